// Launchers of ngcuda's CUDA kernels, with plain pointer arguments. The kernels live in the *.cu
// files, which include no torch headers (they compile in seconds); the ops in the *.cpp files do
// the checks, allocation and dispatch. Every launcher returns cudaGetLastError() after its launch.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace ngcuda::cuda {

// One pass of the upper-triangle SYRK over `rows` rows of X̄ = [x, 1?] (x: rows × d, row-major),
// weighted by w (rows entries, or null for ones). Grid: one CTA per (upper 64×64 tile, split).
// partial[k][t][64][64] receives the split-k sum of tile t (added to its old value when
// accumulate). The CTAs of tile 0 also write Σw of their rows to wsum[k] (double, added when
// accumulate) and set *bad = 1 on a negative or non-finite weight.
template <typename T>
cudaError_t launch_syrk_upper(const T* x, const T* w, int64_t rows, int64_t d, bool bias,
                              int64_t ksplit, T* partial, double* wsum, int* bad, bool accumulate,
                              cudaStream_t stream);

// factor ← decay·factor + (1−decay)·sym(S)/Σw from the partial tiles: S = Σ_k partial[k], Σw =
// Σ_k wsum[k] (fixed order). Σw = 0 leaves the factor as it is; *bad ≠ 0 fills it with NaN.
template <typename T>
cudaError_t launch_blend_epilogue(T* factor, int64_t D, int64_t ksplit, const T* partial,
                                  const double* wsum, const int* bad, double decay,
                                  cudaStream_t stream);

// The same blend from a dense row-major D×D S (upper triangle read), Σw = wsum[0], for the TF32
// path whose S comes from cuBLAS.
template <typename T>
cudaError_t launch_blend_dense(T* factor, int64_t D, const T* S, const double* wsum,
                               const int* bad, double decay, cudaStream_t stream);

// out[r - row0] = Σ_e value[e]·x[col[e]] over rows r ∈ [row0, row0 + rows) of the CSR (rowptr
// [num_rows + 1], col/value [nnz]); rows of weight 0 are written as zeros without a gather.
// Malformed rows (rowptr not monotone or outside [0, nnz]) count as empty, out-of-range columns
// are skipped; both set *bad = 1.
template <typename T>
cudaError_t launch_csr_aggregate(const int64_t* rowptr, const int64_t* col, const T* value,
                                 const T* x, int64_t x_rows, int64_t d, int64_t nnz,
                                 int64_t num_rows, const T* w, int64_t row0, int64_t rows, T* out,
                                 int* bad, cudaStream_t stream);

// Dense rows of a sparse-CSR x, or of ÂX for such an x: out[r − row0] = Σ_{e ∈ Â row r} a_e ·
// X[col_e, :] over rows r ∈ [row0, row0 + rows), with X in CSR (x_crow [x_rows + 1], x_col /
// x_val [x_nnz], d columns); with a_rowptr null, Â is the identity (out = X's rows themselves).
// Rows of weight 0 are written as zeros without a gather. Repeated columns within a row of X add
// up. Malformed rows of Â or X (pointers not monotone or outside [0, nnz]) count as empty and
// out-of-range column indices are skipped; both set *bad = 1.
template <typename T>
cudaError_t launch_csr_x_rows(const int64_t* a_rowptr, const int64_t* a_col, const T* a_val,
                              int64_t a_nnz, int64_t num_rows, const int64_t* x_crow,
                              const int64_t* x_col, const T* x_val, int64_t x_rows, int64_t d,
                              int64_t x_nnz, const T* w, int64_t row0, int64_t rows, T* out,
                              int* bad, cudaStream_t stream);

// Jacobi eigendecomposition, one CTA per matrix, computing in float64. desc holds
// kJacobiDescFields int64 per matrix: the input (T*, n×n row-major, lower triangle used); the
// warm start's QᵀAQ, its basis Q and ‖QᵀQ − I‖_F (three double*, or 0 for a cold start; the warm
// start is used only where that error is ≤ warm_limit); the eigenvalue and eigenvector outputs
// (T*); n; the status index. smem_bytes must cover jacobi_layout(n) of every matrix. Writes
// status 0 (converged), 1 (NaN/Inf input), 2 (not converged in max_sweeps), 3 (broken result).
constexpr int64_t kJacobiDescFields = 8;
template <typename T>
cudaError_t launch_jacobi_eigh(const int64_t* desc, int64_t count, int64_t threads,
                               int64_t smem_bytes, int* status, double tol, int64_t max_sweeps,
                               double warm_limit, cudaStream_t stream);

// Before a cuSOLVER call on `count` stacked n×n matrices: status[index[b]] = 1 and the matrix
// replaced by the identity (so the solver sees finite data) when matrix b holds NaN or Inf.
template <typename T>
cudaError_t launch_screen_nonfinite(T* mats, int64_t n, int64_t count, const int* index,
                                    int* status, cudaStream_t stream);

// After a cuSOLVER call: status[index[b]] = 3 where info[b] ≠ 0 and the status is still 0.
cudaError_t launch_solver_status(const int* info, int64_t count, const int* index, int* status,
                                 cudaStream_t stream);

// t_l[i, j] /= lamG_l[i]·lamA_l[j] + damping for every layer l in one launch. desc holds
// 5 int64 per layer: t, lamG and lamA pointers, rows, cols.
template <typename T>
cudaError_t launch_scale_eigenbasis(const int64_t* desc, int64_t layers, int64_t max_elems,
                                    double damping, cudaStream_t stream);

}  // namespace ngcuda::cuda
