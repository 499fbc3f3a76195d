// Densifies bounded blocks of rows of a sparse-CSR x (or of ÂX for such an x) for the SYRK of
// factor_kernels.cu, so that no N×d intermediate is ever formed on the device.
#include <cuda_runtime.h>

#include "kernels.h"

namespace ngcuda::cuda {
namespace {

constexpr int kThreads = 256;  // 8 warps, one output row each

// One warp per output row. Lane l owns the output columns c ≡ l (mod 32): it zeroes them and
// adds every entry that falls on them, in entry order. Every lane reads every entry (the loads
// are broadcasts), which costs the row's entries once per lane but needs no atomics, so repeated
// columns add up deterministically.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    csr_x_rows_kernel(const int64_t* __restrict__ a_rowptr, const int64_t* __restrict__ a_col,
                      const T* __restrict__ a_val, int64_t a_nnz, int64_t num_rows,
                      const int64_t* __restrict__ x_crow, const int64_t* __restrict__ x_col,
                      const T* __restrict__ x_val, int64_t x_rows, int64_t d, int64_t x_nnz,
                      const T* __restrict__ w, int64_t row0, int64_t rows, T* __restrict__ out,
                      int* __restrict__ bad) {
  const int lane = threadIdx.x % 32;
  const int64_t local = static_cast<int64_t>(blockIdx.x) * (kThreads / 32) + threadIdx.x / 32;
  if (local >= rows) return;
  const int64_t r = row0 + local;
  T* y = out + local * d;
  for (int64_t c = lane; c < d; c += 32) y[c] = T(0);
  // X's end pointers, checked once per call (the per-row checks below cannot see them).
  if (local == 0 && lane == 0 && (x_crow[0] != 0 || x_crow[x_rows] != x_nnz)) atomicOr(bad, 1);

  int64_t b = r, e = r + 1;  // Â = I: the row's own row of X
  if (a_rowptr != nullptr) {
    b = a_rowptr[r];
    e = a_rowptr[r + 1];
    bool ok = b >= 0 && e >= b && e <= a_nnz;
    if (r == 0 && b != 0) ok = false;
    if (r == num_rows - 1 && e != a_nnz) ok = false;
    if (!ok) {
      if (lane == 0) atomicOr(bad, 1);
      b = e = 0;
    }
  }
  // After the row-pointer checks, as the dense-x aggregate: a bad Â poisons the factor even when
  // the broken row carries no weight.
  if (w != nullptr && w[r] == T(0)) return;
  for (int64_t p = b; p < e; ++p) {
    const int64_t src = a_rowptr != nullptr ? a_col[p] : p;
    const T a = (a_rowptr != nullptr && a_val != nullptr) ? a_val[p] : T(1);
    if (src < 0 || src >= x_rows) {
      if (lane == 0) atomicOr(bad, 1);
      continue;
    }
    const int64_t qb = x_crow[src];
    const int64_t qe = x_crow[src + 1];
    if (!(qb >= 0 && qe >= qb && qe <= x_nnz)) {
      if (lane == 0) atomicOr(bad, 1);
      continue;
    }
    for (int64_t q = qb; q < qe; ++q) {
      const int64_t c = x_col[q];
      if (c < 0 || c >= d) {
        if (lane == 0) atomicOr(bad, 1);
        continue;
      }
      if (static_cast<int>(c % 32) == lane) y[c] += a * x_val[q];
    }
  }
}

}  // namespace

template <typename T>
cudaError_t launch_csr_x_rows(const int64_t* a_rowptr, const int64_t* a_col, const T* a_val,
                              int64_t a_nnz, int64_t num_rows, const int64_t* x_crow,
                              const int64_t* x_col, const T* x_val, int64_t x_rows, int64_t d,
                              int64_t x_nnz, const T* w, int64_t row0, int64_t rows, T* out,
                              int* bad, cudaStream_t stream) {
  if (rows <= 0) return cudaSuccess;
  const int64_t per_block = kThreads / 32;
  const int64_t blocks = (rows + per_block - 1) / per_block;
  csr_x_rows_kernel<T><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
      a_rowptr, a_col, a_val, a_nnz, num_rows, x_crow, x_col, x_val, x_rows, d, x_nnz, w, row0,
      rows, out, bad);
  return cudaGetLastError();
}

#define NGCUDA_INSTANTIATE(T)                                                                    \
  template cudaError_t launch_csr_x_rows<T>(const int64_t*, const int64_t*, const T*, int64_t,   \
                                            int64_t, const int64_t*, const int64_t*, const T*,   \
                                            int64_t, int64_t, int64_t, const T*, int64_t,        \
                                            int64_t, T*, int*, cudaStream_t);
NGCUDA_INSTANTIATE(float)
NGCUDA_INSTANTIATE(double)
#undef NGCUDA_INSTANTIATE

}  // namespace ngcuda::cuda
