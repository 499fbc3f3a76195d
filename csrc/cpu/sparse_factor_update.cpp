// factor ← decay·factor + (1−decay)·(ÂX̄)ᵀ diag(w) (ÂX̄) / Σw on the CPU, one block of rows at a
// time, so that the [rows, d] aggregate ÂX is never held in memory at once.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "../blocks.h"
#include "../checks.h"
#include "csr_check.h"
#include "gram.h"
#include "row_weight.h"

namespace ngcuda::cpu {
namespace {

// Bytes of aggregated rows held at once: large enough for an efficient GEMM per block, small
// enough to stay far below the N×d aggregate it replaces.
constexpr int64_t kBlockBytes = 4 << 20;

template <typename scalar_t>
void aggregate_rows(scalar_t* out, const int64_t* rows, int64_t count, const int64_t* rowptr,
                    const int64_t* col, const scalar_t* value, const scalar_t* x, int64_t d) {
  at::parallel_for(0, count, 16, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      scalar_t* __restrict__ y = out + r * d;
      std::fill(y, y + d, scalar_t(0));
      const int64_t row = rows[r];
      for (int64_t e = rowptr[row]; e < rowptr[row + 1]; ++e) {
        const scalar_t v = value != nullptr ? value[e] : scalar_t(1);
        const scalar_t* __restrict__ xr = x + col[e] * d;
        for (int64_t k = 0; k < d; ++k) y[k] += v * xr[k];
      }
    }
  });
}

// The blocks (one block: the whole factor) after their checks; rowptr and col contiguous.
void update_blocks(at::TensorList blocks, const at::Tensor& rowptr, const at::Tensor& col,
                   const c10::optional<at::Tensor>& value, const at::Tensor& x, double decay,
                   bool append_bias, const c10::optional<at::Tensor>& row_weight) {
  const int64_t rows = rowptr.numel() - 1;
  const auto opts = blocks[0].options();
  at::Tensor row_ids;
  c10::optional<at::Tensor> w;
  double total_weight = static_cast<double>(rows);
  if (row_weight.has_value()) {
    const KeptRows kept = keep_weighted_rows(*row_weight, opts.dtype().toScalarType());
    total_weight = kept.total;
    w = kept.weight;
    if (kept.index.has_value()) row_ids = *kept.index;
  }
  if (total_weight == 0.0) return;
  if (!row_ids.defined()) row_ids = at::arange(rows, rowptr.options());

  const at::Tensor xs = x.to(opts.dtype()).contiguous();
  const at::Tensor vs = value.has_value() ? value->to(opts.dtype()).contiguous() : at::Tensor();
  const int64_t d = x.size(1);
  const int64_t count = row_ids.numel();
  const int64_t block =
      std::max<int64_t>(1, std::min<int64_t>(count, kBlockBytes / (std::max<int64_t>(d, 1) *
                                                                    blocks[0].element_size())));
  const std::vector<BlockSpan> spans = block_spans(blocks, d, append_bias);
  std::vector<at::Tensor> S;
  for (const BlockSpan& s : spans) S.push_back(at::zeros({s.size, s.size}, opts));
  at::Tensor buffer = at::empty({block, d}, opts);

  AT_DISPATCH_FLOATING_TYPES(opts.dtype().toScalarType(), "ngcuda_sparse_factor_update", [&] {
    for (int64_t b0 = 0; b0 < count; b0 += block) {
      const int64_t nb = std::min(block, count - b0);
      at::Tensor Y = buffer.narrow(0, 0, nb);
      aggregate_rows<scalar_t>(Y.data_ptr<scalar_t>(), row_ids.data_ptr<int64_t>() + b0, nb,
                               rowptr.data_ptr<int64_t>(), col.data_ptr<int64_t>(),
                               vs.defined() ? vs.data_ptr<scalar_t>() : nullptr,
                               xs.data_ptr<scalar_t>(), d);
      c10::optional<at::Tensor> wb;
      if (w.has_value()) wb = w->narrow(0, b0, nb);
      for (size_t k = 0; k < spans.size(); ++k) {
        if (spans[k].size == 0) continue;
        accumulate_gram_upper(S[k], Y.narrow(1, spans[k].start, spans[k].x_cols), wb,
                              spans[k].bias);
      }
    }
  });
  for (size_t k = 0; k < spans.size(); ++k) {
    if (spans[k].size > 0) blend_upper_into(blocks[k], S[k], decay, (1.0 - decay) / total_weight);
  }
}

void sparse_factor_update_cpu(const at::Tensor& factor, const at::Tensor& rowptr_in,
                              const at::Tensor& col_in, const c10::optional<at::Tensor>& value,
                              const at::Tensor& x, double decay, bool append_bias,
                              const c10::optional<at::Tensor>& row_weight) {
  check_factor_update(factor, x, decay, append_bias);
  const auto [rowptr, col] =
      checked_adjacency(rowptr_in, col_in, value, row_weight, factor, x.size(0));
  update_blocks({factor}, rowptr, col, value, x, decay, append_bias, row_weight);
}

void sparse_block_factor_update_cpu(at::TensorList blocks, const at::Tensor& rowptr_in,
                                    const at::Tensor& col_in,
                                    const c10::optional<at::Tensor>& value, const at::Tensor& x,
                                    double decay, bool append_bias,
                                    const c10::optional<at::Tensor>& row_weight) {
  if (!check_block_update(blocks, x, decay, append_bias)) return;
  const auto [rowptr, col] =
      checked_adjacency(rowptr_in, col_in, value, row_weight, blocks[0], x.size(0));
  update_blocks(blocks, rowptr, col, value, x, decay, append_bias, row_weight);
}

}  // namespace

TORCH_LIBRARY_IMPL(ngcuda, CPU, m) {
  m.impl("sparse_factor_update_", &sparse_factor_update_cpu);
  m.impl("sparse_block_factor_update_", &sparse_block_factor_update_cpu);
}

}  // namespace ngcuda::cpu
