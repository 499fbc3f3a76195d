// Argument checks of precondition, shared by the CPU, CUDA and Meta kernels.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/SymInt.h>
#include <c10/util/Exception.h>

#include "checks.h"

namespace ngcuda {

inline void check_precondition_args(at::TensorList grads, at::TensorList QA, at::TensorList lamA,
                                    at::TensorList QG, at::TensorList lamG, double damping) {
  const size_t L = grads.size();
  TORCH_CHECK(QA.size() == L && lamA.size() == L && QG.size() == L && lamG.size() == L,
              "ngcuda: precondition needs one QA, lamA, QG and lamG per gradient; got ", L,
              " grads, ", QA.size(), " QA, ", lamA.size(), " lamA, ", QG.size(), " QG, ",
              lamG.size(), " lamG");
  TORCH_CHECK(damping >= 0.0, "ngcuda: damping must be non-negative, got ", damping);
  for (size_t l = 0; l < L; ++l) {
    const at::Tensor& g = grads[l];
    check_float(g, "grads[i]");
    // One call runs on one device: the CUDA kernel reads every layer's pointers there.
    TORCH_CHECK(g.device() == grads[0].device(), "ngcuda: precondition: grads[", l, "] is on ",
                g.device(), " but grads[0] is on ", grads[0].device(), "; one call takes one device");
    TORCH_CHECK(g.dim() == 2, "ngcuda: grads[", l, "] must be 2-D [d_out, d_in(+1)], got shape ",
                g.sym_sizes());
    const c10::SymInt dout = g.sym_size(0), din = g.sym_size(1);
    TORCH_CHECK(QA[l].dim() == 2 && QA[l].sym_size(0) == din && QA[l].sym_size(1) == din, "ngcuda: QA[", l,
                "] must be [", din, ", ", din, "] to match grads[", l, "], got ", QA[l].sym_sizes());
    TORCH_CHECK(QG[l].dim() == 2 && QG[l].sym_size(0) == dout && QG[l].sym_size(1) == dout, "ngcuda: QG[",
                l, "] must be [", dout, ", ", dout, "] to match grads[", l, "], got ",
                QG[l].sym_sizes());
    TORCH_CHECK(lamA[l].dim() == 1 && lamA[l].sym_size(0) == din, "ngcuda: lamA[", l, "] must be [",
                din, "], got ", lamA[l].sym_sizes());
    TORCH_CHECK(lamG[l].dim() == 1 && lamG[l].sym_size(0) == dout, "ngcuda: lamG[", l, "] must be [",
                dout, "], got ", lamG[l].sym_sizes());
    for (const at::Tensor* t : {&QA[l], &QG[l], &lamA[l], &lamG[l]}) {
      TORCH_CHECK(t->scalar_type() == g.scalar_type(), "ngcuda: layer ", l,
                  " mixes dtypes: grads is ", g.scalar_type(), " but a factor tensor is ",
                  t->scalar_type());
      TORCH_CHECK(t->device() == g.device(), "ngcuda: layer ", l, " mixes devices: grads is on ",
                  g.device(), " but a factor tensor is on ", t->device());
    }
  }
}

}  // namespace ngcuda
