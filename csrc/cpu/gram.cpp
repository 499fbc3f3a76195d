#include "gram.h"

#include <ATen/Parallel.h>

#include <algorithm>

namespace ngcuda::cpu {

namespace {
// Column-block width of the triangular tiling: wide enough that each GEMM runs near peak, narrow
// enough that the computed-but-unused part below the diagonal stays a small fraction of d².
constexpr int64_t kColumnBlock = 128;
}  // namespace

void accumulate_gram_upper(at::Tensor& S, const at::Tensor& Y, const c10::optional<at::Tensor>& w,
                           bool append_bias) {
  const int64_t d = Y.size(1);
  if (Y.size(0) == 0) return;
  const at::Tensor Yw = w.has_value() ? Y * w->unsqueeze(1) : Y;
  const at::Tensor Yt = Y.t();
  for (int64_t j0 = 0; j0 < d; j0 += kColumnBlock) {
    const int64_t j1 = std::min(d, j0 + kColumnBlock);
    at::Tensor tile = S.slice(0, 0, j1).slice(1, j0, j1);
    tile.addmm_(Yt.slice(0, 0, j1), Yw.slice(1, j0, j1));
  }
  if (append_bias) {
    S.select(1, d).slice(0, 0, d).add_(Yw.sum(0));
    S[d][d].add_(w.has_value() ? w->sum() : at::scalar_tensor(Y.size(0), S.options()));
  }
}

void blend_upper_into(const at::Tensor& factor, const at::Tensor& S, double decay, double scale) {
  const int64_t D = factor.size(0);
  AT_DISPATCH_FLOATING_TYPES(factor.scalar_type(), "ngcuda_blend_upper", [&] {
    scalar_t* f = factor.data_ptr<scalar_t>();
    const scalar_t* s = S.data_ptr<scalar_t>();
    const scalar_t a = static_cast<scalar_t>(decay);
    const scalar_t b = static_cast<scalar_t>(scale);
    // Rows near the top carry more of the triangle; a small grain keeps the threads balanced.
    at::parallel_for(0, D, 16, [&](int64_t r0, int64_t r1) {
      for (int64_t i = r0; i < r1; ++i) {
        for (int64_t j = i; j < D; ++j) {
          // decay 0 must forget the old factor even where it holds Inf or NaN.
          const scalar_t v = (a == scalar_t(0) ? scalar_t(0) : a * f[i * D + j]) + b * s[i * D + j];
          f[i * D + j] = v;
          f[j * D + i] = v;
        }
      }
    });
  });
}

}  // namespace ngcuda::cpu
