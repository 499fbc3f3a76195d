// factor ← decay·factor + (1−decay)·x̄ᵀ diag(w) x̄ / Σw on the CPU.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "../checks.h"
#include "gram.h"
#include "row_weight.h"

namespace ngcuda::cpu {
namespace {

void factor_update_cpu(const at::Tensor& factor, const at::Tensor& x, double decay, bool append_bias,
                       const c10::optional<at::Tensor>& row_weight) {
  check_float(x, "x");
  check_dim(x, 2, "x");
  check_same_device(x, factor, "x", "factor");
  check_factor(factor, x.size(1) + (append_bias ? 1 : 0));
  check_decay(decay);
  check_row_weight(row_weight, x.size(0), factor);

  const auto opts = factor.options();
  at::Tensor rows = x.to(opts.dtype()).contiguous();
  c10::optional<at::Tensor> w;
  double total_weight = static_cast<double>(x.size(0));
  if (row_weight.has_value()) {
    const KeptRows kept = keep_weighted_rows(*row_weight, factor.scalar_type());
    total_weight = kept.total;
    if (kept.index.has_value()) rows = rows.index_select(0, *kept.index);
    w = kept.weight;
  }
  // An empty batch (no rows, or all weights zero) carries no statistics: the factor stays as it is.
  if (total_weight == 0.0) return;

  at::Tensor S = at::zeros({factor.size(0), factor.size(0)}, opts);
  accumulate_gram_upper(S, rows, w, append_bias);
  blend_upper_into(factor, S, decay, (1.0 - decay) / total_weight);
}

}  // namespace

TORCH_LIBRARY_IMPL(ngcuda, CPU, m) { m.impl("factor_update_", &factor_update_cpu); }

}  // namespace ngcuda::cpu
