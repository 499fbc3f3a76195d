// Cold eigensolver for one small dense symmetric matrix, in float64 on buffers the caller owns:
// Householder reduction to tridiagonal form, the orthogonal factor formed explicitly, then
// implicit QL with Wilkinson shifts, its rotations applied to the eigenvectors.
//
// Why our own: at the sizes K-FAC factors have (tens to a few hundred), LAPACK's ?syevd through
// ATen spends most of its time in per-call overhead and level-2 kernels that are not tuned for this
// CPU (measured on a Zen 5 EPYC: 210 µs at n = 64 single-threaded for float32). Here everything
// stays in L1/L2, every inner loop is a contiguous row operation the compiler vectorises, and
// float64 throughout gives float32 results rounded once.
//
// Layout: `a` row-major [n, n], full symmetric; `wt` receives the eigenvectors as ROWS (Vᵀ), so a
// QL rotation of columns i, i+1 of V updates two contiguous rows.
#pragma once

#include <cstdint>

namespace ngcuda::cpu::tridiag {

// Matrices solved together: their QL phases are interleaved (see ImplicitQl in the .cpp).
constexpr int kGroup = 4;

template <typename T>
struct Matrix {
  const T* a;    // row-major [n, n], symmetric; the lower triangle is read
  int64_t n;
  T* values;     // [n]: eigenvalues, ascending
  T* vectors;    // [n, n]: eigenvectors as columns
};

// Eigendecomposition of `count` (1..kGroup) matrices. ok[k] is false, and matrix k's outputs are
// untouched, in the rare case its QL does not converge (the caller then uses LAPACK). Uses this
// thread's buffers, about 4·n² doubles per matrix.
template <typename T>
void solve(int count, const Matrix<T>* mats, bool* ok);

}  // namespace ngcuda::cpu::tridiag
