// The Gram x̄ᵀ diag(w) x̄ of a sparse x, accumulated straight into the upper triangles of a
// factor's diagonal blocks, on the CPU.
//
// Each thread owns whole output rows i and adds w_r·x_ri·x_rj to row i for the columns j ≥ i of
// i's block. With sorted rows and blocks of at most 512 it walks x's rows in order (its output
// rows stay in cache); otherwise it walks the transposed pattern (which rows hold column i), so
// that one large output row stays in cache. Nothing is shared between threads, and every sum
// runs in the order of the rows, so the result is the same for any thread count and either
// walk. The cost is Σ_r nnz_r² / 2 multiply-adds within blocks (Σ_r nnz_r² for rows whose
// columns are unsorted or repeated), plus one pass over each block.
#pragma once

#include <ATen/ATen.h>

#include <vector>

namespace ngcuda::cpu {

// The diagonal blocks being updated; block k covers columns [start[k], start[k + 1]).
template <typename scalar_t>
struct BlockTargets {
  std::vector<scalar_t*> data;  // row-major [n_k, n_k]
  std::vector<int64_t> start;   // K + 1 entries, start[K] = D
  bool bias = false;            // the last column (D − 1) is the bias column of x̄ = [x, 1]
};

// Rows of a sparse matrix with `cols` columns: row r holds entries [begin[r], end[r]) of col and
// val (gaps between rows are allowed) and weight[r], which already includes the blend scale.
template <typename scalar_t, typename index_t>
struct SparseRows {
  int64_t count = 0;
  const int64_t* begin = nullptr;
  const int64_t* end = nullptr;
  const index_t* col = nullptr;
  const scalar_t* val = nullptr;
  const scalar_t* weight = nullptr;
  int64_t cols = 0;
  bool sorted = false;  // every row's columns strictly increasing
};

// Upper triangle of every block: t ← (scale_first ? decay·t : t) + Σ_r weight_r·x̄_rᵀ x̄_r
// restricted to the block, where x̄_r = [x_r, 0]: the bias column gets Σ_r weight_r·x_r here, its
// diagonal entry is left to finish_blocks. decay 0 with scale_first zeroes the old values, Inf
// and NaN included. The lower triangles are not touched.
template <typename scalar_t, typename index_t>
void accumulate_sparse_upper(const BlockTargets<scalar_t>& targets,
                             const SparseRows<scalar_t, index_t>& rows, bool scale_first,
                             double decay);

// Adds `corner` to the bias column's diagonal entry (when targets.bias) and copies every upper
// triangle onto its lower one.
template <typename scalar_t>
void finish_blocks(const BlockTargets<scalar_t>& targets, double corner);

}  // namespace ngcuda::cpu
