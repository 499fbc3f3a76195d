// Weighted Gram accumulation shared by the dense and the sparse factor updates.
#pragma once

#include <ATen/ATen.h>

namespace ngcuda::cpu {

// S[:d, :d] upper triangle (by column blocks) += Yᵀ diag(w) Y; with a bias column also
// S[:d, d] += Yᵀ w and S[d, d] += Σw. S is [D, D] with D = d (+1), zero-initialised by the caller.
// Only tiles on or above the diagonal are computed; the lower part of S is left untouched.
void accumulate_gram_upper(at::Tensor& S, const at::Tensor& Y, const c10::optional<at::Tensor>& w,
                           bool append_bias);

// factor ← decay·factor + scale·sym(S), reading S's upper triangle and writing both triangles.
void blend_upper_into(const at::Tensor& factor, const at::Tensor& S, double decay, double scale);

}  // namespace ngcuda::cpu
