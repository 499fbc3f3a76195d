// Register-blocked products of a square matrix with a narrow panel; see panel_gemm.h.
#include "panel_gemm.h"

#include "small_gemm.h"

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#include <immintrin.h>
#endif

#if defined(__GNUC__)
#define NGCUDA_PANEL_INLINE inline __attribute__((always_inline))
#else
#define NGCUDA_PANEL_INLINE inline
#endif

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define NGCUDA_PANEL_DISPATCH 1
#else
#define NGCUDA_PANEL_DISPATCH 0
#endif

namespace ngcuda::cpu::panel {
namespace {

// An MR×NR block of C in registers over the whole k loop. Per k: one NR-wide row segment of P and
// MR broadcasts of Q (a contiguous run of row k for tn, one element of each of MR rows for nn).
template <typename T, int MR, int NR, bool kTrans>
NGCUDA_PANEL_INLINE void block(const T* __restrict q, int64_t ldq, const T* __restrict p,
                               int64_t ldp, T* __restrict c, int64_t ldc, int64_t k,
                               bool accumulate) {
  T acc[MR][NR];
  for (int r = 0; r < MR; ++r) {
    for (int j = 0; j < NR; ++j) acc[r][j] = accumulate ? c[r * ldc + j] : T(0);
  }
  for (int64_t s = 0; s < k; ++s) {
    const T* ps = p + s * ldp;
#pragma GCC unroll 16
    for (int r = 0; r < MR; ++r) {
      const T qv = kTrans ? q[s * ldq + r] : q[r * ldq + s];
#pragma GCC unroll 16
      for (int j = 0; j < NR; ++j) acc[r][j] += qv * ps[j];
    }
  }
  for (int r = 0; r < MR; ++r) {
    for (int j = 0; j < NR; ++j) c[r * ldc + j] = acc[r][j];
  }
}

// Rows in blocks of MR, then the remainder in blocks of MR/2, MR/4, ... 1.
template <typename T, int MR, int NR, bool kTrans>
NGCUDA_PANEL_INLINE void rows_from(const T* q, int64_t ldq, const T* p, int64_t ldp, T* c,
                                   int64_t ldc, int64_t r, int64_t rows, int64_t w, int64_t k,
                                   bool accumulate) {
  static_assert(kPanelPad % NR == 0, "NR must divide the panel padding");
  for (; r + MR <= rows; r += MR) {
    const T* qr = kTrans ? q + r : q + r * ldq;
    for (int64_t j = 0; j < w; j += NR) {
      block<T, MR, NR, kTrans>(qr, ldq, p + j, ldp, c + r * ldc + j, ldc, k, accumulate);
    }
  }
  if constexpr (MR > 1) {
    rows_from<T, MR / 2, NR, kTrans>(q, ldq, p, ldp, c, ldc, r, rows, w, k, accumulate);
  }
}

template <typename T>
using Fn = void (*)(const T*, int64_t, const T*, int64_t, T*, int64_t, int64_t, int64_t, int64_t,
                    bool);

#define NGCUDA_PANEL_VARIANT(name, attr, T, MR, NR, TRANS)                                  \
  attr void name(const T* q, int64_t ldq, const T* p, int64_t ldp, T* c, int64_t ldc,      \
                 int64_t rows, int64_t w, int64_t k, bool acc) {                            \
    rows_from<T, MR, NR, TRANS>(q, ldq, p, ldp, c, ldc, 0, rows, w, k, acc);                \
  }

NGCUDA_PANEL_VARIANT(generic_tn_f32, , float, 4, 4, true)
NGCUDA_PANEL_VARIANT(generic_nn_f32, , float, 4, 4, false)
NGCUDA_PANEL_VARIANT(generic_tn_f64, , double, 4, 2, true)
NGCUDA_PANEL_VARIANT(generic_nn_f64, , double, 4, 2, false)
#undef NGCUDA_PANEL_VARIANT

#if NGCUDA_PANEL_DISPATCH
// The vector variants are written with intrinsics: left to itself, GCC vectorises the strip of Q
// in the transposed form (the wrong axis) and spills the accumulators. One register holds an
// NR-wide segment of a row of C; MR of them (16 of the 32 zmm, 8 of the 16 ymm) stay in
// registers over the k loop, fed by a broadcast of Q and one load of P per row of the block.
#define NGCUDA_V4 __attribute__((target("arch=x86-64-v4")))
#define NGCUDA_V3 __attribute__((target("arch=x86-64-v3")))

struct Avx512F32 {
  using T = float;
  using V = __m512;
  static constexpr int kWidth = 16;
  NGCUDA_V4 static V load(const T* a) { return _mm512_loadu_ps(a); }
  NGCUDA_V4 static void store(T* a, V v) { _mm512_storeu_ps(a, v); }
  NGCUDA_V4 static V zero() { return _mm512_setzero_ps(); }
  NGCUDA_V4 static V fma(T a, V b, V c) { return _mm512_fmadd_ps(_mm512_set1_ps(a), b, c); }
};
struct Avx512F64 {
  using T = double;
  using V = __m512d;
  static constexpr int kWidth = 8;
  NGCUDA_V4 static V load(const T* a) { return _mm512_loadu_pd(a); }
  NGCUDA_V4 static void store(T* a, V v) { _mm512_storeu_pd(a, v); }
  NGCUDA_V4 static V zero() { return _mm512_setzero_pd(); }
  NGCUDA_V4 static V fma(T a, V b, V c) { return _mm512_fmadd_pd(_mm512_set1_pd(a), b, c); }
};
struct Avx2F32 {
  using T = float;
  using V = __m256;
  static constexpr int kWidth = 8;
  NGCUDA_V3 static V load(const T* a) { return _mm256_loadu_ps(a); }
  NGCUDA_V3 static void store(T* a, V v) { _mm256_storeu_ps(a, v); }
  NGCUDA_V3 static V zero() { return _mm256_setzero_ps(); }
  NGCUDA_V3 static V fma(T a, V b, V c) { return _mm256_fmadd_ps(_mm256_set1_ps(a), b, c); }
};
struct Avx2F64 {
  using T = double;
  using V = __m256d;
  static constexpr int kWidth = 4;
  NGCUDA_V3 static V load(const T* a) { return _mm256_loadu_pd(a); }
  NGCUDA_V3 static void store(T* a, V v) { _mm256_storeu_pd(a, v); }
  NGCUDA_V3 static V zero() { return _mm256_setzero_pd(); }
  NGCUDA_V3 static V fma(T a, V b, V c) { return _mm256_fmadd_pd(_mm256_set1_pd(a), b, c); }
};

template <typename S, int MR, bool kTrans>
NGCUDA_PANEL_INLINE void vblock(const typename S::T* __restrict q, int64_t ldq,
                                const typename S::T* __restrict p, int64_t ldp,
                                typename S::T* __restrict c, int64_t ldc, int64_t k,
                                bool accumulate) {
  typename S::V acc[MR];
#pragma GCC unroll 16
  for (int r = 0; r < MR; ++r) acc[r] = accumulate ? S::load(c + r * ldc) : S::zero();
  for (int64_t s = 0; s < k; ++s) {
    const typename S::V pv = S::load(p + s * ldp);
#pragma GCC unroll 16
    for (int r = 0; r < MR; ++r) acc[r] = S::fma(kTrans ? q[s * ldq + r] : q[r * ldq + s], pv, acc[r]);
  }
#pragma GCC unroll 16
  for (int r = 0; r < MR; ++r) S::store(c + r * ldc, acc[r]);
}

template <typename S, int MR, bool kTrans>
NGCUDA_PANEL_INLINE void vrows_from(const typename S::T* q, int64_t ldq, const typename S::T* p,
                                    int64_t ldp, typename S::T* c, int64_t ldc, int64_t r,
                                    int64_t rows, int64_t w, int64_t k, bool accumulate) {
  static_assert(kPanelPad % S::kWidth == 0, "the vector width must divide the panel padding");
  for (; r + MR <= rows; r += MR) {
    const typename S::T* qr = kTrans ? q + r : q + r * ldq;
    for (int64_t j = 0; j < w; j += S::kWidth) {
      vblock<S, MR, kTrans>(qr, ldq, p + j, ldp, c + r * ldc + j, ldc, k, accumulate);
    }
  }
  if constexpr (MR > 1) {
    vrows_from<S, MR / 2, kTrans>(q, ldq, p, ldp, c, ldc, r, rows, w, k, accumulate);
  }
}

#define NGCUDA_PANEL_VECTOR(name, attr, S, MR, TRANS)                                        \
  attr void name(const S::T* q, int64_t ldq, const S::T* p, int64_t ldp, S::T* c,            \
                 int64_t ldc, int64_t rows, int64_t w, int64_t k, bool acc) {               \
    vrows_from<S, MR, TRANS>(q, ldq, p, ldp, c, ldc, 0, rows, w, k, acc);                    \
  }
NGCUDA_PANEL_VECTOR(avx512_tn_f32, NGCUDA_V4, Avx512F32, 16, true)
NGCUDA_PANEL_VECTOR(avx512_nn_f32, NGCUDA_V4, Avx512F32, 16, false)
NGCUDA_PANEL_VECTOR(avx512_tn_f64, NGCUDA_V4, Avx512F64, 16, true)
NGCUDA_PANEL_VECTOR(avx512_nn_f64, NGCUDA_V4, Avx512F64, 16, false)
NGCUDA_PANEL_VECTOR(avx2_tn_f32, NGCUDA_V3, Avx2F32, 8, true)
NGCUDA_PANEL_VECTOR(avx2_nn_f32, NGCUDA_V3, Avx2F32, 8, false)
NGCUDA_PANEL_VECTOR(avx2_tn_f64, NGCUDA_V3, Avx2F64, 8, true)
NGCUDA_PANEL_VECTOR(avx2_nn_f64, NGCUDA_V3, Avx2F64, 8, false)
#undef NGCUDA_PANEL_VECTOR
#undef NGCUDA_V4
#undef NGCUDA_V3
#endif

template <typename T>
Fn<T> pick(Fn<T> avx512, Fn<T> avx2, Fn<T> generic) {
#if NGCUDA_PANEL_DISPATCH
  switch (gemm::level()) {
    case 2: return avx512;
    case 1: return avx2;
    default: return generic;
  }
#else
  (void)avx512;
  (void)avx2;
  return generic;
#endif
}

#if NGCUDA_PANEL_DISPATCH
#define NGCUDA_PICK(form, T) pick<T>(&avx512_##form, &avx2_##form, &generic_##form)
#else
#define NGCUDA_PICK(form, T) pick<T>(nullptr, nullptr, &generic_##form)
#endif

}  // namespace

void tn(const float* q, int64_t ldq, const float* p, int64_t ldp, float* c, int64_t ldc,
        int64_t rows, int64_t w, int64_t k, bool accumulate) {
  static const Fn<float> fn = NGCUDA_PICK(tn_f32, float);
  fn(q, ldq, p, ldp, c, ldc, rows, w, k, accumulate);
}

void tn(const double* q, int64_t ldq, const double* p, int64_t ldp, double* c, int64_t ldc,
        int64_t rows, int64_t w, int64_t k, bool accumulate) {
  static const Fn<double> fn = NGCUDA_PICK(tn_f64, double);
  fn(q, ldq, p, ldp, c, ldc, rows, w, k, accumulate);
}

void nn(const float* q, int64_t ldq, const float* p, int64_t ldp, float* c, int64_t ldc,
        int64_t rows, int64_t w, int64_t k, bool accumulate) {
  static const Fn<float> fn = NGCUDA_PICK(nn_f32, float);
  fn(q, ldq, p, ldp, c, ldc, rows, w, k, accumulate);
}

void nn(const double* q, int64_t ldq, const double* p, int64_t ldp, double* c, int64_t ldc,
        int64_t rows, int64_t w, int64_t k, bool accumulate) {
  static const Fn<double> fn = NGCUDA_PICK(nn_f64, double);
  fn(q, ldq, p, ldp, c, ldc, rows, w, k, accumulate);
}

#undef NGCUDA_PICK

}  // namespace ngcuda::cpu::panel
