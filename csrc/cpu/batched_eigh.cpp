// batched_eigh on the CPU: a list of symmetric matrices of any mix of sizes, in parallel over them.
//
// Warm start (prev_eigenvectors given), for the sizes where it pays on this CPU (warm_range):
// iterative refinement of the previous eigenvectors by matrix products (warm_refine.h), one
// matrix per thread. A matrix the refinement cannot finish within max_sweeps steps (or not
// cheaply: a basis that is far off) is solved cold afterwards and reported with status
// kWarmFallback, so its result is as good as a cold one. Other sizes are solved cold.
// Cold: float32 n ≤ 96 and float64 n ≤ 256 by our Householder + QL (tridiagonal_eigh.h), a few
// matrices interleaved per work item; larger ones by LAPACK (?syevd through at::linalg_eigh) on
// per-thread stacks of same-size matrices, and n ≥ 768 by LAPACK with its own threads.
// The solvers read only the lower triangle of each matrix, as torch.linalg.eigh; the finiteness
// screen reads all of it.
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
#include <memory>
#include <vector>

#include "batched_eigh.h"
#include "clones.h"
#include "small_gemm.h"
#include "tridiagonal_eigh.h"
#include "warm_refine.h"

namespace ngcuda::cpu {
namespace {

// kWarmFallback: the warm start did not converge within max_sweeps (or would not pay off), and
// the matrix was solved cold instead; its result is valid.
enum Status : int32_t { kOk = 0, kNotConverged = 2, kSolverFailed = 3, kWarmFallback = 4 };

int64_t env_int(const char* name, int64_t fallback) {
  const char* env = std::getenv(name);
  return env ? std::atoll(env) : fallback;
}

double env_double(const char* name, double fallback) {
  const char* env = std::getenv(name);
  return env ? std::atof(env) : fallback;
}

}  // namespace

// Measured with `python -m benchmarks eigh` (2 threads, 64 K-FAC-like factors, 35 at n = 192,
// warm/cold time after a 1e-3 drift). AMD EPYC Zen 5 (AVX-512), float32: 1.13 at n = 20, 1.05 at
// 24, 0.84 at 28, 0.77 at 32, 0.67 at 48 to 96 (cold: our Householder + QL), 0.62 at 128, 0.76 at
// 160, 0.70 at 192 (cold: LAPACK), 1.3 at 224 and 1.4 at 256; after a 1e-4 drift 0.6 at 128 to 224;
// a 1e-2 drift is over warm_max_start_off. float64: 1.1 to 2.1 at n ≤ 24 whatever the drift, and
// above that the cold solver is faster unless the start is nearly exact (0.8–0.9 at n = 32 to 96
// after a 1e-8 drift, 1.0–1.1 after 1e-7 to 1e-5), so that range is kept. AMD EPYC Zen 3 (AVX2
// only), where the products run at half the width: float32 0.83–1.0 at n = 32 to 64 after a 1e-4
// drift, 1.04–1.22 after 3e-4 to 1e-3, 1.4–1.9 at 128 to 192; float64 1.3–2.2 even after 1e-8. So
// without AVX-512 no warm start is refined. The refinement keeps about 110·n² bytes of buffers per
// thread (4 MiB at n = 192).
WarmRange warm_range(at::ScalarType dtype) {
  static const int64_t forced_min = env_int("NGCUDA_EIGH_WARM_MIN_N", -1);
  static const int64_t forced_max = env_int("NGCUDA_EIGH_WARM_MAX_N", -1);
  const int64_t max_n = gemm::level() < 2 ? 0 : dtype == at::kFloat ? 192 : 96;
  return {forced_min >= 0 ? forced_min : 28, forced_max >= 0 ? forced_max : max_n};
}

namespace {

// A warm start whose ‖offdiag(QᵀAQ)‖_F exceeds this fraction of ‖A‖_F is solved cold at once
// (status kWarmFallback): the cold solve is then faster. Measured single-threaded, K-FAC-like
// float32 factors of n = 32 to 128, AMD EPYC Zen 5: warm/cold time 0.6–0.9 at starts off by 7e-4
// to 2e-3, 0.8–1.0 at 3.5e-3, 1.3 at 7e-3 (a 1e-2 drift of the benchmark); handing such a start
// back after a failed refinement would cost both.
double warm_max_start_off() {
  static const double value = env_double("NGCUDA_EIGH_WARM_MAX_START_OFF", 3e-3);
  return value;
}

// Largest n for which a cold matrix goes to our Householder + QL solver (tridiagonal_eigh.h)
// instead of LAPACK. Measured single-threaded against LAPACK in the same loop (K-FAC-like factors,
// AMD EPYC Zen 5, best of 15, two runs each): float32 1.5× faster at n = 64, 1.0–1.1× at 96, even
// at 112, 0.75–0.95× at 128; float64 1.3–1.4× at 128, 1.1–1.2× at 224, 1.06–1.1× at 256 (LAPACK's
// float64 is slower, ours is float64 either way). On a Zen 3 EPYC (AVX2; `python -m benchmarks
// eigh`, 2 threads, batch 64) float32 limits of 64, 96 and 128 timed level at n = 96 and 128.
int64_t tridiagonal_max_n(at::ScalarType dtype) {
  static const int64_t forced = env_int("NGCUDA_EIGH_TRIDIAGONAL_MAX_N", -1);
  if (forced >= 0) return forced;
  return dtype == at::kFloat ? 96 : 256;
}

// Smallest n solved by LAPACK outside the parallel loop, one size at a time with LAPACK's own
// threads: inside the loop it runs single-threaded, which loses to threaded LAPACK once the
// matrices are large and few (measured with 2 threads: n = 1024 batch 3 at 0.87×, n = 2048 at
// 0.64× of stacked torch.linalg.eigh; n = 512 batch 8 still 1.5× faster in the loop).
int64_t threaded_lapack_min_n() {
  static const int64_t value = env_int("NGCUDA_EIGH_THREADED_LAPACK_MIN_N", 768);
  return value;
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
NGCUDA_CLONES bool all_finite(const T* x, int64_t count) {
  // x·0 is NaN exactly for NaN and ±Inf; one test at the end keeps the loop branch-free, and 16
  // independent sums let it vectorise (a single float sum may not be reassociated).
  T acc[16] = {};
  int64_t k = 0;
  for (; k + 16 <= count; k += 16) {
    for (int j = 0; j < 16; ++j) acc[j] += x[k + j] * T(0);
  }
  for (; k < count; ++k) acc[0] += x[k] * T(0);
  T total = T(0);
  for (int j = 0; j < 16; ++j) total += acc[j];
  return total == T(0);
}

// Index of the first tensor in `t` holding NaN or Inf, or −1; checked in parallel over the list.
template <typename T>
int64_t first_non_finite(const std::vector<at::Tensor>& t) {
  const int64_t count = static_cast<int64_t>(t.size());
  if (count == 0) return -1;
  std::atomic<int64_t> first{count};
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 15) / std::max<int64_t>(1, t[0].numel()));
  at::parallel_for(0, count, grain, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e && i < first.load(); ++i) {
      if (all_finite(t[i].data_ptr<T>(), t[i].numel())) continue;
      int64_t seen = first.load();
      while (i < seen && !first.compare_exchange_weak(seen, i)) {
      }
      return;
    }
  });
  return first.load() == count ? -1 : first.load();
}

// ---------------------------------------------------------------------------------------------
// Work items, run longest first from a shared counter so mixed sizes balance over the threads.

struct Item {
  enum Kind { kWarm, kTridiagonal, kLapack } kind;
  std::vector<int64_t> index;  // one matrix, a group for tridiag, or a same-size stack for LAPACK
  double cost;
};

// Groups matrices by size into about two stacks per thread, so LAPACK's per-call overhead is paid
// a few times rather than once per matrix.
void lapack_items(const std::vector<at::Tensor>& a, const std::vector<int64_t>& index,
                  std::vector<Item>& items) {
  std::map<int64_t, std::vector<int64_t>> groups;
  for (const int64_t i : index) groups[a[i].size(0)].push_back(i);
  const int64_t stacks_per_size = 2 * at::get_num_threads();
  for (auto& [n, members] : groups) {
    const int64_t m = static_cast<int64_t>(members.size());
    const int64_t per = (m + stacks_per_size - 1) / stacks_per_size;
    for (int64_t s = 0; s < m; s += per) {
      std::vector<int64_t> part(members.begin() + s, members.begin() + std::min(m, s + per));
      const double cost = static_cast<double>(part.size()) * n * n * n;
      items.push_back({Item::kLapack, std::move(part), cost});
    }
  }
}

// Groups of up to tridiag::kGroup matrices, similar sizes together, at least two groups per thread,
// and no more matrices per group than keep their eigenvector buffers (n² doubles each) within about
// 1 MiB (measured per matrix, single-threaded: four interleaved take 84 µs at n = 64 against 112
// alone, 624 against 747 at n = 128, and make no difference at n = 256).
void tridiagonal_items(const std::vector<at::Tensor>& a, std::vector<int64_t> index,
                       std::vector<Item>& items) {
  const int64_t count = static_cast<int64_t>(index.size());
  if (count == 0) return;
  std::stable_sort(index.begin(), index.end(),
                   [&](int64_t x, int64_t y) { return a[x].size(0) > a[y].size(0); });
  const int64_t per_thread = 2 * at::get_num_threads();
  const int64_t most = std::clamp<int64_t>((count + per_thread - 1) / per_thread, 1, tridiag::kGroup);
  for (int64_t s = 0; s < count;) {
    const int64_t n = a[index[s]].size(0);
    const int64_t fit = std::clamp<int64_t>((int64_t{1} << 17) / (n * n), 1, most);
    std::vector<int64_t> part(index.begin() + s, index.begin() + std::min(count, s + fit));
    s += static_cast<int64_t>(part.size());
    double cost = 0.0;
    for (const int64_t i : part) {
      const double m = static_cast<double>(a[i].size(0));
      cost += m * m * m;
    }
    items.push_back({Item::kTridiagonal, std::move(part), cost});
  }
}

// Cold work items: the sizes our solver takes in groups, the others in LAPACK stacks.
void cold_items(const std::vector<at::Tensor>& a, const std::vector<int64_t>& index,
                std::vector<Item>& items) {
  std::vector<int64_t> by_lapack, by_tridiagonal;
  for (const int64_t i : index) {
    const bool ours = a[i].size(0) <= tridiagonal_max_n(a[i].scalar_type());
    (ours ? by_tridiagonal : by_lapack).push_back(i);
  }
  lapack_items(a, by_lapack, items);
  tridiagonal_items(a, by_tridiagonal, items);
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

  void tridiagonal(const std::vector<int64_t>& index, int32_t ok_status) {
    tridiag::Matrix<T> mats[tridiag::kGroup];
    bool ok[tridiag::kGroup];
    const int count = static_cast<int>(index.size());
    for (int k = 0; k < count; ++k) {
      const int64_t i = index[k];
      mats[k] = {a[i].data_ptr<T>(), a[i].size(0), values[i].data_ptr<T>(),
                 vectors[i].data_ptr<T>()};
    }
    tridiag::solve<T>(count, mats, ok);
    for (int k = 0; k < count; ++k) {
      if (ok[k]) {
        status[index[k]] = ok_status;
      } else {
        lapack({index[k]}, ok_status);
      }
    }
  }

  // Marks the matrix kWarmFallback when the refinement hands it back; the caller solves those
  // cold after this pass, stacked by size.
  void warm(int64_t i, refine::Workspace& w) {
    const int64_t n = a[i].size(0);
    const refine::Result r =
        refine::solve<T>(a[i].data_ptr<T>(), prev[i].data_ptr<T>(), n, values[i].data_ptr<T>(),
                         vectors[i].data_ptr<T>(), {tol, max_sweeps, warm_max_start_off()}, w);
    TORCH_CHECK(r.outcome != refine::Outcome::kNotOrthonormal,
                "ngcuda: batched_eigh: prev_eigenvectors[", i, "] is not orthonormal: ‖QᵀQ − I‖_F = ",
                r.prev_orth_error, " (a warm start must be the eigenvectors of a nearby matrix)");
    status[i] = r.outcome == refine::Outcome::kConverged ? kOk : kWarmFallback;
  }

  void lapack(const std::vector<int64_t>& index, int32_t ok_status) {
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
        status[index[j]] = ok_status;
      }
    } catch (const c10::Error&) {
      for (const int64_t i : index) {
        values[i].fill_(std::numeric_limits<T>::quiet_NaN());
        vectors[i].fill_(std::numeric_limits<T>::quiet_NaN());
        status[i] = kSolverFailed;
      }
    }
  }

  // Matrices solved cold by LAPACK or tridiag get cold_status.
  void run(const std::vector<Item>& items, int64_t nmax_warm, bool parallel,
           int32_t cold_status) {
    std::atomic<size_t> next{0};
    at::parallel_for(0, parallel ? at::get_num_threads() : 1, 1, [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t) {
        refine::Workspace* rw = nmax_warm > 0 ? &refine::Workspace::local(nmax_warm) : nullptr;
        for (size_t k = next++; k < items.size(); k = next++) {
          const Item& item = items[k];
          switch (item.kind) {
            case Item::kWarm: warm(item.index[0], *rw); break;
            case Item::kTridiagonal: tridiagonal(item.index, cold_status); break;
            case Item::kLapack: lapack(item.index, cold_status); break;
          }
        }
      }
    });
  }
};

// Waking a second thread can cost a scheduler tick (milliseconds) on a loaded machine, more than
// a small batch takes on one core (Σn³ = 5e5 is about half a millisecond of LAPACK).
bool worth_parallel(std::vector<Item>& items) {
  std::stable_sort(items.begin(), items.end(),
                   [](const Item& x, const Item& y) { return x.cost > y.cost; });
  double total_cost = 0.0;
  for (const Item& item : items) total_cost += item.cost;
  return total_cost >= 5e5;
}

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
    const int64_t bad = first_non_finite<scalar_t>(a);
    TORCH_CHECK_VALUE(bad < 0, "ngcuda: batched_eigh: matrices[", bad, "] holds NaN or Inf");
    const int64_t bad_prev = first_non_finite<scalar_t>(prev);
    TORCH_CHECK_VALUE(bad_prev < 0, "ngcuda: batched_eigh: prev_eigenvectors[", bad_prev,
                      "] holds NaN or Inf");
  });

  values.reserve(B);
  vectors.reserve(B);
  for (const auto i : c10::irange(B)) {
    values.push_back(at::empty({a[i].size(0)}, a[i].options()));
    vectors.push_back(at::empty({a[i].size(0), a[i].size(0)}, a[i].options()));
  }

  // Plan: one item per warm matrix, cold ones grouped (cold_items), the large ones apart.
  std::vector<Item> items;
  std::vector<int64_t> cold;
  std::map<int64_t, std::vector<int64_t>> large;  // n -> matrices, for threaded LAPACK
  int64_t nmax_warm = 0;
  for (const auto i : c10::irange(B)) {
    const int64_t n = a[i].size(0);
    if (n == 0) continue;
    const double cost = static_cast<double>(n) * static_cast<double>(n) * static_cast<double>(n);
    if (warm && warm_range(a[i].scalar_type()).holds(n)) {
      items.push_back({Item::kWarm, {i}, cost});
      nmax_warm = std::max(nmax_warm, n);
    } else if (n >= threaded_lapack_min_n() && n > tridiagonal_max_n(a[i].scalar_type())) {
      large[n].push_back(i);
    } else {
      cold.push_back(i);
    }
  }
  cold_items(a, cold, items);
  const bool parallel = worth_parallel(items);

  // float32: 1e-5, the accuracy promised for float32 results, which the refinement can check on
  // float32 products alone (warm_refine.h); a tighter tol makes it finish in float64.
  const double tol_value = tol.has_value() ? *tol : (dtype == at::kFloat ? 1e-5 : 1e-14);
  AT_DISPATCH_FLOATING_TYPES(dtype, "ngcuda_batched_eigh", [&] {
    Solver<scalar_t> solver{a, prev, values, vectors, status.data_ptr<int32_t>(), tol_value,
                            max_sweeps};
    solver.run(items, nmax_warm, parallel, kOk);
    for (const auto& [n, members] : large) solver.lapack(members, kOk);
    // Warm starts handed back: solve them cold, grouped like any cold batch.
    std::vector<int64_t> fallback;
    const int32_t* st = status.data_ptr<int32_t>();
    for (const auto i : c10::irange(B)) {
      if (st[i] == kWarmFallback) fallback.push_back(i);
    }
    if (!fallback.empty()) {
      std::vector<Item> retry;
      cold_items(a, fallback, retry);
      solver.run(retry, 0, worth_parallel(retry), kWarmFallback);
    }
  });
  return {values, vectors, status};
}

}  // namespace

TORCH_LIBRARY_IMPL(ngcuda, CPU, m) { m.impl("batched_eigh", &batched_eigh_cpu); }

}  // namespace ngcuda::cpu
