// Kernels of batched_eigh: a two-sided parallel-order Jacobi with the matrix and its eigenvectors
// in shared memory (one CTA per matrix, matrices of any mix of sizes in one launch), and the
// status kernels around the cuSOLVER calls for the sizes that do not fit.
#include <cuda_runtime.h>

#include <cmath>
#include <limits>

#include "eigh_plan.h"
#include "kernels.h"

namespace ngcuda::cuda {
namespace {

// Σ a_ij² over the n×n matrix in shared memory (off-diagonal only when offdiag), in float64 and
// a fixed order, returned to every thread. All threads must call it.
template <typename T>
__device__ double block_sum_squares(const T* A, int n, int lda, bool offdiag, double* red) {
  double s = 0.0;
  for (int e = threadIdx.x; e < n * n; e += blockDim.x) {
    const int i = e / n;
    const int j = e - i * n;
    if (offdiag && i == j) continue;
    const double v = static_cast<double>(A[i * lda + j]);
    s += v * v;
  }
  for (int off = 16; off > 0; off /= 2) s += __shfl_down_sync(0xffffffffu, s, off);
  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (lane == 0) red[warp] = s;
  __syncthreads();
  if (warp == 0) {
    const int warps = blockDim.x / 32;
    double v = lane < warps ? red[lane] : 0.0;
    for (int off = 16; off > 0; off /= 2) v += __shfl_down_sync(0xffffffffu, v, off);
    if (lane == 0) red[32] = v;
  }
  __syncthreads();
  const double total = red[32];
  __syncthreads();  // red is reused by the next call
  return total;
}

template <typename T>
__device__ void fill_nan(T* vals, T* vecs, int n) {
  const T nan = std::numeric_limits<T>::quiet_NaN();
  for (int e = threadIdx.x; e < n; e += blockDim.x) vals[e] = nan;
  for (int e = threadIdx.x; e < n * n; e += blockDim.x) vecs[e] = nan;
}

// The rotation that zeroes a_pq of the symmetric 2×2 block [[app, apq], [apq, aqq]]
// (Golub & Van Loan, Algorithm 8.4.1): c, s and t = s/c.
template <typename T>
__device__ void sym_schur2(T app, T aqq, T apq, T* c, T* s, T* t) {
  const T theta = (aqq - app) / (T(2) * apq);
  T tt;
  // For huge θ the exact t ≈ 1/(2θ), and θ² would overflow.
  if (fabs(theta) > T(1e15)) {
    tt = T(0.5) / theta;
  } else {
    const T sign = theta >= T(0) ? T(1) : T(-1);
    tt = sign / (fabs(theta) + sqrt(T(1) + theta * theta));
  }
  const T cc = T(1) / sqrt(T(1) + tt * tt);
  *c = cc;
  *s = tt * cc;
  *t = tt;
}

// 512 threads at most (plan::jacobi_threads); the bound keeps the register count launchable.
template <typename T>
__global__ void __launch_bounds__(512) jacobi_eigh_kernel(const int64_t* __restrict__ desc, int* __restrict__ status,
                                   double tol, int max_sweeps, double warm_limit) {
  const int64_t* dsc = desc + static_cast<int64_t>(blockIdx.x) * kJacobiDescFields;
  const T* in = reinterpret_cast<const T*>(dsc[0]);
  const double* warm_in = reinterpret_cast<const double*>(dsc[1]);
  const double* warm_v = reinterpret_cast<const double*>(dsc[2]);
  const double* warm_err = reinterpret_cast<const double*>(dsc[3]);
  T* vals = reinterpret_cast<T*>(dsc[4]);
  T* vecs = reinterpret_cast<T*>(dsc[5]);
  const int n = static_cast<int>(dsc[6]);
  const int64_t sidx = dsc[7];
  // The warm start is taken only when the previous basis is orthonormal (NaN compares false),
  // so a stale or wrong prev_eigenvectors can cost sweeps but never correctness.
  const bool warm = warm_in != nullptr && warm_v != nullptr && warm_err != nullptr &&
                    *warm_err <= warm_limit;

  // W is the compute type (float64 for both input types; see eigh_plan.h).
  using W = double;
  const plan::JacobiLayout L = plan::jacobi_layout(n);
  extern __shared__ __align__(16) unsigned char smem[];
  W* A = reinterpret_cast<W*>(smem + L.a_off);
  W* V = reinterpret_cast<W*>(smem + L.v_off);
  const int half = static_cast<int>(L.m / 2);
  W* rc = reinterpret_cast<W*>(smem + L.rot_off);
  W* rs = rc + half;
  W* rdp = rs + half;
  W* rdq = rdp + half;
  double* red = reinterpret_cast<double*>(smem + L.red_off);
  int* P = reinterpret_cast<int*>(smem + L.pq_off);
  int* Q = P + half;
  int* rank = reinterpret_cast<int*>(smem + L.rank_off);
  const int lda = static_cast<int>(L.lda);
  const int m = static_cast<int>(L.m);
  const int tid = threadIdx.x;
  const int nt = blockDim.x;

  // Load A (checking every entry of the input) and V (the warm-start basis, or I); warm, A is
  // the input rotated into that basis, QᵀAQ.
  int nonfinite = 0;
  for (int e = tid; e < n * n; e += nt) {
    const int i = e / n;
    const int j = e - i * n;
    const T a = in[e];
    if (!isfinite(a)) nonfinite = 1;
    A[i * lda + j] = warm ? warm_in[e] : static_cast<W>(a);
    V[i * lda + j] = warm ? warm_v[e] : (i == j ? W(1) : W(0));
  }
  if (__syncthreads_or(nonfinite)) {
    fill_nan(vals, vecs, n);
    if (tid == 0) status[sidx] = 1;
    return;
  }
  // Like LAPACK's eigh with UPLO='L': the lower triangle defines the matrix.
  for (int e = tid; e < n * n; e += nt) {
    const int i = e / n;
    const int j = e - i * n;
    if (j > i) A[i * lda + j] = A[j * lda + i];
  }
  __syncthreads();

  const double norm2 = block_sum_squares(A, n, lda, false, red);
  const double stop2 = tol * tol * norm2;
  bool converged = false;
  for (int sweep = 0;; ++sweep) {
    const double off2 = block_sum_squares(A, n, lda, true, red);
    if (off2 <= stop2) {
      converged = true;
      break;
    }
    if (sweep >= max_sweeps) break;
    const double skip_below = plan::kSkipRms * sqrt(off2 / (static_cast<double>(n) * (n - 1)));
    for (int r = 0; r < m - 1; ++r) {
      // 1. The rotation of each pair of this round, from the current 2×2 blocks.
      for (int i = tid; i < half; i += nt) {
        int64_t p64, q64;
        plan::round_robin_pair(m, r, i, &p64, &q64);
        const int p = static_cast<int>(p64);
        int q = static_cast<int>(q64);
        W c = W(1), s = W(0), t = W(0);
        if (q < n) {
          const W apq = A[p * lda + q];
          const W app = A[p * lda + p];
          const W aqq = A[q * lda + q];
          const bool tiny_in_cluster = fabs(apq) < skip_below &&
                                       fabs(aqq - app) < W(2 * plan::kSkipTheta) * fabs(apq);
          if (apq != W(0) && !tiny_in_cluster) {
            sym_schur2(app, aqq, apq, &c, &s, &t);
            rdp[i] = app - t * apq;
            rdq[i] = aqq + t * apq;
          } else {
            q = -1;  // zero, or left for later (see kSkipRms): no rotation
          }
        } else {
          q = -1;  // a bye of the odd-n schedule
        }
        P[i] = p;
        Q[i] = q;
        rc[i] = c;
        rs[i] = s;
      }
      __syncthreads();
      // 2. Rows p and q of every pair: A ← Jᵀ A. Pairs own disjoint rows.
      for (int e = tid; e < half * n; e += nt) {
        const int i = e / n;
        const int k = e - i * n;
        const int q = Q[i];
        if (q < 0) continue;
        const int p = P[i];
        const W c = rc[i], s = rs[i];
        const W x = A[p * lda + k];
        const W y = A[q * lda + k];
        A[p * lda + k] = c * x - s * y;
        A[q * lda + k] = s * x + c * y;
      }
      __syncthreads();
      // 3. Columns p and q: A ← A J and V ← V J. Pairs own disjoint columns.
      for (int e = tid; e < half * n; e += nt) {
        const int i = e / n;
        const int k = e - i * n;
        const int q = Q[i];
        if (q < 0) continue;
        const int p = P[i];
        const W c = rc[i], s = rs[i];
        const W x = A[k * lda + p];
        const W y = A[k * lda + q];
        A[k * lda + p] = c * x - s * y;
        A[k * lda + q] = s * x + c * y;
        const W vx = V[k * lda + p];
        const W vy = V[k * lda + q];
        V[k * lda + p] = c * vx - s * vy;
        V[k * lda + q] = s * vx + c * vy;
      }
      __syncthreads();
      // 4. The rotated 2×2 blocks exactly: diagonal from the closed form, a_pq = 0.
      for (int i = tid; i < half; i += nt) {
        const int q = Q[i];
        if (q < 0) continue;
        const int p = P[i];
        A[p * lda + p] = rdp[i];
        A[q * lda + q] = rdq[i];
        A[p * lda + q] = W(0);
        A[q * lda + p] = W(0);
      }
      __syncthreads();
    }
  }

  int broken = 0;
  for (int i = tid; i < n; i += nt) {
    if (!isfinite(A[i * lda + i])) broken = 1;
  }
  if (__syncthreads_or(broken)) {
    fill_nan(vals, vecs, n);
    if (tid == 0) status[sidx] = 3;
    return;
  }
  // Ascending order: the rank of each eigenvalue, ties broken by index (a permutation because
  // every value is finite).
  for (int i = tid; i < n; i += nt) {
    const W di = A[i * lda + i];
    int r = 0;
    for (int j = 0; j < n; ++j) {
      const W dj = A[j * lda + j];
      r += (dj < di || (dj == di && j < i)) ? 1 : 0;
    }
    rank[i] = r;
    vals[r] = static_cast<T>(di);
  }
  __syncthreads();
  for (int e = tid; e < n * n; e += nt) {
    const int i = e / n;
    const int j = e - i * n;
    vecs[static_cast<int64_t>(i) * n + rank[j]] = static_cast<T>(V[i * lda + j]);
  }
  if (tid == 0) status[sidx] = converged ? 0 : 2;
}

template <typename T>
__global__ void screen_nonfinite_kernel(T* __restrict__ mats, int64_t n, const int* __restrict__ index,
                                        int* __restrict__ status) {
  T* a = mats + static_cast<int64_t>(blockIdx.x) * n * n;
  int nonfinite = 0;
  for (int64_t e = threadIdx.x; e < n * n; e += blockDim.x) {
    if (!isfinite(a[e])) nonfinite = 1;
  }
  if (!__syncthreads_or(nonfinite)) return;
  for (int64_t e = threadIdx.x; e < n * n; e += blockDim.x) {
    a[e] = (e / n == e % n) ? T(1) : T(0);
  }
  if (threadIdx.x == 0) status[index[blockIdx.x]] = 1;
}

__global__ void solver_status_kernel(const int* __restrict__ info, int64_t count,
                                     const int* __restrict__ index, int* __restrict__ status) {
  const int64_t b = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (b >= count) return;
  const int s = index[b];
  if (status[s] == 0 && info[b] != 0) status[s] = 3;
}

}  // namespace

template <typename T>
cudaError_t launch_jacobi_eigh(const int64_t* desc, int64_t count, int64_t threads,
                               int64_t smem_bytes, int* status, double tol, int64_t max_sweeps,
                               double warm_limit, cudaStream_t stream) {
  if (count <= 0) return cudaSuccess;
  cudaError_t err = cudaFuncSetAttribute(jacobi_eigh_kernel<T>,
                                         cudaFuncAttributeMaxDynamicSharedMemorySize,
                                         static_cast<int>(smem_bytes));
  if (err != cudaSuccess) return err;
  const int sweeps = max_sweeps > 1000000 ? 1000000 : static_cast<int>(max_sweeps);
  jacobi_eigh_kernel<T><<<static_cast<unsigned>(count), static_cast<unsigned>(threads),
                          static_cast<size_t>(smem_bytes), stream>>>(desc, status, tol, sweeps,
                                                                     warm_limit);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_screen_nonfinite(T* mats, int64_t n, int64_t count, const int* index,
                                    int* status, cudaStream_t stream) {
  if (count <= 0 || n <= 0) return cudaSuccess;
  screen_nonfinite_kernel<T><<<static_cast<unsigned>(count), 256, 0, stream>>>(mats, n, index,
                                                                                status);
  return cudaGetLastError();
}

cudaError_t launch_solver_status(const int* info, int64_t count, const int* index, int* status,
                                 cudaStream_t stream) {
  if (count <= 0) return cudaSuccess;
  const int threads = 128;
  const unsigned blocks = static_cast<unsigned>((count + threads - 1) / threads);
  solver_status_kernel<<<blocks, threads, 0, stream>>>(info, count, index, status);
  return cudaGetLastError();
}

template cudaError_t launch_jacobi_eigh<float>(const int64_t*, int64_t, int64_t, int64_t, int*,
                                               double, int64_t, double, cudaStream_t);
template cudaError_t launch_jacobi_eigh<double>(const int64_t*, int64_t, int64_t, int64_t, int*,
                                                double, int64_t, double, cudaStream_t);
template cudaError_t launch_screen_nonfinite<float>(float*, int64_t, int64_t, const int*, int*,
                                                    cudaStream_t);
template cudaError_t launch_screen_nonfinite<double>(double*, int64_t, int64_t, const int*, int*,
                                                     cudaStream_t);

}  // namespace ngcuda::cuda
