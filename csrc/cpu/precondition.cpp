// Q_G [(Q_Gᵀ g Q_A) / (λ_G λ_Aᵀ + damping)] Q_Aᵀ for every layer, on the CPU.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "../checks.h"
#include "../precondition_checks.h"

namespace ngcuda::cpu {
namespace {

template <typename scalar_t>
void scale_in_eigenbasis(scalar_t* t, const scalar_t* lam_g, const scalar_t* lam_a, int64_t rows,
                         int64_t cols, scalar_t damping) {
  at::parallel_for(0, rows, 64, [&](int64_t r0, int64_t r1) {
    for (int64_t i = r0; i < r1; ++i) {
      for (int64_t j = 0; j < cols; ++j) t[i * cols + j] /= lam_g[i] * lam_a[j] + damping;
    }
  });
}

std::vector<at::Tensor> precondition_cpu(at::TensorList grads, at::TensorList QA,
                                         at::TensorList lamA, at::TensorList QG,
                                         at::TensorList lamG, double damping) {
  check_precondition_args(grads, QA, lamA, QG, lamG, damping);
  std::vector<at::Tensor> out;
  out.reserve(grads.size());
  for (size_t l = 0; l < grads.size(); ++l) {
    at::Tensor t = at::mm(at::mm(QG[l].t(), grads[l]), QA[l]).contiguous();
    const at::Tensor lg = lamG[l].contiguous();
    const at::Tensor la = lamA[l].contiguous();
    AT_DISPATCH_FLOATING_TYPES(t.scalar_type(), "ngcuda_precondition", [&] {
      scale_in_eigenbasis<scalar_t>(t.data_ptr<scalar_t>(), lg.data_ptr<scalar_t>(),
                                    la.data_ptr<scalar_t>(), t.size(0), t.size(1),
                                    static_cast<scalar_t>(damping));
    });
    out.push_back(at::mm(at::mm(QG[l], t), QA[l].t()));
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(ngcuda, CPU, m) { m.impl("precondition", &precondition_cpu); }

}  // namespace ngcuda::cpu
