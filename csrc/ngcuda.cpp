// The one place where ngcuda's ops are declared. Backends register kernels for these schemas in
// cpu/, cuda/ and meta/; this file also carries the small Python module that reports the build.
#include <torch/extension.h>
#include <torch/library.h>

#ifndef NGCUDA_TORCH_VERSION
#define NGCUDA_TORCH_VERSION "unknown"
#endif
#ifndef NGCUDA_CUDA_VERSION
#define NGCUDA_CUDA_VERSION ""
#endif
#ifndef NGCUDA_CUDA_ARCHS
#define NGCUDA_CUDA_ARCHS ""
#endif

TORCH_LIBRARY(ngcuda, m) {
  m.def(
      "factor_update_(Tensor(a!) factor, Tensor x, float decay, bool append_bias, "
      "Tensor? row_weight=None) -> ()");
  m.def(
      "sparse_factor_update_(Tensor(a!) factor, Tensor rowptr, Tensor col, Tensor? value, Tensor x, "
      "float decay, bool append_bias, Tensor? row_weight=None) -> ()");
  m.def(
      "batched_eigh(Tensor[] matrices, Tensor[]? prev_eigenvectors=None, float? tol=None, "
      "int max_sweeps=15) -> (Tensor[], Tensor[], Tensor)");
  m.def(
      "precondition(Tensor[] grads, Tensor[] QA, Tensor[] lamA, Tensor[] QG, Tensor[] lamG, "
      "float damping) -> Tensor[]");
}

namespace {

pybind11::dict build_info() {
  pybind11::dict info;
  pybind11::list backends;
  backends.append("cpu");
#ifdef NGCUDA_WITH_CUDA
  backends.append("cuda");
  info["cuda_archs"] = std::string(NGCUDA_CUDA_ARCHS);
  info["cuda_version"] = std::string(NGCUDA_CUDA_VERSION);
#else
  info["cuda_archs"] = std::string();
#endif
  info["backends"] = backends;
  info["torch_version"] = std::string(NGCUDA_TORCH_VERSION);
  return info;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "ngcuda C++/CUDA kernels; the ops live in torch.ops.ngcuda";
  m.def("build_info", &build_info, "Which backends and CUDA architectures this build holds");
}
