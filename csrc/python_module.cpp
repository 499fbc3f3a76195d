// The Python module ngcuda._C: loading it registers the ops; build_info reports what was compiled.
#include <torch/extension.h>

#include "cpu/batched_eigh.h"
#include "cpu/small_gemm.h"

#ifndef NGCUDA_TORCH_VERSION
#define NGCUDA_TORCH_VERSION "unknown"
#endif
#ifndef NGCUDA_CUDA_VERSION
#define NGCUDA_CUDA_VERSION ""
#endif
#ifndef NGCUDA_CUDA_ARCHS
#define NGCUDA_CUDA_ARCHS ""
#endif

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
  // The vector kernels this CPU runs (small_gemm and panel_gemm pick them at load time).
  info["cpu_kernels"] = std::string(ngcuda::cpu::gemm::variant());
  // The sizes whose warm starts the CPU batched_eigh refines here: (min n, max n), or None.
  pybind11::dict warm;
  for (const auto& [name, dtype] :
       {std::pair{"float32", c10::kFloat}, std::pair{"float64", c10::kDouble}}) {
    const auto range = ngcuda::cpu::warm_range(dtype);
    if (range.min_n <= range.max_n) {
      warm[name] = pybind11::make_tuple(range.min_n, range.max_n);
    } else {
      warm[name] = pybind11::none();
    }
  }
  info["eigh_warm_n"] = warm;
  return info;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "ngcuda C++/CUDA kernels; the ops live in torch.ops.ngcuda";
  m.def("build_info", &build_info, "Which backends and CUDA architectures this build holds");
}
