// batched_eigh on CUDA: every matrix that fits in shared memory goes to one launch of the Jacobi
// kernel (one CTA per matrix, any mix of sizes); larger ones to cuSOLVER, XsyevBatched for each
// group of equal n up to plan::kBatchedMaxN, Xsyevd for the rest. Per-matrix failures land in
// the int32 status tensor on the device; nothing here waits for the device, except that cuSOLVER
// itself may synchronise when it asks for a host workspace.
//
// Also registers the CPU-callable test ops _eigh_plan, _jacobi_layout, _jacobi_max_n,
// _round_robin and _syrk_split, which return what eigh_plan.h decides, for tests on machines
// without a GPU.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/eye.h>
#include <ATen/ops/matmul.h>
#include <ATen/ops/stack.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <cusolverDn.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <map>
#include <tuple>
#include <type_traits>
#include <vector>

#include "../checks.h"
#include "eigh_plan.h"
#include "kernels.h"

namespace ngcuda::cuda {
namespace {

using EighResult = std::tuple<std::vector<at::Tensor>, std::vector<at::Tensor>, at::Tensor>;

// Post-Newton–Schulz ‖QᵀQ − I‖_F above which a warm start falls back to a cold one.
double warm_limit(at::ScalarType t) { return t == at::kFloat ? 1e-5 : 1e-12; }

double default_tol(at::ScalarType t) { return t == at::kFloat ? 1e-7 : 1e-14; }

// A small int64/int32 array on the device, uploaded from pinned memory without a sync.
template <typename I>
at::Tensor upload(const std::vector<I>& host, at::Device device) {
  const auto dtype = std::is_same<I, int64_t>::value ? at::kLong : at::kInt;
  at::Tensor pinned = at::empty({static_cast<int64_t>(host.size())},
                                at::TensorOptions().dtype(dtype).pinned_memory(true));
  std::copy(host.begin(), host.end(), static_cast<I*>(pinned.data_ptr()));
  return pinned.to(at::TensorOptions().device(device), /*non_blocking=*/true);
}

void check_inputs(at::TensorList matrices, const c10::optional<at::TensorList>& prev,
                  c10::optional<double> tol, int64_t max_sweeps) {
  TORCH_CHECK(max_sweeps >= 0, "ngcuda: batched_eigh: max_sweeps must be >= 0, got ", max_sweeps);
  if (tol.has_value()) {
    TORCH_CHECK(std::isfinite(*tol) && *tol >= 0.0,
                "ngcuda: batched_eigh: tol must be finite and >= 0, got ", *tol);
  }
  const at::Device device = matrices[0].device();
  for (size_t i = 0; i < matrices.size(); ++i) {
    const at::Tensor& a = matrices[i];
    TORCH_CHECK(a.dim() == 2 && a.size(0) == a.size(1), "ngcuda: batched_eigh: matrices[", i,
                "] must be square 2-D, got shape ", a.sizes());
    TORCH_CHECK(a.scalar_type() == at::kFloat || a.scalar_type() == at::kDouble,
                "ngcuda: batched_eigh: matrices[", i, "] must be float32 or float64, got ",
                a.scalar_type());
    TORCH_CHECK(a.device() == device, "ngcuda: batched_eigh: matrices[", i, "] is on ",
                a.device(), " but matrices[0] is on ", device);
  }
  if (!prev.has_value()) return;
  TORCH_CHECK(prev->size() == matrices.size(), "ngcuda: batched_eigh: prev_eigenvectors must hold ",
              matrices.size(), " tensors (one per matrix), got ", prev->size());
  for (size_t i = 0; i < matrices.size(); ++i) {
    const at::Tensor& q = (*prev)[i];
    TORCH_CHECK(q.sizes() == matrices[i].sizes(), "ngcuda: batched_eigh: prev_eigenvectors[", i,
                "] must have shape ", matrices[i].sizes(), ", got ", q.sizes());
    TORCH_CHECK(q.scalar_type() == matrices[i].scalar_type(),
                "ngcuda: batched_eigh: prev_eigenvectors[", i, "] must be ",
                matrices[i].scalar_type(), ", got ", q.scalar_type());
    TORCH_CHECK(q.device() == device, "ngcuda: batched_eigh: prev_eigenvectors[", i, "] is on ",
                q.device(), " but matrices[0] is on ", device);
  }
}

// Keeps every tensor a launch reads alive until the launch is enqueued (the caching allocator
// orders later reuse after it on the same stream).
struct Keep {
  std::vector<at::Tensor> tensors;
  at::Tensor operator()(at::Tensor t) {
    tensors.push_back(t);
    return t;
  }
};

int64_t addr(const at::Tensor& t) { return reinterpret_cast<int64_t>(t.data_ptr()); }

// The Jacobi matrices of one dtype: warm-start preparation per size, then one launch.
template <typename T>
void run_jacobi(const std::vector<int64_t>& idx, at::TensorList matrices,
                const c10::optional<at::TensorList>& prev, double tol, int64_t max_sweeps,
                std::vector<at::Tensor>& values, std::vector<at::Tensor>& vectors,
                at::Tensor& status) {
  if (idx.empty()) return;
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const at::ScalarType dtype = matrices[idx[0]].scalar_type();
  Keep keep;
  struct Warm {
    int64_t b = 0, q = 0, err = 0;
  };
  std::map<int64_t, Warm> warm;  // by matrix index
  if (prev.has_value()) {
    // Per size: A from its lower triangle, one Newton–Schulz step Q ← Q(3I − QᵀQ)/2 (the basis
    // of the last call drifts from orthonormal by its rounding; this resets the drift each call),
    // then QᵀAQ, all in float64 (no TF32, whatever torch's matmul flags say).
    std::map<int64_t, std::vector<int64_t>> by_n;
    for (int64_t i : idx) by_n[matrices[i].size(0)].push_back(i);
    for (const auto& [n, group] : by_n) {
      std::vector<at::Tensor> as, qs;
      for (int64_t i : group) {
        as.push_back(matrices[i]);
        qs.push_back((*prev)[i]);
      }
      const at::Tensor A = at::stack(as).to(at::kDouble);
      const at::Tensor Q0 = at::stack(qs).to(at::kDouble);
      const at::Tensor As = A.tril().add(A.tril(-1).mT());
      const at::Tensor I = at::eye(n, A.options());
      const at::Tensor Q =
          at::matmul(Q0, at::matmul(Q0.mT(), Q0).mul(-0.5).add(I, 1.5)).contiguous();
      const at::Tensor B = at::matmul(Q.mT(), at::matmul(As, Q)).contiguous();
      const at::Tensor err = at::matmul(Q.mT(), Q).sub(I).square().sum({1, 2}).sqrt().contiguous();
      keep(Q);
      keep(B);
      keep(err);
      for (size_t k = 0; k < group.size(); ++k) {
        const int64_t nn = n * n;
        warm[group[k]] = Warm{addr(B) + static_cast<int64_t>(k * nn * sizeof(double)),
                              addr(Q) + static_cast<int64_t>(k * nn * sizeof(double)),
                              addr(err) + static_cast<int64_t>(k * sizeof(double))};
      }
    }
  }
  // Largest first, so that the longest CTAs start in the first wave.
  std::vector<int64_t> order(idx);
  std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) {
    return matrices[a].size(0) > matrices[b].size(0);
  });
  std::vector<int64_t> desc;
  desc.reserve(order.size() * kJacobiDescFields);
  int64_t smem = 0, max_n = 0;
  for (int64_t i : order) {
    const int64_t n = matrices[i].size(0);
    const at::Tensor a = keep(matrices[i].contiguous());
    const Warm w = warm.count(i) ? warm[i] : Warm{};
    desc.insert(desc.end(), {addr(a), w.b, w.q, w.err, addr(values[i]), addr(vectors[i]), n, i});
    smem = std::max(smem, plan::jacobi_layout(n).bytes);
    max_n = std::max(max_n, n);
  }
  const at::Tensor desc_dev = upload(desc, status.device());
  C10_CUDA_CHECK(launch_jacobi_eigh<T>(desc_dev.data_ptr<int64_t>(),
                                       static_cast<int64_t>(order.size()),
                                       plan::jacobi_threads(max_n), smem,
                                       status.data_ptr<int>(), tol, max_sweeps,
                                       warm_limit(dtype), stream));
}

void check_cusolver(cusolverStatus_t st, const char* what) {
  TORCH_CHECK(st == CUSOLVER_STATUS_SUCCESS, "ngcuda: batched_eigh: ", what,
              " failed with cuSOLVER status ", static_cast<int>(st));
}

// One cuSOLVER handle per thread and device, created on first use and kept for the process
// (ATen's own handle pool lives in libtorch_cuda_linalg, which extensions cannot link to).
cusolverDnHandle_t solver_handle(int device) {
  thread_local std::map<int, cusolverDnHandle_t> handles;
  auto it = handles.find(device);
  if (it != handles.end()) return it->second;
  cusolverDnHandle_t h = nullptr;
  check_cusolver(cusolverDnCreate(&h), "cusolverDnCreate");
  handles[device] = h;
  return h;
}

struct SolverParams {
  cusolverDnParams_t p = nullptr;
  SolverParams() { check_cusolver(cusolverDnCreateParams(&p), "cusolverDnCreateParams"); }
  ~SolverParams() {
    if (p != nullptr) cusolverDnDestroyParams(p);
  }
  SolverParams(const SolverParams&) = delete;
  SolverParams& operator=(const SolverParams&) = delete;
};

// The cuSOLVER matrices of one dtype and one n: stacked (the solver overwrites its input), NaN/Inf
// screened into the status, solved, info folded into the status.
template <typename T>
void run_solver(const std::vector<int64_t>& group, int64_t n, bool batched,
                at::TensorList matrices, std::vector<at::Tensor>& values,
                std::vector<at::Tensor>& vectors, at::Tensor& status) {
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const cudaDataType dt = std::is_same<T, float>::value ? CUDA_R_32F : CUDA_R_64F;
  const int64_t count = static_cast<int64_t>(group.size());
  std::vector<at::Tensor> as;
  std::vector<int32_t> index;
  for (int64_t i : group) {
    as.push_back(matrices[i]);
    index.push_back(static_cast<int32_t>(i));
  }
  at::Tensor buf = at::stack(as).contiguous();
  const at::Tensor index_dev = upload(index, status.device());
  at::Tensor w = at::empty({count, n}, buf.options());
  at::Tensor info = at::zeros({count}, buf.options().dtype(at::kInt));
  C10_CUDA_CHECK(launch_screen_nonfinite<T>(buf.data_ptr<T>(), n, count,
                                            index_dev.data_ptr<int>(), status.data_ptr<int>(),
                                            stream));
  cusolverDnHandle_t handle = solver_handle(status.device().index());
  check_cusolver(cusolverDnSetStream(handle, stream), "cusolverDnSetStream");
  SolverParams params;
  // Row-major lower triangle = column-major upper triangle. The eigenvectors come back as the
  // columns of a column-major matrix, i.e. the rows of buf.
  const cublasFillMode_t uplo = CUBLAS_FILL_MODE_UPPER;
  const cusolverEigMode_t jobz = CUSOLVER_EIG_MODE_VECTOR;
  const int64_t step = batched ? plan::solver_batch_limit(n) : 1;
  for (int64_t b0 = 0; b0 < count; b0 += step) {
    const int64_t nb = std::min(step, count - b0);
    T* a = buf.data_ptr<T>() + b0 * n * n;
    T* wv = w.data_ptr<T>() + b0 * n;
    int* inf = info.data_ptr<int>() + b0;
    size_t dev_bytes = 0, host_bytes = 0;
    if (batched) {
      check_cusolver(cusolverDnXsyevBatched_bufferSize(handle, params.p, jobz, uplo, n, dt, a, n,
                                                       dt, wv, dt, &dev_bytes, &host_bytes, nb),
                     "cusolverDnXsyevBatched_bufferSize");
    } else {
      check_cusolver(cusolverDnXsyevd_bufferSize(handle, params.p, jobz, uplo, n, dt, a, n, dt,
                                                 wv, dt, &dev_bytes, &host_bytes),
                     "cusolverDnXsyevd_bufferSize");
    }
    at::Tensor work = at::empty({static_cast<int64_t>(std::max<size_t>(dev_bytes, 1))},
                                buf.options().dtype(at::kByte));
    std::vector<uint8_t> host_work(std::max<size_t>(host_bytes, 1));
    if (batched) {
      check_cusolver(cusolverDnXsyevBatched(handle, params.p, jobz, uplo, n, dt, a, n, dt, wv, dt,
                                            work.data_ptr(), dev_bytes, host_work.data(),
                                            host_bytes, inf, nb),
                     "cusolverDnXsyevBatched");
    } else {
      check_cusolver(cusolverDnXsyevd(handle, params.p, jobz, uplo, n, dt, a, n, dt, wv, dt,
                                      work.data_ptr(), dev_bytes, host_work.data(), host_bytes,
                                      inf),
                     "cusolverDnXsyevd");
    }
    // The call is asynchronous and cuSOLVER does not promise to be done with a host workspace
    // when it returns; sizes that ask for one (rare) pay a sync rather than risk a freed buffer.
    if (host_bytes > 0) C10_CUDA_CHECK(cudaStreamSynchronize(stream));
  }
  C10_CUDA_CHECK(launch_solver_status(info.data_ptr<int>(), count, index_dev.data_ptr<int>(),
                                      status.data_ptr<int>(), stream));
  // The screen gave the solver an identity in place of a non-finite matrix, and a failed solve
  // leaves what it leaves: neither must pass for an answer, so both read NaN, as on the Jacobi
  // path (device ops, no sync).
  const at::Tensor failed = status.index_select(0, index_dev).ne(0);
  w.masked_fill_(failed.unsqueeze(1), std::numeric_limits<T>::quiet_NaN());
  buf.masked_fill_(failed.view({count, 1, 1}), std::numeric_limits<T>::quiet_NaN());
  const at::Tensor vecs = buf.mT().contiguous();
  for (int64_t k = 0; k < count; ++k) {
    values[group[k]] = w[k];
    vectors[group[k]] = vecs[k];
  }
}

EighResult batched_eigh_cuda(at::TensorList matrices, const c10::optional<at::TensorList>& prev,
                             c10::optional<double> tol, int64_t max_sweeps) {
  std::vector<at::Tensor> values(matrices.size()), vectors(matrices.size());
  if (matrices.empty()) {
    return {values, vectors, at::empty({0}, at::TensorOptions().dtype(at::kInt).device(at::kCUDA))};
  }
  check_inputs(matrices, prev, tol, max_sweeps);
  const at::Device device = matrices[0].device();
  const c10::cuda::CUDAGuard guard(device);
  at::Tensor status = at::zeros({static_cast<int64_t>(matrices.size())},
                                at::TensorOptions().dtype(at::kInt).device(device));
  const int64_t smem_limit =
      static_cast<int64_t>(at::cuda::getDeviceProperties(device.index())->sharedMemPerBlockOptin);

  // Group by dtype, then by path (and by n for the solver paths).
  for (const at::ScalarType dtype : {at::kFloat, at::kDouble}) {
    std::map<int64_t, int64_t> same_n;
    for (const at::Tensor& a : matrices) {
      if (a.scalar_type() == dtype) same_n[a.size(0)] += 1;
    }
    if (same_n.empty()) continue;
    std::vector<int64_t> jacobi;
    std::map<int64_t, std::vector<int64_t>> batched, single;
    for (size_t i = 0; i < matrices.size(); ++i) {
      const at::Tensor& a = matrices[i];
      if (a.scalar_type() != dtype) continue;
      const int64_t n = a.size(0);
      switch (plan::eigh_path(n, same_n[n], smem_limit)) {
        case plan::kEmpty:
          values[i] = at::empty({0}, a.options());
          vectors[i] = at::empty({0, 0}, a.options());
          break;
        case plan::kJacobi:
          values[i] = at::empty({n}, a.options());
          vectors[i] = at::empty({n, n}, a.options());
          jacobi.push_back(static_cast<int64_t>(i));
          break;
        case plan::kBatched:
          batched[n].push_back(static_cast<int64_t>(i));
          break;
        case plan::kSyevd:
          single[n].push_back(static_cast<int64_t>(i));
          break;
      }
    }
    const double t = tol.has_value() ? *tol : default_tol(dtype);
    AT_DISPATCH_FLOATING_TYPES(dtype, "ngcuda_batched_eigh_cuda", [&] {
      run_jacobi<scalar_t>(jacobi, matrices, prev, t, max_sweeps, values, vectors, status);
      for (const auto& [n, group] : batched) {
        run_solver<scalar_t>(group, n, true, matrices, values, vectors, status);
      }
      for (const auto& [n, group] : single) {
        run_solver<scalar_t>(group, n, false, matrices, values, vectors, status);
      }
    });
  }
  return {values, vectors, status};
}

// ---- CPU-callable views of eigh_plan.h, for tests without a GPU ----

std::vector<int64_t> eigh_plan_op(std::vector<int64_t> sizes, int64_t smem_limit) {
  std::map<int64_t, int64_t> same_n;
  for (int64_t n : sizes) same_n[n] += 1;
  std::vector<int64_t> out;
  for (int64_t n : sizes) out.push_back(plan::eigh_path(n, same_n[n], smem_limit));
  return out;
}

std::vector<int64_t> jacobi_layout_op(int64_t n) {
  const plan::JacobiLayout L = plan::jacobi_layout(n);
  return {L.m, L.lda, L.a_off, L.v_off, L.rot_off, L.red_off, L.pq_off, L.rank_off, L.bytes,
          plan::jacobi_threads(n)};
}

int64_t jacobi_max_n_op(int64_t smem_limit) { return plan::jacobi_max_n(smem_limit); }

std::vector<int64_t> round_robin_op(int64_t n) {
  const int64_t m = plan::jacobi_layout(n).m;
  std::vector<int64_t> out;
  for (int64_t r = 0; r < m - 1; ++r) {
    for (int64_t i = 0; i < m / 2; ++i) {
      int64_t p, q;
      plan::round_robin_pair(m, r, i, &p, &q);
      out.push_back(p);
      out.push_back(q);
    }
  }
  return out;
}

int64_t syrk_split_op(int64_t rows, int64_t num_tiles, int64_t sms) {
  return plan::syrk_split(rows, num_tiles, sms);
}

}  // namespace

TORCH_LIBRARY_IMPL(ngcuda, CUDA, m) { m.impl("batched_eigh", &batched_eigh_cuda); }

TORCH_LIBRARY_FRAGMENT(ngcuda, m) {
  m.def("_eigh_plan(int[] sizes, int smem_limit) -> int[]", &eigh_plan_op);
  m.def("_jacobi_layout(int n) -> int[]", &jacobi_layout_op);
  m.def("_jacobi_max_n(int smem_limit) -> int", &jacobi_max_n_op);
  m.def("_round_robin(int n) -> int[]", &round_robin_op);
  m.def("_syrk_split(int rows, int num_tiles, int sms) -> int", &syrk_split_op);
}

}  // namespace ngcuda::cuda
