// batched_eigh on the CPU: a list of symmetric matrices of any mix of sizes, in parallel over them.
//
// Warm start (prev_eigenvectors given): B = QᵀAQ is nearly diagonal when A drifted slowly, so a
// few cyclic Jacobi sweeps finish it; the eigenvectors are Q·R with R the accumulated rotations.
// Cold: LAPACK (?syevd through at::linalg_eigh) on per-thread stacks of same-size matrices, except
// for tiny matrices where a cold Jacobi in our own buffers beats the per-call overhead.
// Only the lower triangle of each matrix is read, as in torch.linalg.eigh.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/irange.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <map>
#include <vector>

#include "../checks.h"
#include "jacobi.h"

// Hot loops get AVX-512 / AVX2 clones picked at load time: setup.py compiles for baseline x86-64.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define NGCUDA_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define NGCUDA_CLONES
#endif

namespace ngcuda::cpu {
namespace {

using jacobi::Outcome;

enum Status : int32_t { kOk = 0, kNotConverged = 2, kSolverFailed = 3 };

// Largest n for which a cold matrix goes to Jacobi instead of LAPACK (measured: see
// benchmarks/bench_eigh.py --crossover).
int64_t cold_jacobi_max_n() {
  static const int64_t value = [] {
    const char* env = std::getenv("NGCUDA_EIGH_COLD_JACOBI_MAX_N");
    return env ? std::atoll(env) : int64_t(12);
  }();
  return value;
}

// Largest n for which a warm start runs Jacobi; above it LAPACK on A is faster than even the
// one or two sweeps a slow drift needs, so the warm start is ignored (measured like the above).
int64_t warm_jacobi_max_n() {
  static const int64_t value = [] {
    const char* env = std::getenv("NGCUDA_EIGH_WARM_JACOBI_MAX_N");
    return env ? std::atoll(env) : int64_t(96);
  }();
  return value;
}

// Sweeps of a cold Jacobi before it hands the matrix to LAPACK; cyclic Jacobi needs ~6–10.
constexpr int64_t kColdJacobiSweeps = 40;

NGCUDA_CLONES Outcome jacobi_run_f32(float* b, float* vt, int64_t n, float skip, double stop_sq,
                                     int64_t max_sweeps) {
  return jacobi::run<float>(b, vt, n, skip, stop_sq, max_sweeps);
}

NGCUDA_CLONES Outcome jacobi_run_f64(double* b, double* vt, int64_t n, double skip,
                                     double stop_sq, int64_t max_sweeps) {
  return jacobi::run<double>(b, vt, n, skip, stop_sq, max_sweeps);
}

Outcome jacobi_run(float* b, float* vt, int64_t n, float skip, double stop_sq, int64_t max_sweeps) {
  return jacobi_run_f32(b, vt, n, skip, stop_sq, max_sweeps);
}

Outcome jacobi_run(double* b, double* vt, int64_t n, double skip, double stop_sq,
                   int64_t max_sweeps) {
  return jacobi_run_f64(b, vt, n, skip, stop_sq, max_sweeps);
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
  // Summing x·0 turns any NaN or Inf into NaN; one branch at the end keeps the loop vectorisable.
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

template <typename T>
struct Workspace {
  std::vector<T> buf;
  std::vector<int64_t> order;
  T *sym, *tmp, *b, *vt;
  explicit Workspace(int64_t nmax) : buf(4 * nmax * nmax), order(nmax) {
    const int64_t nn = nmax * nmax;
    sym = buf.data();
    tmp = sym + nn;
    b = tmp + nn;
    vt = b + nn;
  }
};

// Full symmetric copy of the lower triangle of a; returns ‖A‖_F (of that symmetric matrix).
template <typename T>
double symmetric_from_lower(const T* a, T* sym, int64_t n) {
  double norm_sq = 0.0;
  for (int64_t i = 0; i < n; ++i) {
    for (int64_t j = 0; j < i; ++j) {
      const T v = a[i * n + j];
      sym[i * n + j] = v;
      sym[j * n + i] = v;
      norm_sq += 2.0 * static_cast<double>(v) * static_cast<double>(v);
    }
    sym[i * n + i] = a[i * n + i];
    norm_sq += static_cast<double>(a[i * n + i]) * static_cast<double>(a[i * n + i]);
  }
  return std::sqrt(norm_sq);
}

template <typename T>
at::Tensor wrap(T* data, int64_t n) {
  return at::from_blob(data, {n, n}, at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value));
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

  void finish_jacobi(int64_t i, Workspace<T>& w, int64_t n, double norm, int64_t sweeps,
                     bool cold) {
    const double stop = tol * norm;
    const T skip = static_cast<T>(stop / static_cast<double>(n));
    const Outcome out = jacobi_run(w.b, w.vt, n, skip, stop * stop, sweeps);
    if (!out.converged && cold) {
      lapack({i});
      return;
    }
    jacobi::sorted_output(w.b, w.vt, n, w.order.data(), values[i].data_ptr<T>(),
                          vectors[i].data_ptr<T>());
    status[i] = out.converged ? kOk : kNotConverged;
  }

  void warm(int64_t i, Workspace<T>& w) {
    const int64_t n = a[i].size(0);
    const double norm = symmetric_from_lower(a[i].data_ptr<T>(), w.sym, n);
    const T* q = prev[i].data_ptr<T>();
    const at::Tensor Q = prev[i];
    at::Tensor S = wrap(w.sym, n), AQ = wrap(w.tmp, n), Bt = wrap(w.b, n);
    at::mm_out(AQ, S, Q);
    at::mm_out(Bt, Q.t(), AQ);
    // QᵀAQ is symmetric only up to rounding; Jacobi needs it exactly symmetric.
    T* b = w.b;
    for (int64_t r = 0; r < n; ++r) {
      for (int64_t c = 0; c < r; ++c) {
        const T v = T(0.5) * (b[r * n + c] + b[c * n + r]);
        b[r * n + c] = v;
        b[c * n + r] = v;
      }
    }
    for (int64_t r = 0; r < n; ++r) {
      for (int64_t c = 0; c < n; ++c) w.vt[r * n + c] = q[c * n + r];
    }
    finish_jacobi(i, w, n, norm, max_sweeps, /*cold=*/false);
  }

  void cold_jacobi(int64_t i, Workspace<T>& w) {
    const int64_t n = a[i].size(0);
    const double norm = symmetric_from_lower(a[i].data_ptr<T>(), w.b, n);
    std::fill(w.vt, w.vt + n * n, T(0));
    for (int64_t r = 0; r < n; ++r) w.vt[r * n + r] = T(1);
    finish_jacobi(i, w, n, norm, kColdJacobiSweeps, /*cold=*/true);
  }

  void lapack(const std::vector<int64_t>& index) {
    std::vector<at::Tensor> parts;
    parts.reserve(index.size());
    for (const int64_t i : index) parts.push_back(a[i]);
    try {
      const auto [lam, vec] = at::linalg_eigh(at::stack(parts));
      for (const auto j : c10::irange(index.size())) {
        values[index[j]].copy_(lam[j]);
        vectors[index[j]].copy_(vec[j]);
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

  void run(const std::vector<Item>& items, int64_t nmax_jacobi) {
    std::atomic<size_t> next{0};
    at::parallel_for(0, at::get_num_threads(), 1, [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t) {
        Workspace<T> w(nmax_jacobi);
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
    vectors.push_back(at::empty_like(a[i], at::MemoryFormat::Contiguous));
  }

  // Plan: one item per Jacobi matrix; LAPACK matrices grouped by size into about two stacks per
  // thread, so the per-call overhead is paid a few times rather than once per matrix.
  std::vector<Item> items;
  std::map<int64_t, std::vector<int64_t>> lapack_groups;
  int64_t nmax_jacobi = 0;
  for (const auto i : c10::irange(B)) {
    const int64_t n = a[i].size(0);
    if (n == 0) continue;
    const double cost = static_cast<double>(n) * static_cast<double>(n) * static_cast<double>(n);
    if (warm && n <= warm_jacobi_max_n()) {
      items.push_back({Item::kWarm, {i}, cost});
      nmax_jacobi = std::max(nmax_jacobi, n);
    } else if (n <= cold_jacobi_max_n()) {
      items.push_back({Item::kColdJacobi, {i}, cost});
      nmax_jacobi = std::max(nmax_jacobi, n);
    } else {
      lapack_groups[n].push_back(i);
    }
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

  const double tol_value = tol.has_value() ? *tol : (dtype == at::kFloat ? 1e-7 : 1e-14);
  AT_DISPATCH_FLOATING_TYPES(dtype, "ngcuda_batched_eigh", [&] {
    Solver<scalar_t>{a, prev, values, vectors, status.data_ptr<int32_t>(), tol_value, max_sweeps}
        .run(items, nmax_jacobi);
  });
  return {values, vectors, status};
}

}  // namespace

TORCH_LIBRARY_IMPL(ngcuda, CPU, m) { m.impl("batched_eigh", &batched_eigh_cpu); }

}  // namespace ngcuda::cpu
