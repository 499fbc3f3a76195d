// The one place where ngcuda's ops are declared. Backends register kernels for these schemas in
// cpu/, cuda/ and meta/.
#include <torch/library.h>

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
