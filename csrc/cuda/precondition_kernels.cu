// The eigenbasis scaling of precondition, all layers in one launch: grid.y is the layer, grid.x
// walks its elements.
#include <cuda_runtime.h>

#include "kernels.h"

namespace ngcuda::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kMaxBlocksX = 1024;
constexpr int64_t kMaxGridY = 65535;

template <typename T>
__global__ void __launch_bounds__(kThreads)
    scale_eigenbasis_kernel(const int64_t* __restrict__ desc, T damping) {
  const int64_t* d = desc + static_cast<int64_t>(blockIdx.y) * 5;
  T* t = reinterpret_cast<T*>(d[0]);
  const T* lam_g = reinterpret_cast<const T*>(d[1]);
  const T* lam_a = reinterpret_cast<const T*>(d[2]);
  const int64_t rows = d[3];
  const int64_t cols = d[4];
  const int64_t total = rows * cols;
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; idx < total;
       idx += static_cast<int64_t>(gridDim.x) * kThreads) {
    const int64_t i = idx / cols;
    const int64_t j = idx - i * cols;
    t[idx] /= lam_g[i] * lam_a[j] + damping;
  }
}

}  // namespace

template <typename T>
cudaError_t launch_scale_eigenbasis(const int64_t* desc, int64_t layers, int64_t max_elems,
                                    double damping, cudaStream_t stream) {
  if (layers <= 0 || max_elems <= 0) return cudaSuccess;
  int64_t blocks = (max_elems + kThreads - 1) / kThreads;
  if (blocks > kMaxBlocksX) blocks = kMaxBlocksX;
  for (int64_t l0 = 0; l0 < layers; l0 += kMaxGridY) {  // grid.y is capped at 65,535
    const int64_t n = layers - l0 < kMaxGridY ? layers - l0 : kMaxGridY;
    const dim3 grid(static_cast<unsigned>(blocks), static_cast<unsigned>(n));
    scale_eigenbasis_kernel<T><<<grid, kThreads, 0, stream>>>(desc + l0 * 5, static_cast<T>(damping));
    const cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  return cudaSuccess;
}

template cudaError_t launch_scale_eigenbasis<float>(const int64_t*, int64_t, int64_t, double,
                                                    cudaStream_t);
template cudaError_t launch_scale_eigenbasis<double>(const int64_t*, int64_t, int64_t, double,
                                                     cudaStream_t);

}  // namespace ngcuda::cuda
