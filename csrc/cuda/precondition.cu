// precondition on CUDA: the rotations run as cuBLAS GEMMs through ATen, and the eigenbasis
// scaling of every layer runs in one fused kernel launch.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "../precondition_checks.h"

namespace ngcuda::cuda {
namespace {

template <typename scalar_t>
__global__ void scale_in_eigenbasis_kernel(scalar_t* __restrict__ t, const scalar_t* __restrict__ lam_g,
                                           const scalar_t* __restrict__ lam_a, int64_t rows,
                                           int64_t cols, scalar_t damping) {
  const int64_t total = rows * cols;
  for (int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; idx < total;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t i = idx / cols;
    const int64_t j = idx - i * cols;
    t[idx] /= lam_g[i] * lam_a[j] + damping;
  }
}

std::vector<at::Tensor> precondition_cuda(at::TensorList grads, at::TensorList QA,
                                          at::TensorList lamA, at::TensorList QG,
                                          at::TensorList lamG, double damping) {
  check_precondition_args(grads, QA, lamA, QG, lamG, damping);
  std::vector<at::Tensor> out;
  out.reserve(grads.size());
  if (grads.empty()) return out;
  const c10::cuda::CUDAGuard guard(grads[0].device());
  const auto stream = at::cuda::getCurrentCUDAStream();
  for (size_t l = 0; l < grads.size(); ++l) {
    at::Tensor t = at::mm(at::mm(QG[l].t(), grads[l]), QA[l]).contiguous();
    const at::Tensor lg = lamG[l].contiguous();
    const at::Tensor la = lamA[l].contiguous();
    const int64_t total = t.numel();
    if (total > 0) {
      const int threads = 256;
      const int blocks = static_cast<int>(std::min<int64_t>((total + threads - 1) / threads, 4096));
      AT_DISPATCH_FLOATING_TYPES(t.scalar_type(), "ngcuda_precondition_cuda", [&] {
        scale_in_eigenbasis_kernel<scalar_t><<<blocks, threads, 0, stream>>>(
            t.data_ptr<scalar_t>(), lg.data_ptr<scalar_t>(), la.data_ptr<scalar_t>(), t.size(0),
            t.size(1), static_cast<scalar_t>(damping));
      });
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    out.push_back(at::mm(at::mm(QG[l], t), QA[l].t()));
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(ngcuda, CUDA, m) { m.impl("precondition", &precondition_cuda); }

}  // namespace ngcuda::cuda
