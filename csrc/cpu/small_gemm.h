// Dense products and transposes of small square matrices for the warm eigensolver (n up to a few
// hundred).
//
// At these sizes a dispatched at::mm costs more in overhead than the arithmetic (and MKL runs a
// slow path on some AMD parts: about 10 GFLOP/s in float64 at n = 64, where the register-blocked
// kernel here reaches 109), so the warm path keeps every matrix in buffers of its own and
// multiplies them here.
//
// One shape only: C = XᵀY (or C += XᵀY), all buffers row-major with the same leading dimension
// `ld`, a multiple of kPad. Xᵀ is read as rows of X, so the kernel broadcasts contiguous
// elements of X and streams contiguous rows of Y; every product the solver needs (QᵀQ, AQ with A
// symmetric, QᵀW, Q·E via the stored transpose of Q) has this form. The caller keeps the padding
// (rows and columns from n to the padded size) at zero, which keeps the padded parts of products
// zero, so the kernel never handles a remainder.
#pragma once

#include <cstdint>

namespace ngcuda::cpu::gemm {

constexpr int64_t kPad = 16;

inline int64_t padded(int64_t n) { return (n + kPad - 1) / kPad * kPad; }

// C[0:m, 0:m] (+)= X[0:k, 0:m]ᵀ · Y[0:k, 0:m]. m must be a multiple of kPad, ld >= m.
// upper: compute only the blocks that touch the upper triangle (i <= j); the strictly lower
// triangle of C is then partly stale, for a symmetric product the caller mirrors it.
void xty(const float* x, const float* y, float* c, int64_t m, int64_t k, int64_t ld,
         bool accumulate, bool upper);
void xty(const double* x, const double* y, double* c, int64_t m, int64_t k, int64_t ld,
         bool accumulate, bool upper);

// Rectangular form with a leading dimension per buffer: C[0:m, 0:cols] = X[0:k, 0:m]ᵀ·Y[0:k, 0:cols],
// m and cols multiples of kPad.
void xty(const float* x, int64_t ldx, const float* y, int64_t ldy, float* c, int64_t ldc,
         int64_t m, int64_t cols, int64_t k);
void xty(const double* x, int64_t ldx, const double* y, int64_t ldy, double* c, int64_t ldc,
         int64_t m, int64_t cols, int64_t k);

// dst ← srcᵀ for [ld, ld] buffers, ld a multiple of kPad.
void transpose(const float* src, float* dst, int64_t ld);
void transpose(const double* src, double* dst, int64_t ld);

// Lower triangle ← upper triangle of an [ld, ld] buffer, in place: completes a product computed
// with upper = true.
void mirror_upper(float* c, int64_t ld);
void mirror_upper(double* c, int64_t ld);

// The kernel variant picked for this CPU: 2 = AVX-512 (x86-64-v4), 1 = AVX2 (x86-64-v3),
// 0 = generic; and its name.
int level();
const char* variant();

}  // namespace ngcuda::cpu::gemm
