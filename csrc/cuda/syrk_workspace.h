// Scratch of the tiled SYRK (factor_kernels.cu) and small helpers shared by the factor ops on
// CUDA.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>

#include "eigh_plan.h"

namespace ngcuda::cuda {

// Bytes of aggregated ÂX rows staged per pass of the sparse updates: small enough to stay in L2
// (50 MB on H100) between the gather and the SYRK that reads it, and far below N×d for the wide
// first-layer inputs.
constexpr int64_t kChunkBytes = 16 << 20;

struct SyrkWorkspace {
  at::Tensor partial;  // [ksplit, tiles, 64, 64] in the factor's dtype
  at::Tensor wsum;     // [ksplit] float64
  at::Tensor bad;      // [1] int32, 0 unless a weight or the CSR was invalid
  int64_t ksplit = 1;
};

// The workspace of a [D, D] factor (or block) fed `rows_per_pass` rows per SYRK launch.
inline SyrkWorkspace make_workspace(const at::Tensor& factor, int64_t rows_per_pass) {
  const int64_t D = factor.size(0);
  const int64_t side = (D + plan::kSyrkTile - 1) / plan::kSyrkTile;
  const int64_t tiles = side * (side + 1) / 2;
  const int sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  SyrkWorkspace ws;
  ws.ksplit = plan::syrk_split(rows_per_pass, tiles, sms);
  ws.partial = at::empty({ws.ksplit, tiles, plan::kSyrkTile, plan::kSyrkTile}, factor.options());
  ws.wsum = at::empty({ws.ksplit}, factor.options().dtype(at::kDouble));
  ws.bad = at::zeros({1}, factor.options().dtype(at::kInt));
  return ws;
}

template <typename T>
T* ptr(const at::Tensor& t) {
  return t.defined() ? static_cast<T*>(t.data_ptr()) : nullptr;
}

inline at::Tensor weights_as(const c10::optional<at::Tensor>& row_weight, const at::Tensor& factor) {
  if (!row_weight.has_value()) return at::Tensor();
  return row_weight->to(factor.scalar_type()).contiguous();
}

}  // namespace ngcuda::cuda
