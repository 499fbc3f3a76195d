// Cold eigensolver for small dense symmetric matrices, in float64 on this thread's buffers:
// Householder reduction to tridiagonal form, Qᵀ formed from the reflectors, then implicit QL with
// Wilkinson shifts whose rotations are applied to the rows of Qᵀ (the eigenvectors as rows, so a
// rotation of columns i, i+1 of V updates two contiguous rows).
//
// Why our own: at the sizes K-FAC factors have (tens to a couple of hundred), LAPACK's ?syevd
// through ATen is bound by per-call overhead and level-2 kernels (measured single-threaded on a
// Zen 5 EPYC, 64 K-FAC-like float32 factors of n = 64: 143–200 µs a matrix in our loop, against 83
// here). Everything here stays in L1/L2, the inner loops are contiguous row operations, the QL
// rotation chains of several matrices are interleaved to hide their latency, and float64
// throughout leaves a float32 result rounded once (‖QᵀQ − I‖_F 3.5e-7 at n = 64; LAPACK's float32
// result 6.5e-6).
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
// thread's buffers, four n² doubles per matrix, kept for the life of the thread.
template <typename T>
void solve(int count, const Matrix<T>* mats, bool* ok);

}  // namespace ngcuda::cpu::tridiag
