// Kernels of factor_update_ and sparse_factor_update_: an upper-triangle tiled SYRK with split-K
// partial tiles (no float atomics: every partial has one writer, and the epilogue sums them in a
// fixed order), the blend epilogue, and the CSR aggregation of a bounded block of rows.
#include <cuda_runtime.h>

#include <cmath>
#include <limits>

#include "eigh_plan.h"
#include "kernels.h"

namespace ngcuda::cuda {
namespace {

constexpr int kTile = static_cast<int>(plan::kSyrkTile);         // 64
constexpr int kStep = static_cast<int>(plan::kSyrkRowsPerStep);  // 16 rows per smem stage
constexpr int kThreads = 256;  // 16 × 16 threads, each owning a 4 × 4 micro-tile
constexpr int kMicro = kTile / 16;

__host__ __device__ inline int64_t tiles_per_side(int64_t D) { return (D + kTile - 1) / kTile; }

// Upper tiles are numbered row by row: tile row I holds tiles (I, I) .. (I, T-1).
__device__ inline void upper_tile(int64_t t, int64_t T, int64_t* I, int64_t* J) {
  int64_t i = 0;
  while (t >= T - i) {
    t -= T - i;
    ++i;
  }
  *I = i;
  *J = i + t;
}

// Element (r, c) of X̄ = [x, 1]: the bias column is 1, columns past D are 0.
template <typename T>
__device__ inline T xbar(const T* x, int64_t r, int64_t c, int64_t d, bool bias) {
  if (c < d) return x[r * d + c];
  return (bias && c == d) ? T(1) : T(0);
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    syrk_upper_kernel(const T* __restrict__ x, const T* __restrict__ w, int64_t rows, int64_t d,
                      bool bias, int64_t T_side, int64_t num_tiles, int64_t rows_per_split,
                      T* __restrict__ partial, double* __restrict__ wsum, int* __restrict__ bad,
                      bool accumulate) {
  __shared__ T As[kStep][kTile];
  __shared__ T Bs[kStep][kTile];
  __shared__ double red[kThreads];

  const int64_t t = blockIdx.x;
  const int64_t k = blockIdx.y;
  int64_t I, J;
  upper_tile(t, T_side, &I, &J);
  const int64_t r_begin = k * rows_per_split;
  const int64_t r_end = r_begin + rows_per_split < rows ? r_begin + rows_per_split : rows;
  const int tid = threadIdx.x;
  const int tx = tid % 16;
  const int ty = tid / 16;
  const int64_t ci0 = I * kTile;
  const int64_t cj0 = J * kTile;

  T acc[kMicro][kMicro];
#pragma unroll
  for (int a = 0; a < kMicro; ++a)
#pragma unroll
    for (int b = 0; b < kMicro; ++b) acc[a][b] = T(0);

  for (int64_t r0 = r_begin; r0 < r_end; r0 += kStep) {
#pragma unroll
    for (int q = 0; q < kStep * kTile / kThreads; ++q) {
      const int e = tid + kThreads * q;
      const int rr = e / kTile;
      const int cc = e % kTile;
      const int64_t r = r0 + rr;
      T av = T(0), bv = T(0);
      if (r < r_end) {
        const T wv = w != nullptr ? w[r] : T(1);
        // A row of weight 0 is left out entirely, so NaN or Inf in it cannot reach the factor.
        if (wv != T(0)) {
          av = xbar(x, r, ci0 + cc, d, bias) * wv;
          bv = xbar(x, r, cj0 + cc, d, bias);
        }
      }
      As[rr][cc] = av;
      Bs[rr][cc] = bv;
    }
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < kStep; ++kk) {
      T a[kMicro], b[kMicro];
#pragma unroll
      for (int u = 0; u < kMicro; ++u) a[u] = As[kk][ty + 16 * u];
#pragma unroll
      for (int u = 0; u < kMicro; ++u) b[u] = Bs[kk][tx + 16 * u];
#pragma unroll
      for (int u = 0; u < kMicro; ++u)
#pragma unroll
        for (int v = 0; v < kMicro; ++v) acc[u][v] = fma(a[u], b[v], acc[u][v]);
    }
    __syncthreads();
  }

  T* out = partial + (k * num_tiles + t) * (kTile * kTile);
#pragma unroll
  for (int u = 0; u < kMicro; ++u)
#pragma unroll
    for (int v = 0; v < kMicro; ++v) {
      const int idx = (ty + 16 * u) * kTile + tx + 16 * v;
      out[idx] = accumulate ? out[idx] + acc[u][v] : acc[u][v];
    }

  if (t == 0) {
    double s = 0.0;
    int invalid = 0;
    for (int64_t r = r_begin + tid; r < r_end; r += kThreads) {
      const double wv = w != nullptr ? static_cast<double>(w[r]) : 1.0;
      if (!(wv >= 0.0) || isinf(wv)) invalid = 1;
      s += wv;
    }
    red[tid] = s;
    invalid = __syncthreads_or(invalid);
    for (int half = kThreads / 2; half > 0; half /= 2) {
      if (tid < half) red[tid] += red[tid + half];
      __syncthreads();
    }
    if (tid == 0) {
      wsum[k] = accumulate ? wsum[k] + red[0] : red[0];
      if (invalid) *bad = 1;
    }
  }
}

template <typename T>
__global__ void blend_epilogue_kernel(T* __restrict__ f, int64_t D, int64_t T_side,
                                      int64_t num_tiles, int64_t ksplit,
                                      const T* __restrict__ partial,
                                      const double* __restrict__ wsum, const int* __restrict__ bad,
                                      double decay) {
  __shared__ double total_s;
  __shared__ int bad_s;
  if (threadIdx.x == 0) {
    double s = 0.0;
    for (int64_t k = 0; k < ksplit; ++k) s += wsum[k];
    total_s = s;
    bad_s = *bad;
  }
  __syncthreads();
  const double total = total_s;
  const bool poison = bad_s != 0;
  // No weight means no statistics: the factor keeps its value, as on the CPU.
  if (!poison && total == 0.0) return;

  const int64_t t = blockIdx.x;
  int64_t I, J;
  upper_tile(t, T_side, &I, &J);
  const T a = static_cast<T>(decay);
  const T b = static_cast<T>((1.0 - decay) / total);
  const T nan = std::numeric_limits<T>::quiet_NaN();
  for (int e = threadIdx.x; e < kTile * kTile; e += blockDim.x) {
    const int ii = e / kTile;
    const int jj = e % kTile;
    const int64_t i = I * kTile + ii;
    const int64_t j = J * kTile + jj;
    if (i >= D || j >= D || i > j) continue;
    T v;
    if (poison) {
      v = nan;
    } else {
      T s = T(0);
      for (int64_t k = 0; k < ksplit; ++k) s += partial[(k * num_tiles + t) * (kTile * kTile) + e];
      // decay 0 must forget the old factor even where it holds Inf or NaN.
      v = (a == T(0) ? T(0) : a * f[i * D + j]) + b * s;
    }
    f[i * D + j] = v;
    f[j * D + i] = v;
  }
}

template <typename T>
__global__ void blend_dense_kernel(T* __restrict__ f, int64_t D, const T* __restrict__ S,
                                   const double* __restrict__ wsum, const int* __restrict__ bad,
                                   double decay) {
  const double total = wsum[0];
  const bool poison = *bad != 0;
  if (!poison && total == 0.0) return;
  const T a = static_cast<T>(decay);
  const T b = static_cast<T>((1.0 - decay) / total);
  const T nan = std::numeric_limits<T>::quiet_NaN();
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < D * D;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t i = e / D;
    const int64_t j = e - i * D;
    if (i > j) continue;
    const T v = poison ? nan : (a == T(0) ? T(0) : a * f[e]) + b * S[e];
    f[e] = v;
    f[j * D + i] = v;
  }
}

constexpr int kAggThreads = 256;
constexpr int kAggCols = 4;  // columns per lane per pass over the row's edges

// One warp per row: lanes split the columns, each pass walks the row's edges once.
template <typename T>
__global__ void __launch_bounds__(kAggThreads)
    csr_aggregate_kernel(const int64_t* __restrict__ rowptr, const int64_t* __restrict__ col,
                         const T* __restrict__ value, const T* __restrict__ x, int64_t x_rows,
                         int64_t d, int64_t nnz, int64_t num_rows, const T* __restrict__ w,
                         int64_t row0, int64_t rows, T* __restrict__ out, int* __restrict__ bad) {
  const int lane = threadIdx.x % 32;
  const int64_t local = static_cast<int64_t>(blockIdx.x) * (kAggThreads / 32) + threadIdx.x / 32;
  if (local >= rows) return;
  const int64_t r = row0 + local;
  int64_t b = rowptr[r];
  int64_t e = rowptr[r + 1];
  bool ok = b >= 0 && e >= b && e <= nnz;
  if (r == 0 && b != 0) ok = false;
  if (r == num_rows - 1 && e != nnz) ok = false;
  if (!ok) {
    if (lane == 0) atomicOr(bad, 1);
    b = e = 0;
  }
  if (w != nullptr && w[r] == T(0)) b = e = 0;
  if (d == 0 && lane == 0) {  // no column pass below to check the edges' sources
    for (int64_t p = b; p < e; ++p) {
      if (col[p] < 0 || col[p] >= x_rows) atomicOr(bad, 1);
    }
  }
  T* y = out + local * d;
  for (int64_t c0 = 0; c0 < d; c0 += 32 * kAggCols) {
    T acc[kAggCols];
#pragma unroll
    for (int u = 0; u < kAggCols; ++u) acc[u] = T(0);
    for (int64_t p = b; p < e; ++p) {
      const int64_t c = col[p];
      if (c < 0 || c >= x_rows) {
        if (lane == 0) atomicOr(bad, 1);
        continue;
      }
      const T v = value != nullptr ? value[p] : T(1);
      const T* xr = x + c * d;
#pragma unroll
      for (int u = 0; u < kAggCols; ++u) {
        const int64_t kcol = c0 + lane + 32 * u;
        if (kcol < d) acc[u] = fma(v, xr[kcol], acc[u]);
      }
    }
#pragma unroll
    for (int u = 0; u < kAggCols; ++u) {
      const int64_t kcol = c0 + lane + 32 * u;
      if (kcol < d) y[kcol] = acc[u];
    }
  }
}

}  // namespace

template <typename T>
cudaError_t launch_syrk_upper(const T* x, const T* w, int64_t rows, int64_t d, bool bias,
                              int64_t ksplit, T* partial, double* wsum, int* bad, bool accumulate,
                              cudaStream_t stream) {
  const int64_t D = d + (bias ? 1 : 0);
  const int64_t T_side = tiles_per_side(D);
  const int64_t num_tiles = T_side * (T_side + 1) / 2;
  if (num_tiles == 0 || ksplit <= 0) return cudaSuccess;
  int64_t rps = (rows + ksplit - 1) / ksplit;
  rps = plan::align_up(rps > 0 ? rps : 1, kStep);
  const dim3 grid(static_cast<unsigned>(num_tiles), static_cast<unsigned>(ksplit));
  syrk_upper_kernel<T><<<grid, kThreads, 0, stream>>>(x, w, rows, d, bias, T_side, num_tiles, rps,
                                                      partial, wsum, bad, accumulate);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_blend_epilogue(T* factor, int64_t D, int64_t ksplit, const T* partial,
                                  const double* wsum, const int* bad, double decay,
                                  cudaStream_t stream) {
  const int64_t T_side = tiles_per_side(D);
  const int64_t num_tiles = T_side * (T_side + 1) / 2;
  if (num_tiles == 0) return cudaSuccess;
  blend_epilogue_kernel<T><<<static_cast<unsigned>(num_tiles), 256, 0, stream>>>(
      factor, D, T_side, num_tiles, ksplit, partial, wsum, bad, decay);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_blend_dense(T* factor, int64_t D, const T* S, const double* wsum,
                               const int* bad, double decay, cudaStream_t stream) {
  if (D <= 0) return cudaSuccess;
  int64_t blocks = (D * D + 255) / 256;
  if (blocks > 4096) blocks = 4096;
  blend_dense_kernel<T><<<static_cast<unsigned>(blocks), 256, 0, stream>>>(factor, D, S, wsum, bad,
                                                                            decay);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_csr_aggregate(const int64_t* rowptr, const int64_t* col, const T* value,
                                 const T* x, int64_t x_rows, int64_t d, int64_t nnz,
                                 int64_t num_rows, const T* w, int64_t row0, int64_t rows, T* out,
                                 int* bad, cudaStream_t stream) {
  if (rows <= 0) return cudaSuccess;
  const int64_t per_block = kAggThreads / 32;
  const int64_t blocks = (rows + per_block - 1) / per_block;
  csr_aggregate_kernel<T><<<static_cast<unsigned>(blocks), kAggThreads, 0, stream>>>(
      rowptr, col, value, x, x_rows, d, nnz, num_rows, w, row0, rows, out, bad);
  return cudaGetLastError();
}

#define NGCUDA_INSTANTIATE(T)                                                                    \
  template cudaError_t launch_syrk_upper<T>(const T*, const T*, int64_t, int64_t, bool, int64_t, \
                                            T*, double*, int*, bool, cudaStream_t);               \
  template cudaError_t launch_blend_epilogue<T>(T*, int64_t, int64_t, const T*, const double*,   \
                                                const int*, double, cudaStream_t);               \
  template cudaError_t launch_blend_dense<T>(T*, int64_t, const T*, const double*, const int*,   \
                                             double, cudaStream_t);                              \
  template cudaError_t launch_csr_aggregate<T>(const int64_t*, const int64_t*, const T*,         \
                                               const T*, int64_t, int64_t, int64_t, int64_t,     \
                                               const T*, int64_t, int64_t, T*, int*,             \
                                               cudaStream_t);
NGCUDA_INSTANTIATE(float)
NGCUDA_INSTANTIATE(double)
#undef NGCUDA_INSTANTIATE

}  // namespace ngcuda::cuda
