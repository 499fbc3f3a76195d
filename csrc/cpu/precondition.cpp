// Q_G [(Q_Gᵀ g Q_A) / (λ_G λ_Aᵀ + damping)] Q_Aᵀ for every layer, on the CPU.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "../checks.h"
#include "../precondition_checks.h"
#include "panel_gemm.h"

namespace ngcuda::cpu {
namespace {

template <typename scalar_t>
void scale_in_eigenbasis(scalar_t* t, const scalar_t* lam_row, const scalar_t* lam_col, int64_t rows,
                         int64_t cols, scalar_t damping) {
  at::parallel_for(0, rows, 64, [&](int64_t r0, int64_t r1) {
    for (int64_t i = r0; i < r1; ++i) {
      for (int64_t j = 0; j < cols; ++j) t[i * cols + j] /= lam_row[i] * lam_col[j] + damping;
    }
  });
}

// A wide layer (few outputs, D ≥ kWideMinD inputs: a GNN's first layer) is preconditioned in
// column blocks of Q_A: each block is read from memory once and used for both products while it
// is in cache, Vᵀ_b = Q_A[:, b]ᵀ·(Q_Gᵀg)ᵀ and then Zᵀ += Q_A[:, b]·(Vᵀ_b ⊘ scale). The plain order
// streams the D×D Q_A twice, and in a training step Q_A is cold (the activations evict it). The
// products run in panel_gemm's register-blocked kernels on the [D, d_out] panels (MKL packs Q_A
// for every call, which at d_out = 16 costs as much as the arithmetic).
constexpr int64_t kWideMinD = 512;
constexpr int64_t kWideMaxOut = 64;
constexpr int64_t kBlock = 128;
constexpr int64_t kRows = 64;

template <typename T>
at::Tensor precondition_wide(const at::Tensor& g, const at::Tensor& qa_in, const at::Tensor& la_in,
                             const at::Tensor& qg, const at::Tensor& lg_in, double damping) {
  const int64_t dout = g.size(0), d = g.size(1), w = gemm::padded(dout);
  // torch.linalg.eigh returns column-major eigenvectors: their storage is a row-major Q_Aᵀ, read
  // in place with the two product forms swapped.
  const bool stored_t = !qa_in.is_contiguous() && qa_in.t().is_contiguous();
  const at::Tensor qs = stored_t ? qa_in.t() : qa_in.contiguous();
  const at::Tensor la = la_in.contiguous(), lg = lg_in.contiguous();
  // The panel Hᵀ = (Q_Gᵀg)ᵀ [D, w], zero beyond d_out so the padded columns stay zero.
  at::Tensor ht = at::zeros({d, w}, g.options());
  ht.narrow(1, 0, dout).copy_(at::mm(qg.t(), g).t());
  const T* q = qs.data_ptr<T>();
  const T* h = ht.data_ptr<T>();
  const T* lam_a = la.data_ptr<T>();
  const T* lam_g = lg.data_ptr<T>();
  const T damp = static_cast<T>(damping);
  const int64_t nblocks = (d + kBlock - 1) / kBlock;
  std::vector<at::Tensor> partial(at::get_num_threads());
  at::parallel_for(0, nblocks, 1, [&](int64_t b0, int64_t b1) {
    at::Tensor& acc = partial[at::get_thread_num()];
    if (!acc.defined()) acc = at::zeros({d, w}, g.options());
    std::vector<T> vt(kBlock * w);
    T* zt = acc.data_ptr<T>();
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t k = b * kBlock, bw = std::min(kBlock, d - k);
      if (stored_t) {
        panel::nn(q + k * d, d, h, w, vt.data(), w, bw, w, d, false);
      } else {
        // Q_A[:, b] in chunks of kRows rows: each chunk comes from memory as whole row segments
        // and serves every row block of the strip from L1 (a strip read down its column blocks
        // would fetch one line per row at a time, at memory latency).
        for (int64_t s0 = 0; s0 < d; s0 += kRows) {
          const int64_t rows = std::min(kRows, d - s0);
          panel::tn(q + s0 * d + k, d, h + s0 * w, w, vt.data(), w, bw, w, rows, s0 > 0);
        }
      }
      for (int64_t s = 0; s < bw; ++s) {
        for (int64_t i = 0; i < dout; ++i) vt[s * w + i] /= lam_g[i] * lam_a[k + s] + damp;
      }
      if (stored_t) {
        panel::tn(q + k * d, d, vt.data(), w, zt, w, d, w, bw, true);
      } else {
        panel::nn(q + k, d, vt.data(), w, zt, w, d, w, bw, true);
      }
    }
  });
  at::Tensor zt;
  for (auto& p : partial) {
    if (!p.defined()) continue;
    if (zt.defined()) zt.add_(p); else zt = p;
  }
  return at::mm(qg, zt.narrow(1, 0, dout).t());
}

std::vector<at::Tensor> precondition_cpu(at::TensorList grads, at::TensorList QA,
                                         at::TensorList lamA, at::TensorList QG,
                                         at::TensorList lamG, double damping) {
  check_precondition_args(grads, QA, lamA, QG, lamG, damping);
  std::vector<at::Tensor> out;
  out.reserve(grads.size());
  for (size_t l = 0; l < grads.size(); ++l) {
    const at::Tensor lg = lamG[l].contiguous();
    const at::Tensor la = lamA[l].contiguous();
    if (grads[l].size(0) * 8 <= grads[l].size(1) && grads[l].size(1) >= kWideMinD &&
        grads[l].size(0) <= kWideMaxOut) {
      AT_DISPATCH_FLOATING_TYPES(grads[l].scalar_type(), "ngcuda_precondition_wide", [&] {
        out.push_back(precondition_wide<scalar_t>(grads[l].contiguous(), QA[l], la, QG[l], lg,
                                                  damping));
      });
      continue;
    }
    // A skinny gradient (few outputs, wide input: a GNN's first layer) runs 20-25% faster in
    // MKL as Q_A·[d_in, d_out] than as [d_out, d_in]·Q_A (measured on 2 cores at 16x1434), so
    // such layers work on the transposed middle term.
    const bool transposed = grads[l].size(0) * 8 <= grads[l].size(1);
    at::Tensor t = transposed ? at::mm(QA[l].t(), at::mm(grads[l].t(), QG[l])).contiguous()
                              : at::mm(at::mm(QG[l].t(), grads[l]), QA[l]).contiguous();
    AT_DISPATCH_FLOATING_TYPES(t.scalar_type(), "ngcuda_precondition", [&] {
      scale_in_eigenbasis<scalar_t>(t.data_ptr<scalar_t>(),
                                    (transposed ? la : lg).data_ptr<scalar_t>(),
                                    (transposed ? lg : la).data_ptr<scalar_t>(), t.size(0),
                                    t.size(1), static_cast<scalar_t>(damping));
    });
    out.push_back(transposed ? at::mm(QG[l], at::mm(QA[l], t).t())
                             : at::mm(at::mm(QG[l], t), QA[l].t()));
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(ngcuda, CPU, m) { m.impl("precondition", &precondition_cpu); }

}  // namespace ngcuda::cpu
