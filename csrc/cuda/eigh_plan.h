// Host-side planning of the CUDA batched_eigh, and the Jacobi kernel's shared-memory layout and
// pair schedule. No CUDA includes: the same functions run in the kernel (through NGCUDA_HD), in
// the host launcher, and in the CPU-callable test ops of batched_eigh.cpp, so the numbers the
// tests check are the numbers the kernel uses.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define NGCUDA_HD __host__ __device__
#else
#define NGCUDA_HD
#endif

namespace ngcuda::plan {

// Which solver a matrix of size n goes to.
enum EighPath : int64_t {
  kEmpty = 0,    // n = 0: nothing to compute
  kJacobi = 1,   // one CTA per matrix, two-sided Jacobi with A and V in shared memory
  kBatched = 2,  // cusolverDnXsyevBatched over all matrices of the same n
  kSyevd = 3,    // cusolverDnXsyevd, one matrix at a time
};

// XsyevBatched is for medium sizes with company; above this, or alone, a matrix goes to Xsyevd.
constexpr int64_t kBatchedMaxN = 1024;
// XsyevBatched is documented for n·lda·batch ≤ INT32_MAX; a grid of 65535 is its reported limit.
constexpr int64_t kSolverMaxBatchElems = 2147483647LL;
constexpr int64_t kSolverMaxBatch = 65535;

NGCUDA_HD inline int64_t align_up(int64_t x, int64_t a) { return (x + a - 1) / a * a; }

// The Jacobi kernel computes in float64 for float32 inputs too: a float32 V accumulates one
// rounding per rotation, and its ‖VᵀV − I‖_F reaches ~3e-4 at n = 150 (NumPy emulation of this
// kernel), 30× LAPACK's float32 eigh. In float64 the returned float32 vectors are orthonormal to
// float32 rounding. The price is 8 bytes per element: n ≤ 119 on H100 (227 KB), ≤ 101 on A100.
constexpr int64_t kJacobiElemSize = 8;

// Shared-memory layout of the Jacobi kernel for one n×n matrix, byte offsets from the base.
struct JacobiLayout {
  int64_t n;       // matrix size
  int64_t m;       // players of the round-robin: n rounded up to even (index ≥ n is a bye)
  int64_t lda;     // row stride of A and V in elements: odd, so column walks hit distinct banks
  int64_t a_off;   // A: n × lda elements
  int64_t v_off;   // V: n × lda elements
  int64_t rot_off; // c, s, new a_pp, new a_qq: 4 × m/2 elements
  int64_t red_off; // block reduction scratch: kRedSlots doubles
  int64_t pq_off;  // p and q of each pair of the round: 2 × m/2 int32
  int64_t rank_off;  // rank of each eigenvalue: n int32
  int64_t bytes;   // total dynamic shared memory
};

constexpr int64_t kRedSlots = 34;  // 32 warp partials, the result, one spare

NGCUDA_HD inline JacobiLayout jacobi_layout(int64_t n) {
  const int64_t elem_size = kJacobiElemSize;
  JacobiLayout L{};
  L.n = n;
  L.m = n + (n & 1);
  if (L.m < 2) L.m = 2;
  L.lda = n | 1;
  L.a_off = 0;
  L.v_off = align_up(L.a_off + n * L.lda * elem_size, 16);
  L.rot_off = align_up(L.v_off + n * L.lda * elem_size, 16);
  L.red_off = align_up(L.rot_off + 4 * (L.m / 2) * elem_size, 16);
  L.pq_off = align_up(L.red_off + kRedSlots * 8, 16);
  L.rank_off = align_up(L.pq_off + 2 * (L.m / 2) * 4, 16);
  L.bytes = align_up(L.rank_off + n * 4, 16);
  return L;
}

// Pairs the Jacobi kernel leaves alone in a sweep: |a_pq| < kSkipRms·rms(off-diagonal) at the
// sweep's start and |θ| = |a_qq − a_pp|/(2|a_pq|) < kSkipTheta. Inside a cluster of (nearly)
// equal eigenvalues such a tiny a_pq asks for a large rotation that only reshuffles the cluster's
// coupling to the rest, and with the round-robin order that halves the off-diagonal norm per
// sweep instead of squaring it (NumPy replay: 3 clusters at n = 118 need > 15 sweeps to 1e-14
// without the rule, 9 with it; unclustered spectra are unchanged). The largest entry is always
// above the threshold, so every sweep still makes progress.
constexpr double kSkipRms = 0.1;
constexpr double kSkipTheta = 100.0;

// Threads of the Jacobi CTA: enough to keep a round's (m/2)·n element updates busy, at most 512.
NGCUDA_HD inline int64_t jacobi_threads(int64_t n) {
  if (n <= 16) return 64;
  if (n <= 48) return 128;
  if (n <= 96) return 256;
  return 512;
}

// Circle-method round-robin: over rounds 0..m-2 every pair of 0..m-1 meets exactly once, and the
// m/2 pairs of one round are disjoint, so their rotations commute and run in parallel.
NGCUDA_HD inline int64_t round_robin_player(int64_t m, int64_t round, int64_t pos) {
  return pos == 0 ? 0 : (pos - 1 + round) % (m - 1) + 1;
}

NGCUDA_HD inline void round_robin_pair(int64_t m, int64_t round, int64_t i, int64_t* p,
                                       int64_t* q) {
  const int64_t a = round_robin_player(m, round, i);
  const int64_t b = round_robin_player(m, round, m - 1 - i);
  *p = a < b ? a : b;
  *q = a < b ? b : a;
}

// Largest n whose Jacobi layout fits in smem_limit bytes (0 when none does).
inline int64_t jacobi_max_n(int64_t smem_limit) {
  int64_t best = 0;
  for (int64_t n = 1; n <= 1024; ++n) {
    if (jacobi_layout(n).bytes <= smem_limit) best = n;
  }
  return best;
}

// The solver of one matrix of size n, given how many matrices of the same n and dtype the call
// holds and the device's opt-in shared memory per block.
inline EighPath eigh_path(int64_t n, int64_t same_n_count, int64_t smem_limit) {
  if (n == 0) return kEmpty;
  if (jacobi_layout(n).bytes <= smem_limit) return kJacobi;
  if (n <= kBatchedMaxN && same_n_count >= 2) return kBatched;
  return kSyevd;
}

// Matrices per XsyevBatched call for size n (its n·n·batch and grid limits).
inline int64_t solver_batch_limit(int64_t n) {
  const int64_t by_elems = kSolverMaxBatchElems / (n * n > 0 ? n * n : 1);
  const int64_t lim = by_elems < kSolverMaxBatch ? by_elems : kSolverMaxBatch;
  return lim > 0 ? lim : 1;
}

// Split-K of the factor SYRK: enough CTAs to fill the device twice, each with at least
// kMinRowsPerSplit rows, at most kMaxSplit partial tiles per output tile.
constexpr int64_t kSyrkTile = 64;
constexpr int64_t kSyrkRowsPerStep = 16;
constexpr int64_t kMinRowsPerSplit = 512;
constexpr int64_t kMaxSplit = 64;

inline int64_t syrk_split(int64_t rows, int64_t num_tiles, int64_t sms) {
  const int64_t want = (2 * sms + num_tiles - 1) / (num_tiles > 0 ? num_tiles : 1);
  const int64_t by_rows = (rows + kMinRowsPerSplit - 1) / kMinRowsPerSplit;
  int64_t k = want < by_rows ? want : by_rows;
  if (k > kMaxSplit) k = kMaxSplit;
  return k < 1 ? 1 : k;
}

}  // namespace ngcuda::plan
