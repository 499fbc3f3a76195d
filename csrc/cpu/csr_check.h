// Index checks of CSR inputs on the CPU, run before any output is written.
#pragma once

#include <ATen/ATen.h>

namespace ngcuda::cpu {

// The adjacency Â of the sparse updates: rowptr [M + 1] and col [nnz] (int64), each column a
// row of x (in [0, x_rows)).
void check_csr_values(const at::Tensor& rowptr, const at::Tensor& col, int64_t x_rows);

// A sparse CSR x: crow_indices from 0 to nnz and non-decreasing, col_indices in [0, cols).
// Returns whether every row's columns are strictly increasing (sorted, no duplicates), which
// lets the sparse Gram walk each row from the current entry on instead of in full.
bool check_csr_x_values(const at::Tensor& x);

}  // namespace ngcuda::cpu
