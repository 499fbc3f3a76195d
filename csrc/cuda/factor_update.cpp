// factor_update_ and sparse_factor_update_ on CUDA. Nothing here synchronises with the host:
// Σw, the Σw = 0 rule, the row-weight check and the CSR check all happen on the device.
//
// What the CPU raises as errors, the device cannot raise without a sync. Here a negative or
// non-finite row weight, a rowptr that is not monotone or not within [0, nnz], or a column index
// outside [0, N) fills the factor with NaN instead (memory is never read out of bounds): the next
// batched_eigh then reports the factor as NON_FINITE. Column indices of rows with weight 0 are
// never read, so they are not checked.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/Context.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/full.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>
#include <torch/version.h>

#include <algorithm>

#include "../checks.h"
#include "eigh_plan.h"
#include "factor_ops.h"
#include "kernels.h"
#include "syrk_workspace.h"

namespace ngcuda::cuda {
namespace {

// torch's own matmuls decide so since 2.9. allowTF32CuBLAS() raises there once a user has set
// only the new torch.backends.cuda.matmul.fp32_precision, and ignores NoTF32Guard.
bool tf32_matmul_allowed() {
#if TORCH_VERSION_MAJOR > 2 || (TORCH_VERSION_MAJOR == 2 && TORCH_VERSION_MINOR >= 9)
  return !at::NoTF32Guard::should_disable_tf32() &&
         at::globalContext().float32Precision(at::Float32Backend::CUDA, at::Float32Op::MATMUL) ==
             at::Float32Precision::TF32;
#else
  return !at::NoTF32Guard::should_disable_tf32() && at::globalContext().allowTF32CuBLAS();
#endif
}

// The TF32 path (float32 factors when torch allows TF32 in CUDA matmuls): the Gram
// matrix from one cuBLAS GEMM on tensor cores (10-bit mantissa products, ~3e-4 relative error),
// the bias column and Σw from reductions, all on the device, then the same blend.
void factor_update_tf32(const at::Tensor& factor, const at::Tensor& x, double decay,
                        bool append_bias, const at::Tensor& w, cudaStream_t stream) {
  const int64_t d = x.size(1);
  const int64_t D = factor.size(0);
  at::Tensor xs = x.to(at::kFloat);
  at::Tensor xw = xs;
  at::Tensor wsum, bad;
  if (w.defined()) {
    // A row of weight 0 is left out entirely, so NaN or Inf in it cannot reach the factor.
    xs = xs.masked_fill(w.eq(0).unsqueeze(1), 0.0);
    xw = xs.mul(w.unsqueeze(1));
    wsum = w.sum(at::kDouble).reshape({1});
    bad = w.lt(0).logical_or(w.isfinite().logical_not()).any().to(at::kInt).reshape({1});
  } else {
    wsum = at::full({1}, static_cast<double>(x.size(0)), factor.options().dtype(at::kDouble));
    bad = at::zeros({1}, factor.options().dtype(at::kInt));
  }
  at::Tensor S = at::empty({D, D}, factor.options());
  at::Tensor gram = S.narrow(0, 0, d).narrow(1, 0, d);
  at::mm_out(gram, xw.t(), xs);
  if (append_bias) {
    S.narrow(0, 0, d).select(1, d).copy_(xw.sum(0));
    S.select(0, d).narrow(0, d, 1).copy_(wsum.to(at::kFloat));
  }
  C10_CUDA_CHECK(launch_blend_dense<float>(ptr<float>(factor), D, ptr<float>(S),
                                           ptr<double>(wsum), ptr<int>(bad), decay, stream));
}

}  // namespace

void factor_update_cuda(const at::Tensor& factor, const at::Tensor& x, double decay,
                        bool append_bias, const c10::optional<at::Tensor>& row_weight) {
  check_factor_update(factor, x, decay, append_bias);
  check_row_weight(row_weight, x.size(0), factor);
  const int64_t N = x.size(0);
  const int64_t d = x.size(1);
  if (N == 0 || factor.size(0) == 0) return;
  const c10::cuda::CUDAGuard guard(factor.device());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const at::Tensor w = weights_as(row_weight, factor);
  if (factor.scalar_type() == at::kFloat && tf32_matmul_allowed()) {
    factor_update_tf32(factor, x, decay, append_bias, w, stream);
    return;
  }
  const at::Tensor xs = x.to(factor.scalar_type()).contiguous();
  SyrkWorkspace ws = make_workspace(factor, N);
  AT_DISPATCH_FLOATING_TYPES(factor.scalar_type(), "ngcuda_factor_update_cuda", [&] {
    C10_CUDA_CHECK(launch_syrk_upper<scalar_t>(ptr<scalar_t>(xs), ptr<scalar_t>(w), N, d,
                                               append_bias, ws.ksplit, ptr<scalar_t>(ws.partial),
                                               ptr<double>(ws.wsum), ptr<int>(ws.bad),
                                               /*accumulate=*/false, stream));
    C10_CUDA_CHECK(launch_blend_epilogue<scalar_t>(ptr<scalar_t>(factor), factor.size(0),
                                                   ws.ksplit, ptr<scalar_t>(ws.partial),
                                                   ptr<double>(ws.wsum), ptr<int>(ws.bad), decay,
                                                   stream));
  });
}

void sparse_factor_update_cuda(const at::Tensor& factor, const at::Tensor& rowptr_in,
                               const at::Tensor& col_in, const c10::optional<at::Tensor>& value,
                               const at::Tensor& x, double decay, bool append_bias,
                               const c10::optional<at::Tensor>& row_weight) {
  check_factor_update(factor, x, decay, append_bias);
  check_csr_shapes(rowptr_in, col_in, value, factor);
  const int64_t M = rowptr_in.numel() - 1;
  check_row_weight(row_weight, M, factor);
  if (M == 0 || factor.size(0) == 0) return;
  const c10::cuda::CUDAGuard guard(factor.device());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const at::Tensor rowptr = rowptr_in.contiguous();
  const at::Tensor col = col_in.contiguous();
  const at::Tensor xs = x.to(factor.scalar_type()).contiguous();
  const at::Tensor vs =
      value.has_value() ? value->to(factor.scalar_type()).contiguous() : at::Tensor();
  const at::Tensor w = weights_as(row_weight, factor);
  const int64_t d = x.size(1);
  const int64_t row_bytes = std::max<int64_t>(d, 1) * factor.element_size();
  const int64_t chunk = std::min<int64_t>(M, std::max<int64_t>(plan::kSyrkRowsPerStep,
                                                               kChunkBytes / row_bytes));
  const at::Tensor buffer = at::empty({chunk, d}, factor.options());
  SyrkWorkspace ws = make_workspace(factor, chunk);
  AT_DISPATCH_FLOATING_TYPES(factor.scalar_type(), "ngcuda_sparse_factor_update_cuda", [&] {
    const scalar_t* wp = ptr<scalar_t>(w);
    for (int64_t r0 = 0; r0 < M; r0 += chunk) {
      const int64_t rows = std::min(chunk, M - r0);
      C10_CUDA_CHECK(launch_csr_aggregate<scalar_t>(
          ptr<int64_t>(rowptr), ptr<int64_t>(col), ptr<scalar_t>(vs), ptr<scalar_t>(xs),
          x.size(0), d, col.numel(), M, wp, r0, rows, ptr<scalar_t>(buffer), ptr<int>(ws.bad),
          stream));
      C10_CUDA_CHECK(launch_syrk_upper<scalar_t>(
          ptr<scalar_t>(buffer), wp != nullptr ? wp + r0 : nullptr, rows, d, append_bias,
          ws.ksplit, ptr<scalar_t>(ws.partial), ptr<double>(ws.wsum), ptr<int>(ws.bad),
          /*accumulate=*/r0 > 0, stream));
    }
    C10_CUDA_CHECK(launch_blend_epilogue<scalar_t>(ptr<scalar_t>(factor), factor.size(0),
                                                   ws.ksplit, ptr<scalar_t>(ws.partial),
                                                   ptr<double>(ws.wsum), ptr<int>(ws.bad), decay,
                                                   stream));
  });
}

TORCH_LIBRARY_IMPL(ngcuda, CUDA, m) {
  m.impl("factor_update_", &factor_update_cuda);
  m.impl("sparse_factor_update_", &sparse_factor_update_cuda);
}

}  // namespace ngcuda::cuda
