#include "csr_check.h"

#include <c10/util/Exception.h>

#include <algorithm>

#include "../checks.h"

namespace ngcuda::cpu {

void check_csr_values(const at::Tensor& rowptr, const at::Tensor& col, int64_t x_rows) {
  const int64_t nnz = col.numel();
  const int64_t* rp = rowptr.data_ptr<int64_t>();
  const int64_t rows = rowptr.numel() - 1;
  TORCH_CHECK(rp[0] == 0, "ngcuda: rowptr must start at 0, got ", rp[0]);
  TORCH_CHECK(rp[rows] == nnz, "ngcuda: rowptr must end at nnz = ", nnz, " (the length of col), got ",
              rp[rows]);
  for (int64_t i = 0; i < rows; ++i) {
    TORCH_CHECK(rp[i + 1] >= rp[i], "ngcuda: rowptr must be non-decreasing, but rowptr[", i + 1,
                "] = ", rp[i + 1], " < rowptr[", i, "] = ", rp[i]);
  }
  // One pass over col in plain code: two reductions through ATen cost more than the update itself
  // on a small graph (each wakes the thread pool).
  const int64_t* c = col.data_ptr<int64_t>();
  int64_t lo = 0, hi = 0;
  if (nnz > 0) lo = hi = c[0];
  for (int64_t e = 1; e < nnz; ++e) {
    lo = std::min(lo, c[e]);
    hi = std::max(hi, c[e]);
  }
  TORCH_CHECK(nnz == 0 || (lo >= 0 && hi < x_rows), "ngcuda: col holds indices in [", lo, ", ", hi,
              "], outside the ", x_rows, " rows of x");
}

namespace {

template <typename index_t>
bool check_csr_x_typed(const at::Tensor& crow_t, const at::Tensor& col_t, int64_t rows,
                       int64_t cols) {
  const index_t* crow = crow_t.data_ptr<index_t>();
  const index_t* col = col_t.data_ptr<index_t>();
  const int64_t nnz = col_t.numel();
  TORCH_CHECK(crow_t.numel() == rows + 1, "ngcuda: x.crow_indices() must have ", rows + 1,
              " entries (rows + 1), got ", crow_t.numel());
  TORCH_CHECK(crow[0] == 0, "ngcuda: x.crow_indices() must start at 0, got ", crow[0]);
  TORCH_CHECK(crow[rows] == nnz, "ngcuda: x.crow_indices() must end at nnz = ", nnz, ", got ",
              crow[rows]);
  for (int64_t i = 0; i < rows; ++i) {
    TORCH_CHECK(crow[i + 1] >= crow[i], "ngcuda: x.crow_indices() must be non-decreasing, but entry ",
                i + 1, " = ", crow[i + 1], " < entry ", i, " = ", crow[i]);
  }
  bool sorted = true;
  for (int64_t i = 0; i < rows; ++i) {
    for (int64_t e = crow[i]; e < crow[i + 1]; ++e) {
      const int64_t c = col[e];
      TORCH_CHECK(c >= 0 && c < cols, "ngcuda: x.col_indices() holds ", c, " in row ", i,
                  ", outside the ", cols, " columns of x");
      if (e > crow[i] && c <= col[e - 1]) sorted = false;
    }
  }
  return sorted;
}

}  // namespace

bool check_csr_x_values(const at::Tensor& x) {
  const at::Tensor crow = x.crow_indices().contiguous();
  const at::Tensor col = x.col_indices().contiguous();
  return AT_DISPATCH_INDEX_TYPES(crow.scalar_type(), "ngcuda_check_csr_x", [&] {
    return check_csr_x_typed<index_t>(crow, col, x.size(0), x.size(1));
  });
}

std::pair<at::Tensor, at::Tensor> checked_adjacency(const at::Tensor& rowptr, const at::Tensor& col,
                                                    const c10::optional<at::Tensor>& value,
                                                    const c10::optional<at::Tensor>& row_weight,
                                                    const at::Tensor& like, int64_t x_rows) {
  check_csr_shapes(rowptr, col, value, like);
  check_row_weight(row_weight, rowptr.numel() - 1, like);
  std::pair<at::Tensor, at::Tensor> out{rowptr.contiguous(), col.contiguous()};
  check_csr_values(out.first, out.second, x_rows);
  return out;
}

}  // namespace ngcuda::cpu
