// The contiguous column partition of a factor's D = d (+1) columns given by its diagonal blocks,
// shared by every backend.
#pragma once

#include <ATen/core/Tensor.h>

#include <vector>

namespace ngcuda {

struct BlockSpan {
  int64_t start = 0;   // first column of the block in x̄ = [x, 1]
  int64_t size = 0;    // n_k: the block is [n_k, n_k]
  int64_t x_cols = 0;  // columns of x it covers: n_k, or n_k − 1 when it holds the bias column
  bool bias = false;   // whether it holds the bias column (the last column of x̄)
};

// Blocks in order; their sizes must already be checked to sum to d + append_bias.
inline std::vector<BlockSpan> block_spans(at::TensorList blocks, int64_t d, bool append_bias) {
  std::vector<BlockSpan> spans;
  spans.reserve(blocks.size());
  const int64_t D = d + (append_bias ? 1 : 0);
  int64_t start = 0;
  for (const at::Tensor& b : blocks) {
    BlockSpan s;
    s.start = start;
    s.size = b.size(0);
    s.bias = append_bias && s.size > 0 && start + s.size == D;
    s.x_cols = s.size - (s.bias ? 1 : 0);
    spans.push_back(s);
    start += s.size;
  }
  return spans;
}

}  // namespace ngcuda
