// factor ← decay·factor + (1−decay)·x̄ᵀ diag(w) x̄ / Σw on the CPU for a dense x, for the whole
// factor or for its diagonal blocks. A sparse CSR x goes to sparse_x_factor_update.cpp.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "../blocks.h"
#include "../checks.h"
#include "gram.h"
#include "row_weight.h"

namespace ngcuda::cpu {
namespace {

// The blocks (one block: the whole factor) after their checks. Each block costs N·n_k² / 2: the
// Gram of its own columns of x, never the D×D product.
void update_blocks(at::TensorList blocks, const at::Tensor& x, double decay, bool append_bias,
                   const c10::optional<at::Tensor>& row_weight) {
  if (blocks.empty()) return;
  const auto opts = blocks[0].options();
  at::Tensor rows = x.to(opts.dtype()).contiguous();
  c10::optional<at::Tensor> w;
  double total_weight = static_cast<double>(x.size(0));
  if (row_weight.has_value()) {
    const KeptRows kept = keep_weighted_rows(*row_weight, opts.dtype().toScalarType());
    total_weight = kept.total;
    if (kept.index.has_value()) rows = rows.index_select(0, *kept.index);
    w = kept.weight;
  }
  // An empty batch (no rows, or all weights zero) carries no statistics: the factor stays as it is.
  if (total_weight == 0.0) return;

  const std::vector<BlockSpan> spans = block_spans(blocks, x.size(1), append_bias);
  for (size_t k = 0; k < blocks.size(); ++k) {
    const BlockSpan& s = spans[k];
    if (s.size == 0) continue;
    at::Tensor S = at::zeros({s.size, s.size}, opts);
    accumulate_gram_upper(S, rows.narrow(1, s.start, s.x_cols), w, s.bias);
    blend_upper_into(blocks[k], S, decay, (1.0 - decay) / total_weight);
  }
}

void factor_update_cpu(const at::Tensor& factor, const at::Tensor& x, double decay, bool append_bias,
                       const c10::optional<at::Tensor>& row_weight) {
  check_factor_update(factor, x, decay, append_bias);
  check_row_weight(row_weight, x.size(0), factor);
  update_blocks({factor}, x, decay, append_bias, row_weight);
}

void block_factor_update_cpu(at::TensorList blocks, const at::Tensor& x, double decay,
                             bool append_bias, const c10::optional<at::Tensor>& row_weight) {
  if (!check_block_update(blocks, x, decay, append_bias)) return;
  check_row_weight(row_weight, x.size(0), blocks[0]);
  update_blocks(blocks, x, decay, append_bias, row_weight);
}

}  // namespace

TORCH_LIBRARY_IMPL(ngcuda, CPU, m) {
  m.impl("factor_update_", &factor_update_cpu);
  m.impl("block_factor_update_", &block_factor_update_cpu);
}

}  // namespace ngcuda::cpu
