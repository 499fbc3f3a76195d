// factor_update_, sparse_factor_update_ and their block forms for a sparse CSR x on the CPU (the
// SparseCsrCPU dispatch key). Nothing of size N×d is ever formed: factor_update_ works on x's
// own arrays, sparse_factor_update_ on bounded blocks of the sparse rows of ÂX.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "../blocks.h"
#include "../checks.h"
#include "csr_check.h"
#include "row_weight.h"
#include "sparse_gram.h"

namespace ngcuda::cpu {
namespace {

// Entries of ÂX's sparse rows held at once by sparse_factor_update_ (plus a transposed copy of
// their pattern): a few tens of MB, far below the N×d aggregate.
constexpr int64_t kBlockEntries = 1 << 20;

// The rows that carry weight, with their weights times the blend scale (1 − decay)/Σw.
struct Weighted {
  at::Tensor ids;     // int64 [count]
  at::Tensor scaled;  // [count] in the factor's dtype
  double total = 0.0;
  double scale = 0.0;
};

Weighted weigh_rows(int64_t rows, const c10::optional<at::Tensor>& row_weight, double decay,
                    const at::TensorOptions& opts) {
  Weighted out;
  at::Tensor w;
  out.total = static_cast<double>(rows);
  if (row_weight.has_value()) {
    const KeptRows kept = keep_weighted_rows(*row_weight, opts.dtype().toScalarType());
    out.total = kept.total;
    w = kept.weight;
    if (kept.index.has_value()) out.ids = *kept.index;
  }
  if (!out.ids.defined()) out.ids = at::arange(rows, opts.dtype(at::kLong));
  if (out.total == 0.0) return out;
  out.scale = (1.0 - decay) / out.total;
  out.scaled = w.defined() ? (w * out.scale).contiguous()
                           : at::full({rows}, out.scale, opts);
  return out;
}

template <typename scalar_t>
BlockTargets<scalar_t> targets_of(at::TensorList blocks, int64_t d, bool append_bias) {
  BlockTargets<scalar_t> t;
  t.start.push_back(0);
  for (const BlockSpan& s : block_spans(blocks, d, append_bias)) t.start.push_back(s.start + s.size);
  for (const at::Tensor& b : blocks) t.data.push_back(b.data_ptr<scalar_t>());
  t.bias = append_bias;
  return t;
}

// x̄ᵀ diag(w) x̄ of the sparse x into the blocks, after every check.
void update_blocks_x(at::TensorList blocks, const at::Tensor& x, bool sorted, double decay,
                     bool append_bias, const c10::optional<at::Tensor>& row_weight) {
  const auto opts = blocks[0].options();
  const Weighted rows = weigh_rows(x.size(0), row_weight, decay, opts);
  if (rows.total == 0.0) return;
  const at::Tensor crow = x.crow_indices().contiguous();
  const at::Tensor col = x.col_indices().contiguous();
  const at::Tensor val = x.values().to(opts.dtype()).contiguous();
  const int64_t count = rows.ids.numel();
  const int64_t* ids = rows.ids.data_ptr<int64_t>();
  std::vector<int64_t> begin(count), end(count);
  AT_DISPATCH_FLOATING_TYPES(opts.dtype().toScalarType(), "ngcuda_csr_x_factor_update", [&] {
    AT_DISPATCH_INDEX_TYPES(crow.scalar_type(), "ngcuda_csr_x_factor_update", [&] {
      const index_t* cp = crow.data_ptr<index_t>();
      for (int64_t r = 0; r < count; ++r) {
        begin[r] = cp[ids[r]];
        end[r] = cp[ids[r] + 1];
      }
      SparseRows<scalar_t, index_t> view;
      view.count = count;
      view.begin = begin.data();
      view.end = end.data();
      view.col = col.data_ptr<index_t>();
      view.val = val.data_ptr<scalar_t>();
      view.weight = rows.scaled.data_ptr<scalar_t>();
      view.cols = x.size(1);
      view.sorted = sorted;
      const BlockTargets<scalar_t> targets = targets_of<scalar_t>(blocks, x.size(1), append_bias);
      accumulate_sparse_upper(targets, view, /*scale_first=*/true, decay);
      finish_blocks(targets, rows.scale * rows.total);
    });
  });
}

// Rows ids[0..count) of ÂX as sorted sparse rows: row r written from out_begin[r] on, ending
// at out_end[r]. Each thread gathers into a dense scratch row of size d plus the list of the
// columns it touched, so a row costs its gathered entries, not d.
template <typename scalar_t, typename index_t>
void gather_rows(const int64_t* ids, int64_t count, const int64_t* a_rowptr, const int64_t* a_col,
                 const scalar_t* a_val, const index_t* x_crow, const index_t* x_col,
                 const scalar_t* x_val, int64_t d, const int64_t* out_begin, index_t* y_col,
                 scalar_t* y_val, int64_t* out_end) {
  at::parallel_for(0, count, 8, [&](int64_t r0, int64_t r1) {
    std::vector<scalar_t> acc(d);
    std::vector<uint8_t> seen(d, 0);
    std::vector<index_t> touched;
    for (int64_t r = r0; r < r1; ++r) {
      touched.clear();
      const int64_t m = ids[r];
      for (int64_t e = a_rowptr[m]; e < a_rowptr[m + 1]; ++e) {
        const scalar_t a = a_val != nullptr ? a_val[e] : scalar_t(1);
        const int64_t src = a_col[e];
        for (int64_t q = x_crow[src]; q < x_crow[src + 1]; ++q) {
          const index_t k = x_col[q];
          if (!seen[k]) {
            seen[k] = 1;
            acc[k] = scalar_t(0);
            touched.push_back(k);
          }
          acc[k] += a * x_val[q];
        }
      }
      std::sort(touched.begin(), touched.end());
      int64_t p = out_begin[r];
      for (const index_t k : touched) {
        y_col[p] = k;
        y_val[p] = acc[k];
        seen[k] = 0;
        ++p;
      }
      out_end[r] = p;
    }
  });
}

// (ÂX̄)ᵀ diag(w) (ÂX̄) of the sparse x into the blocks, after every check, one bounded block of
// ÂX's rows at a time.
void update_blocks_agg(at::TensorList blocks, const at::Tensor& rowptr, const at::Tensor& acol,
                       const c10::optional<at::Tensor>& value, const at::Tensor& x, double decay,
                       bool append_bias, const c10::optional<at::Tensor>& row_weight) {
  const auto opts = blocks[0].options();
  const Weighted rows = weigh_rows(rowptr.numel() - 1, row_weight, decay, opts);
  if (rows.total == 0.0) return;
  const at::Tensor crow = x.crow_indices().contiguous();
  const at::Tensor xcol = x.col_indices().contiguous();
  const at::Tensor xval = x.values().to(opts.dtype()).contiguous();
  const at::Tensor aval = value.has_value() ? value->to(opts.dtype()).contiguous() : at::Tensor();
  const int64_t d = x.size(1);
  const int64_t count = rows.ids.numel();
  const int64_t* ids = rows.ids.data_ptr<int64_t>();
  const int64_t* rp = rowptr.data_ptr<int64_t>();
  const int64_t* ac = acol.data_ptr<int64_t>();

  AT_DISPATCH_FLOATING_TYPES(opts.dtype().toScalarType(), "ngcuda_csr_x_sparse_factor_update", [&] {
    AT_DISPATCH_INDEX_TYPES(crow.scalar_type(), "ngcuda_csr_x_sparse_factor_update", [&] {
      const index_t* cp = crow.data_ptr<index_t>();
      // Room for each row of ÂX: at most the sum of its neighbours' entries, and at most d.
      std::vector<int64_t> cap(count);
      at::parallel_for(0, count, 256, [&](int64_t r0, int64_t r1) {
        for (int64_t r = r0; r < r1; ++r) {
          int64_t c = 0;
          for (int64_t e = rp[ids[r]]; e < rp[ids[r] + 1] && c < d; ++e) c += cp[ac[e] + 1] - cp[ac[e]];
          cap[r] = std::min(c, d);
        }
      });
      const BlockTargets<scalar_t> targets = targets_of<scalar_t>(blocks, d, append_bias);
      std::vector<int64_t> begin, end;
      std::vector<index_t> ycol;
      std::vector<scalar_t> yval;
      bool first = true;
      for (int64_t b0 = 0; b0 < count;) {
        // Rows [b0, b1): at least one, then as many as fit in kBlockEntries.
        int64_t b1 = b0, entries = 0;
        while (b1 < count && (b1 == b0 || entries + cap[b1] <= kBlockEntries)) entries += cap[b1++];
        const int64_t nb = b1 - b0;
        begin.assign(nb, 0);
        end.assign(nb, 0);
        for (int64_t r = 1; r < nb; ++r) begin[r] = begin[r - 1] + cap[b0 + r - 1];
        ycol.resize(entries);
        yval.resize(entries);
        gather_rows<scalar_t, index_t>(ids + b0, nb, rp, ac,
                                       aval.defined() ? aval.data_ptr<scalar_t>() : nullptr, cp,
                                       xcol.data_ptr<index_t>(), xval.data_ptr<scalar_t>(), d,
                                       begin.data(), ycol.data(), yval.data(), end.data());
        SparseRows<scalar_t, index_t> view;
        view.count = nb;
        view.begin = begin.data();
        view.end = end.data();
        view.col = ycol.data();
        view.val = yval.data();
        view.weight = rows.scaled.data_ptr<scalar_t>() + b0;
        view.cols = d;
        view.sorted = true;
        accumulate_sparse_upper(targets, view, first, decay);
        first = false;
        b0 = b1;
      }
      finish_blocks(targets, rows.scale * rows.total);
    });
  });
}

void factor_update_csr(const at::Tensor& factor, const at::Tensor& x, double decay,
                       bool append_bias, const c10::optional<at::Tensor>& row_weight) {
  check_factor_update(factor, x, decay, append_bias);
  check_row_weight(row_weight, x.size(0), factor);
  const bool sorted = check_csr_x_values(x);
  update_blocks_x({factor}, x, sorted, decay, append_bias, row_weight);
}

void block_factor_update_csr(at::TensorList blocks, const at::Tensor& x, double decay,
                             bool append_bias, const c10::optional<at::Tensor>& row_weight) {
  if (!check_block_update(blocks, x, decay, append_bias)) return;
  check_row_weight(row_weight, x.size(0), blocks[0]);
  const bool sorted = check_csr_x_values(x);
  update_blocks_x(blocks, x, sorted, decay, append_bias, row_weight);
}

void sparse_factor_update_csr(const at::Tensor& factor, const at::Tensor& rowptr_in,
                              const at::Tensor& col_in, const c10::optional<at::Tensor>& value,
                              const at::Tensor& x, double decay, bool append_bias,
                              const c10::optional<at::Tensor>& row_weight) {
  check_factor_update(factor, x, decay, append_bias);
  const auto [rowptr, col] =
      checked_adjacency(rowptr_in, col_in, value, row_weight, factor, x.size(0));
  check_csr_x_values(x);
  update_blocks_agg({factor}, rowptr, col, value, x, decay, append_bias, row_weight);
}

void sparse_block_factor_update_csr(at::TensorList blocks, const at::Tensor& rowptr_in,
                                    const at::Tensor& col_in,
                                    const c10::optional<at::Tensor>& value, const at::Tensor& x,
                                    double decay, bool append_bias,
                                    const c10::optional<at::Tensor>& row_weight) {
  if (!check_block_update(blocks, x, decay, append_bias)) return;
  const auto [rowptr, col] =
      checked_adjacency(rowptr_in, col_in, value, row_weight, blocks[0], x.size(0));
  check_csr_x_values(x);
  update_blocks_agg(blocks, rowptr, col, value, x, decay, append_bias, row_weight);
}

}  // namespace

TORCH_LIBRARY_IMPL(ngcuda, SparseCsrCPU, m) {
  m.impl("factor_update_", &factor_update_csr);
  m.impl("block_factor_update_", &block_factor_update_csr);
  m.impl("sparse_factor_update_", &sparse_factor_update_csr);
  m.impl("sparse_block_factor_update_", &sparse_block_factor_update_csr);
}

}  // namespace ngcuda::cpu
