// precondition on CUDA: the rotations into and out of the eigenbases are cuBLAS GEMMs through
// ATen, batched over the layers of equal shape, and the scaling of every layer is one launch.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/matmul.h>
#include <ATen/ops/stack.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <map>
#include <tuple>
#include <vector>

#include "../precondition_checks.h"
#include "kernels.h"

namespace ngcuda::cuda {
namespace {

at::Tensor stack_or_unsqueeze(at::TensorList ts, const std::vector<size_t>& group) {
  if (group.size() == 1) return ts[group[0]].unsqueeze(0);
  std::vector<at::Tensor> parts;
  parts.reserve(group.size());
  for (size_t l : group) parts.push_back(ts[l]);
  return at::stack(parts);
}

std::vector<at::Tensor> precondition_cuda(at::TensorList grads, at::TensorList QA,
                                          at::TensorList lamA, at::TensorList QG,
                                          at::TensorList lamG, double damping) {
  check_precondition_args(grads, QA, lamA, QG, lamG, damping);
  const size_t L = grads.size();
  std::vector<at::Tensor> out(L);
  if (L == 0) return out;
  const c10::cuda::CUDAGuard guard(grads[0].device());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();

  // Layers of one shape and dtype share their GEMMs.
  std::map<std::tuple<int64_t, int64_t, int>, std::vector<size_t>> groups;
  for (size_t l = 0; l < L; ++l) {
    groups[{grads[l].size(0), grads[l].size(1), static_cast<int>(grads[l].scalar_type())}]
        .push_back(l);
  }
  struct Rotated {
    std::vector<size_t> layers;
    at::Tensor qg, qa, t;  // [k, d_out, d_out], [k, d_in, d_in], [k, d_out, d_in]
  };
  std::vector<Rotated> rotated;
  for (const auto& [key, layers] : groups) {
    Rotated r;
    r.layers = layers;
    r.qg = stack_or_unsqueeze(QG, layers);
    r.qa = stack_or_unsqueeze(QA, layers);
    const at::Tensor g = stack_or_unsqueeze(grads, layers);
    r.t = at::matmul(at::matmul(r.qg.mT(), g), r.qa).contiguous();
    rotated.push_back(std::move(r));
  }

  for (const at::ScalarType dtype : {at::kFloat, at::kDouble}) {
    std::vector<int64_t> desc;
    std::vector<at::Tensor> keep;
    int64_t max_elems = 0;
    for (const Rotated& r : rotated) {
      if (r.t.scalar_type() != dtype) continue;
      for (size_t k = 0; k < r.layers.size(); ++k) {
        const size_t l = r.layers[k];
        const at::Tensor t = r.t[static_cast<int64_t>(k)];
        const at::Tensor lg = lamG[l].contiguous();
        const at::Tensor la = lamA[l].contiguous();
        keep.insert(keep.end(), {lg, la});
        desc.insert(desc.end(), {reinterpret_cast<int64_t>(t.data_ptr()),
                                 reinterpret_cast<int64_t>(lg.data_ptr()),
                                 reinterpret_cast<int64_t>(la.data_ptr()), t.size(0), t.size(1)});
        max_elems = std::max(max_elems, t.numel());
      }
    }
    if (desc.empty() || max_elems == 0) continue;
    at::Tensor pinned = at::empty({static_cast<int64_t>(desc.size())},
                                  at::TensorOptions().dtype(at::kLong).pinned_memory(true));
    std::copy(desc.begin(), desc.end(), pinned.data_ptr<int64_t>());
    const at::Tensor desc_dev =
        pinned.to(at::TensorOptions().device(grads[0].device()), /*non_blocking=*/true);
    const int64_t layers = static_cast<int64_t>(desc.size() / 5);
    AT_DISPATCH_FLOATING_TYPES(dtype, "ngcuda_precondition_cuda", [&] {
      C10_CUDA_CHECK(launch_scale_eigenbasis<scalar_t>(desc_dev.data_ptr<int64_t>(), layers,
                                                       max_elems, damping, stream));
    });
  }

  for (const Rotated& r : rotated) {
    const at::Tensor res = at::matmul(at::matmul(r.qg, r.t), r.qa.mT());
    for (size_t k = 0; k < r.layers.size(); ++k) out[r.layers[k]] = res[static_cast<int64_t>(k)];
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(ngcuda, CUDA, m) { m.impl("precondition", &precondition_cuda); }

}  // namespace ngcuda::cuda
