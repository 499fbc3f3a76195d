// Argument checks shared by every backend. Each message names the argument and what was expected,
// and every check runs before any output is written.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/SymInt.h>
#include <c10/util/Exception.h>

#include <cstddef>

namespace ngcuda {

inline void check_float(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble, "ngcuda: ", name,
              " must be float32 or float64, got ", t.scalar_type());
}

inline void check_dim(const at::Tensor& t, int64_t dim, const char* name) {
  TORCH_CHECK(t.dim() == dim, "ngcuda: ", name, " must be ", dim, "-D, got shape ", t.sym_sizes());
}

inline void check_same_device(const at::Tensor& t, const at::Tensor& ref, const char* name,
                              const char* ref_name) {
  TORCH_CHECK(t.device() == ref.device(), "ngcuda: ", name, " is on ", t.device(), " but ", ref_name,
              " is on ", ref.device());
}

// A Kronecker factor of size [dim, dim]: square, contiguous, floating point.
inline void check_factor(const at::Tensor& factor, const c10::SymInt& dim) {
  check_float(factor, "factor");
  check_dim(factor, 2, "factor");
  TORCH_CHECK(factor.sym_size(0) == factor.sym_size(1), "ngcuda: factor must be square, got shape ",
              factor.sym_sizes());
  TORCH_CHECK(factor.sym_size(0) == dim, "ngcuda: factor must be [", dim, ", ", dim,
              "] to match x (with the bias column when append_bias), got ", factor.sym_sizes());
  TORCH_CHECK(factor.is_contiguous(), "ngcuda: factor must be contiguous");
}

inline void check_decay(double decay) {
  TORCH_CHECK(decay >= 0.0 && decay <= 1.0, "ngcuda: decay must lie in [0, 1], got ", decay);
}

inline void check_row_weight(const c10::optional<at::Tensor>& row_weight, const c10::SymInt& rows,
                             const at::Tensor& ref) {
  if (!row_weight.has_value()) return;
  const at::Tensor& w = *row_weight;
  check_float(w, "row_weight");
  check_dim(w, 1, "row_weight");
  TORCH_CHECK(w.sym_size(0) == rows, "ngcuda: row_weight must have ", rows, " entries (one per row), got ",
              w.sym_size(0));
  check_same_device(w, ref, "row_weight", "factor");
}

// CSR adjacency of shape [rows, cols]: rowptr [rows + 1], col [nnz], value [nnz] or None.
// Index values are validated on the host side only for CPU tensors; device kernels bound-check.
inline void check_csr_shapes(const at::Tensor& rowptr, const at::Tensor& col,
                             const c10::optional<at::Tensor>& value, const at::Tensor& ref) {
  TORCH_CHECK(rowptr.scalar_type() == at::kLong, "ngcuda: rowptr must be int64, got ",
              rowptr.scalar_type());
  TORCH_CHECK(col.scalar_type() == at::kLong, "ngcuda: col must be int64, got ", col.scalar_type());
  check_dim(rowptr, 1, "rowptr");
  check_dim(col, 1, "col");
  TORCH_CHECK(rowptr.sym_numel() >= 1, "ngcuda: rowptr must have at least one entry (rows + 1)");
  check_same_device(rowptr, ref, "rowptr", "factor");
  check_same_device(col, ref, "col", "factor");
  if (value.has_value()) {
    check_float(*value, "value");
    check_dim(*value, 1, "value");
    TORCH_CHECK(value->sym_size(0) == col.sym_size(0), "ngcuda: value must have nnz = ", col.sym_size(0),
                " entries like col, got ", value->sym_size(0));
    check_same_device(*value, ref, "value", "factor");
  }
}

// A sparse CSR x [N, d]: 2-D with scalar values, float values, int32 or int64 indices. Index
// values are checked by each backend (on the CPU before anything is written).
inline void check_csr_x(const at::Tensor& x, const at::Tensor& ref) {
  TORCH_CHECK(x.layout() == at::kSparseCsr, "ngcuda: x must be a strided (dense) or sparse CSR tensor, ",
              "got layout ", x.layout(), "; convert it with x.to_sparse_csr()");
  TORCH_CHECK(x.dim() == 2 && x.dense_dim() == 0,
              "ngcuda: a sparse CSR x must be 2-D with scalar values (no batch or dense dimensions), ",
              "got shape ", x.sym_sizes(), " with ", x.dense_dim(), " dense dimensions");
  check_float(x, "x");
  const at::ScalarType index = x.crow_indices().scalar_type();
  TORCH_CHECK(index == at::kInt || index == at::kLong,
              "ngcuda: x.crow_indices() and x.col_indices() must be int32 or int64, got ", index);
  TORCH_CHECK(x.col_indices().scalar_type() == index, "ngcuda: x.crow_indices() is ", index,
              " but x.col_indices() is ", x.col_indices().scalar_type(), "; they must share one dtype");
  // torch.sparse_csr_tensor builds these without checking (check_invariants=False): a values
  // tensor shorter than col_indices would be read past its end.
  TORCH_CHECK(x.values().sym_numel() == x.col_indices().sym_numel(), "ngcuda: x has ",
              x.col_indices().sym_numel(), " column indices but ", x.values().sym_numel(), " values");
  TORCH_CHECK(x.crow_indices().sym_numel() == x.sym_size(0) + 1, "ngcuda: x.crow_indices() must have ",
              x.sym_size(0) + 1, " entries (rows + 1), got ", x.crow_indices().sym_numel());
  check_same_device(x, ref, "x", "factor");
}

// Diagonal blocks [n_k, n_k] of a D×D factor, partitioning its D columns contiguously in order:
// all square, contiguous, of one float dtype and one device, with Σ n_k = D.
inline void check_blocks(at::TensorList blocks, const c10::SymInt& D) {
  c10::SymInt total = 0;
  for (size_t k = 0; k < blocks.size(); ++k) {
    const at::Tensor& b = blocks[k];
    TORCH_CHECK(b.scalar_type() == at::kFloat || b.scalar_type() == at::kDouble, "ngcuda: blocks[", k,
                "] must be float32 or float64, got ", b.scalar_type());
    TORCH_CHECK(b.dim() == 2 && b.sym_size(0) == b.sym_size(1), "ngcuda: blocks[", k,
                "] must be square 2-D, got shape ", b.sym_sizes());
    TORCH_CHECK(b.is_contiguous(), "ngcuda: blocks[", k, "] must be contiguous");
    TORCH_CHECK(b.scalar_type() == blocks[0].scalar_type(), "ngcuda: blocks[", k, "] is ",
                b.scalar_type(), " but blocks[0] is ", blocks[0].scalar_type());
    TORCH_CHECK(b.device() == blocks[0].device(), "ngcuda: blocks[", k, "] is on ", b.device(),
                " but blocks[0] is on ", blocks[0].device());
    total = total + b.sym_size(0);
  }
  TORCH_CHECK(total == D, "ngcuda: the block sizes must sum to D = ", D,
              " (the columns of x, plus the bias column when append_bias), got ", total);
}

// x of a factor update against its target: dense (float, 2-D, on the target's device) or sparse
// CSR (check_csr_x, which also names any other sparse layout the sparse kernels are handed, such
// as CSC).
inline void check_update_x(const at::Tensor& x, const at::Tensor& ref) {
  if (x.layout() != at::kStrided) {
    check_csr_x(x, ref);
    return;
  }
  check_float(x, "x");
  check_dim(x, 2, "x");
  check_same_device(x, ref, "x", "factor");
}

// The checks every factor update runs before its own (adjacency, row weights): x, the factor's
// size d (+1 with append_bias), decay.
inline void check_factor_update(const at::Tensor& factor, const at::Tensor& x, double decay,
                                bool append_bias) {
  check_update_x(x, factor);
  check_factor(factor, x.size(1) + (append_bias ? 1 : 0));
  check_decay(decay);
}

// The same for the block form; false when the list is empty (nothing to check against or update).
inline bool check_block_update(at::TensorList blocks, const at::Tensor& x, double decay,
                               bool append_bias) {
  check_dim(x, 2, "x");
  check_blocks(blocks, x.size(1) + (append_bias ? 1 : 0));
  if (blocks.empty()) return false;
  check_update_x(x, blocks[0]);
  check_decay(decay);
  return true;
}

}  // namespace ngcuda
