// Iterative refinement of a warm start; see warm_refine.h for the method.
//
// Cost model (what the layout below is for): the products are O(n³) and run near the core's peak
// in small_gemm; everything else is O(n²) but runs several times per step, so those passes are
// written to vectorise (AVX-512/AVX2 clones picked at load time) and avoid float64 conversions in
// the float32 phase.
#include "warm_refine.h"

#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <numeric>
#include <type_traits>

#include "clones.h"
#include "jacobi.h"
#include "small_gemm.h"

namespace ngcuda::cpu::refine {
namespace {

// Tuning, measured on the benchmark workload (K-FAC-like spectra spanning three decades, drift
// 1e-6 to 1e-1; benchmarks/bench_eigh.py):
//
// A pair joins a cluster when its first-order angle |B_ij| / |λ_j − λ_i| (B: see
// orthonormal_coupling) exceeds kClusterAngle. Smaller values do
// more rotations in the first step and leave less to later ones; 0.03 to 0.1 measured within
// 10% of each other at n = 64, drift 1e-3, with 0.05 the fastest.
constexpr double kClusterAngle = 0.05;
// Inside a cluster whose pairs left at kClusterAngle would add up to a first-order rotation above
// kBlockLeft (a block of equal eigenvalues split by the drift holds hundreds of pairs; their
// rotations at up to kClusterAngle add up to O(1) and lose orthonormality), the rotations go on
// down to kBlockAngle.
constexpr double kBlockAngle = 0.01;
constexpr double kBlockLeft = 0.05;
// Pairs coupled by less than this fraction of the strongest coupling wait a step (see plan_step).
constexpr double kDefer = 1e-3;
// After the clusters are rotated, pairs whose angle is at most kFirstOrderAngle take the
// first-order step; the rest (rare: a cluster's new eigenvalue landing next to an outsider) wait
// for the next step.
constexpr double kFirstOrderAngle = 0.1;
// The float32 phase ends after a step whose rotation ‖K‖_F is below this. What it leaves is about
// ‖K‖² plus float32 noise, so the float64 step that follows rotates by ~5e-3 on the benchmark and
// then passes the stop test; a lower exit costs another float32 step and saves nothing there.
constexpr double kLowExitRotation = 0.15;
constexpr int64_t kLowMaxSteps = 8;
// A float32 result may be finished from the float32 products alone, without the float64 phase.
// The float32 refinement stalls where the rounding of its own products leaves ‖offdiag(QᵀAQ)‖_F,
// measured 0.73·n·ε32·‖A‖_F at n = 64 and 0.77·n·ε32·‖A‖_F at n = 96, and its measures are off
// by about √n·ε32 (float32 rounding of a length-n sum): so a float32 finish is tried only where
// n·ε32 + kLowMargin·√n·ε32 is at most half of tol, and a matrix passes it when both measures,
// plus that rounding margin, are within half of their bounds (tol·‖A‖_F, and kLowFinishOrth for
// ‖QᵀQ − I‖_F, the accuracy promised for float32; LAPACK's float32 result is at 6.5e-6 at
// n = 64). The halves leave room for what the measures miss: at n = 64 the float64 residual of
// the result was at most 4e-6 over the benchmark's batch, the orthogonality 4e-6.
constexpr double kLowMargin = 2.0;
constexpr double kLowFinishOrth = 1e-5;
// The finish is tested on the residual before S is formed when the last ‖offdiag(S)‖_F was
// within this factor of its bound (benchmark, n = 64, drift 1e-3: 1.3e-5 against 4e-6 before
// the step that finishes, 7e-4 before the one that does not).
constexpr double kResidualFirst = 32.0;
// float32 products of QᵀAQ carry noise of a few ε32·‖A‖_F; entries below this are left to the
// float64 phase (chasing them in float32 rotates by noise).
constexpr double kLowNoise = 2.0 * 5.9604644775390625e-8;
// When both more than kHardBudget of all pairs are too close for a first-order step and the
// clusters they form hold more than kClusterBudget·n³ in Σ m³, the start is not a warm start (a
// basis from elsewhere, a factor that changed wholesale, an eigenspace of high multiplicity
// that split): LAPACK on the whole matrix is cheaper than the rotations. Either alone is fine:
// many pairs in small clusters (equal eigenvalues in blocks) or a large cluster of few pairs (a
// chain of neighbours in a crowded spectrum) cost little. Matrices up to kSmallN are exempt:
// there the rotations are the cheap solve anyway.
constexpr double kHardBudget = 0.25;
constexpr double kClusterBudget = 0.125;
constexpr int64_t kSmallN = 32;
// Sweeps of a cluster's pair rotations before the block is diagonalised by LAPACK instead.
constexpr int64_t kClusterJacobiSweeps = 30;

constexpr double kUnit32 = 5.9604644775390625e-8;   // 2^-24
constexpr double kUnit64 = 1.1102230246251565e-16;  // 2^-53

// Jacobi on a cluster's block that rotates only the pairs still too close for a first-order step
// (|b_pq| > skip and |b_pq| > angle·|b_qq − b_pp|), until a sweep finds none. A cluster is
// typically a chain of neighbours in a crowded part of the spectrum, with a few dozen such pairs
// among hundreds: rotating all pairs to convergence would cost several times more, and the pairs
// left are the first-order step's business anyway. Returns false when max_sweeps did not do.
NGCUDA_CLONES bool hard_jacobi(double* b, double* vt, int64_t k, double skip, double angle,
                               int64_t max_sweeps) {
  for (int64_t s = 0; s < max_sweeps; ++s) {
    const int64_t applied = jacobi::sweep_where(b, vt, k, [=](double apq, double app, double aqq) {
      const double x = std::abs(apq);
      return x > skip && x > angle * std::abs(aqq - app);
    });
    if (applied == 0) return true;
  }
  return false;
}

// ---------------------------------------------------------------------------------------------
// Element-wise passes over [ld, ld] buffers (ld a multiple of 16).

using gemm::mirror_upper;
using gemm::transpose;

struct Measure {
  double off_sq;  // Σ_{i≠j} S_ij²
  double r_sq;    // ‖R‖_F²
};

// Rotates a cluster's block until no pair in it is past kClusterAngle, and on to kBlockAngle when
// the pairs left would still add up to a large first-order rotation (blocks of equal eigenvalues
// split by the drift; chains of neighbours in a crowded spectrum stop at the first angle). The
// float64 phase always goes on (tight): a rotation there costs float64 steps to re-orthonormalise.
NGCUDA_CLONES bool settle_block(double* b, double* vt, int64_t k, double skip, bool tight) {
  if (tight) return hard_jacobi(b, vt, k, skip, kBlockAngle, kClusterJacobiSweeps);
  if (!hard_jacobi(b, vt, k, skip, kClusterAngle, kClusterJacobiSweeps)) return false;
  double left = 0.0;
  for (int64_t p = 0; p < k; ++p) {
    for (int64_t q = p + 1; q < k; ++q) {
      const double x = std::abs(b[p * k + q]), gap = std::abs(b[q * k + q] - b[p * k + p]);
      if (x > skip) left += x * x / std::max(gap * gap, x * x);
    }
  }
  if (left <= kBlockLeft * kBlockLeft) return true;
  return hard_jacobi(b, vt, k, skip, kBlockAngle, kClusterJacobiSweeps);
}

// The O(n²) passes below are plain loops over whole padded rows (ld is a multiple of 16); their
// sums are marked `omp simd reduction`, which lets GCC reassociate them and so vectorise the loop
// (a plain floating-point sum may not be reordered, and a loop containing one stays scalar).
// setup.py compiles with -fopenmp; without it the pragmas are ignored and the loops run scalar.

// Mirrors the upper triangle of S and returns Σ_{i≠j} S_ij².
template <typename T>
NGCUDA_CLONES double finish_s(T* s, int64_t n, int64_t ld) {
  double off_sq = 0.0;
  for (int64_t i = 0; i < n; ++i) {
    const T* si = s + i * ld;
    // The strictly upper part of the row: the rest of its 16-chunk, then whole chunks.
    const int64_t c1 = i / 16 * 16 + 16;
    T off = T(0);
    for (int64_t j = i + 1; j < c1; ++j) off += si[j] * si[j];
#pragma omp simd reduction(+ : off)
    for (int64_t j = c1; j < ld; ++j) off += si[j] * si[j];
    off_sq += 2.0 * static_cast<double>(off);
  }
  mirror_upper(s, ld);
  return off_sq;
}

// Turns the upper triangle of G = QᵀQ into R = I − G, mirrors it, and returns ‖R‖_F².
template <typename T>
NGCUDA_CLONES double finish_r(T* r, int64_t n, int64_t ld) {
  double r_sq = 0.0;
  for (int64_t i = 0; i < n; ++i) {
    T* ri = r + i * ld;
    const int64_t c1 = i / 16 * 16 + 16;
    T rr = T(0);
    for (int64_t j = i + 1; j < c1; ++j) {
      ri[j] = -ri[j];
      rr += ri[j] * ri[j];
    }
#pragma omp simd reduction(+ : rr)
    for (int64_t j = c1; j < ld; ++j) {
      ri[j] = -ri[j];
      rr += ri[j] * ri[j];
    }
    ri[i] = T(1) - ri[i];
    r_sq += 2.0 * static_cast<double>(rr) + static_cast<double>(ri[i]) * static_cast<double>(ri[i]);
  }
  mirror_upper(r, ld);
  return r_sq;
}

template <typename T>
Measure finish_products(T* s, T* r, int64_t n, int64_t ld) {
  return {finish_s(s, n, ld), finish_r(r, n, ld)};
}


// S ← B = S + (RΛ + ΛR)/2 off the diagonal and λ on it, with λ_i = S_ii/(1 − R_ii): QᵀAQ in the
// basis Q(I + R/2), orthonormal to O(R²). The step's rotation is K_ij = B_ij/(λ_j − λ_i): the
// Ogita–Aishima E_ij = (S_ij + λ_j R_ij)/(λ_j − λ_i) is exactly R_ij/2 + K_ij. Deciding which
// pairs to rotate on B rather than S matters when R is as large as the couplings: a float32
// start has R ~ 1e-6, and a cluster of eigenvalues split by 1e-6 is then coupled mostly through R.
// Returns the largest |B_ij|, i ≠ j.
template <typename T>
NGCUDA_CLONES double orthonormal_coupling(T* s, const T* r, T* lam, int64_t n, int64_t ld) {
  for (int64_t i = 0; i < n; ++i) lam[i] = s[i * ld + i] / (T(1) - r[i * ld + i]);
  std::fill(lam + n, lam + ld, T(0));
  T top = T(0);
  for (int64_t i = 0; i < n; ++i) {
    T* si = s + i * ld;
    const T* ri = r + i * ld;
    const T li = lam[i];
    si[i] = T(0);
#pragma omp simd reduction(max : top)
    for (int64_t j = 0; j < ld; ++j) {
      si[j] += T(0.5) * ri[j] * (li + lam[j]);
      top = std::max(top, std::abs(si[j]));
    }
    si[i] = li;
  }
  return static_cast<double>(top);
}

// Pairs i < j too close for a first-order step (see kClusterAngle):
// |B_ij| > skip and |B_ij| > angle·|λ_j − λ_i|.
using PairList = std::vector<std::pair<int32_t, int32_t>>;

template <typename T>
NGCUDA_CLONES void scan_hard(const T* b, const T* lam, int64_t n, int64_t ld, T skip, T angle,
                             T gap_floor, PairList& out) {
  for (int64_t i = 0; i < n; ++i) {
    const T* bi = b + i * ld;
    const T li = lam[i];
    // A vectorised count first; the pairs are collected only in rows that have any.
    int32_t count = 0;
    for (int64_t j = i + 1; j < n; ++j) {
      const T big = std::abs(bi[j]), gap = std::abs(lam[j] - li);
      count += (big > skip) & ((big > angle * gap) | (gap <= gap_floor));
    }
    if (count == 0) continue;
    for (int64_t j = i + 1; j < n; ++j) {
      const T big = std::abs(bi[j]), gap = std::abs(lam[j] - li);
      if (big > skip && (big > angle * gap || gap <= gap_floor)) {
        out.emplace_back(static_cast<int32_t>(i), static_cast<int32_t>(j));
      }
    }
  }
}

// E = R/2 + K of the refinement step (rows and columns beyond n zero). Pairs above `skip` with a
// first-order angle |B_ij|/|λ_j − λ_i| up to `angle` get the rotation K_ij; the others only the
// orthonormality correction (negligible ones, and pairs the cluster rotations could not
// separate, such as equal eigenvalues).
struct Built {
  double rot_sq;  // ‖K‖_F²
  double hard;    // entries (i ≠ j) of pairs past `hard_angle`, each pair counted twice
};

template <typename T>
NGCUDA_CLONES Built build_update(const T* b, const T* r, const T* lam, T* e, int64_t n,
                                 int64_t ld, T skip, T angle, T hard_angle, T gap_floor) {
  // lam[n:ld] is zero and the padding of B and R too, so padded entries come out as E = 0.
  Built out{0.0, 0.0};
  for (int64_t i = 0; i < n; ++i) {
    const T* bi = b + i * ld;
    const T* ri = r + i * ld;
    T* ei = e + i * ld;
    const T li = lam[i];
    T rot = T(0), hard = T(0);
#pragma omp simd reduction(+ : rot, hard)
    for (int64_t j = 0; j < ld; ++j) {
      const T big = std::abs(bi[j]);
      const T gap = std::abs(lam[j] - li);
      const bool first = (big > skip) & (big <= angle * gap) & (gap > gap_floor);
      const T k = first ? bi[j] / (lam[j] - li) : T(0);
      ei[j] = T(0.5) * ri[j] + k;
      rot += k * k;
      hard += (big > skip) & ((big > hard_angle * gap) | (gap <= gap_floor)) & (j != i) ? T(1) : T(0);
    }
    out.rot_sq += static_cast<double>(rot);
    out.hard += static_cast<double>(hard);
  }
  std::fill(e + n * ld, e + ld * ld, T(0));
  return out;
}

// k ← E − R/2 (the rotation part, zero diagonal), converted to the product's precision.
template <typename T, typename U>
NGCUDA_CLONES void rotation_part(const T* e, const T* r, U* k, int64_t n, int64_t ld) {
  for (int64_t i = 0; i < ld * ld; ++i) k[i] = static_cast<U>(e[i] - T(0.5) * r[i]);
  for (int64_t i = 0; i < n; ++i) k[i * ld + i] = U(0);
}

// e ← e − m/2 for the symmetric m (full after mirroring).
template <typename T, typename U>
NGCUDA_CLONES void subtract_half(T* e, const U* m, int64_t count) {
  for (int64_t i = 0; i < count; ++i) e[i] -= T(0.5) * static_cast<T>(m[i]);
}

template <typename T, typename U>
NGCUDA_CLONES void convert(const T* src, U* dst, int64_t count) {
  for (int64_t i = 0; i < count; ++i) dst[i] = static_cast<U>(src[i]);
}

NGCUDA_CLONES void add_to(double* dst, const float* src, int64_t count) {
  for (int64_t i = 0; i < count; ++i) dst[i] += static_cast<double>(src[i]);
}

// Rayleigh quotients λ_j = q_jᵀw_j / q_jᵀq_j of the columns of Q (W = AQ) and the squared
// residual ‖W − QΛ‖_F². `num` and `den` are scratch of ld entries.
NGCUDA_CLONES double rayleigh(const double* q, const double* w, int64_t n, int64_t ld,
                              double* lam, double* num, double* den) {
  std::fill(num, num + ld, 0.0);
  std::fill(den, den + ld, 0.0);
  for (int64_t r = 0; r < n; ++r) {
    const double* qr = q + r * ld;
    const double* wr = w + r * ld;
    for (int64_t j = 0; j < ld; ++j) {
      num[j] += qr[j] * wr[j];
      den[j] += qr[j] * qr[j];
    }
  }
  for (int64_t j = 0; j < n; ++j) lam[j] = num[j] / den[j];
  for (int64_t j = n; j < ld; ++j) lam[j] = 0.0;
  double res_sq = 0.0;
  for (int64_t r = 0; r < n; ++r) {
    const double* qr = q + r * ld;
    const double* wr = w + r * ld;
    double acc = 0.0;
#pragma omp simd reduction(+ : acc)
    for (int64_t j = 0; j < ld; ++j) {
      const double d = wr[j] - qr[j] * lam[j];
      acc += d * d;
    }
    res_sq += acc;
  }
  return res_sq;
}

// rayleigh for float32 Q and W in one pass: with λ_j = q_jᵀw_j / q_jᵀq_j,
// ‖w_j − λ_j q_j‖² = ‖w_j‖² − (q_jᵀw_j)² / q_jᵀq_j. The sums of float32 products are exact to
// about ε64 in float64, so the cancellation costs ~n·ε64·‖A‖², far below the (n·ε32·‖A‖)² that a
// float32 residual is ever compared with. `ww` is scratch of ld entries as well.
NGCUDA_CLONES double rayleigh_f32(const float* q, const float* w, int64_t n, int64_t ld,
                                  double* lam, double* num, double* den, double* ww) {
  std::fill(num, num + ld, 0.0);
  std::fill(den, den + ld, 0.0);
  std::fill(ww, ww + ld, 0.0);
  for (int64_t r = 0; r < n; ++r) {
    const float* qr = q + r * ld;
    const float* wr = w + r * ld;
    for (int64_t j = 0; j < ld; ++j) {
      const double qj = static_cast<double>(qr[j]), wj = static_cast<double>(wr[j]);
      num[j] += qj * wj;
      den[j] += qj * qj;
      ww[j] += wj * wj;
    }
  }
  double res_sq = 0.0;
  for (int64_t j = 0; j < n; ++j) {
    lam[j] = num[j] / den[j];
    res_sq += std::max(0.0, ww[j] - num[j] * lam[j]);
  }
  for (int64_t j = n; j < ld; ++j) lam[j] = 0.0;
  return res_sq;
}


// Full symmetric copy of the lower triangle of `a`, scaled by 2^-ilogb(‖A‖_F) (so to a norm in
// [1, 2)), zero padded to [ld, ld]; returns ‖A‖_F. The scaling is exact, so Out may be In.
template <typename In, typename Out>
NGCUDA_CLONES double load_symmetric(const In* a, Out* out, Out* scratch, int64_t n, int64_t ld) {
  double off = 0.0, diag = 0.0;
  for (int64_t i = 0; i < n; ++i) {
    const In* row = a + i * n;
    double acc = 0.0;
#pragma omp simd reduction(+ : acc)
    for (int64_t j = 0; j < i; ++j) acc += static_cast<double>(row[j]) * static_cast<double>(row[j]);
    off += acc;
    diag += static_cast<double>(row[i]) * static_cast<double>(row[i]);
  }
  const double norm = std::sqrt(2.0 * off + diag);
  const double scale = norm > 0.0 ? std::ldexp(1.0, -std::ilogb(norm)) : 1.0;
  // The lower triangle, transposed into the upper one, then mirrored back.
  for (int64_t i = 0; i < n; ++i) {
    Out* row = scratch + i * ld;
    for (int64_t j = 0; j <= i; ++j) row[j] = static_cast<Out>(scale * static_cast<double>(a[i * n + j]));
    std::fill(row + i + 1, row + ld, Out(0));
  }
  std::fill(scratch + n * ld, scratch + ld * ld, Out(0));
  transpose(scratch, out, ld);
  mirror_upper(out, ld);
  return norm;
}

template <typename In, typename T>
void load_square(const In* q, T* out, int64_t n, int64_t ld) {
  for (int64_t i = 0; i < n; ++i) {
    T* row = out + i * ld;
    for (int64_t j = 0; j < n; ++j) row[j] = static_cast<T>(q[i * n + j]);
    std::fill(row + n, row + ld, T(0));
  }
  std::fill(out + n * ld, out + ld * ld, T(0));
}

// ---------------------------------------------------------------------------------------------
// One refinement step.

int32_t find(std::vector<int32_t>& parent, int32_t x) {
  while (parent[x] != x) {
    parent[x] = parent[parent[x]];
    x = parent[x];
  }
  return x;
}

// V [k, kp] as T: itself for float64, a float32 copy in ws.vecs32 otherwise.
template <typename T>
const T* v_as(Workspace& ws, const double* v, int64_t count) {
  if constexpr (std::is_same_v<T, double>) {
    return v;
  } else {
    if (static_cast<int64_t>(ws.vecs32.size()) < count) ws.vecs32.resize(count);
    convert(v, ws.vecs32.data(), count);
    return ws.vecs32.data();
  }
}

// Rotates each cluster's block of S until no pair in it is too close for a first-order step, and
// S, R and the rows of Qᵀ with it. r_zero: R is zero (not measured this step) and stays so, which
// skips its rotation. Returns false when a block could not be solved.
template <typename T>
bool solve_clusters(Workspace& ws, const Mats<T>& m, int64_t n, int64_t ld, double skip,
                    int64_t count, bool r_zero) {
  // The rotations of S, R and Qᵀ by V are products in T: float32 ones suffice for the float32
  // phase, whose S and R are measured afresh by the next step.
  T* rows = reinterpret_cast<T*>(ws.rows.data());  // gathered rows [k, ld], then V·rows
  T* rs = rows + ld * ld;
  T* rr = rs + ld * ld;
  for (int64_t c = 0; c < count; ++c) {
    const int32_t* idx = ws.members.data() + ws.start[c];
    const int64_t k = ws.start[c + 1] - ws.start[c];
    const int64_t kp = gemm::padded(k);
    double* b = ws.block.data();
    double* v = ws.vecs.data();  // V [k, kp]: column a is the a-th rotated direction
    for (int64_t p = 0; p < k; ++p) {
      for (int64_t q = 0; q < k; ++q) b[p * k + q] = static_cast<double>(m.s[idx[p] * ld + idx[q]]);
    }
    double* vt = ws.vt.data();
    std::fill(vt, vt + k * k, 0.0);
    for (int64_t p = 0; p < k; ++p) vt[p * k + p] = 1.0;
    std::fill(v, v + k * kp, 0.0);
    if (settle_block(b, vt, k, skip, /*tight=*/sizeof(T) == 8)) {
      for (int64_t a = 0; a < k; ++a) {
        for (int64_t p = 0; p < k; ++p) v[p * kp + a] = vt[a * k + p];
      }
    } else {
      // Not settled by the pair rotations: diagonalise the block outright.
      for (int64_t p = 0; p < k; ++p) {
        for (int64_t q = 0; q < k; ++q) b[p * k + q] = static_cast<double>(m.s[idx[p] * ld + idx[q]]);
      }
      try {
        const auto [lam, vec] =
            at::linalg_eigh(at::from_blob(b, {k, k}, at::TensorOptions().dtype(at::kDouble)));
        const at::Tensor lam_c = lam.contiguous(), vec_c = vec.contiguous();
        const double* l = lam_c.data_ptr<double>();
        const double* e = vec_c.data_ptr<double>();
        for (int64_t p = 0; p < k; ++p) {
          for (int64_t q = 0; q < k; ++q) {
            b[p * k + q] = p == q ? l[p] : 0.0;
            v[p * kp + q] = e[p * k + q];
          }
        }
      } catch (const c10::Error&) {
        return false;
      }
    }
    const T* vt_ = v_as<T>(ws, v, k * kp);
    // out[a][:] = Σ_p V[p][a]·src[idx[p]][:], a small product.
    auto combine = [&](const T* src, T* out) {
      for (int64_t p = 0; p < k; ++p) std::memcpy(rows + p * ld, src + idx[p] * ld, sizeof(T) * ld);
      gemm::xty(vt_, kp, rows, ld, out, ld, kp, ld, k);
    };
    const int32_t id = ws.cluster[idx[0]];
    // Rows idx of src ← their rotation (from out) outside the block, mirrored into the columns.
    auto scatter = [&](T* dst, const T* out) {
      for (int64_t a = 0; a < k; ++a) {
        const int64_t ia = idx[a];
        for (int64_t j = 0; j < n; ++j) {
          if (ws.cluster[j] == id) continue;
          const T x = out[a * ld + j];
          dst[ia * ld + j] = x;
          dst[j * ld + ia] = x;
        }
      }
    };
    combine(m.s, rs);
    scatter(m.s, rs);
    // The diagonal block: S becomes VᵀS_CC V (what the rotations left in b), R becomes (VᵀR)V,
    // both kept exactly symmetric, as the step relies on.
    for (int64_t a = 0; a < k; ++a) {
      for (int64_t c2 = a; c2 < k; ++c2) {
        const T x = static_cast<T>(b[a * k + c2]);
        m.s[idx[a] * ld + idx[c2]] = x;
        m.s[idx[c2] * ld + idx[a]] = x;
      }
    }
    if (!r_zero) {
      combine(m.r, rr);
      scatter(m.r, rr);
      T* g = rows;  // [k, kp]: g[p][a] = (VᵀR)[a][idx[p]]
      T* rcc = rs;  // [kp, kp]
      std::fill(g, g + k * kp, T(0));
      for (int64_t a = 0; a < k; ++a) {
        for (int64_t p = 0; p < k; ++p) g[p * kp + a] = rr[a * ld + idx[p]];
      }
      gemm::xty(g, kp, vt_, kp, rcc, kp, kp, kp, k);
      for (int64_t a = 0; a < k; ++a) {
        for (int64_t c2 = a; c2 < k; ++c2) {
          const T x = rcc[a * kp + c2];
          m.r[idx[a] * ld + idx[c2]] = x;
          m.r[idx[c2] * ld + idx[a]] = x;
        }
      }
    }
    // Columns idx of Q, i.e. rows idx of Qᵀ, ← Q[:, idx]·V.
    combine(m.qt, rs);
    for (int64_t a = 0; a < k; ++a) std::memcpy(m.qt + idx[a] * ld, rs + a * ld, sizeof(T) * ld);
  }
  return true;
}

// Groups the hard pairs into clusters (union–find, numbered by smallest member) and solves them.
// Returns the number of clusters, or −1 to give up on the matrix.
template <typename T>
int64_t cluster_step(Workspace& ws, const Mats<T>& m, int64_t n, int64_t ld, double skip,
                     bool r_zero) {
  int32_t* cluster = ws.cluster.data();
  std::fill(cluster, cluster + n, -1);
  if (ws.hard.empty()) return 0;
  std::vector<int32_t>& parent = ws.parent;
  std::iota(parent.begin(), parent.begin() + n, 0);
  for (const auto& [i, j] : ws.hard) {
    const int32_t a = find(parent, i), b = find(parent, j);
    if (a != b) parent[std::max(a, b)] = std::min(a, b);
  }
  std::vector<int32_t>& start = ws.start;
  int32_t* size = ws.members.data();  // sizes first, members afterwards
  std::fill(size, size + n, 0);
  for (int64_t i = 0; i < n; ++i) ++size[find(parent, static_cast<int32_t>(i))];
  int64_t count = 0;
  for (int64_t i = 0; i < n; ++i) {
    if (parent[i] == i && size[i] > 1) cluster[i] = static_cast<int32_t>(count++);
  }
  for (int64_t i = 0; i < n; ++i) cluster[i] = cluster[parent[i]];  // roots are compressed
  start.assign(count + 2, 0);
  for (int64_t i = 0; i < n; ++i) {
    if (cluster[i] >= 0) ++start[cluster[i] + 2];
  }
  int64_t largest = 0;
  double cubes = 0.0;
  for (int64_t c = 0; c < count; ++c) {
    const double k = start[c + 2];
    largest = std::max<int64_t>(largest, start[c + 2]);
    cubes += k * k * k;
  }
  const double nd = static_cast<double>(n);
  if (n > kSmallN && static_cast<double>(ws.hard.size()) > kHardBudget * 0.5 * nd * (nd - 1) &&
      cubes > kClusterBudget * nd * nd * nd) {
    return -1;
  }
  // Counting sort: start[c + 1] ends as the first slot of cluster c + 1.
  for (int64_t c = 0; c < count; ++c) start[c + 2] += start[c + 1];
  for (int64_t i = 0; i < n; ++i) {
    if (cluster[i] >= 0) ws.members[start[cluster[i] + 1]++] = static_cast<int32_t>(i);
  }
  start.pop_back();
  const int64_t square = largest * gemm::padded(largest);
  if (static_cast<int64_t>(ws.block.size()) < square) {
    ws.block.resize(square);
    ws.vt.resize(square);
    ws.vecs.resize(square);
  }
  return solve_clusters(ws, m, n, ld, skip, count, r_zero) ? count : -1;
}

struct Step {
  bool give_up;
  int64_t clusters;   // > 0: rows of Qᵀ were rotated, Q is stale
  double rot;         // ‖K‖_F of the first-order rotation K = E − R/2
  bool k2_cancelled;  // the −KᵀK/2 term was added
};

// One refinement step on S and R from the products (scale: ‖A‖_F as scaled): clusters (rotating
// B, R and the rows of Qᵀ),
// then the update F in m.e: E, plus −KᵀK/2 when ‖K‖_F² > k2_min, that product formed in precision
// U with the buffers k and k2. r_zero: R was not measured (m.r is zero). The caller applies
// Q ← Q(I + F).
template <typename T, typename U>
Step plan_step(Workspace& ws, const Mats<T>& m, int64_t n, int64_t ld, double scale, double skip,
               double k2_min, bool r_zero, U* k, U* k2) {
  Step step{false, 0, 0.0, false};
  transpose(m.q, m.qt, ld);
  T* lam = reinterpret_cast<T*>(ws.lam_t.data());
  // Pairs coupled far more weakly than the strongest wait for a later step: such couplings are
  // often second-order effects of the strong ones (inside the null space of a rank-deficient
  // factor, say) and vanish with them, and acting on them now (first-order angles over tiny
  // gaps, clusters the size of that space) would cost accuracy or time for nothing. The stop test
  // still sees them, and the threshold falls to `skip` as the strong couplings go.
  skip = std::max(skip, kDefer * orthonormal_coupling(m.s, m.r, lam, n, ld));
  // Eigenvalue estimates carry rounding of a few ε·√n·‖A‖; a gap below that is no gap, and a
  // first-order angle over it would be noise (harmless in an orthogonal rotation, not in Q + QE).
  const double gap_floor = 16.0 * std::sqrt(static_cast<double>(n)) *
                           (sizeof(T) == 4 ? kUnit32 : kUnit64) * scale;
  Built built = build_update<T>(m.s, m.r, lam, m.e, n, ld, static_cast<T>(skip),
                                static_cast<T>(kFirstOrderAngle), static_cast<T>(kClusterAngle),
                                static_cast<T>(gap_floor));
  if (built.hard > 0.0) {
    ws.hard.clear();
    scan_hard<T>(m.s, lam, n, ld, static_cast<T>(skip), static_cast<T>(kClusterAngle),
                 static_cast<T>(gap_floor), ws.hard);
    step.clusters = cluster_step(ws, m, n, ld, skip, r_zero);
    if (step.clusters < 0) {
      step.give_up = true;
      return step;
    }
    if (step.clusters > 0) {
      for (int64_t i = 0; i < n; ++i) {
        if (ws.cluster[i] >= 0) lam[i] = m.s[i * ld + i];
      }
      built = build_update<T>(m.s, m.r, lam, m.e, n, ld, static_cast<T>(skip),
                              static_cast<T>(kFirstOrderAngle), static_cast<T>(kClusterAngle),
                              static_cast<T>(gap_floor));
    }
  }
  const double rot_sq = built.rot_sq;
  step.rot = std::sqrt(rot_sq);
  if (rot_sq > k2_min) {
    // Q(I + E) is off orthonormal by KᵀK; adding K²/2 = −KᵀK/2 cancels that to second order, so
    // ‖QᵀQ − I‖ falls with the rotation instead of lagging a step behind.
    rotation_part<T, U>(m.e, m.r, k, n, ld);
    gemm::xty(k, k, k2, ld, n, ld, false, true);
    mirror_upper(k2, ld);
    subtract_half<T, U>(m.e, k2, ld * ld);
    step.k2_cancelled = true;
  }
  return step;
}

// Q ← Qᵀᵀ(I + F), from the rows of Qᵀ (which carry any cluster rotations).
template <typename T>
void update_from_qt(const Mats<T>& m, int64_t n, int64_t ld) {
  for (int64_t i = 0; i < n; ++i) m.e[i * ld + i] += T(1);
  gemm::xty(m.qt, m.e, m.q, ld, n, ld, false, false);
}

// r ← I − QᵀQ (or 0 without with_r), w ← AQ, s ← QᵀAQ (symmetric ones mirrored).
template <typename T>
Measure products(const Mats<T>& m, int64_t n, int64_t ld, bool with_r) {
  if (with_r) {
    gemm::xty(m.q, m.q, m.r, ld, n, ld, false, true);
  } else {
    // G = I, which finish_products turns into R = 0.
    std::fill(m.r, m.r + ld * ld, T(0));
    for (int64_t i = 0; i < n; ++i) m.r[i * ld + i] = T(1);
  }
  gemm::xty(m.a, m.q, m.w, ld, n, ld, false, false);  // A is symmetric: AᵀQ = AQ
  gemm::xty(m.q, m.w, m.s, ld, n, ld, false, true);
  return finish_products(m.s, m.r, n, ld);
}

// S and R for the W = AQ already in m.w.
template <typename T>
Measure products_from_w(const Mats<T>& m, int64_t n, int64_t ld) {
  gemm::xty(m.q, m.q, m.r, ld, n, ld, false, true);
  gemm::xty(m.q, m.w, m.s, ld, n, ld, false, true);
  return finish_products(m.s, m.r, n, ld);
}

// Eigenvalues lam (scaled by `unscale`) ascending into `values`, and the columns of the padded
// row-major Q in the same order into `vectors` [n, n].
template <typename Q, typename T>
void sorted_output(const double* lam, const Q* q, int64_t n, int64_t ld, double unscale,
                   int64_t* order, T* values, T* vectors) {
  std::iota(order, order + n, int64_t(0));
  std::stable_sort(order, order + n, [&](int64_t i, int64_t j) { return lam[i] < lam[j]; });
  for (int64_t j = 0; j < n; ++j) values[j] = static_cast<T>(unscale * lam[order[j]]);
  for (int64_t r = 0; r < n; ++r) {
    const Q* qrow = q + r * ld;
    T* out = vectors + r * n;
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) out[j] = static_cast<T>(qrow[order[j]]);
  }
}

// The float32 finish: λ_i = S_ii/(1 − R_ii), the Rayleigh quotient of column i of the current Q
// (m.s and m.r as finish_products left them), and Q itself.
template <typename T>
void write_sorted(const Mats<float>& m, int64_t n, int64_t ld, double unscale, Workspace& ws,
                  T* values, T* vectors) {
  double* lam = ws.lam.data();
  for (int64_t i = 0; i < n; ++i) {
    lam[i] = static_cast<double>(m.s[i * ld + i]) / (1.0 - static_cast<double>(m.r[i * ld + i]));
  }
  sorted_output(lam, m.q, n, ld, unscale, ws.order.data(), values, vectors);
}

}  // namespace

Workspace::Workspace(int64_t nmax) { reserve(nmax); }

void Workspace::reserve(int64_t nmax) {
  const int64_t ld = gemm::padded(std::max<int64_t>(nmax, 1));
  if (ld <= ld_) return;
  ld_ = ld;
  const int64_t nn = ld * ld;
  f32_.reset(new float[7 * nn]);
  f64_.reset(new double[7 * nn]);
  float* f = f32_.get();
  double* d = f64_.get();
  f32 = {f, f + nn, f + 2 * nn, f + 3 * nn, f + 4 * nn, f + 5 * nn, f + 6 * nn};
  f64 = {d, d + nn, d + 2 * nn, d + 3 * nn, d + 4 * nn, d + 5 * nn, d + 6 * nn};
  lam.resize(ld);
  lam_t.resize(ld);
  num.resize(ld);
  den.resize(ld);
  cluster.resize(ld);
  parent.resize(ld);
  members.resize(ld);
  ww.resize(ld);
  rows.resize(3 * nn);
  order.resize(ld);
}

Workspace& Workspace::local(int64_t nmax) {
  // One per thread for the life of the thread: the warm path runs every few optimizer steps, and
  // fresh buffers would cost a page fault per 4 KiB each time.
  thread_local Workspace ws(0);
  ws.reserve(nmax);
  return ws;
}

template <typename T>
Result solve(const T* a, const T* prev, int64_t n, T* values, T* vectors, const Options& options,
             Workspace& ws) {
  Result result{Outcome::kGaveUp, 0.0, 0, 0};
  const int64_t ld = gemm::padded(n);
  const int64_t nn = ld * ld;
  const Mats<float>& lo = ws.f32;
  const Mats<double>& hi = ws.f64;
  // A is scaled by a power of two near 1/‖A‖_F: exact, so a float32 input stays exact in lo.a,
  // and float32 products stay clear of overflow and denormals. Tolerances become absolute.
  // A float32 input is loaded in float32 (exactly) and widened only if the float64 phase runs.
  double norm;
  if constexpr (std::is_same_v<T, float>) {
    norm = load_symmetric(a, lo.a, lo.w, n, ld);
  } else {
    norm = load_symmetric(a, hi.a, hi.w, n, ld);
    convert(hi.a, lo.a, nn);
  }
  load_square(prev, lo.q, n, ld);
  const double scaled_norm = norm > 0.0 ? norm * std::ldexp(1.0, -std::ilogb(norm)) : 0.0;
  const double unscale = norm > 0.0 ? std::ldexp(1.0, std::ilogb(norm)) : 1.0;

  const double nd = static_cast<double>(n);
  // Below 4·n·ε64 the float64 residual is rounding (measured 1.5e-14 at n = 96): a tighter tol,
  // the float64 default of 1e-14 included, could never be met there.
  const double tol = std::max(options.tol, 4.0 * nd * kUnit64) * scaled_norm;
  // float64 rounding of QᵀQ itself is a few n·ε64. A float32 result is rounded to float32
  // afterwards, which alone leaves ‖QᵀQ − I‖_F ≈ ε32·√(2n/3) (3e-7 at n = 64): 1e-6 is below what
  // that rounding costs at n ≥ 256 and lets the last correction of Q be a float32 product.
  // A looser float32 tol (the CPU default, 1e-5) loosens it to half of tol, up to half of the
  // float32 promise kLowFinishOrth: a float64 step cannot take a float32 start's ‖QᵀQ − I‖_F of
  // a few 1e-6 (n ≥ 80) much lower before its own float32 update's rounding.
  const double orth_tol = sizeof(T) == 4
                              ? std::clamp(0.5 * options.tol, 1e-6, 0.5 * kLowFinishOrth)
                              : 128.0 * nd * kUnit64;
  // Entries at float64 rounding level are noise even where tol/n is smaller (float64 defaults):
  // rotating them, say inside a cluster of equal eigenvalues, would only chase rounding. Entries
  // above orth_tol/n are rotated even under a looser tol, so that a step also repairs Q's
  // orthonormality instead of leaving couplings that the float32 rounding of Q then spreads.
  const double skip_hi =
      std::max(std::min(tol, orth_tol * scaled_norm) / nd, 4.0 * kUnit64 * scaled_norm);
  const double skip_lo = std::max(skip_hi, kLowNoise * scaled_norm);
  int64_t steps = 0;
  bool checked = false;
  auto check_prev = [&](double orth) {
    checked = true;
    result.prev_orth_error = orth;
    return orth <= kMaxPrevOrthError;
  };

  // float32 phase: down to float32 noise, while it pays.
  const double low_margin = kLowMargin * std::sqrt(nd) * kUnit32;
  const bool low_finish = sizeof(T) == 4 && nd * kUnit32 + low_margin <= 0.5 * options.tol;
  const double low_finish_off = 0.5 * tol - low_margin * scaled_norm;
  double last_off = std::numeric_limits<double>::infinity();
  for (int64_t k = 0; k < kLowMaxSteps && steps < options.max_steps; ++k) {
    // The first step goes without R: a start's own ‖QᵀQ − I‖ (float32 rounding, ~1e-6) is below
    // what a float32 step resolves, and the rotation keeps it to first order, so the first R
    // measured (next step, or the float64 phase) still shows a start far from orthonormal. Only
    // a start that may already pass the float32 finish gets its R (and S again) at once.
    bool with_r = k > 0;
    // Only once the last S was near the finish: further off, the step that follows cuts the
    // error by much less than would be needed, and the residual would be computed for nothing.
    const bool residual_first = with_r && low_finish && last_off <= kResidualFirst * low_finish_off;
    Measure ms;
    if (residual_first) {
      // R and the residual first: a matrix that passes the float32 finish needs no S = QᵀW.
      // Its stop test is the residual itself, ‖W − QΛ‖_F with Λ the Rayleigh quotients, which
      // for a nearly orthonormal Q equals ‖offdiag(QᵀAQ)‖_F and carries the same rounding.
      gemm::xty(lo.q, lo.q, lo.r, ld, n, ld, false, true);
      gemm::xty(lo.a, lo.q, lo.w, ld, n, ld, false, false);
      ms.r_sq = finish_r(lo.r, n, ld);
      if (!checked && !check_prev(std::sqrt(ms.r_sq))) {
        result.outcome = Outcome::kNotOrthonormal;
        return result;
      }
      double* lam = ws.lam.data();
      const double res = std::sqrt(
          rayleigh_f32(lo.q, lo.w, n, ld, lam, ws.num.data(), ws.den.data(), ws.ww.data()));
      if (res <= low_finish_off && std::sqrt(ms.r_sq) + low_margin <= 0.5 * kLowFinishOrth) {
        sorted_output(lam, lo.q, n, ld, unscale, ws.order.data(), values, vectors);
        result.outcome = Outcome::kConverged;
        return result;
      }
      gemm::xty(lo.q, lo.w, lo.s, ld, n, ld, false, true);
      ms.off_sq = finish_s(lo.s, n, ld);
    } else {
      ms = products(lo, n, ld, with_r);
    }
    const double off = std::sqrt(ms.off_sq);
    if (k == 0 && off > options.max_start_off * scaled_norm) {
      // Too far off to pay: solved cold instead, unless the start is a caller error.
      gemm::xty(lo.q, lo.q, lo.r, ld, n, ld, false, true);
      if (!check_prev(std::sqrt(finish_r(lo.r, n, ld)))) result.outcome = Outcome::kNotOrthonormal;
      return result;
    }
    if (!with_r && low_finish && off <= low_finish_off) {
      // S stands (finish_products only mirrors it again); R = I − QᵀQ is all that is missing.
      gemm::xty(lo.q, lo.q, lo.r, ld, n, ld, false, true);
      ms = finish_products(lo.s, lo.r, n, ld);
      with_r = true;
    }
    if (with_r && !checked && !check_prev(std::sqrt(ms.r_sq))) {
      result.outcome = Outcome::kNotOrthonormal;
      return result;
    }
    if (low_finish && with_r && !residual_first && off <= low_finish_off &&
        std::sqrt(ms.r_sq) + low_margin <= 0.5 * kLowFinishOrth) {
      write_sorted(lo, n, ld, unscale, ws, values, vectors);
      result.outcome = Outcome::kConverged;
      return result;
    }
    if (off <= skip_lo || off > 0.5 * last_off) break;  // at float32 noise, or no longer gaining
    last_off = off;
    const Step st = plan_step(ws, lo, n, ld, scaled_norm, skip_lo, 1e-6, !with_r, lo.w, lo.s);
    if (st.give_up) return result;
    update_from_qt(lo, n, ld);
    ++steps;
    ++result.low_steps;
    // A float32 finish goes on to its stop test; otherwise the float64 phase takes over here.
    if (!low_finish && st.rot <= kLowExitRotation) break;
  }

  // float64 phase. The stop test is the residual ‖AQ − QΛ‖_F (Λ the Rayleigh quotients), which
  // for an orthonormal Q equals ‖offdiag(QᵀAQ)‖_F, and ‖QᵀQ − I‖_F: measured from the products
  // at first, afterwards bounded from the step (so a converged matrix costs one product, AQ).
  if constexpr (std::is_same_v<T, float>) convert(lo.a, hi.a, nn);
  if (result.low_steps > 0) {
    convert(lo.q, hi.q, nn);
  } else {
    load_square(prev, hi.q, n, ld);
  }
  // The small products of a float32 result may be formed in float32 (their rounding is counted in
  // the bound below); a float64 result needs them in float64.
  const bool low_ok = sizeof(T) == 4;
  const double unit = low_ok ? kUnit32 : kUnit64;
  double orth_bound = std::numeric_limits<double>::infinity();
  double last_defect = std::numeric_limits<double>::infinity();
  double* lam = ws.lam.data();
  gemm::xty(hi.a, hi.q, hi.w, ld, n, ld, false, false);
  for (;;) {
    const double res = std::sqrt(rayleigh(hi.q, hi.w, n, ld, lam, ws.num.data(), ws.den.data()));
    if (res <= tol && orth_bound <= orth_tol) break;
    const Measure ms = products_from_w(hi, n, ld);
    const double orth = std::sqrt(ms.r_sq);
    if (!checked && !check_prev(orth)) {
      result.outcome = Outcome::kNotOrthonormal;
      return result;
    }
    if (res <= tol && orth <= orth_tol) break;
    // Progress is judged on the measures still failing: one already passing may sit at its own
    // rounding floor (a float32 result's residual at n·ε32, with tol near it) and stop falling.
    const double defect = (res > tol ? res / (scaled_norm > 0.0 ? scaled_norm : 1.0) : 0.0) +
                          (orth > orth_tol ? orth : 0.0);
    if (steps >= options.max_steps || !(defect <= 0.9 * last_defect)) return result;
    last_defect = defect;
    const Step st =
        low_ok ? plan_step(ws, hi, n, ld, scaled_norm, skip_hi, 0.1 * orth_tol, false, lo.w, lo.s)
               : plan_step(ws, hi, n, ld, scaled_norm, skip_hi, 0.1 * orth_tol, false, hi.w, hi.s);
    if (st.give_up) return result;
    ++steps;
    ++result.high_steps;
    // F = K + H with K = −Kᵀ and 2H = R + K² (or 2H = R without the K² term), so
    // (I+F)ᵀ(I−R)(I+F) − I = H² + HK − KH [− K²] − FᵀR − RF − FᵀRF, bounded in Frobenius norms
    // from ‖K‖, ‖R‖ and ‖KᵀK‖ ≤ ‖K‖².
    const double k = st.rot, r = orth;
    const double h = 0.5 * r + (st.k2_cancelled ? 0.5 * k * k : 0.0);
    const double f = k + h;
    orth_bound = h * h + 2.0 * h * k + (st.k2_cancelled ? 0.0 : k * k) + 2.0 * f * r + f * f * r;
    // Rounding: the K² product (γ_n‖K‖² plus its conversions), and QF: with Q + ΔQ the stored
    // result, ‖ΔQ‖_F ≤ γ_n‖Q‖_F‖F‖_F (+ conversions), which moves QᵀQ by about 2.2‖ΔQ‖_F.
    orth_bound += (2.0 * nd + 4.0) * unit * k * k;
    const double low_update = 2.2 * (nd + 2.0) * kUnit32 * std::sqrt(nd) * f;
    if (low_ok && st.clusters == 0 && orth_bound + low_update <= 0.5 * orth_tol) {
      // Q ← Q + QF with QF in float32 (Q is current: no cluster rotated Qᵀ).
      convert(hi.qt, lo.qt, nn);
      convert(hi.e, lo.e, nn);
      gemm::xty(lo.qt, lo.e, lo.w, ld, n, ld, false, false);
      add_to(hi.q, lo.w, nn);
      orth_bound += low_update;
    } else {
      update_from_qt(hi, n, ld);
      orth_bound += 2.2 * (nd + 2.0) * kUnit64 * std::sqrt(nd) * (1.0 + f);
    }
    gemm::xty(hi.a, hi.q, hi.w, ld, n, ld, false, false);
  }

  sorted_output(lam, hi.q, n, ld, unscale, ws.order.data(), values, vectors);
  result.outcome = Outcome::kConverged;
  return result;
}

template Result solve<float>(const float*, const float*, int64_t, float*, float*, const Options&,
                             Workspace&);
template Result solve<double>(const double*, const double*, int64_t, double*, double*,
                              const Options&, Workspace&);

}  // namespace ngcuda::cpu::refine

