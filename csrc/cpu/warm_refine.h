// Warm start of batched_eigh on the CPU: iterative refinement of the previous eigenvectors.
//
// K-FAC factors drift slowly, so the previous eigenvectors Q nearly diagonalise the new matrix A.
// One refinement step (Ogita & Aishima, "Iterative refinement for symmetric eigenvalue
// decomposition", Japan J. Indust. Appl. Math. 35, 2018) is a simultaneous Jacobi step over all
// pairs, built from matrix products:
//
//   S = QᵀAQ,   R = I − QᵀQ,   λ_i = S_ii / (1 − R_ii),
//   E_ij = (S_ij + λ_j R_ij) / (λ_j − λ_i)   (i ≠ j),   E_ii = R_ii / 2,   Q ← Q + QE.
//
// It corrects the eigenvectors and the orthonormality of Q to first order, so the error is roughly
// squared by each step as long as every pair is well separated relative to its coupling.
//
// Pairs that are not (close or equal eigenvalues: the first-order angle S_ij/(λ_j − λ_i) would be
// large) are why plain refinement stalls on K-FAC factors, whose small eigenvalues crowd together.
// They are gathered into clusters (connected components of such pairs); each cluster's block of S
// is diagonalised exactly (Jacobi, or LAPACK for large blocks), S, R and Q are rotated by the block
// rotations, and the step then treats pairs inside a cluster as solved (E_ij = R_ij / 2, which
// only restores orthonormality).
//
// The first steps use float32 products (twice as fast, and their result only needs to be good to
// float32 noise); the last ones float64, where the stop test is evaluated:
//   ‖offdiag(QᵀAQ)‖_F ≤ tol·‖A‖_F   and   ‖QᵀQ − I‖_F ≤ orth_tol.
// A float32 result under a tol well above float32's own rounding of these measures (n·ε32, the
// CPU default 1e-5 up to n = 80) is instead finished in float32, where both measures plus their
// rounding pass half of their bounds: no float64 product at all. Near the end that test runs on
// the residual ‖AQ − QΛ‖_F (equal to the first measure for an orthonormal Q) before S is formed,
// so the step that passes it costs two products, QᵀQ and AQ.
// A matrix that does not get there (iteration limit, no progress, a cluster too large to pay off)
// is handed back to the caller, which solves it cold.
#pragma once

#include <cstdint>
#include <memory>
#include <utility>
#include <vector>

namespace ngcuda::cpu::refine {

struct Options {
  double tol;            // relative off-diagonal Frobenius norm at which a matrix is done
  int64_t max_steps;     // refinement steps (updates of Q) allowed per matrix
  double max_start_off;  // a start with ‖offdiag(QᵀAQ)‖_F above this·‖A‖_F is handed back
};

enum class Outcome {
  kConverged,        // values and vectors written
  kGaveUp,           // outputs untouched: solve this matrix cold
  kNotOrthonormal,   // prev is far from orthonormal (a caller error); outputs untouched
};

struct Result {
  Outcome outcome;
  double prev_orth_error;  // ‖QᵀQ − I‖_F of the warm start as given (float32 estimate)
  int64_t low_steps;       // float32 steps taken
  int64_t high_steps;      // float64 steps taken
};

// A warm start further than this from orthonormal (‖QᵀQ − I‖_F) is a caller error.
constexpr double kMaxPrevOrthError = 0.1;

template <typename T>
struct Mats {
  T *a, *q, *qt, *w, *s, *r, *e;  // seven [ld, ld] row-major buffers
};

// Buffers of one thread for matrices up to a size; reused across matrices and calls.
class Workspace {
 public:
  explicit Workspace(int64_t nmax);
  // Grows the buffers to hold matrices of size nmax.
  void reserve(int64_t nmax);
  // This thread's workspace, grown to nmax. It lives as long as the thread: fresh buffers on
  // every call would cost a page fault per 4 KiB, about as much as the refinement at n = 256.
  static Workspace& local(int64_t nmax);

  Mats<float> f32;
  Mats<double> f64;
  std::vector<double> lam, lam_t, num, den, ww, rows;
  std::vector<int32_t> cluster, parent, members, start;
  std::vector<std::pair<int32_t, int32_t>> hard;
  std::vector<double> block, vt, vecs;
  std::vector<float> vecs32;
  std::vector<int64_t> order;

 private:
  int64_t ld_ = 0;
  std::unique_ptr<float[]> f32_;
  std::unique_ptr<double[]> f64_;
};

// Eigendecomposition of the symmetric matrix `a` (row-major [n, n], lower triangle read) from the
// warm start `prev` ([n, n], columns = previous eigenvectors). On kConverged, `values` [n] holds the
// eigenvalues ascending and `vectors` [n, n] the eigenvectors as columns.
template <typename T>
Result solve(const T* a, const T* prev, int64_t n, T* values, T* vectors, const Options& options,
             Workspace& ws);

}  // namespace ngcuda::cpu::refine
