#include "sparse_gram.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <utility>

namespace ngcuda::cpu {
namespace {

// Columns [0, D) split into about `parts` contiguous ranges of equal estimated cost, so that a
// static split over threads stays balanced even when a few columns (frequent words) dominate.
std::vector<int64_t> balanced_ranges(const std::vector<int64_t>& cost, int64_t parts) {
  const int64_t D = static_cast<int64_t>(cost.size());
  int64_t total = 0;
  for (int64_t c : cost) total += c;
  std::vector<int64_t> bounds{0};
  int64_t acc = 0;
  for (int64_t i = 0; i < D; ++i) {
    acc += cost[i];
    const int64_t next = static_cast<int64_t>(bounds.size());
    if (acc * parts >= total * next && i + 1 < D && next < parts) bounds.push_back(i + 1);
  }
  bounds.push_back(D);
  return bounds;
}

// out[j] ← decay·out[j] for j in [from, n): one upper-triangle row of a block. decay 0 zeroes,
// Inf and NaN included.
template <typename scalar_t>
inline void scale_row(scalar_t* __restrict__ out, int64_t from, int64_t n, scalar_t decay) {
  for (int64_t j = from; j < n; ++j) out[j] = decay == scalar_t(0) ? scalar_t(0) : decay * out[j];
}

// Adds c·x_rj to out[j − s0] for the entries q ≥ e of sorted row r whose column j is below s1.
template <typename scalar_t, typename index_t>
inline void add_sorted_tail(scalar_t* __restrict__ out, const SparseRows<scalar_t, index_t>& rows,
                            int64_t r, int64_t e, int64_t s0, int64_t s1, scalar_t c) {
  for (int64_t q = e; q < rows.end[r]; ++q) {
    const int64_t j = rows.col[q];
    if (j >= s1) break;
    out[j - s0] += c * rows.val[q];
  }
}

// Blocks no larger than this take the walk over x's rows (sorted rows only): it reads x in
// order instead of building a transposed pattern and reading through it. Coauthor CS with
// input dropout (546k entries, one thread, Zen 3): block:32 14.1 -> 6.1 ms, block:128 16.7 ->
// 8.0 ms, block:512 25.9 -> 20.3 ms; but 2048 59.8 -> 65.8 and one 6805² block 109 -> 189 ms,
// where the output rows a thread owns no longer stay in cache.
constexpr int64_t kRowWalkMaxBlock = 512;

// The same sums as the column walk below, in the same order for every output entry (rows
// ascending), so the two give bit-identical results. Each thread owns a range of output rows
// i and walks every row of x, from its first column ≥ the range's start.
template <typename scalar_t, typename index_t>
void accumulate_by_rows(const BlockTargets<scalar_t>& targets,
                        const SparseRows<scalar_t, index_t>& rows, bool scale_first, double decay,
                        const std::vector<int64_t>& block_of) {
  const int64_t D = targets.start.back();
  const int64_t cols = rows.cols;
  std::vector<int64_t> cost(D, 1);
  for (int64_t r = 0; r < rows.count; ++r)
    for (int64_t e = rows.begin[r]; e < rows.end[r]; ++e) ++cost[rows.col[e]];
  if (scale_first)
    for (int64_t i = 0; i < D; ++i) cost[i] += (targets.start[block_of[i] + 1] - i) / 8;
  const std::vector<int64_t> bounds = balanced_ranges(cost, at::get_num_threads());

  const scalar_t a = static_cast<scalar_t>(decay);
  at::parallel_for(0, static_cast<int64_t>(bounds.size()) - 1, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t part = c0; part < c1; ++part) {
      const int64_t i0 = bounds[part], i1 = bounds[part + 1];
      if (scale_first) {
        for (int64_t i = i0; i < i1; ++i) {
          const int64_t k = block_of[i];
          const int64_t s0 = targets.start[k], n = targets.start[k + 1] - s0;
          scale_row(targets.data[k] + (i - s0) * n, i - s0, n, a);
        }
      }
      if (i0 >= cols) continue;
      for (int64_t r = 0; r < rows.count; ++r) {
        const index_t* row_end = rows.col + rows.end[r];
        const index_t* p = std::lower_bound(rows.col + rows.begin[r], row_end, static_cast<index_t>(i0));
        for (; p < row_end && *p < i1; ++p) {
          const int64_t e = p - rows.col;
          const int64_t i = *p;
          const int64_t k = block_of[i];
          const int64_t s0 = targets.start[k];
          const int64_t s1 = targets.start[k + 1];
          scalar_t* __restrict__ out = targets.data[k] + (i - s0) * (s1 - s0);
          const scalar_t c = rows.weight[r] * rows.val[e];
          if (targets.bias && s1 == D) out[D - 1 - s0] += c;
          add_sorted_tail(out, rows, r, e, s0, s1, c);
        }
      }
    }
  });
}

}  // namespace

template <typename scalar_t, typename index_t>
void accumulate_sparse_upper(const BlockTargets<scalar_t>& targets,
                             const SparseRows<scalar_t, index_t>& rows, bool scale_first,
                             double decay) {
  const int64_t D = targets.start.back();
  const int64_t K = static_cast<int64_t>(targets.data.size());
  if (D == 0) return;
  const int64_t cols = rows.cols;

  std::vector<int64_t> block_of(D);
  int64_t largest = 0;
  for (int64_t k = 0; k < K; ++k) {
    largest = std::max(largest, targets.start[k + 1] - targets.start[k]);
    for (int64_t i = targets.start[k]; i < targets.start[k + 1]; ++i) block_of[i] = k;
  }
  if (rows.sorted && largest <= kRowWalkMaxBlock) {
    accumulate_by_rows(targets, rows, scale_first, decay, block_of);
    return;
  }

  // The transposed pattern: for column i, the (row, entry) pairs holding it, rows ascending.
  std::vector<int64_t> cptr(cols + 1, 0);
  for (int64_t r = 0; r < rows.count; ++r)
    for (int64_t e = rows.begin[r]; e < rows.end[r]; ++e) ++cptr[rows.col[e] + 1];
  for (int64_t i = 0; i < cols; ++i) cptr[i + 1] += cptr[i];
  std::vector<int64_t> trow(cptr[cols]), tpos(cptr[cols]);
  {
    std::vector<int64_t> fill(cptr.begin(), cptr.end() - 1);
    for (int64_t r = 0; r < rows.count; ++r) {
      for (int64_t e = rows.begin[r]; e < rows.end[r]; ++e) {
        const int64_t p = fill[rows.col[e]]++;
        trow[p] = r;
        tpos[p] = e;
      }
    }
  }

  // The estimated cost of each output row: its share of the scaling pass plus the multiply-adds
  // of its entries.
  std::vector<int64_t> cost(D);
  for (int64_t i = 0; i < D; ++i) {
    int64_t c = 1 + (scale_first ? (targets.start[block_of[i] + 1] - i) / 8 : 0);
    if (i < cols) {
      for (int64_t p = cptr[i]; p < cptr[i + 1]; ++p) {
        const int64_t r = trow[p];
        c += rows.sorted ? rows.end[r] - tpos[p] : rows.end[r] - rows.begin[r];
      }
    }
    cost[i] = c;
  }
  const std::vector<int64_t> bounds = balanced_ranges(cost, 4 * at::get_num_threads());

  const scalar_t a = static_cast<scalar_t>(decay);
  at::parallel_for(0, static_cast<int64_t>(bounds.size()) - 1, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t part = c0; part < c1; ++part) {
      for (int64_t i = bounds[part]; i < bounds[part + 1]; ++i) {
        const int64_t k = block_of[i];
        const int64_t s0 = targets.start[k];
        const int64_t s1 = targets.start[k + 1];
        const int64_t n = s1 - s0;
        // out[j − s0] is entry (i, j) of the factor, for j in this block.
        scalar_t* __restrict__ out = targets.data[k] + (i - s0) * n;
        if (scale_first) scale_row(out, i - s0, n, a);
        if (i >= cols) continue;
        const bool bias_here = targets.bias && s1 == D;
        for (int64_t p = cptr[i]; p < cptr[i + 1]; ++p) {
          const int64_t r = trow[p];
          const int64_t e = tpos[p];
          const scalar_t c = rows.weight[r] * rows.val[e];
          if (bias_here) out[D - 1 - s0] += c;
          if (rows.sorted) {
            add_sorted_tail(out, rows, r, e, s0, s1, c);
          } else {
            // Every pair of entries, so that repeated columns add up as in the dense sum.
            for (int64_t q = rows.begin[r]; q < rows.end[r]; ++q) {
              const int64_t j = rows.col[q];
              if (j >= i && j < s1) out[j - s0] += c * rows.val[q];
            }
          }
        }
      }
    }
  });
}

template <typename scalar_t>
void finish_blocks(const BlockTargets<scalar_t>& targets, double corner) {
  const int64_t K = static_cast<int64_t>(targets.data.size());
  for (int64_t k = 0; k < K; ++k) {
    const int64_t n = targets.start[k + 1] - targets.start[k];
    scalar_t* f = targets.data[k];
    if (n == 0) continue;
    if (targets.bias && targets.start[k + 1] == targets.start.back()) {
      f[n * n - 1] += static_cast<scalar_t>(corner);
    }
    // Mirrored tile by tile, so that the column writes of one tile share their cache lines.
    constexpr int64_t kTile = 64;
    const int64_t tiles = (n + kTile - 1) / kTile;
    std::vector<std::pair<int64_t, int64_t>> pairs;  // upper tiles (I, J), J ≥ I: equal work each
    for (int64_t ti = 0; ti < tiles; ++ti)
      for (int64_t tj = ti; tj < tiles; ++tj) pairs.emplace_back(ti, tj);
    at::parallel_for(0, static_cast<int64_t>(pairs.size()), 16, [&](int64_t p0, int64_t p1) {
      for (int64_t p = p0; p < p1; ++p) {
        const int64_t i0 = pairs[p].first * kTile, i1 = std::min(n, i0 + kTile);
        const int64_t j0 = pairs[p].second * kTile, j1 = std::min(n, j0 + kTile);
        for (int64_t i = i0; i < i1; ++i)
          for (int64_t j = std::max(j0, i + 1); j < j1; ++j) f[j * n + i] = f[i * n + j];
      }
    });
  }
}

#define NGCUDA_INSTANTIATE(S, I)                                                          \
  template void accumulate_sparse_upper<S, I>(const BlockTargets<S>&,                    \
                                              const SparseRows<S, I>&, bool, double);
NGCUDA_INSTANTIATE(float, int32_t)
NGCUDA_INSTANTIATE(float, int64_t)
NGCUDA_INSTANTIATE(double, int32_t)
NGCUDA_INSTANTIATE(double, int64_t)
#undef NGCUDA_INSTANTIATE
template void finish_blocks<float>(const BlockTargets<float>&, double);
template void finish_blocks<double>(const BlockTargets<double>&, double);

}  // namespace ngcuda::cpu
