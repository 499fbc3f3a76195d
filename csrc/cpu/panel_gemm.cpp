// Register-blocked products of a square matrix with a narrow panel; see panel_gemm.h.
#include "panel_gemm.h"

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

// Each variant is one template over an element-wise "vector" S: an NR-wide segment of a row of C
// is one S::V; MR of them (16 of the 32 zmm, 8 of the 16 ymm) stay in registers over the k loop,
// fed per k by MR broadcasts of Q and one load of P. The vector types are written with intrinsics:
// left to itself, GCC vectorises the strip of Q in the transposed form (the wrong axis) and
// spills the accumulators.
template <typename Ty, int W>
struct Scalar {
  using T = Ty;
  struct V {
    T v[W];
  };
  static constexpr int kWidth = W;
  static V load(const T* a) {
    V r;
    for (int i = 0; i < W; ++i) r.v[i] = a[i];
    return r;
  }
  static void store(T* a, const V& x) {
    for (int i = 0; i < W; ++i) a[i] = x.v[i];
  }
  static V zero() { return V{}; }
  static V fma(T a, const V& b, V c) {
    for (int i = 0; i < W; ++i) c.v[i] += a * b.v[i];
    return c;
  }
};

// block and rows_from have no target of their own (they take it from the variant they are
// inlined into), so GCC warns that their vector values would change the ABI if they were ever
// called out of line; they never are.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wpsabi"
#endif

template <typename S, int MR, bool kTrans>
NGCUDA_PANEL_INLINE void block(const typename S::T* __restrict q, int64_t ldq,
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

// Rows in blocks of MR, then the remainder in blocks of MR/2, MR/4, ... 1.
template <typename S, int MR, bool kTrans>
NGCUDA_PANEL_INLINE void rows_from(const typename S::T* q, int64_t ldq, const typename S::T* p,
                                   int64_t ldp, typename S::T* c, int64_t ldc, int64_t r,
                                   int64_t rows, int64_t w, int64_t k, bool accumulate) {
  static_assert(gemm::kPad % S::kWidth == 0, "the vector width must divide the panel padding");
  for (; r + MR <= rows; r += MR) {
    const typename S::T* qr = kTrans ? q + r : q + r * ldq;
    for (int64_t j = 0; j < w; j += S::kWidth) {
      block<S, MR, kTrans>(qr, ldq, p + j, ldp, c + r * ldc + j, ldc, k, accumulate);
    }
  }
  if constexpr (MR > 1) {
    rows_from<S, MR / 2, kTrans>(q, ldq, p, ldp, c, ldc, r, rows, w, k, accumulate);
  }
}

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic pop
#endif

template <typename T>
using Fn = void (*)(const T*, int64_t, const T*, int64_t, T*, int64_t, int64_t, int64_t, int64_t,
                    bool);

#define NGCUDA_PANEL_VARIANT(name, attr, S, MR, TRANS)                                         \
  attr void name(const S::T* q, int64_t ldq, const S::T* p, int64_t ldp, S::T* c, int64_t ldc, \
                 int64_t rows, int64_t w, int64_t k, bool acc) {                                \
    rows_from<S, MR, TRANS>(q, ldq, p, ldp, c, ldc, 0, rows, w, k, acc);                         \
  }

using GenericF32 = Scalar<float, 4>;
using GenericF64 = Scalar<double, 4>;
NGCUDA_PANEL_VARIANT(generic_tn_f32, , GenericF32, 4, true)
NGCUDA_PANEL_VARIANT(generic_nn_f32, , GenericF32, 4, false)
NGCUDA_PANEL_VARIANT(generic_tn_f64, , GenericF64, 4, true)
NGCUDA_PANEL_VARIANT(generic_nn_f64, , GenericF64, 4, false)

#if NGCUDA_PANEL_DISPATCH
#define NGCUDA_V4 __attribute__((target("arch=x86-64-v4")))
#define NGCUDA_V3 __attribute__((target("arch=x86-64-v3")))
#define NGCUDA_VECTOR_TYPE(Name, attr, Ty, Vy, W, pre, suf)                                    \
  struct Name {                                                                                 \
    using T = Ty;                                                                               \
    using V = Vy;                                                                               \
    static constexpr int kWidth = W;                                                            \
    attr static V load(const T* a) { return pre##_loadu_##suf(a); }                             \
    attr static void store(T* a, V v) { pre##_storeu_##suf(a, v); }                             \
    attr static V zero() { return pre##_setzero_##suf(); }                                      \
    attr static V fma(T a, V b, V c) { return pre##_fmadd_##suf(pre##_set1_##suf(a), b, c); }   \
  };
NGCUDA_VECTOR_TYPE(Avx512F32, NGCUDA_V4, float, __m512, 16, _mm512, ps)
NGCUDA_VECTOR_TYPE(Avx512F64, NGCUDA_V4, double, __m512d, 8, _mm512, pd)
NGCUDA_VECTOR_TYPE(Avx2F32, NGCUDA_V3, float, __m256, 8, _mm256, ps)
NGCUDA_VECTOR_TYPE(Avx2F64, NGCUDA_V3, double, __m256d, 4, _mm256, pd)
#undef NGCUDA_VECTOR_TYPE

NGCUDA_PANEL_VARIANT(avx512_tn_f32, NGCUDA_V4, Avx512F32, 16, true)
NGCUDA_PANEL_VARIANT(avx512_nn_f32, NGCUDA_V4, Avx512F32, 16, false)
NGCUDA_PANEL_VARIANT(avx512_tn_f64, NGCUDA_V4, Avx512F64, 16, true)
NGCUDA_PANEL_VARIANT(avx512_nn_f64, NGCUDA_V4, Avx512F64, 16, false)
NGCUDA_PANEL_VARIANT(avx2_tn_f32, NGCUDA_V3, Avx2F32, 8, true)
NGCUDA_PANEL_VARIANT(avx2_nn_f32, NGCUDA_V3, Avx2F32, 8, false)
NGCUDA_PANEL_VARIANT(avx2_tn_f64, NGCUDA_V3, Avx2F64, 8, true)
NGCUDA_PANEL_VARIANT(avx2_nn_f64, NGCUDA_V3, Avx2F64, 8, false)
#undef NGCUDA_V4
#undef NGCUDA_V3
#endif
#undef NGCUDA_PANEL_VARIANT

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

// The entry points: each resolves its variant once, on first use.
#define NGCUDA_PANEL_ENTRY(form, T, suffix)                                                    \
  void form(const T* q, int64_t ldq, const T* p, int64_t ldp, T* c, int64_t ldc, int64_t rows, \
            int64_t w, int64_t k, bool accumulate) {                                            \
    static const Fn<T> fn = NGCUDA_PICK(form##_##suffix, T);                                    \
    fn(q, ldq, p, ldp, c, ldc, rows, w, k, accumulate);                                         \
  }
NGCUDA_PANEL_ENTRY(tn, float, f32)
NGCUDA_PANEL_ENTRY(tn, double, f64)
NGCUDA_PANEL_ENTRY(nn, float, f32)
NGCUDA_PANEL_ENTRY(nn, double, f64)
#undef NGCUDA_PANEL_ENTRY
#undef NGCUDA_PICK

}  // namespace ngcuda::cpu::panel
