// The dense-x factor ops on CUDA, for the block ops that compose them.
#pragma once

#include <ATen/core/Tensor.h>

namespace ngcuda::cuda {

void factor_update_cuda(const at::Tensor& factor, const at::Tensor& x, double decay,
                        bool append_bias, const c10::optional<at::Tensor>& row_weight);

void sparse_factor_update_cuda(const at::Tensor& factor, const at::Tensor& rowptr,
                               const at::Tensor& col, const c10::optional<at::Tensor>& value,
                               const at::Tensor& x, double decay, bool append_bias,
                               const c10::optional<at::Tensor>& row_weight);

}  // namespace ngcuda::cuda
