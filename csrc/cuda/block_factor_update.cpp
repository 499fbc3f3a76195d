// block_factor_update_ and sparse_block_factor_update_ on CUDA for a dense x: each block is the
// dense op on the block's own columns of x (a strided slice, copied contiguous by the op), so a
// block costs N·n_k² and the D×D factor is never formed. The gather of the sparse form is
// redone per block, which costs nnz·n_k per block: nnz·d in all, as one gather of every column.
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <vector>

#include "../blocks.h"
#include "../checks.h"
#include "factor_ops.h"

namespace ngcuda::cuda {
namespace {

void block_factor_update_cuda(at::TensorList blocks, const at::Tensor& x, double decay,
                              bool append_bias, const c10::optional<at::Tensor>& row_weight) {
  if (!check_block_update(blocks, x, decay, append_bias)) return;
  check_row_weight(row_weight, x.size(0), blocks[0]);
  const std::vector<BlockSpan> spans = block_spans(blocks, x.size(1), append_bias);
  for (size_t k = 0; k < spans.size(); ++k) {
    if (spans[k].size == 0) continue;
    factor_update_cuda(blocks[k], x.narrow(1, spans[k].start, spans[k].x_cols), decay,
                       spans[k].bias, row_weight);
  }
}

void sparse_block_factor_update_cuda(at::TensorList blocks, const at::Tensor& rowptr,
                                     const at::Tensor& col, const c10::optional<at::Tensor>& value,
                                     const at::Tensor& x, double decay, bool append_bias,
                                     const c10::optional<at::Tensor>& row_weight) {
  if (!check_block_update(blocks, x, decay, append_bias)) return;
  check_csr_shapes(rowptr, col, value, blocks[0]);
  check_row_weight(row_weight, rowptr.numel() - 1, blocks[0]);
  const std::vector<BlockSpan> spans = block_spans(blocks, x.size(1), append_bias);
  for (size_t k = 0; k < spans.size(); ++k) {
    if (spans[k].size == 0) continue;
    sparse_factor_update_cuda(blocks[k], rowptr, col, value,
                              x.narrow(1, spans[k].start, spans[k].x_cols), decay, spans[k].bias,
                              row_weight);
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(ngcuda, CUDA, m) {
  m.impl("block_factor_update_", &block_factor_update_cuda);
  m.impl("sparse_block_factor_update_", &sparse_block_factor_update_cuda);
}

}  // namespace ngcuda::cuda
