// Register-blocked C = XᵀY, one variant per x86-64 level, picked at load time: setup.py compiles
// for baseline x86-64, and the block shape that fills AVX-512's 32 registers spills on AVX2.
#include "small_gemm.h"

#include <c10/util/Exception.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <string>

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#include <immintrin.h>
#endif

#if defined(__GNUC__)
#define NGCUDA_GEMM_INLINE inline __attribute__((always_inline))
#else
#define NGCUDA_GEMM_INLINE inline
#endif

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define NGCUDA_GEMM_DISPATCH 1
#else
#define NGCUDA_GEMM_DISPATCH 0
#endif

namespace ngcuda::cpu::gemm {
namespace {

// An MR×NR block of C held in registers over the whole k loop: per k, one row segment of Y
// (NR contiguous values) and MR broadcasts of X feed MR·NR fused multiply-adds.
template <typename T, int MR, int NR>
NGCUDA_GEMM_INLINE void block(const T* __restrict x, int64_t ldx, const T* __restrict y,
                              int64_t ldy, T* __restrict c, int64_t ldc, int64_t k,
                              bool accumulate) {
  T acc[MR][NR];
  for (int r = 0; r < MR; ++r) {
    for (int q = 0; q < NR; ++q) acc[r][q] = accumulate ? c[r * ldc + q] : T(0);
  }
  for (int64_t p = 0; p < k; ++p) {
    const T* xp = x + p * ldx;
    const T* yp = y + p * ldy;
#pragma GCC unroll 16
    for (int r = 0; r < MR; ++r) {
      const T xv = xp[r];
#pragma GCC unroll 64
      for (int q = 0; q < NR; ++q) acc[r][q] += xv * yp[q];
    }
  }
  for (int r = 0; r < MR; ++r) {
    for (int q = 0; q < NR; ++q) c[r * ldc + q] = acc[r][q];
  }
}

// The plain blocks, as a policy for `product`.
template <typename T, int MR>
struct PlainBlocks {
  using Elem = T;
  static constexpr int kRows = MR;
  template <int NR>
  NGCUDA_GEMM_INLINE static void run(const T* x, int64_t ldx, const T* y, int64_t ldy, T* c,
                                     int64_t ldc, int64_t k, bool accumulate) {
    block<T, MR, NR>(x, ldx, y, ldy, c, ldc, k, accumulate);
  }
};

template <typename T>
using Fn = void (*)(const T*, int64_t, const T*, int64_t, T*, int64_t, int64_t, int64_t, int64_t,
                    bool, bool);

#if NGCUDA_GEMM_DISPATCH
#define NGCUDA_V4 __attribute__((target("arch=x86-64-v4")))
#define NGCUDA_V3 __attribute__((target("arch=x86-64-v3")))

// Blocks in intrinsics for AVX-512 and AVX2. From the plain `block`, GCC turns the MR broadcasts
// of X into one vector load and MR permutes, whose index vectors spill: the permutes compete with
// the FMAs for the FP pipes (measured about 60% of the FMA peak at n = 64 on Zen 5). A broadcast
// from memory is a load alone, which leaves the FMA pipes to the block. The vector operations
// come from a traits class whose members carry the target; the variants below are `flatten`, so
// everything is inlined into a function compiled for that target.
struct V4f {
  using T = float;
  using V = __m512;
  static constexpr int kLanes = 16;
  NGCUDA_V4 static V zero() { return _mm512_setzero_ps(); }
  NGCUDA_V4 static V load(const T* p) { return _mm512_loadu_ps(p); }
  NGCUDA_V4 static V broadcast(const T* p) { return _mm512_set1_ps(*p); }
  NGCUDA_V4 static V fma(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }
  NGCUDA_V4 static void store(T* p, V v) { _mm512_storeu_ps(p, v); }
};
struct V4d {
  using T = double;
  using V = __m512d;
  static constexpr int kLanes = 8;
  NGCUDA_V4 static V zero() { return _mm512_setzero_pd(); }
  NGCUDA_V4 static V load(const T* p) { return _mm512_loadu_pd(p); }
  NGCUDA_V4 static V broadcast(const T* p) { return _mm512_set1_pd(*p); }
  NGCUDA_V4 static V fma(V a, V b, V c) { return _mm512_fmadd_pd(a, b, c); }
  NGCUDA_V4 static void store(T* p, V v) { _mm512_storeu_pd(p, v); }
};
struct V3f {
  using T = float;
  using V = __m256;
  static constexpr int kLanes = 8;
  NGCUDA_V3 static V zero() { return _mm256_setzero_ps(); }
  NGCUDA_V3 static V load(const T* p) { return _mm256_loadu_ps(p); }
  NGCUDA_V3 static V broadcast(const T* p) { return _mm256_broadcast_ss(p); }
  NGCUDA_V3 static V fma(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }
  NGCUDA_V3 static void store(T* p, V v) { _mm256_storeu_ps(p, v); }
};
struct V3d {
  using T = double;
  using V = __m256d;
  static constexpr int kLanes = 4;
  NGCUDA_V3 static V zero() { return _mm256_setzero_pd(); }
  NGCUDA_V3 static V load(const T* p) { return _mm256_loadu_pd(p); }
  NGCUDA_V3 static V broadcast(const T* p) { return _mm256_broadcast_sd(p); }
  NGCUDA_V3 static V fma(V a, V b, V c) { return _mm256_fmadd_pd(a, b, c); }
  NGCUDA_V3 static void store(T* p, V v) { _mm256_storeu_pd(p, v); }
};

// The templates below have no target of their own (they take it from the variant they are
// flattened into), so GCC warns that their vector values would change the ABI if they were ever
// called out of line; they never are.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wpsabi"

// An MR × (NV·lanes) block of C in MR·NV registers.
template <typename A, int MR, int NV>
NGCUDA_GEMM_INLINE void block_simd(const typename A::T* __restrict x, int64_t ldx,
                                           const typename A::T* __restrict y, int64_t ldy,
                                           typename A::T* __restrict c, int64_t ldc, int64_t k,
                                           bool accumulate) {
  typename A::V acc[MR][NV];
#pragma GCC unroll 16
  for (int r = 0; r < MR; ++r) {
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) {
      acc[r][v] = accumulate ? A::load(c + r * ldc + v * A::kLanes) : A::zero();
    }
  }
  for (int64_t p = 0; p < k; ++p) {
    const typename A::T* xp = x + p * ldx;
    const typename A::T* yp = y + p * ldy;
    typename A::V yv[NV];
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) yv[v] = A::load(yp + v * A::kLanes);
#pragma GCC unroll 16
    for (int r = 0; r < MR; ++r) {
      const typename A::V b = A::broadcast(xp + r);
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) acc[r][v] = A::fma(b, yv[v], acc[r][v]);
    }
  }
#pragma GCC unroll 16
  for (int r = 0; r < MR; ++r) {
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) A::store(c + r * ldc + v * A::kLanes, acc[r][v]);
  }
}

// The intrinsic blocks, as a policy for `product`; NR is a multiple of the vector's lanes.
template <typename A, int MR>
struct SimdBlocks {
  using Elem = typename A::T;
  static constexpr int kRows = MR;
  template <int NR>
  NGCUDA_GEMM_INLINE static void run(const Elem* x, int64_t ldx, const Elem* y, int64_t ldy,
                                     Elem* c, int64_t ldc, int64_t k, bool accumulate) {
    static_assert(NR % A::kLanes == 0, "whole vectors per block row");
    block_simd<A, MR, NR / A::kLanes>(x, ldx, y, ldy, c, ldc, k, accumulate);
  }
};
#pragma GCC diagnostic pop
#endif

// C[0:m, 0:cols] (+)= X[0:k, 0:m]ᵀ·Y[0:k, 0:cols] in MR×NR blocks of `Blocks` (MR its kRows).
// NR2 divides kPad and NR; it finishes a row of blocks and aligns the first block of the upper
// triangle, so every m and cols that are multiples of kPad are covered without remainder code.
template <typename Blocks, int NR, int NR2>
NGCUDA_GEMM_INLINE void product(const typename Blocks::Elem* x, int64_t ldx,
                                const typename Blocks::Elem* y, int64_t ldy,
                                typename Blocks::Elem* c, int64_t ldc, int64_t m, int64_t cols,
                                int64_t k, bool accumulate, bool upper) {
  constexpr int MR = Blocks::kRows;
  static_assert(kPad % MR == 0 && kPad % NR2 == 0 && NR % NR2 == 0, "block shape");
  for (int64_t i = 0; i < m; i += MR) {
    int64_t j = upper ? i / NR2 * NR2 : 0;
    for (; j + NR <= cols; j += NR) {
      Blocks::template run<NR>(x + i, ldx, y + j, ldy, c + i * ldc + j, ldc, k, accumulate);
    }
    for (; j < cols; j += NR2) {
      Blocks::template run<NR2>(x + i, ldx, y + j, ldy, c + i * ldc + j, ldc, k, accumulate);
    }
  }
}

// `flatten` inlines the whole product into the variant, which is compiled for its target.
#define NGCUDA_GEMM_VARIANT(name, attr, Blocks, NR, NR2)                                        \
  attr __attribute__((flatten)) void name(                                                    \
      const Blocks::Elem* x, int64_t ldx, const Blocks::Elem* y, int64_t ldy, Blocks::Elem* c, \
      int64_t ldc, int64_t m, int64_t cols, int64_t k, bool acc, bool upper) {                \
    product<Blocks, NR, NR2>(x, ldx, y, ldy, c, ldc, m, cols, k, acc, upper);                 \
  }

using GenericF32 = PlainBlocks<float, 4>;
using GenericF64 = PlainBlocks<double, 4>;
NGCUDA_GEMM_VARIANT(generic_f32, , GenericF32, 8, 4)
NGCUDA_GEMM_VARIANT(generic_f64, , GenericF64, 4, 2)
#if NGCUDA_GEMM_DISPATCH
// 16 accumulators of the 32 zmm registers (8×16 float64, 8×32 float32). Timed alone at n = 64,
// hot caches, on a 3.7 GHz Zen 5 core: 224 GFLOP/s float32 and 109 float64 (peaks 237 and 118; the
// plain-C++ blocks reached 150 and 83); the AVX2 blocks 107 and 50.
using Avx512F32 = SimdBlocks<V4f, 8>;
using Avx512F64 = SimdBlocks<V4d, 8>;
NGCUDA_GEMM_VARIANT(avx512_f32, NGCUDA_V4, Avx512F32, 32, 16)
NGCUDA_GEMM_VARIANT(avx512_f64, NGCUDA_V4, Avx512F64, 16, 8)
// 8 of the 16 ymm registers.
using Avx2F32 = SimdBlocks<V3f, 4>;
using Avx2F64 = SimdBlocks<V3d, 4>;
NGCUDA_GEMM_VARIANT(avx2_f32, NGCUDA_V3, Avx2F32, 16, 8)
NGCUDA_GEMM_VARIANT(avx2_f64, NGCUDA_V3, Avx2F64, 8, 4)
#endif
#undef NGCUDA_GEMM_VARIANT

// Transposes in tiles of B×B, so both the rows read and the columns written stay within B cache
// lines. The generic variant moves scalars; the AVX-512 one transposes each tile in registers.
constexpr int64_t kTile = 16;

template <typename T>
void tile_transpose(const T* src, T* dst, int64_t ld, int64_t i0, int64_t j0) {
  for (int64_t i = i0; i < i0 + kTile; ++i) {
    for (int64_t j = j0; j < j0 + kTile; ++j) dst[j * ld + i] = src[i * ld + j];
  }
}

template <typename T>
void generic_transpose(const T* src, T* dst, int64_t ld) {
  for (int64_t i0 = 0; i0 < ld; i0 += kTile) {
    for (int64_t j0 = 0; j0 < ld; j0 += kTile) tile_transpose(src, dst, ld, i0, j0);
  }
}

template <typename T>
void generic_mirror(T* c, int64_t ld) {
  for (int64_t i0 = 0; i0 < ld; i0 += kTile) {
    for (int64_t i = i0; i < i0 + kTile; ++i) {
      for (int64_t j = i + 1; j < i0 + kTile; ++j) c[j * ld + i] = c[i * ld + j];
    }
    for (int64_t j0 = i0 + kTile; j0 < ld; j0 += kTile) tile_transpose(c, c, ld, i0, j0);
  }
}

#if NGCUDA_GEMM_DISPATCH
#define NGCUDA_AVX512 __attribute__((target("arch=x86-64-v4")))
// GCC 12 flags the deliberately undefined pass-through operand inside _mm512_unpack*_ps.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

// 16×16 floats in 16 registers: 4×4 interleaves, then pairs, then 128-bit lanes twice.
NGCUDA_AVX512 inline void transpose16(__m512* r) {
  __m512 t[16];
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_unpacklo_ps(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_ps(r[i], r[i + 1]);
  }
  for (int i = 0; i < 16; i += 4) {
    const __m512d a = _mm512_castps_pd(t[i]), b = _mm512_castps_pd(t[i + 1]);
    const __m512d c = _mm512_castps_pd(t[i + 2]), d = _mm512_castps_pd(t[i + 3]);
    r[i] = _mm512_castpd_ps(_mm512_unpacklo_pd(a, c));
    r[i + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(a, c));
    r[i + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(b, d));
    r[i + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(b, d));
  }
  for (int h = 0; h < 16; h += 8) {
    for (int i = 0; i < 4; ++i) {
      t[h + i] = _mm512_shuffle_f32x4(r[h + i], r[h + i + 4], 0x88);
      t[h + i + 4] = _mm512_shuffle_f32x4(r[h + i], r[h + i + 4], 0xdd);
    }
  }
  for (int i = 0; i < 8; ++i) {
    r[i] = _mm512_shuffle_f32x4(t[i], t[i + 8], 0x88);
    r[i + 8] = _mm512_shuffle_f32x4(t[i], t[i + 8], 0xdd);
  }
}

// 8×8 doubles in 8 registers.
NGCUDA_AVX512 inline void transpose8(__m512d* r) {
  __m512d t[8], u[8];
  for (int i = 0; i < 8; i += 2) {
    t[i] = _mm512_unpacklo_pd(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_pd(r[i], r[i + 1]);
  }
  for (int h = 0; h < 8; h += 4) {
    u[h] = _mm512_shuffle_f64x2(t[h], t[h + 2], 0x88);
    u[h + 1] = _mm512_shuffle_f64x2(t[h + 1], t[h + 3], 0x88);
    u[h + 2] = _mm512_shuffle_f64x2(t[h], t[h + 2], 0xdd);
    u[h + 3] = _mm512_shuffle_f64x2(t[h + 1], t[h + 3], 0xdd);
  }
  for (int i = 0; i < 4; ++i) {
    r[i] = _mm512_shuffle_f64x2(u[i], u[i + 4], 0x88);
    r[i + 4] = _mm512_shuffle_f64x2(u[i], u[i + 4], 0xdd);
  }
}

// Tile (i0, j0) of src, transposed, into tile (j0, i0) of dst; on the diagonal (diag) only the
// strictly lower part of dst is written, so the tile can be mirrored in place.
NGCUDA_AVX512 void tile16(const float* src, float* dst, int64_t ld, int64_t i0, int64_t j0,
                          bool diag) {
  __m512 r[16];
  for (int i = 0; i < 16; ++i) r[i] = _mm512_loadu_ps(src + (i0 + i) * ld + j0);
  transpose16(r);
  for (int j = 0; j < 16; ++j) {
    float* out = dst + (j0 + j) * ld + i0;
    if (diag) {
      _mm512_mask_storeu_ps(out, static_cast<__mmask16>((1u << j) - 1u), r[j]);
    } else {
      _mm512_storeu_ps(out, r[j]);
    }
  }
}

NGCUDA_AVX512 void tile8(const double* src, double* dst, int64_t ld, int64_t i0, int64_t j0,
                         bool diag) {
  __m512d r[8];
  for (int i = 0; i < 8; ++i) r[i] = _mm512_loadu_pd(src + (i0 + i) * ld + j0);
  transpose8(r);
  for (int j = 0; j < 8; ++j) {
    double* out = dst + (j0 + j) * ld + i0;
    if (diag) {
      _mm512_mask_storeu_pd(out, static_cast<__mmask8>((1u << j) - 1u), r[j]);
    } else {
      _mm512_storeu_pd(out, r[j]);
    }
  }
}

NGCUDA_AVX512 void avx512_transpose_f32(const float* src, float* dst, int64_t ld) {
  for (int64_t i0 = 0; i0 < ld; i0 += 16) {
    for (int64_t j0 = 0; j0 < ld; j0 += 16) tile16(src, dst, ld, i0, j0, false);
  }
}
NGCUDA_AVX512 void avx512_transpose_f64(const double* src, double* dst, int64_t ld) {
  for (int64_t i0 = 0; i0 < ld; i0 += 8) {
    for (int64_t j0 = 0; j0 < ld; j0 += 8) tile8(src, dst, ld, i0, j0, false);
  }
}
NGCUDA_AVX512 void avx512_mirror_f32(float* c, int64_t ld) {
  for (int64_t i0 = 0; i0 < ld; i0 += 16) {
    for (int64_t j0 = i0; j0 < ld; j0 += 16) tile16(c, c, ld, i0, j0, j0 == i0);
  }
}
NGCUDA_AVX512 void avx512_mirror_f64(double* c, int64_t ld) {
  for (int64_t i0 = 0; i0 < ld; i0 += 8) {
    for (int64_t j0 = i0; j0 < ld; j0 += 8) tile8(c, c, ld, i0, j0, j0 == i0);
  }
}
#pragma GCC diagnostic pop
#endif

enum Level { kGeneric, kAvx2, kAvx512 };

// NGCUDA_CPU_ISA=generic|avx2|avx512 caps the level (read once): it lets the tests run the
// variants a machine would not pick by itself, and a user rule out a suspect one.
Level capped(Level detected) {
  const char* env = std::getenv("NGCUDA_CPU_ISA");
  if (env == nullptr || *env == '\0') return detected;
  const std::string name(env);
  TORCH_CHECK(name == "generic" || name == "avx2" || name == "avx512",
              "ngcuda: NGCUDA_CPU_ISA must be generic, avx2 or avx512, got '", name, "'");
  const Level cap = name == "generic" ? kGeneric : name == "avx2" ? kAvx2 : kAvx512;
  return std::min(detected, cap);
}

Level isa() {
#if NGCUDA_GEMM_DISPATCH
  static const Level value = capped([] {
    __builtin_cpu_init();
    if (__builtin_cpu_supports("x86-64-v4")) return kAvx512;
    if (__builtin_cpu_supports("x86-64-v3")) return kAvx2;
    return kGeneric;
  }());
  return value;
#else
  static const Level value = capped(kGeneric);
  return value;
#endif
}

template <typename T>
Fn<T> pick(Fn<T> avx512, Fn<T> avx2, Fn<T> generic) {
  switch (isa()) {
    case kAvx512: return avx512;
    case kAvx2: return avx2;
    default: return generic;
  }
}

Fn<float> f32_kernel() {
#if NGCUDA_GEMM_DISPATCH
  static const Fn<float> fn = pick<float>(&avx512_f32, &avx2_f32, &generic_f32);
#else
  static const Fn<float> fn = &generic_f32;
#endif
  return fn;
}

Fn<double> f64_kernel() {
#if NGCUDA_GEMM_DISPATCH
  static const Fn<double> fn = pick<double>(&avx512_f64, &avx2_f64, &generic_f64);
#else
  static const Fn<double> fn = &generic_f64;
#endif
  return fn;
}

}  // namespace

void xty(const float* x, const float* y, float* c, int64_t m, int64_t k, int64_t ld,
         bool accumulate, bool upper) {
  f32_kernel()(x, ld, y, ld, c, ld, m, m, k, accumulate, upper);
}

void xty(const double* x, const double* y, double* c, int64_t m, int64_t k, int64_t ld,
         bool accumulate, bool upper) {
  f64_kernel()(x, ld, y, ld, c, ld, m, m, k, accumulate, upper);
}

void xty(const float* x, int64_t ldx, const float* y, int64_t ldy, float* c, int64_t ldc,
         int64_t m, int64_t cols, int64_t k) {
  f32_kernel()(x, ldx, y, ldy, c, ldc, m, cols, k, false, false);
}

void xty(const double* x, int64_t ldx, const double* y, int64_t ldy, double* c, int64_t ldc,
         int64_t m, int64_t cols, int64_t k) {
  f64_kernel()(x, ldx, y, ldy, c, ldc, m, cols, k, false, false);
}

void transpose(const float* src, float* dst, int64_t ld) {
#if NGCUDA_GEMM_DISPATCH
  if (isa() == kAvx512) return avx512_transpose_f32(src, dst, ld);
#endif
  generic_transpose(src, dst, ld);
}

void transpose(const double* src, double* dst, int64_t ld) {
#if NGCUDA_GEMM_DISPATCH
  if (isa() == kAvx512) return avx512_transpose_f64(src, dst, ld);
#endif
  generic_transpose(src, dst, ld);
}

void mirror_upper(float* c, int64_t ld) {
#if NGCUDA_GEMM_DISPATCH
  if (isa() == kAvx512) return avx512_mirror_f32(c, ld);
#endif
  generic_mirror(c, ld);
}

void mirror_upper(double* c, int64_t ld) {
#if NGCUDA_GEMM_DISPATCH
  if (isa() == kAvx512) return avx512_mirror_f64(c, ld);
#endif
  generic_mirror(c, ld);
}

int level() { return static_cast<int>(isa()); }

const char* variant() {
  switch (isa()) {
    case kAvx512: return "avx512";
    case kAvx2: return "avx2";
    default: return "generic";
  }
}

}  // namespace ngcuda::cpu::gemm
