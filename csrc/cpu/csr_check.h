// Index checks of CSR inputs on the CPU, run before any output is written.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Optional.h>

#include <utility>

namespace ngcuda::cpu {

// The adjacency Â of the sparse updates: rowptr [M + 1] and col [nnz] (int64), each column a
// row of x (in [0, x_rows)).
void check_csr_values(const at::Tensor& rowptr, const at::Tensor& col, int64_t x_rows);

// A sparse CSR x: crow_indices from 0 to nnz and non-decreasing, col_indices in [0, cols).
// Returns whether every row's columns are strictly increasing (sorted, no duplicates), which
// lets the sparse Gram walk each row from the current entry on instead of in full.
bool check_csr_x_values(const at::Tensor& x);

// Every check of the adjacency arguments of the sparse updates: Â's shapes, dtypes and device
// against `like` (the factor or first block), the row weights over Â's rows, and Â's indices
// against x's x_rows rows. Returns rowptr and col, contiguous.
std::pair<at::Tensor, at::Tensor> checked_adjacency(const at::Tensor& rowptr, const at::Tensor& col,
                                                    const c10::optional<at::Tensor>& value,
                                                    const c10::optional<at::Tensor>& row_weight,
                                                    const at::Tensor& like, int64_t x_rows);

}  // namespace ngcuda::cpu
