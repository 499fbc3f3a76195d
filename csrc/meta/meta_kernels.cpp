// Shape-only kernels for the Meta key, so that fake tensors (torch.compile, torch.export) trace
// every op without running it. Checks that need only shapes run here as they do on real devices.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "../checks.h"
#include "../precondition_checks.h"

namespace ngcuda::meta {
namespace {

void factor_update_meta(const at::Tensor& factor, const at::Tensor& x, double decay,
                        bool append_bias, const c10::optional<at::Tensor>& row_weight) {
  check_dim(x, 2, "x");
  if (x.layout() == at::kStrided) check_float(x, "x");
  check_factor(factor, x.sym_size(1) + (append_bias ? 1 : 0));
  check_decay(decay);
  check_row_weight(row_weight, x.sym_size(0), factor);
}

void sparse_factor_update_meta(const at::Tensor& factor, const at::Tensor& rowptr,
                               const at::Tensor& col, const c10::optional<at::Tensor>& value,
                               const at::Tensor& x, double decay, bool append_bias,
                               const c10::optional<at::Tensor>& row_weight) {
  check_dim(x, 2, "x");
  check_factor(factor, x.sym_size(1) + (append_bias ? 1 : 0));
  check_decay(decay);
  check_csr_shapes(rowptr, col, value, factor);
  check_row_weight(row_weight, rowptr.sym_numel() - 1, factor);
}

void block_factor_update_meta(at::TensorList blocks, const at::Tensor& x, double decay,
                              bool append_bias, const c10::optional<at::Tensor>& row_weight) {
  check_dim(x, 2, "x");
  check_blocks(blocks, x.sym_size(1) + (append_bias ? 1 : 0));
  check_decay(decay);
  if (!blocks.empty()) check_row_weight(row_weight, x.sym_size(0), blocks[0]);
}

void sparse_block_factor_update_meta(at::TensorList blocks, const at::Tensor& rowptr,
                                     const at::Tensor& col, const c10::optional<at::Tensor>& value,
                                     const at::Tensor& x, double decay, bool append_bias,
                                     const c10::optional<at::Tensor>& row_weight) {
  check_dim(x, 2, "x");
  check_blocks(blocks, x.sym_size(1) + (append_bias ? 1 : 0));
  check_decay(decay);
  if (blocks.empty()) return;
  check_csr_shapes(rowptr, col, value, blocks[0]);
  check_row_weight(row_weight, rowptr.sym_numel() - 1, blocks[0]);
}

std::tuple<std::vector<at::Tensor>, std::vector<at::Tensor>, at::Tensor> batched_eigh_meta(
    at::TensorList matrices, const c10::optional<at::TensorList>& prev, c10::optional<double> tol,
    int64_t max_sweeps) {
  std::vector<at::Tensor> values, vectors;
  TORCH_CHECK(max_sweeps >= 0, "ngcuda: batched_eigh: max_sweeps must be >= 0, got ", max_sweeps);
  for (size_t i = 0; i < matrices.size(); ++i) {
    const at::Tensor& a = matrices[i];
    TORCH_CHECK(a.dim() == 2 && a.sym_size(0) == a.sym_size(1),
                "ngcuda: matrices must be square 2-D, got ", a.sym_sizes());
    // (one dtype per call is the CPU kernel's own limit; CUDA takes mixed dtypes)
    TORCH_CHECK(a.scalar_type() == at::kFloat || a.scalar_type() == at::kDouble,
                "ngcuda: batched_eigh: matrices[", i, "] must be float32 or float64, got ",
                a.scalar_type());
    values.push_back(at::empty_symint({a.sym_size(0)}, a.options()));
    // contiguous, as every backend returns them (empty_like would copy a transposed a's strides)
    vectors.push_back(at::empty_symint({a.sym_size(0), a.sym_size(0)}, a.options()));
  }
  const auto device = matrices.empty() ? at::Device(at::kMeta) : matrices[0].device();
  at::Tensor status = at::empty({static_cast<int64_t>(matrices.size())},
                                at::TensorOptions().dtype(at::kInt).device(device));
  return {values, vectors, status};
}

std::vector<at::Tensor> precondition_meta(at::TensorList grads, at::TensorList QA,
                                          at::TensorList lamA, at::TensorList QG,
                                          at::TensorList lamG, double damping) {
  check_precondition_args(grads, QA, lamA, QG, lamG, damping);
  std::vector<at::Tensor> out;
  for (const at::Tensor& g : grads) out.push_back(at::empty_symint(g.sym_sizes(), g.options()));
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(ngcuda, Meta, m) {
  m.impl("factor_update_", &factor_update_meta);
  m.impl("sparse_factor_update_", &sparse_factor_update_meta);
  m.impl("block_factor_update_", &block_factor_update_meta);
  m.impl("sparse_block_factor_update_", &sparse_block_factor_update_meta);
  m.impl("batched_eigh", &batched_eigh_meta);
  m.impl("precondition", &precondition_meta);
}

// A sparse CSR x on the meta device: the same shape checks (x's layout is checked by the real
// backends, whose dispatch keys are the sparse CSR ones too).
TORCH_LIBRARY_IMPL(ngcuda, SparseCsrMeta, m) {
  m.impl("factor_update_", &factor_update_meta);
  m.impl("sparse_factor_update_", &sparse_factor_update_meta);
  m.impl("block_factor_update_", &block_factor_update_meta);
  m.impl("sparse_block_factor_update_", &sparse_block_factor_update_meta);
}

}  // namespace ngcuda::meta
