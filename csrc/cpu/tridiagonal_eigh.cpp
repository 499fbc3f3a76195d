// Householder tridiagonalisation + implicit QL for batched_eigh's cold path (tridiagonal_eigh.h).
#include "tridiagonal_eigh.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <limits>
#include <vector>

#include <c10/util/Exception.h>

#include "jacobi.h"
#include "small_gemm.h"

// setup.py compiles for baseline x86-64: the kernels are built once more for AVX2 and AVX-512
// and picked at run time by the level small_gemm detects (NGCUDA_CPU_ISA caps it, so the tests
// can run every variant).
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define NGCUDA_TRIDIAG_DISPATCH 1
#else
#define NGCUDA_TRIDIAG_DISPATCH 0
#endif

namespace ngcuda::cpu::tridiag {
namespace {

// QL iterations allowed per eigenvalue; one or two are typical, so hitting this means the input is
// pathological and the caller falls back to LAPACK. NGCUDA_EIGH_QL_MAX_ITERATIONS overrides it
// (read once), which lets the tests take that fallback.
int max_iterations() {
  static const int value = [] {
    const char* env = std::getenv("NGCUDA_EIGH_QL_MAX_ITERATIONS");
    return env ? std::atoi(env) : 30;
  }();
  return value;
}

// Reduces the symmetric a (overwritten) to T = QᵀAQ with Q = H_0 H_1 ⋯ H_{n−3}; H_k = I − τ_k v_k v_kᵀ
// acts on indices k+1..n−1. Writes d [n] (diagonal of T), e [n] (e_i couples i and i+1; e_{n−1} = 0),
// v_k into row k of `v` (entries k+1..n−1, v_k[k+1] = 1) and τ_k into tau [n].
NGCUDA_ALWAYS_INLINE void tridiagonalize(double* NGCUDA_RESTRICT a, double* NGCUDA_RESTRICT v,
                                         double* NGCUDA_RESTRICT p, double* NGCUDA_RESTRICT d,
                                         double* NGCUDA_RESTRICT e, double* NGCUDA_RESTRICT tau,
                                         int64_t n) {
  for (int64_t k = 0; k + 2 < n; ++k) {
    const int64_t m = n - k - 1;  // length of the column below the diagonal
    const double* x = a + k * n + k + 1;  // row k right of the diagonal = column k below it
    double* vk = v + k * n + k + 1;
    double sigma = 0.0;
    for (int64_t j = 1; j < m; ++j) sigma += x[j] * x[j];
    const double alpha = x[0];
    d[k] = a[k * n + k];
    if (sigma == 0.0) {  // already tridiagonal in this column: H_k = I
      tau[k] = 0.0;
      e[k] = alpha;
      vk[0] = 1.0;
      for (int64_t j = 1; j < m; ++j) vk[j] = 0.0;
      continue;
    }
    const double beta = -std::copysign(std::sqrt(alpha * alpha + sigma), alpha);
    const double scale = 1.0 / (alpha - beta);
    vk[0] = 1.0;
    for (int64_t j = 1; j < m; ++j) vk[j] = x[j] * scale;
    const double t = (beta - alpha) / beta;
    tau[k] = t;
    e[k] = beta;

    // Trailing block A22 ← H A22 H = A22 − v wᵀ − w vᵀ with p = τ A22 v, w = p − (τ/2)(pᵀv) v.
    double* a22 = a + (k + 1) * n + (k + 1);
    // A22 v as a sum of rows (A22 is symmetric), two rows per pass over p: these passes are
    // bound by loads and stores, not arithmetic.
    for (int64_t j = 0; j < m; ++j) p[j] = 0.0;
    int64_t i = 0;
    for (; i + 1 < m; i += 2) {
      const double* r0 = a22 + i * n;
      const double* r1 = r0 + n;
      const double c0 = t * vk[i], c1 = t * vk[i + 1];
#pragma GCC ivdep
      for (int64_t j = 0; j < m; ++j) p[j] += c0 * r0[j] + c1 * r1[j];
    }
    if (i < m) {
      const double* r0 = a22 + i * n;
      const double c0 = t * vk[i];
#pragma GCC ivdep
      for (int64_t j = 0; j < m; ++j) p[j] += c0 * r0[j];
    }
    double pv = 0.0;
    for (int64_t j = 0; j < m; ++j) pv += p[j] * vk[j];
    const double half = 0.5 * t * pv;
    for (int64_t j = 0; j < m; ++j) p[j] -= half * vk[j];
    for (i = 0; i + 1 < m; i += 2) {
      double* r0 = a22 + i * n;
      double* r1 = r0 + n;
      const double v0 = vk[i], w0 = p[i], v1 = vk[i + 1], w1 = p[i + 1];
#pragma GCC ivdep
      for (int64_t j = 0; j < m; ++j) {
        const double pj = p[j], vj = vk[j];
        r0[j] -= v0 * pj + w0 * vj;
        r1[j] -= v1 * pj + w1 * vj;
      }
    }
    if (i < m) {
      double* r0 = a22 + i * n;
      const double v0 = vk[i], w0 = p[i];
#pragma GCC ivdep
      for (int64_t j = 0; j < m; ++j) r0[j] -= v0 * p[j] + w0 * vk[j];
    }
  }
  if (n >= 2) {
    d[n - 2] = a[(n - 2) * n + (n - 2)];
    e[n - 2] = a[(n - 1) * n + (n - 2)];
  }
  d[n - 1] = a[(n - 1) * n + (n - 1)];
  e[n - 1] = 0.0;
}

// Forms Qᵀ into wt [n, n] from the reflectors: Q = H_0 (H_1 (⋯ H_{n−3})), built innermost first so
// that each product only touches its trailing block, then transposed (its rows reversed when
// `reversed`). Reflectors go two at a time: H_{k−1} H_k M = M − τ_k v_k u_kᵀ − τ_{k−1} v_{k−1} u_{k−1}ᵀ
// with u_k = v_kᵀM and u_{k−1} = v_{k−1}ᵀM − τ_k (v_{k−1}ᵀv_k) u_k: one pass over M for both u and
// one for the update, instead of two each. `u` is scratch of 3n.
NGCUDA_ALWAYS_INLINE void form_qt(const double* NGCUDA_RESTRICT v, const double* NGCUDA_RESTRICT tau,
                                  double* NGCUDA_RESTRICT q, double* NGCUDA_RESTRICT u,
                                  double* NGCUDA_RESTRICT wt, int64_t n, bool reversed) {
  std::fill(q, q + n * n, 0.0);
  for (int64_t i = 0; i < n; ++i) q[i * n + i] = 1.0;
  double* u1 = u;           // u_k
  double* x1 = u + n;       // v_k in the frame of the pair's block (zero at 0)
  double* u0 = u + 2 * n;   // u_{k−1}
  int64_t k = n - 3;
  for (; k >= 1; k -= 2) {
    const int64_t m = n - k;  // the block [k:, k:] that H_{k−1} acts on
    const double t1 = tau[k], t0 = tau[k - 1];
    const double* v0 = v + (k - 1) * n + k;
    x1[0] = 0.0;
    for (int64_t j = 1; j < m; ++j) x1[j] = v[k * n + k + j];
    double* block = q + k * n + k;
    for (int64_t j = 0; j < m; ++j) u1[j] = u0[j] = 0.0;
    for (int64_t i = 0; i < m; ++i) {
      const double* row = block + i * n;
      const double a1 = x1[i], a0 = v0[i];
#pragma GCC ivdep
      for (int64_t j = 0; j < m; ++j) {
        u1[j] += a1 * row[j];
        u0[j] += a0 * row[j];
      }
    }
    double dot = 0.0;
    for (int64_t j = 1; j < m; ++j) dot += v0[j] * x1[j];
    for (int64_t j = 0; j < m; ++j) u0[j] -= t1 * dot * u1[j];
    for (int64_t i = 0; i < m; ++i) {
      double* row = block + i * n;
      const double c1 = t1 * x1[i], c0 = t0 * v0[i];
#pragma GCC ivdep
      for (int64_t j = 0; j < m; ++j) row[j] -= c1 * u1[j] + c0 * u0[j];
    }
  }
  if (k == 0 && tau[0] != 0.0) {  // H_0 alone, on the block [1:, 1:]
    const int64_t m = n - 1;
    const double t = tau[0];
    const double* vk = v + 1;
    double* block = q + n + 1;
    for (int64_t j = 0; j < m; ++j) u1[j] = 0.0;
    for (int64_t i = 0; i < m; ++i) {
      const double* row = block + i * n;
      const double vi = vk[i];
#pragma GCC ivdep
      for (int64_t j = 0; j < m; ++j) u1[j] += vi * row[j];
    }
    for (int64_t i = 0; i < m; ++i) {
      double* row = block + i * n;
      const double tv = t * vk[i];
#pragma GCC ivdep
      for (int64_t j = 0; j < m; ++j) row[j] -= tv * u1[j];
    }
  }
  // In 8×8 tiles: a plain column-order write strides n doubles, and at n = 128 that alone took
  // a fifth of this function.
  for (int64_t i0 = 0; i0 < n; i0 += 8) {
    for (int64_t j0 = 0; j0 < n; j0 += 8) {
      for (int64_t j = j0; j < std::min(n, j0 + 8); ++j) {
        double* out = wt + (reversed ? n - 1 - j : j) * n;
        for (int64_t i = i0; i < std::min(n, i0 + 8); ++i) out[i] = q[i * n + j];
      }
    }
  }
}

// W doubles, loaded and stored unaligned: the register width of each build (8 for AVX-512, 4 for
// AVX2, 2 for the baseline). GCC does not vectorise the carried loop below by itself, so it is
// written with vector types; a type wider than the registers would spill.
template <int W>
struct Lanes {
  typedef double type __attribute__((vector_size(8 * W), aligned(8)));
};

// Applies the rotations of one QL iteration, i = hi−1 down to lo, each to rows i and i+1 of wt, one
// block of W·V columns at a time: row i+1 is final after rotation i, and row i is carried in
// registers into rotation i−1, so each rotation loads and stores one row instead of two.
template <int W, int V>
NGCUDA_ALWAYS_INLINE void rotate_block(double* NGCUDA_RESTRICT wt, int64_t n, int64_t lo, int64_t hi,
                                       const double* NGCUDA_RESTRICT c,
                                       const double* NGCUDA_RESTRICT s) {
  using Vec = typename Lanes<W>::type;
  Vec carry[V];
  for (int v = 0; v < V; ++v) carry[v] = *reinterpret_cast<const Vec*>(wt + hi * n + W * v);
  for (int64_t i = hi - 1; i >= lo; --i) {
    const double* x = wt + i * n;
    double* y = wt + (i + 1) * n;
    const double ci = c[i], si = s[i];
    for (int v = 0; v < V; ++v) {
      const Vec xv = *reinterpret_cast<const Vec*>(x + W * v);
      *reinterpret_cast<Vec*>(y + W * v) = si * xv + ci * carry[v];
      carry[v] = ci * xv - si * carry[v];
    }
  }
  for (int v = 0; v < V; ++v) *reinterpret_cast<Vec*>(wt + lo * n + W * v) = carry[v];
}

NGCUDA_ALWAYS_INLINE void rotate_tail(double* NGCUDA_RESTRICT wt, int64_t n, int64_t lo, int64_t hi,
                                      int64_t width, const double* NGCUDA_RESTRICT c,
                                      const double* NGCUDA_RESTRICT s) {
  for (int64_t i = hi - 1; i >= lo; --i) {
    double* x = wt + i * n;
    double* y = wt + (i + 1) * n;
    const double ci = c[i], si = s[i];
    for (int64_t j = 0; j < width; ++j) {
      const double xj = x[j], yj = y[j];
      y[j] = si * xj + ci * yj;
      x[j] = ci * xj - si * yj;
    }
  }
}

template <int W>
NGCUDA_ALWAYS_INLINE void apply_rotations(double* wt, int64_t n, int64_t lo, int64_t hi,
                                          const double* c, const double* s) {
  // Each carried block is a dependency chain of one multiply and one FMA per rotation: eight blocks
  // in flight keep the FMA units busy.
  int64_t j = 0;
  for (; j + 8 * W <= n; j += 8 * W) rotate_block<W, 8>(wt + j, n, lo, hi, c, s);
  for (; j + 4 * W <= n; j += 4 * W) rotate_block<W, 4>(wt + j, n, lo, hi, c, s);
  for (; j + 2 * W <= n; j += 2 * W) rotate_block<W, 2>(wt + j, n, lo, hi, c, s);
  for (; j + W <= n; j += W) rotate_block<W, 1>(wt + j, n, lo, hi, c, s);
  if (j < n) rotate_tail(wt + j, n, lo, hi, n - j, c, s);
}

// Implicit QL with Wilkinson shifts on the tridiagonal (d, e) of one matrix, as a state machine that
// advances one rotation per step(). Each rotation waits on the previous one's square root and
// divisions (about 40 cycles), so a single QL leaves the core mostly idle; stepping several
// matrices in turn lets their independent chains overlap. An iteration's rotations are recorded and
// applied to the rows of wt when it ends.
// Deflates where |e_m| ≤ ε·‖T‖ (absolute, as the accuracy asked is relative to ‖A‖).
struct ImplicitQl {
  double* d = nullptr;
  double* e = nullptr;
  double* wt = nullptr;
  double* rc = nullptr;  // [n]: the current iteration's rotation cosines
  double* rs = nullptr;  // [n]: and sines
  int64_t n = 0;
  double small = 0.0;
  int64_t l = 0, m = 0, i = -1;  // active block [l, m]; next rotation at i (i < l: none pending)
  int iteration = 0;
  int max_iteration = 0;
  double s = 0.0, c = 0.0, p = 0.0, g = 0.0;
  bool failed = false;  // an eigenvalue took more than max_iteration

  ImplicitQl() = default;
  ImplicitQl(double* d_, double* e_, double* wt_, double* rc_, double* rs_, int64_t n_)
      : d(d_), e(e_), wt(wt_), rc(rc_), rs(rs_), n(n_), max_iteration(max_iterations()) {
    double norm = 0.0;
    for (int64_t k = 0; k < n; ++k) norm = std::max(norm, std::abs(d[k]) + std::abs(e[k]));
    small = std::numeric_limits<double>::epsilon() * norm;
  }

  // Applies the next rotation (starting a new iteration first if needed); false when done. W: the
  // vector width of the build.
  template <int W>
  NGCUDA_ALWAYS_INLINE bool step() {
    if (i < l) {
      for (;;) {
        if (l >= n) return false;
        m = l;
        while (m + 1 < n && std::abs(e[m]) > small) ++m;
        if (m == l) {
          ++l;
          iteration = 0;
          continue;
        }
        if (iteration >= max_iteration) {
          failed = true;
          return false;
        }
        ++iteration;
        // Shift: the eigenvalue of the leading 2×2 block nearer d_l.
        const double h = (d[l + 1] - d[l]) / (2.0 * e[l]);
        const double r = std::sqrt(h * h + 1.0);
        g = d[m] - d[l] + e[l] / (h + std::copysign(r, h));
        s = c = 1.0;
        p = 0.0;
        i = m - 1;
        break;
      }
    }
    const double f = s * e[i], b = c * e[i];
    double r = std::sqrt(f * f + g * g);
    e[i + 1] = r;
    if (r == 0.0) {  // exact split: this iteration ends here, the next one rescans
      d[i + 1] -= p;
      e[m] = 0.0;
      apply_rotations<W>(wt, n, i + 1, m, rc, rs);
      i = l - 1;
      return true;
    }
    // One division, not two: with several chains in flight the divider (which also takes the
    // square root) is the busiest unit.
    const double inv = 1.0 / r;
    s = f * inv;
    c = g * inv;
    g = d[i + 1] - p;
    r = (d[i] - g) * s + 2.0 * c * b;
    p = s * r;
    d[i + 1] = g + p;
    g = c * r - b;
    rc[i] = c;
    rs[i] = s;
    if (--i < l) {
      d[l] -= p;
      e[l] = g;
      e[m] = 0.0;
      apply_rotations<W>(wt, n, l, m, rc, rs);
    }
    return true;
  }
};

// Runs the QLs of K matrices to completion, one rotation of each in turn. The states are local
// copies stepped with constant indices, so their scalars stay in registers rather than making
// each rotation's chain wait on a store and a reload.
template <int W, int K>
NGCUDA_ALWAYS_INLINE void interleaved_ql(ImplicitQl* ql) {
  ImplicitQl q[K];
  for (int k = 0; k < K; ++k) q[k] = ql[k];
  bool active[K];
  for (int k = 0; k < K; ++k) active[k] = true;
  for (bool any = true; any;) {
    any = false;
#pragma GCC unroll 4
    for (int k = 0; k < K; ++k) {
      if (active[k]) {
        active[k] = q[k].template step<W>();
        any = any || active[k];
      }
    }
  }
  for (int k = 0; k < K; ++k) ql[k].failed = q[k].failed;
}

template <int W>
NGCUDA_ALWAYS_INLINE void implicit_ql(ImplicitQl* ql, int count) {
  static_assert(kGroup == 4, "implicit_ql handles groups of 1 to 4");
  switch (count) {
    case 1: interleaved_ql<W, 1>(ql); break;
    case 2: interleaved_ql<W, 2>(ql); break;
    case 3: interleaved_ql<W, 3>(ql); break;
    default: interleaved_ql<W, 4>(ql); break;
  }
}

// QL deflates at the top of T, and converges fastest when the small entries are there (LAPACK's
// ?steqr picks QL or QR by the same test). Reverses T when its top end is the larger one, and
// says so: the rows of Qᵀ must then be reversed with it.
NGCUDA_ALWAYS_INLINE bool reverse_graded(double* d, double* e, int64_t n) {
  if (n < 2 || !(std::abs(d[0]) > std::abs(d[n - 1]))) return false;
  std::reverse(d, d + n);
  std::reverse(e, e + n - 1);
  return true;
}

// Symmetric float64 copy of the lower triangle of a, scaled by a power of two near 1/max|a_ij| so
// that no square in the rotations can overflow or underflow, whatever the magnitude of a, and the
// scaling itself rounds nothing. Returns the scale to multiply the eigenvalues by.
template <typename T>
double scaled_copy(const T* a, double* sym, int64_t n) {
  double amax = 0.0;
  for (int64_t i = 0; i < n; ++i) {
    for (int64_t j = 0; j <= i; ++j) {
      amax = std::max(amax, std::abs(static_cast<double>(a[i * n + j])));
    }
  }
  int exponent = 0;
  if (amax > 0.0) std::frexp(amax, &exponent);
  exponent = std::clamp(exponent, -1020, 1020);  // 2^±exponent stays finite for subnormal inputs
  const double inv = std::ldexp(1.0, -exponent);
  for (int64_t i = 0; i < n; ++i) {
    for (int64_t j = 0; j <= i; ++j) {
      const double x = static_cast<double>(a[i * n + j]) * inv;
      sym[i * n + j] = x;
      sym[j * n + i] = x;
    }
  }
  return std::ldexp(1.0, exponent);
}

// One matrix's float64 buffers in this thread, grown on demand and kept: fresh ones each call
// would page-fault.
struct Buffers {
  std::vector<double> a, v, q, wt, p, d, e, tau, rc, rs;
  std::vector<int64_t> order;
  void reserve(int64_t n) {
    if (static_cast<int64_t>(order.size()) >= n) return;
    for (auto* m : {&a, &v, &q, &wt}) m->resize(n * n);
    for (auto* x : {&d, &e, &tau, &rc, &rs}) x->resize(n);
    p.resize(3 * n);  // also form_qt's scratch
    order.resize(n);
  }
};

// Tridiagonalises the scaled copies in bufs[0..count) and runs their QLs interleaved; failed[k]
// says matrix k's QL did not converge. On success bufs[k].d holds the eigenvalues (unsorted) and
// the rows of bufs[k].wt the eigenvectors.
template <int W>
NGCUDA_ALWAYS_INLINE void decompose(Buffers* bufs, const int64_t* n, int count, bool* failed) {
  ImplicitQl ql[kGroup];
  for (int k = 0; k < count; ++k) {
    Buffers& b = bufs[k];
    tridiagonalize(b.a.data(), b.v.data(), b.p.data(), b.d.data(), b.e.data(), b.tau.data(), n[k]);
    const bool reversed = reverse_graded(b.d.data(), b.e.data(), n[k]);
    form_qt(b.v.data(), b.tau.data(), b.q.data(), b.p.data(), b.wt.data(), n[k], reversed);
    ql[k] = ImplicitQl(b.d.data(), b.e.data(), b.wt.data(), b.rc.data(), b.rs.data(), n[k]);
  }
  implicit_ql<W>(ql, count);
  for (int k = 0; k < count; ++k) failed[k] = ql[k].failed;
}

void decompose_generic(Buffers* bufs, const int64_t* n, int count, bool* failed) {
  decompose<2>(bufs, n, count, failed);
}
#if NGCUDA_TRIDIAG_DISPATCH
__attribute__((target("arch=x86-64-v3"))) void decompose_avx2(Buffers* bufs, const int64_t* n,
                                                               int count, bool* failed) {
  decompose<4>(bufs, n, count, failed);
}
__attribute__((target("arch=x86-64-v4"))) void decompose_avx512(Buffers* bufs, const int64_t* n,
                                                                 int count, bool* failed) {
  decompose<8>(bufs, n, count, failed);
}
#endif

using DecomposeFn = void (*)(Buffers*, const int64_t*, int, bool*);

DecomposeFn decompose_kernel() {
#if NGCUDA_TRIDIAG_DISPATCH
  static const DecomposeFn fn = gemm::level() == 2   ? &decompose_avx512
                                : gemm::level() == 1 ? &decompose_avx2
                                                     : &decompose_generic;
  return fn;
#else
  return &decompose_generic;
#endif
}

}  // namespace

template <typename T>
void solve(int count, const Matrix<T>* mats, bool* ok) {
  TORCH_INTERNAL_ASSERT(count >= 1 && count <= kGroup);
  thread_local Buffers bufs[kGroup];
  double scale[kGroup];
  int64_t n[kGroup];
  bool failed[kGroup];
  for (int k = 0; k < count; ++k) {
    n[k] = mats[k].n;
    bufs[k].reserve(n[k]);
    scale[k] = scaled_copy(mats[k].a, bufs[k].a.data(), n[k]);
  }
  decompose_kernel()(bufs, n, count, failed);
  for (int k = 0; k < count; ++k) {
    ok[k] = !failed[k];
    if (!ok[k]) continue;
    Buffers& b = bufs[k];
    for (int64_t j = 0; j < n[k]; ++j) b.d[j] *= scale[k];
    jacobi::sorted_output(b.d.data(), b.wt.data(), n[k], b.order.data(), mats[k].values,
                          mats[k].vectors);
  }
}

template void solve<float>(int, const Matrix<float>*, bool*);
template void solve<double>(int, const Matrix<double>*, bool*);

}  // namespace ngcuda::cpu::tridiag
