// The one place where ngcuda's ops are declared. Backends register kernels for these schemas in
// cpu/, cuda/ and meta/. The factor ops take x dense (CPU, CUDA, Meta keys) or as a sparse CSR
// tensor (SparseCsrCPU, SparseCsrCUDA, SparseCsrMeta keys): the dispatcher picks by x's layout.
#include <torch/library.h>

TORCH_LIBRARY(ngcuda, m) {
  m.def(
      "factor_update_(Tensor(a!) factor, Tensor x, float decay, bool append_bias, "
      "Tensor? row_weight=None) -> ()");
  m.def(
      "sparse_factor_update_(Tensor(a!) factor, Tensor rowptr, Tensor col, Tensor? value, Tensor x, "
      "float decay, bool append_bias, Tensor? row_weight=None) -> ()");
  // The diagonal blocks of factor_update_ / sparse_factor_update_ for a partition of the D
  // columns into contiguous blocks, in order (the bias column is the last column), without the
  // D×D factor.
  m.def(
      "block_factor_update_(Tensor(a!)[] blocks, Tensor x, float decay, bool append_bias, "
      "Tensor? row_weight=None) -> ()");
  m.def(
      "sparse_block_factor_update_(Tensor(a!)[] blocks, Tensor rowptr, Tensor col, Tensor? value, "
      "Tensor x, float decay, bool append_bias, Tensor? row_weight=None) -> ()");
  m.def(
      "batched_eigh(Tensor[] matrices, Tensor[]? prev_eigenvectors=None, float? tol=None, "
      "int max_sweeps=15) -> (Tensor[], Tensor[], Tensor)");
  m.def(
      "precondition(Tensor[] grads, Tensor[] QA, Tensor[] lamA, Tensor[] QG, Tensor[] lamG, "
      "float damping) -> Tensor[]");
}
