// Jacobi rotations on one dense symmetric matrix, on buffers the caller owns (the warm
// refinement's cluster blocks), and the sorted output shared by the CPU eigensolvers.
//
// Layout: `b` is the full symmetric matrix, row-major [n, n]; `vt` holds the eigenvector
// estimates as ROWS (Vᵀ, row-major), so a rotation of columns p, q of V updates two contiguous
// rows. A rotation updates rows p, q of `b` (contiguous, vectorisable) and then mirrors them into
// columns p, q, which keeps `b` exactly symmetric.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <numeric>

#if defined(__GNUC__)
#define NGCUDA_ALWAYS_INLINE inline __attribute__((always_inline))
#define NGCUDA_RESTRICT __restrict__
#else
#define NGCUDA_ALWAYS_INLINE inline
#define NGCUDA_RESTRICT
#endif

namespace ngcuda::cpu::jacobi {

// (x, y) ← (c·x − s·y, s·x + c·y) elementwise over two rows of length n.
template <typename T>
NGCUDA_ALWAYS_INLINE void rotate_rows(T* NGCUDA_RESTRICT x, T* NGCUDA_RESTRICT y, int64_t n, T c,
                                      T s) {
#pragma GCC ivdep
  for (int64_t k = 0; k < n; ++k) {
    const T xk = x[k], yk = y[k];
    x[k] = c * xk - s * yk;
    y[k] = s * xk + c * yk;
  }
}

// One cyclic-by-rows sweep over the pairs for which rotate(b_pq, b_pp, b_qq) holds. Returns the
// number of rotations applied.
template <typename T, typename Pred>
NGCUDA_ALWAYS_INLINE int64_t sweep_where(T* NGCUDA_RESTRICT b, T* NGCUDA_RESTRICT vt, int64_t n,
                                         Pred rotate) {
  // Beyond this |θ|, θ² + 1 would overflow; t = 1/(2θ) is then exact to working precision.
  const T big_theta = sizeof(T) == 4 ? T(1e15) : T(1e150);
  int64_t applied = 0;
  for (int64_t p = 0; p + 1 < n; ++p) {
    T* bp = b + p * n;
    for (int64_t q = p + 1; q < n; ++q) {
      const T apq = bp[q];
      T* bq = b + q * n;
      const T app = bp[p], aqq = bq[q];
      if (!rotate(apq, app, aqq)) continue;
      // Rutishauser: t = tan φ is the smaller root of t² + 2θt − 1 = 0, so |φ| ≤ π/4.
      const T theta = (aqq - app) / (T(2) * apq);
      const T abs_theta = std::abs(theta);
      T t = abs_theta > big_theta ? T(0.5) / abs_theta
                                  : T(1) / (abs_theta + std::sqrt(abs_theta * abs_theta + T(1)));
      if (theta < T(0)) t = -t;
      const T c = T(1) / std::sqrt(t * t + T(1));
      const T s = t * c;
      rotate_rows(bp, bq, n, c, s);
      // The 2×2 block gets its exact values (Golub–Van Loan 8.5): the pair is now decoupled.
      bp[p] = app - t * apq;
      bq[q] = aqq + t * apq;
      bp[q] = T(0);
      bq[p] = T(0);
      for (int64_t k = 0; k < n; ++k) {
        b[k * n + p] = bp[k];
        b[k * n + q] = bq[k];
      }
      rotate_rows(vt + p * n, vt + q * n, n, c, s);
      ++applied;
    }
  }
  return applied;
}

// Writes eigenvalues (the final diagonal `diag`) ascending and eigenvectors (rows of `vt`) as
// the COLUMNS of row-major `vectors` [n, n], converting to the output type. `order` is scratch
// of n entries.
template <typename C, typename T>
NGCUDA_ALWAYS_INLINE void sorted_output(const C* NGCUDA_RESTRICT diag, const C* NGCUDA_RESTRICT vt,
                                        int64_t n, int64_t* NGCUDA_RESTRICT order,
                                        T* NGCUDA_RESTRICT values, T* NGCUDA_RESTRICT vectors) {
  std::iota(order, order + n, int64_t(0));
  std::sort(order, order + n, [&](int64_t i, int64_t j) { return diag[i] < diag[j]; });
  for (int64_t j = 0; j < n; ++j) values[j] = static_cast<T>(diag[order[j]]);
  for (int64_t j = 0; j < n; ++j) {
    const C* src = vt + order[j] * n;
    for (int64_t r = 0; r < n; ++r) vectors[r * n + j] = static_cast<T>(src[r]);
  }
}

}  // namespace ngcuda::cpu::jacobi
