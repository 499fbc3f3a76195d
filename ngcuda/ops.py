"""Python front of ``torch.ops.ngcuda``: the ops, with their shapes documented.

Each call dispatches to the CPU or CUDA kernel by the tensors' device. On a device that has no
compiled kernel (CUDA tensors with a CPU-only build) the plain-torch path of
:mod:`ngcuda.reference` runs instead, after a one-time warning.
"""
from __future__ import annotations

import warnings
from typing import Optional, Sequence

import torch
from torch import Tensor

from . import reference
from ._extension import has_kernel

__all__ = [
    "factor_update_",
    "sparse_factor_update_",
    "block_factor_update_",
    "sparse_block_factor_update_",
    "batched_eigh",
    "batched_eigh_with_status",
    "check_eigh_status",
    "precondition",
    "EighStatus",
]


class EighStatus:
    """Per-matrix codes of the ``status`` tensor that ``batched_eigh`` returns.

    ``OK`` and ``WARM_FALLBACK`` are successes: with ``WARM_FALLBACK`` (CPU only) the warm start
    was not finished within ``max_sweeps`` refinement steps, or was too far off to pay, and the
    matrix was solved cold instead, so its result is as good as a cold one.
    """

    OK = 0
    NON_FINITE = 1
    NOT_CONVERGED = 2
    SOLVER_FAILED = 3
    WARM_FALLBACK = 4

    @staticmethod
    def succeeded(status: Tensor) -> Tensor:
        """Bool tensor: which matrices have a valid eigendecomposition."""
        return (status == EighStatus.OK) | (status == EighStatus.WARM_FALLBACK)


_warned: set[str] = set()


def _use_kernel(op: str, device: torch.device, sparse_csr: bool = False) -> bool:
    if has_kernel(op, device, sparse_csr):
        return True
    key = f"{op}:{device.type}:{'csr' if sparse_csr else 'dense'}"
    if key not in _warned:
        _warned.add(key)
        warnings.warn(
            f"ngcuda: no compiled {device.type} kernel for {op}; using the plain-PyTorch path. "
            "Rebuild with the CUDA toolkit (NGCUDA_CUDA=1) for the fast kernels.",
            RuntimeWarning,
            stacklevel=3,
        )
    return False


def _is_csr(x: Tensor) -> bool:
    """Whether x is sparse CSR; raises for layouts the factor ops do not take."""
    if x.layout == torch.strided:
        return False
    if x.layout == torch.sparse_csr:
        return True
    raise ValueError(f"ngcuda: x must be a dense (strided) or sparse CSR tensor, got {x.layout}; "
                     "convert it with x.to_sparse_csr()")


def factor_update_(
    factor: Tensor,
    x: Tensor,
    decay: float,
    append_bias: bool = True,
    row_weight: Optional[Tensor] = None,
) -> Tensor:
    """In-place moving average of a Kronecker factor; returns ``factor``.

    ``factor ← decay·factor + (1−decay)·x̄ᵀ diag(w) x̄ / Σw`` with ``x̄ = [x, 1]`` when
    ``append_bias``.

    Args:
        factor: [D, D], float32 or float64, contiguous; D = d + 1 with ``append_bias``, else d.
            Symmetric: only its upper triangle is read, and the result is written exactly
            symmetric (a non-symmetric factor comes back symmetrised from its upper triangle).
        x: [N, d], float32 or float64 (cast to the factor's): dense, or a sparse CSR tensor
            (``torch.sparse_csr_tensor``, int32 or int64 indices), which is never densified:
            the CPU works on its pattern (Σ_rows nnz_row² / 2 multiply-adds), CUDA densifies
            bounded blocks of rows. Repeated column indices within a row add up.
        decay: in [0, 1]; 0 replaces the factor, 1 leaves it unchanged.
        row_weight: [N] non-negative weights, or None for ones. Weight 0 excludes a row; when
            every weight is 0 (or N = 0) the factor is left unchanged.

    On CUDA the call never synchronises with the host, so invalid row weights (or, for a sparse
    x, invalid CSR indices) cannot raise there: they fill the factor with NaN, which the next
    ``batched_eigh`` reports.
    """
    if _use_kernel("factor_update_", factor.device, _is_csr(x)):
        torch.ops.ngcuda.factor_update_(factor, x, float(decay), bool(append_bias), row_weight)
        return factor
    return reference.factor_update_(factor, x, decay, append_bias, row_weight, compute_dtype=None)


def sparse_factor_update_(
    factor: Tensor,
    rowptr: Tensor,
    col: Tensor,
    value: Optional[Tensor],
    x: Tensor,
    decay: float,
    append_bias: bool = True,
    row_weight: Optional[Tensor] = None,
) -> Tensor:
    """:func:`factor_update_` with ``x`` replaced by ``ÂX``, never materialising ``ÂX``.

    Args:
        factor: [D, D] as in :func:`factor_update_`.
        rowptr: [M+1] int64 CSR row pointers of Â (M rows).
        col: [nnz] int64 column indices, each in [0, N).
        value: [nnz] edge values, or None for ones.
        x: [N, d] node features, dense or sparse CSR (as in :func:`factor_update_`). For a
            sparse x the CPU gathers each row of ÂX as a sparse row and adds its outer product
            (Σ_rows nnz(ÂX row)² / 2 multiply-adds), a bounded block of rows at a time.
        row_weight: [M] or None; rows of weight 0 cost nothing.

    On the CPU a malformed CSR (rowptr not starting at 0, decreasing, or not ending at nnz;
    columns out of range) raises before anything is written. On CUDA, where checking would
    synchronise, it fills the factor with NaN instead, as do invalid row weights.
    """
    if _use_kernel("sparse_factor_update_", factor.device, _is_csr(x)):
        torch.ops.ngcuda.sparse_factor_update_(
            factor, rowptr, col, value, x, float(decay), bool(append_bias), row_weight
        )
        return factor
    return reference.sparse_factor_update_(
        factor, rowptr, col, value, x, decay, append_bias, row_weight, compute_dtype=None
    )


def block_factor_update_(
    blocks: Sequence[Tensor],
    x: Tensor,
    decay: float,
    append_bias: bool = True,
    row_weight: Optional[Tensor] = None,
) -> list[Tensor]:
    """:func:`factor_update_` of the diagonal blocks only, in place; returns ``blocks``.

    The D = d (+1) columns of ``x̄ = [x, 1]`` are split into contiguous blocks, in order, and
    block k is updated with the Gram matrix of its own columns: the D×D factor is never formed,
    and the cost is N·Σ n_k² / 2 (dense x) or Σ_rows of the pairs within each block (sparse x).

    Args:
        blocks: K tensors [n_k, n_k] with Σ n_k = D, one float dtype, one device, contiguous.
            With ``append_bias`` the bias column is column D − 1, so it lies in the last
            non-empty block. Block sizes are free: 1, larger than d, a short last block.
        x: [N, d], dense or sparse CSR, as in :func:`factor_update_`.
        decay, row_weight: as in :func:`factor_update_`.
    """
    blocks = list(blocks)
    if _use_kernel("block_factor_update_", x.device, _is_csr(x)):
        torch.ops.ngcuda.block_factor_update_(blocks, x, float(decay), bool(append_bias), row_weight)
        return blocks
    return reference.block_factor_update_(blocks, x, decay, append_bias, row_weight,
                                          compute_dtype=None)


def sparse_block_factor_update_(
    blocks: Sequence[Tensor],
    rowptr: Tensor,
    col: Tensor,
    value: Optional[Tensor],
    x: Tensor,
    decay: float,
    append_bias: bool = True,
    row_weight: Optional[Tensor] = None,
) -> list[Tensor]:
    """:func:`block_factor_update_` with ``x`` replaced by ``ÂX``, never materialising ``ÂX``.

    Args:
        blocks: K tensors [n_k, n_k] with Σ n_k = D, as in :func:`block_factor_update_`.
        rowptr, col, value: the CSR adjacency Â [M, N], as in :func:`sparse_factor_update_`.
        x: [N, d] node features, dense or sparse CSR.
        decay, append_bias, row_weight: as in :func:`sparse_factor_update_` (row_weight [M]).
    """
    blocks = list(blocks)
    if _use_kernel("sparse_block_factor_update_", x.device, _is_csr(x)):
        torch.ops.ngcuda.sparse_block_factor_update_(
            blocks, rowptr, col, value, x, float(decay), bool(append_bias), row_weight
        )
        return blocks
    return reference.sparse_block_factor_update_(
        blocks, rowptr, col, value, x, decay, append_bias, row_weight, compute_dtype=None
    )


def batched_eigh_with_status(
    matrices: Sequence[Tensor],
    prev_eigenvectors: Optional[Sequence[Tensor]] = None,
    tol: Optional[float] = None,
    max_sweeps: int = 15,
) -> tuple[list[Tensor], list[Tensor], Tensor]:
    """:func:`batched_eigh` without the status check: returns ``(values, vectors, status)``.

    ``status`` is an int32 [B] tensor on the matrices' device (see :class:`EighStatus`). Reading
    it synchronises a CUDA device, so callers may check it later with :func:`check_eigh_status`.
    On CUDA a matrix with status ``NON_FINITE`` or ``SOLVER_FAILED`` gets NaN values and vectors,
    and one with ``NOT_CONVERGED`` the last Jacobi iterate; the CPU kernel raises for a non-finite
    input instead.
    """
    matrices = list(matrices)
    prev = None if prev_eigenvectors is None else list(prev_eigenvectors)
    if not matrices:
        return [], [], torch.zeros(0, dtype=torch.int32)
    device = matrices[0].device
    if _use_kernel("batched_eigh", device):
        values, vectors, status = torch.ops.ngcuda.batched_eigh(matrices, prev, tol, int(max_sweeps))
        return list(values), list(vectors), status
    for i, a in enumerate(matrices):
        if not bool(torch.isfinite(a).all()):
            raise ValueError(f"ngcuda: batched_eigh: matrices[{i}] holds NaN or Inf")
    values, vectors = reference.batched_eigh(matrices, compute_dtype=None)
    return values, vectors, torch.zeros(len(matrices), dtype=torch.int32, device=device)


def check_eigh_status(status: Tensor) -> None:
    """Raises naming the first matrix whose eigendecomposition failed (``OK`` and
    ``WARM_FALLBACK`` are successes)."""
    bad = torch.nonzero(~EighStatus.succeeded(status)).flatten().tolist()
    if not bad:
        return
    codes = status.tolist()
    i = bad[0]
    reason = {
        EighStatus.NON_FINITE: "holds NaN or Inf",
        EighStatus.NOT_CONVERGED: "did not converge",
        EighStatus.SOLVER_FAILED: "made the solver fail",
    }.get(codes[i], f"returned status {codes[i]}")
    raise ValueError(f"ngcuda: batched_eigh: matrices[{i}] {reason} ({len(bad)} matrices failed)")


def batched_eigh(
    matrices: Sequence[Tensor],
    prev_eigenvectors: Optional[Sequence[Tensor]] = None,
    tol: Optional[float] = None,
    max_sweeps: int = 15,
) -> tuple[list[Tensor], list[Tensor]]:
    """Eigendecomposes a list of symmetric matrices of any mix of sizes in one call.

    Args:
        matrices: B tensors [n_i, n_i], float32 or float64, all on one device. The solvers
            read only the lower triangle, but the whole matrix must be finite: NaN or Inf
            anywhere in it is an error (CPU) or a NON_FINITE status (CUDA's screen).
        prev_eigenvectors: None, or B tensors [n_i, n_i]: a warm start, the eigenvectors (as
            columns) of a nearby matrix such as the previous value of a slowly drifting K-FAC
            factor. Where it is used it must be orthonormal to within 0.1 (‖QᵀQ − I‖_F).
        tol: stop when the off-diagonal Frobenius norm of QᵀAQ is at most ``tol·‖A‖_F`` (the CPU
            refinement tests ‖AQ − QΛ‖_F ≤ tol·‖A‖_F, the same quantity for an orthonormal Q,
            with tol raised to 4·n·ε64 where that is larger: below it the float64 residual is
            rounding); None picks 1e-14 for float64, and for float32 1e-5 on the CPU (the
            accuracy float32 results promise, which the refinement checks on float32 products)
            and 1e-7 on CUDA.
        max_sweeps: on CUDA, most Jacobi sweeps per matrix; on the CPU, most refinement steps per
            warm-started matrix (each is a simultaneous Jacobi step over all pairs, made of
            matrix products). 0 accepts a warm start only if it already passes the stop test.

    Cold on the CPU: float32 n ≤ 96 and float64 n ≤ 256 by our own Householder
    tridiagonalisation and implicit QL in float64, a few matrices interleaved per thread (faster
    than LAPACK at these sizes, measured); larger ones by LAPACK (?syevd), in
    parallel over the matrices, and n ≥ 768 with LAPACK's own threads. ``tol`` and
    ``max_sweeps`` do not affect cold solves.

    Warm starts on the CPU, with AVX-512 kernels only (``build_info()["eigh_warm_n"]``; without
    AVX-512 the cold path measured as fast or faster at every size, and warm starts go unused):
    float32 28 ≤ n ≤ 192, where they beat the cold path, 1.5× at n = 64 after a 1e-3 drift;
    float64 28 ≤ n ≤ 96, where the cold path is as fast or faster unless the start is nearly
    exact. There the previous eigenvectors are refined by iterative
    refinement (Ogita & Aishima 2018: S = QᵀAQ, R = I − QᵀQ, a first-order correction of every
    pair at once, Q ← Q + QE), with exact Jacobi rotations for pairs of
    clustered eigenvalues, first in float32 and then in float64 for the stop test, which also
    requires ‖QᵀQ − I‖_F ≤ tol/2 within [1e-6, 5e-6] (float32) or about 1e2·n·ε (float64). A
    float32 matrix with n·ε32 + 2√n·ε32 ≤ tol/2 (n ≤ 80 at the default 1e-5) may finish from its
    float32 products, when the residual and ‖QᵀQ − I‖_F measured there, plus their own rounding
    (2√n·ε32), are within half of tol and of 1e-5. A matrix whose start is off by more than
    3e-3·‖A‖_F (‖offdiag(QᵀAQ)‖_F; about a 4e-3 relative change of a K-FAC factor, where the cold
    path becomes the faster one; ``NGCUDA_EIGH_WARM_MAX_START_OFF`` moves it), that does not pass
    the stop test within ``max_sweeps`` steps, stops improving, or has a quarter of its pairs
    badly coupled is solved cold and reported as ``EighStatus.WARM_FALLBACK``. Other
    sizes are solved cold, their warm start unused. On CUDA, the shared-memory Jacobi finishes
    warm starts for n ≤ 119 (H100; 101 on A100) after rotating into QᵀAQ, larger ones go to
    cuSOLVER; ``prev_eigenvectors``, ``tol`` and ``max_sweeps`` only affect the Jacobi sizes.

    Returns:
        ``(values, vectors)``: B tensors [n_i] ascending, and B tensors [n_i, n_i] whose
        columns are orthonormal eigenvectors.

    Raises:
        ValueError: naming the index of a matrix with NaN/Inf, or of one that failed.
    """
    values, vectors, status = batched_eigh_with_status(matrices, prev_eigenvectors, tol, max_sweeps)
    check_eigh_status(status)
    return values, vectors


def precondition(
    grads: Sequence[Tensor],
    QA: Sequence[Tensor],
    lamA: Sequence[Tensor],
    QG: Sequence[Tensor],
    lamG: Sequence[Tensor],
    damping: float,
) -> list[Tensor]:
    """``Q_G[(Q_Gᵀ g Q_A) / (λ_G λ_Aᵀ + damping)]Q_Aᵀ`` for every layer in one call.

    Args:
        grads: L tensors [d_out, d_in(+1)]; the last column is the bias when the layer has one.
        QA, lamA: L tensors [d_in(+1), d_in(+1)] and [d_in(+1)]: eigenpairs of A.
        QG, lamG: L tensors [d_out, d_out] and [d_out]: eigenpairs of G.
        damping: Tikhonov damping γ ≥ 0, exact in the eigenbasis.

    Returns:
        L tensors shaped like ``grads``: ``(A⊗G + γI)⁻¹ vec(g)`` per layer.
    """
    grads = list(grads)
    if not grads:
        return []
    if _use_kernel("precondition", grads[0].device):
        return list(torch.ops.ngcuda.precondition(grads, list(QA), list(lamA), list(QG), list(lamG),
                                                  float(damping)))
    return reference.precondition(grads, QA, lamA, QG, lamG, damping, compute_dtype=None)
