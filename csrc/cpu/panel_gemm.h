// Products of a large row-major matrix Q with a narrow panel P (a few dozen columns): what
// preconditioning a wide layer (few outputs, thousands of inputs) costs, Q being its D×D Q_A.
//
// MKL packs Q for every call, which at a 16-column panel costs as much as the arithmetic, and on
// AMD parts it runs an AVX2-class kernel (about 90 GFLOP/s a Zen 5 core); these kernels read Q in
// place and keep an MR×NR block of the result in registers over the whole inner loop (AVX-512 /
// AVX2 variants picked at load time, about 160 GFLOP/s a core for AVX-512).
//
// Both forms write C [rows, w] with w a multiple of gemm::kPad (the caller zero-pads the panel to
// gemm::padded(w)); rows and k are arbitrary. Each call is single-threaded: the caller splits the
// rows.
#pragma once

#include <cstdint>

#include "small_gemm.h"

namespace ngcuda::cpu::panel {

// C[0:rows, 0:w] (+)= Q[0:k, 0:rows]ᵀ · P[0:k, 0:w]: q points at column r0 of Q, so a strip of
// `rows` columns of Q is read down its k rows.
void tn(const float* q, int64_t ldq, const float* p, int64_t ldp, float* c, int64_t ldc,
        int64_t rows, int64_t w, int64_t k, bool accumulate);
void tn(const double* q, int64_t ldq, const double* p, int64_t ldp, double* c, int64_t ldc,
        int64_t rows, int64_t w, int64_t k, bool accumulate);

// C[0:rows, 0:w] (+)= Q[0:rows, 0:k] · P[0:k, 0:w]: q points at row r0 (and any column offset).
void nn(const float* q, int64_t ldq, const float* p, int64_t ldp, float* c, int64_t ldc,
        int64_t rows, int64_t w, int64_t k, bool accumulate);
void nn(const double* q, int64_t ldq, const double* p, int64_t ldp, double* c, int64_t ldc,
        int64_t rows, int64_t w, int64_t k, bool accumulate);

}  // namespace ngcuda::cpu::panel
