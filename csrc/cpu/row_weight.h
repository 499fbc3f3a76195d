// Row weights on the CPU: validation and the selection of the rows that carry weight.
#pragma once

#include <ATen/ATen.h>

namespace ngcuda::cpu {

struct KeptRows {
  // Indices of the rows with non-zero weight, or nullopt when every row is kept.
  c10::optional<at::Tensor> index;
  // The weights of the kept rows, in the factor's dtype.
  at::Tensor weight;
  double total = 0.0;
};

// Checks that every weight is finite and non-negative, then keeps the rows of non-zero weight,
// so that a sparse mask costs only its own rows.
KeptRows keep_weighted_rows(const at::Tensor& row_weight, at::ScalarType dtype);

}  // namespace ngcuda::cpu
