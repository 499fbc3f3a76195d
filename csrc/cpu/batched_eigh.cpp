// batched_eigh on the CPU: a list of symmetric matrices of any mix of sizes, in parallel over them.
//
// Warm start (prev_eigenvectors given): B = QᵀAQ is nearly diagonal when A drifted slowly, so a
// few cyclic Jacobi sweeps finish it; the eigenvectors are Q·R with R the accumulated rotations.
// Cold: LAPACK (?syevd through at::linalg_eigh) on per-thread stacks of same-size matrices, except
// for tiny matrices where a cold Jacobi in our own buffers beats LAPACK's per-call overhead.
// Which path a size takes was measured: a Jacobi sweep costs about as much as a whole LAPACK
// solve from n ≈ 32, so larger warm starts go to LAPACK as well (see warm_jacobi_max_n).
// Jacobi work runs in float64 whatever the input dtype: Q·R then stays orthonormal to float64
// rounding, and a float32 result is as orthonormal as rounding to float32 allows.
// Only the lower triangle of each matrix is read, as in torch.linalg.eigh.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/irange.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <map>
#include <vector>

#include "jacobi.h"

// The sweep gets AVX-512 / AVX2 clones picked at load time: setup.py compiles for baseline x86-64.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define NGCUDA_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define NGCUDA_CLONES
#endif

namespace ngcuda::cpu {
namespace {

using jacobi::Outcome;

enum Status : int32_t { kOk = 0, kNotConverged = 2, kSolverFailed = 3 };

int64_t env_int(const char* name, int64_t fallback) {
  const char* env = std::getenv(name);
  return env ? std::atoll(env) : fallback;
}

// Largest n for which a cold matrix goes to Jacobi instead of LAPACK, and for which a warm start
// is used at all. Measured single-threaded CPU time against the LAPACK path (batch 64, float32,
// AMD EPYC Zen 5, default tol): cold Jacobi wins up to n ≈ 10; warm Jacobi after a 1e-3 drift
// (two to three sweeps) ties LAPACK at n = 16–24 and loses from n = 32 (1.4× slower at 32,
// 2× at 64), so larger warm starts are solved cold. The environment variables exist to
// re-measure the crossover on other machines.
int64_t cold_jacobi_max_n() {
  static const int64_t value = env_int("NGCUDA_EIGH_COLD_JACOBI_MAX_N", 10);
  return value;
}
int64_t warm_jacobi_max_n() {
  static const int64_t value = env_int("NGCUDA_EIGH_WARM_JACOBI_MAX_N", 24);
  return value;
}

// Sweeps of a cold Jacobi before it hands the matrix to LAPACK; cyclic Jacobi needs ~6–10.
constexpr int64_t kColdJacobiSweeps = 40;

// A warm start further than this from orthonormal (‖QᵀQ − I‖_F) is a caller error.
constexpr double kMaxPrevOrthError = 0.1;

NGCUDA_CLONES Outcome jacobi_run(double* b, double* vt, int64_t n, double skip, double stop_sq,
                                 int64_t max_sweeps) {
  return jacobi::run<double>(b, vt, n, skip, stop_sq, max_sweeps);
}

// Small row-major products for the warm start (n ≤ warm_jacobi_max_n()): a plain loop beats a
// dispatched at::mm, whose fixed overhead is larger than the whole product at these sizes.
// c = a·b, or c = aᵀ·b with transpose_a; all [n, n].
NGCUDA_CLONES void small_gemm(const double* NGCUDA_RESTRICT a, const double* NGCUDA_RESTRICT b,
                              double* NGCUDA_RESTRICT c, int64_t n, bool transpose_a) {
  // a(i, k) = a[i * ai + k * ak]; eight columns of c accumulate in registers over k.
  const int64_t ai = transpose_a ? 1 : n, ak = transpose_a ? n : 1;
  int64_t j0 = 0;
  for (; j0 + 8 <= n; j0 += 8) {
    for (int64_t i = 0; i < n; ++i) {
      double acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
      for (int64_t k = 0; k < n; ++k) {
        const double aik = a[i * ai + k * ak];
        const double* bk = b + k * n + j0;
        for (int jj = 0; jj < 8; ++jj) acc[jj] += aik * bk[jj];
      }
      for (int jj = 0; jj < 8; ++jj) c[i * n + j0 + jj] = acc[jj];
    }
  }
  for (; j0 < n; ++j0) {
    for (int64_t i = 0; i < n; ++i) {
      double acc = 0.0;
      for (int64_t k = 0; k < n; ++k) acc += a[i * ai + k * ak] * b[k * n + j0];
      c[i * n + j0] = acc;
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Argument checks: all of them run before any work.

void check_args(at::TensorList matrices, const c10::optional<at::TensorList>& prev,
                c10::optional<double> tol, int64_t max_sweeps) {
  const size_t B = matrices.size();
  for (const auto i : c10::irange(B)) {
    const at::Tensor& a = matrices[i];
    TORCH_CHECK(a.dim() == 2, "ngcuda: batched_eigh: matrices[", i, "] must be 2-D, got shape ",
                a.sizes());
    TORCH_CHECK(a.size(0) == a.size(1), "ngcuda: batched_eigh: matrices[", i,
                "] must be square, got shape ", a.sizes());
    TORCH_CHECK(a.scalar_type() == at::kFloat || a.scalar_type() == at::kDouble,
                "ngcuda: batched_eigh: matrices[", i, "] must be float32 or float64, got ",
                a.scalar_type());
    TORCH_CHECK(a.scalar_type() == matrices[0].scalar_type(), "ngcuda: batched_eigh: matrices[", i,
                "] is ", a.scalar_type(), " but matrices[0] is ", matrices[0].scalar_type(),
                "; all matrices must share one dtype");
    TORCH_CHECK(a.device() == matrices[0].device(), "ngcuda: batched_eigh: matrices[", i,
                "] is on ", a.device(), " but matrices[0] is on ", matrices[0].device());
    TORCH_CHECK(a.device().is_cpu(), "ngcuda: batched_eigh: matrices[", i,
                "] must be on the CPU for the CPU kernel, got ", a.device());
  }
  if (prev.has_value()) {
    const at::TensorList q = *prev;
    TORCH_CHECK(q.size() == B, "ngcuda: batched_eigh: prev_eigenvectors must hold one tensor per "
                "matrix: got ", q.size(), " for ", B, " matrices");
    for (const auto i : c10::irange(B)) {
      TORCH_CHECK(q[i].sizes() == matrices[i].sizes(), "ngcuda: batched_eigh: prev_eigenvectors[",
                  i, "] must have the shape of matrices[", i, "] ", matrices[i].sizes(), ", got ",
                  q[i].sizes());
      TORCH_CHECK(q[i].scalar_type() == matrices[i].scalar_type(),
                  "ngcuda: batched_eigh: prev_eigenvectors[", i, "] is ", q[i].scalar_type(),
                  " but matrices[", i, "] is ", matrices[i].scalar_type());
      TORCH_CHECK(q[i].device() == matrices[i].device(), "ngcuda: batched_eigh: prev_eigenvectors[",
                  i, "] is on ", q[i].device(), " but matrices[", i, "] is on ",
                  matrices[i].device());
    }
  }
  if (tol.has_value()) {
    TORCH_CHECK(std::isfinite(*tol) && *tol >= 0.0,
                "ngcuda: batched_eigh: tol must be finite and >= 0, got ", *tol);
  }
  TORCH_CHECK(max_sweeps >= 0, "ngcuda: batched_eigh: max_sweeps must be >= 0, got ", max_sweeps);
}

template <typename T>
bool all_finite(const T* x, int64_t count) {
  // x·0 is NaN exactly for NaN and ±Inf; one test at the end keeps the loop vectorisable.
  T acc = T(0);
  for (int64_t k = 0; k < count; ++k) acc += x[k] * T(0);
  return acc == T(0);
}

// ---------------------------------------------------------------------------------------------
// Work items, run longest first from a shared counter so mixed sizes balance over the threads.

struct Item {
  enum Kind { kWarm, kColdJacobi, kLapack } kind;
  std::vector<int64_t> index;  // one matrix, or a stack of same-size matrices for LAPACK
  double cost;
};

// Per-thread float64 buffers for the largest Jacobi matrix, allocated once per call.
struct Workspace {
  std::vector<double> buf;
  std::vector<int64_t> order;
  double *sym, *q, *tmp, *b, *vt, *diag;
  explicit Workspace(int64_t nmax) : buf(5 * nmax * nmax + nmax), order(nmax) {
    const int64_t nn = nmax * nmax;
    sym = buf.data();
    q = sym + nn;
    tmp = q + nn;
    b = tmp + nn;
    vt = b + nn;
    diag = vt + nn;
  }
};

// Full symmetric float64 copy of the lower triangle of a; returns its ‖·‖_F.
template <typename T>
double symmetric_from_lower(const T* a, double* sym, int64_t n) {
  double norm_sq = 0.0;
  for (int64_t i = 0; i < n; ++i) {
    for (int64_t j = 0; j < i; ++j) {
      const double v = static_cast<double>(a[i * n + j]);
      sym[i * n + j] = v;
      sym[j * n + i] = v;
      norm_sq += 2.0 * v * v;
    }
    const double d = static_cast<double>(a[i * n + i]);
    sym[i * n + i] = d;
    norm_sq += d * d;
  }
  return std::sqrt(norm_sq);
}

// ‖G − I‖_F for G = QᵀQ [n, n].
double orth_error(const double* g, int64_t n) {
  double s = 0.0;
  for (int64_t i = 0; i < n; ++i) {
    for (int64_t j = 0; j < n; ++j) {
      const double d = g[i * n + j] - (i == j ? 1.0 : 0.0);
      s += d * d;
    }
  }
  return std::sqrt(s);
}

template <typename T>
struct Solver {
  const std::vector<at::Tensor>& a;     // contiguous inputs
  const std::vector<at::Tensor>& prev;  // contiguous warm starts, or empty
  std::vector<at::Tensor>& values;
  std::vector<at::Tensor>& vectors;
  int32_t* status;
  double tol;
  int64_t max_sweeps;

  // Diagonalises w.b (full symmetric) with the starting vectors as the rows of w.vt, and writes
  // the sorted output of matrix i.
  void finish_jacobi(int64_t i, Workspace& w, int64_t n, double norm, int64_t sweeps, bool cold) {
    const double stop = tol * norm;
    const Outcome out = jacobi_run(w.b, w.vt, n, stop / static_cast<double>(n), stop * stop, sweeps);
    if (!out.converged && cold) {
      lapack({i});
      return;
    }
    for (int64_t k = 0; k < n; ++k) w.diag[k] = w.b[k * n + k];
    jacobi::sorted_output(w.diag, w.vt, n, w.order.data(), values[i].data_ptr<T>(),
                          vectors[i].data_ptr<T>());
    status[i] = out.converged ? kOk : kNotConverged;
  }

  // Newton–Schulz steps Q ← Q(3I − QᵀQ)/2 until Q is orthonormal to float64 rounding, so that
  // QᵀAQ is similar to A and rounding in earlier warm starts does not pile up across calls.
  void orthonormalize(int64_t i, Workspace& w, int64_t n) {
    // Far below what rounding to T can show, and at float64 rounding for T = double.
    const double floor = std::max(16.0 * static_cast<double>(n) * std::numeric_limits<double>::epsilon(),
                                  0.01 * static_cast<double>(std::numeric_limits<T>::epsilon()));
    for (int it = 0; it < 4; ++it) {
      small_gemm(w.q, w.q, w.tmp, n, /*transpose_a=*/true);
      const double e = orth_error(w.tmp, n);
      TORCH_CHECK(it > 0 || e <= kMaxPrevOrthError, "ngcuda: batched_eigh: prev_eigenvectors[", i,
                  "] is not orthonormal: ‖QᵀQ − I‖_F = ", e, " (a warm start must be the "
                  "eigenvectors of a nearby matrix)");
      if (e <= floor) return;
      for (int64_t k = 0; k < n * n; ++k) w.tmp[k] *= -0.5;
      for (int64_t k = 0; k < n; ++k) w.tmp[k * n + k] += 1.5;
      small_gemm(w.q, w.tmp, w.b, n, /*transpose_a=*/false);
      std::memcpy(w.q, w.b, sizeof(double) * n * n);
      if (2.0 * e * e <= floor) return;  // the step is quadratic: the new error is below floor
    }
  }

  void warm(int64_t i, Workspace& w) {
    const int64_t n = a[i].size(0);
    const double norm = symmetric_from_lower(a[i].data_ptr<T>(), w.sym, n);
    const T* q = prev[i].data_ptr<T>();
    for (int64_t k = 0; k < n * n; ++k) w.q[k] = static_cast<double>(q[k]);
    orthonormalize(i, w, n);
    small_gemm(w.sym, w.q, w.tmp, n, /*transpose_a=*/false);
    small_gemm(w.q, w.tmp, w.b, n, /*transpose_a=*/true);
    // QᵀAQ is symmetric only up to rounding; Jacobi needs it exactly symmetric.
    double* b = w.b;
    for (int64_t r = 0; r < n; ++r) {
      for (int64_t c = 0; c < r; ++c) {
        const double v = 0.5 * (b[r * n + c] + b[c * n + r]);
        b[r * n + c] = v;
        b[c * n + r] = v;
      }
    }
    for (int64_t r = 0; r < n; ++r) {
      for (int64_t c = 0; c < n; ++c) w.vt[r * n + c] = w.q[c * n + r];
    }
    finish_jacobi(i, w, n, norm, max_sweeps, /*cold=*/false);
  }

  void cold_jacobi(int64_t i, Workspace& w) {
    const int64_t n = a[i].size(0);
    const double norm = symmetric_from_lower(a[i].data_ptr<T>(), w.b, n);
    std::fill(w.vt, w.vt + n * n, 0.0);
    for (int64_t r = 0; r < n; ++r) w.vt[r * n + r] = 1.0;
    finish_jacobi(i, w, n, norm, kColdJacobiSweeps, /*cold=*/true);
  }

  void lapack(const std::vector<int64_t>& index) {
    const int64_t n = a[index[0]].size(0);
    std::vector<at::Tensor> parts;
    parts.reserve(index.size());
    for (const int64_t i : index) parts.push_back(a[i]);
    try {
      const auto [lam, vec] = at::linalg_eigh(at::stack(parts));
      // One layout change for the whole stack, then raw copies: a tensor op per matrix would
      // cost more than LAPACK itself for small n.
      const at::Tensor lam_c = lam.contiguous(), vec_c = vec.contiguous();
      const T* lp = lam_c.data_ptr<T>();
      const T* vp = vec_c.data_ptr<T>();
      for (const auto j : c10::irange(index.size())) {
        std::memcpy(values[index[j]].data_ptr<T>(), lp + j * n, sizeof(T) * n);
        std::memcpy(vectors[index[j]].data_ptr<T>(), vp + j * n * n, sizeof(T) * n * n);
        status[index[j]] = kOk;
      }
    } catch (const c10::Error&) {
      for (const int64_t i : index) {
        values[i].fill_(std::numeric_limits<T>::quiet_NaN());
        vectors[i].fill_(std::numeric_limits<T>::quiet_NaN());
        status[i] = kSolverFailed;
      }
    }
  }

  void run(const std::vector<Item>& items, int64_t nmax_jacobi, bool parallel) {
    std::atomic<size_t> next{0};
    at::parallel_for(0, parallel ? at::get_num_threads() : 1, 1, [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t) {
        Workspace w(nmax_jacobi);
        for (size_t k = next++; k < items.size(); k = next++) {
          const Item& item = items[k];
          switch (item.kind) {
            case Item::kWarm: warm(item.index[0], w); break;
            case Item::kColdJacobi: cold_jacobi(item.index[0], w); break;
            case Item::kLapack: lapack(item.index); break;
          }
        }
      }
    });
  }
};

std::tuple<std::vector<at::Tensor>, std::vector<at::Tensor>, at::Tensor> batched_eigh_cpu(
    at::TensorList matrices, const c10::optional<at::TensorList>& prev_eigenvectors,
    c10::optional<double> tol, int64_t max_sweeps) {
  check_args(matrices, prev_eigenvectors, tol, max_sweeps);
  const int64_t B = static_cast<int64_t>(matrices.size());
  at::Tensor status = at::zeros({B}, at::TensorOptions().dtype(at::kInt));
  std::vector<at::Tensor> values, vectors;
  if (B == 0) return {values, vectors, status};

  const bool warm = prev_eigenvectors.has_value();
  std::vector<at::Tensor> a(B), prev(warm ? B : 0);
  for (const auto i : c10::irange(B)) a[i] = matrices[i].contiguous();
  for (const auto i : c10::irange(warm ? B : 0)) prev[i] = (*prev_eigenvectors)[i].contiguous();

  const at::ScalarType dtype = matrices[0].scalar_type();
  AT_DISPATCH_FLOATING_TYPES(dtype, "ngcuda_batched_eigh_finite", [&] {
    for (const auto i : c10::irange(B)) {
      TORCH_CHECK_VALUE(all_finite(a[i].data_ptr<scalar_t>(), a[i].numel()),
                        "ngcuda: batched_eigh: matrices[", i, "] holds NaN or Inf");
    }
    for (const auto i : c10::irange(warm ? B : 0)) {
      TORCH_CHECK_VALUE(all_finite(prev[i].data_ptr<scalar_t>(), prev[i].numel()),
                        "ngcuda: batched_eigh: prev_eigenvectors[", i, "] holds NaN or Inf");
    }
  });

  values.reserve(B);
  vectors.reserve(B);
  for (const auto i : c10::irange(B)) {
    values.push_back(at::empty({a[i].size(0)}, a[i].options()));
    vectors.push_back(at::empty({a[i].size(0), a[i].size(0)}, a[i].options()));
  }

  // Plan: one item per Jacobi matrix; LAPACK matrices grouped by size into about two stacks per
  // thread, so LAPACK's per-call overhead is paid a few times rather than once per matrix.
  std::vector<Item> items;
  std::map<int64_t, std::vector<int64_t>> lapack_groups;
  int64_t nmax_jacobi = 0;
  for (const auto i : c10::irange(B)) {
    const int64_t n = a[i].size(0);
    if (n == 0) continue;
    const double cost = static_cast<double>(n) * static_cast<double>(n) * static_cast<double>(n);
    if (warm && n <= warm_jacobi_max_n()) {
      items.push_back({Item::kWarm, {i}, cost});
    } else if (n <= cold_jacobi_max_n()) {
      items.push_back({Item::kColdJacobi, {i}, cost});
    } else {
      lapack_groups[n].push_back(i);
      continue;
    }
    nmax_jacobi = std::max(nmax_jacobi, n);
  }
  const int64_t stacks_per_size = 2 * at::get_num_threads();
  for (auto& [n, index] : lapack_groups) {
    const int64_t m = static_cast<int64_t>(index.size());
    const int64_t per = (m + stacks_per_size - 1) / stacks_per_size;
    for (int64_t s = 0; s < m; s += per) {
      std::vector<int64_t> part(index.begin() + s, index.begin() + std::min(m, s + per));
      const double cost = static_cast<double>(part.size()) * n * n * n;
      items.push_back({Item::kLapack, std::move(part), cost});
    }
  }
  std::stable_sort(items.begin(), items.end(),
                   [](const Item& x, const Item& y) { return x.cost > y.cost; });
  // Waking a second thread can cost a scheduler tick (milliseconds) on a loaded machine, more than
  // a small batch takes on one core (Σn³ = 5e5 is about half a millisecond of LAPACK).
  double total_cost = 0.0;
  for (const Item& item : items) total_cost += item.cost;
  const bool parallel = total_cost >= 5e5;

  const double tol_value = tol.has_value() ? *tol : (dtype == at::kFloat ? 1e-7 : 1e-14);
  AT_DISPATCH_FLOATING_TYPES(dtype, "ngcuda_batched_eigh", [&] {
    Solver<scalar_t>{a, prev, values, vectors, status.data_ptr<int32_t>(), tol_value, max_sweeps}
        .run(items, nmax_jacobi, parallel);
  });
  return {values, vectors, status};
}

}  // namespace

TORCH_LIBRARY_IMPL(ngcuda, CPU, m) { m.impl("batched_eigh", &batched_eigh_cpu); }

}  // namespace ngcuda::cpu
