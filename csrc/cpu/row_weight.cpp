#include "row_weight.h"

#include <c10/util/Exception.h>

namespace ngcuda::cpu {

KeptRows keep_weighted_rows(const at::Tensor& row_weight, at::ScalarType dtype) {
  const at::Tensor w = row_weight.to(at::kDouble);
  TORCH_CHECK(at::isfinite(w).all().item<bool>(), "ngcuda: row_weight must be finite");
  TORCH_CHECK(!(w < 0).any().item<bool>(), "ngcuda: row_weight must be non-negative");
  KeptRows kept;
  kept.total = w.sum().item<double>();
  const at::Tensor nonzero = w.ne(0);
  const int64_t count = nonzero.sum().item<int64_t>();
  if (count < w.numel()) {
    kept.index = nonzero.nonzero().squeeze(1);
    kept.weight = row_weight.index_select(0, *kept.index).to(dtype);
  } else {
    kept.weight = row_weight.to(dtype);
  }
  return kept;
}

}  // namespace ngcuda::cpu
