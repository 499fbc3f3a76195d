// factor_update_, sparse_factor_update_ and their block forms for a sparse CSR x on CUDA (the
// SparseCsrCUDA dispatch key). Blocks of rows of x (or of ÂX) are densified into a bounded
// staging buffer by csr_x_rows_kernel and fed to the same tiled SYRK as the dense ops, with one
// workspace per block and one blend at the end; no N×d intermediate exists. Like the dense ops,
// nothing here synchronises with the host: invalid CSR indices (of Â or of x) and invalid row
// weights fill the blocks with NaN instead of raising. No float atomics: bitwise deterministic.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "../blocks.h"
#include "../checks.h"
#include "eigh_plan.h"
#include "kernels.h"
#include "syrk_workspace.h"

namespace ngcuda::cuda {
namespace {

// The adjacency Â of the sparse ops, or none (Â = I) for factor_update_.
struct Adjacency {
  at::Tensor rowptr, col, value;  // value undefined for ones
  int64_t rows = 0;
};

void update_blocks(at::TensorList blocks, const Adjacency* adj, const at::Tensor& x, double decay,
                   bool append_bias, const c10::optional<at::Tensor>& row_weight) {
  const int64_t M = adj != nullptr ? adj->rows : x.size(0);
  const int64_t d = x.size(1);
  if (M == 0 || blocks.empty()) return;
  const at::Tensor& first = blocks[0];
  const c10::cuda::CUDAGuard guard(first.device());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  // The kernels take int64 indices: int32 ones are widened here (O(nnz), no sync).
  const at::Tensor crow = x.crow_indices().to(at::kLong).contiguous();
  const at::Tensor xcol = x.col_indices().to(at::kLong).contiguous();
  const at::Tensor xval = x.values().to(first.scalar_type()).contiguous();
  const at::Tensor w = weights_as(row_weight, first);
  const std::vector<BlockSpan> spans = block_spans(blocks, d, append_bias);
  const bool whole = spans.size() == 1;

  const int64_t row_bytes = std::max<int64_t>(d, 1) * first.element_size();
  const int64_t chunk =
      std::min<int64_t>(M, std::max<int64_t>(plan::kSyrkRowsPerStep, kChunkBytes / row_bytes));
  const at::Tensor buffer = at::empty({chunk, d}, first.options());
  // One flag for every block, so that bad input poisons them all.
  const at::Tensor bad = at::zeros({1}, first.options().dtype(at::kInt));
  std::vector<SyrkWorkspace> ws;
  std::vector<at::Tensor> stage;  // the block's columns of the buffer, contiguous for the SYRK
  for (size_t k = 0; k < spans.size(); ++k) {
    ws.push_back(make_workspace(blocks[k], chunk));
    ws.back().bad = bad;
    stage.push_back(whole ? buffer : at::empty({chunk, spans[k].x_cols}, first.options()));
  }

  AT_DISPATCH_FLOATING_TYPES(first.scalar_type(), "ngcuda_csr_x_factor_update_cuda", [&] {
    const scalar_t* wp = ptr<scalar_t>(w);
    for (int64_t r0 = 0; r0 < M; r0 += chunk) {
      const int64_t rows = std::min(chunk, M - r0);
      C10_CUDA_CHECK(launch_csr_x_rows<scalar_t>(
          adj != nullptr ? ptr<int64_t>(adj->rowptr) : nullptr,
          adj != nullptr ? ptr<int64_t>(adj->col) : nullptr,
          adj != nullptr ? ptr<scalar_t>(adj->value) : nullptr,
          adj != nullptr ? adj->col.numel() : 0, M, ptr<int64_t>(crow), ptr<int64_t>(xcol),
          ptr<scalar_t>(xval), x.size(0), d, xcol.numel(), wp, r0, rows, ptr<scalar_t>(buffer),
          ptr<int>(bad), stream));
      for (size_t k = 0; k < spans.size(); ++k) {
        if (spans[k].size == 0) continue;
        if (!whole) {
          stage[k].narrow(0, 0, rows).copy_(
              buffer.narrow(0, 0, rows).narrow(1, spans[k].start, spans[k].x_cols));
        }
        C10_CUDA_CHECK(launch_syrk_upper<scalar_t>(
            ptr<scalar_t>(stage[k]), wp != nullptr ? wp + r0 : nullptr, rows, spans[k].x_cols,
            spans[k].bias, ws[k].ksplit, ptr<scalar_t>(ws[k].partial), ptr<double>(ws[k].wsum),
            ptr<int>(bad), /*accumulate=*/r0 > 0, stream));
      }
    }
    for (size_t k = 0; k < spans.size(); ++k) {
      if (spans[k].size == 0) continue;
      C10_CUDA_CHECK(launch_blend_epilogue<scalar_t>(
          ptr<scalar_t>(blocks[k]), spans[k].size, ws[k].ksplit, ptr<scalar_t>(ws[k].partial),
          ptr<double>(ws[k].wsum), ptr<int>(bad), decay, stream));
    }
  });
}

Adjacency adjacency(const at::Tensor& rowptr, const at::Tensor& col,
                    const c10::optional<at::Tensor>& value, const at::Tensor& blocks0) {
  Adjacency a;
  a.rowptr = rowptr.contiguous();
  a.col = col.contiguous();
  if (value.has_value()) a.value = value->to(blocks0.scalar_type()).contiguous();
  a.rows = rowptr.numel() - 1;
  return a;
}

void factor_update_csr_cuda(const at::Tensor& factor, const at::Tensor& x, double decay,
                            bool append_bias, const c10::optional<at::Tensor>& row_weight) {
  check_factor_update(factor, x, decay, append_bias);
  check_row_weight(row_weight, x.size(0), factor);
  update_blocks({factor}, nullptr, x, decay, append_bias, row_weight);
}

void block_factor_update_csr_cuda(at::TensorList blocks, const at::Tensor& x, double decay,
                                  bool append_bias, const c10::optional<at::Tensor>& row_weight) {
  if (!check_block_update(blocks, x, decay, append_bias)) return;
  check_row_weight(row_weight, x.size(0), blocks[0]);
  update_blocks(blocks, nullptr, x, decay, append_bias, row_weight);
}

void sparse_factor_update_csr_cuda(const at::Tensor& factor, const at::Tensor& rowptr,
                                   const at::Tensor& col, const c10::optional<at::Tensor>& value,
                                   const at::Tensor& x, double decay, bool append_bias,
                                   const c10::optional<at::Tensor>& row_weight) {
  check_factor_update(factor, x, decay, append_bias);
  check_csr_shapes(rowptr, col, value, factor);
  check_row_weight(row_weight, rowptr.numel() - 1, factor);
  const Adjacency adj = adjacency(rowptr, col, value, factor);
  update_blocks({factor}, &adj, x, decay, append_bias, row_weight);
}

void sparse_block_factor_update_csr_cuda(at::TensorList blocks, const at::Tensor& rowptr,
                                         const at::Tensor& col,
                                         const c10::optional<at::Tensor>& value,
                                         const at::Tensor& x, double decay, bool append_bias,
                                         const c10::optional<at::Tensor>& row_weight) {
  if (!check_block_update(blocks, x, decay, append_bias)) return;
  check_csr_shapes(rowptr, col, value, blocks[0]);
  check_row_weight(row_weight, rowptr.numel() - 1, blocks[0]);
  const Adjacency adj = adjacency(rowptr, col, value, blocks[0]);
  update_blocks(blocks, &adj, x, decay, append_bias, row_weight);
}

}  // namespace

TORCH_LIBRARY_IMPL(ngcuda, SparseCsrCUDA, m) {
  m.impl("factor_update_", &factor_update_csr_cuda);
  m.impl("block_factor_update_", &block_factor_update_csr_cuda);
  m.impl("sparse_factor_update_", &sparse_factor_update_csr_cuda);
  m.impl("sparse_block_factor_update_", &sparse_block_factor_update_csr_cuda);
}

}  // namespace ngcuda::cuda
