"""Plain-PyTorch versions of ngcuda's ops: the float64 oracle of the tests.

These are not the user's path. With ``compute_dtype=None`` they compute in the inputs' own dtype,
which :mod:`ngcuda.ops` uses as the fallback when a device has no compiled kernel.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

__all__ = [
    "csr_to_dense",
    "with_bias_column",
    "weighted_gram",
    "factor_update",
    "factor_update_",
    "sparse_aggregate",
    "sparse_factor_update",
    "sparse_factor_update_",
    "block_factor_update",
    "block_factor_update_",
    "sparse_block_factor_update",
    "sparse_block_factor_update_",
    "batched_eigh",
    "precondition",
]


def _as(t: Tensor, dtype: Optional[torch.dtype]) -> Tensor:
    return t if dtype is None else t.to(dtype)


def csr_to_dense(x: Tensor) -> Tensor:
    """[N, d] dense form of x; a sparse CSR x is summed entry by entry, so repeated column
    indices within a row add up (the meaning the ops give them). Dense x is returned as is.

    The oracle densifies: it is meant for test sizes, not for wide real features.
    """
    if x.layout == torch.strided:
        return x
    if x.layout != torch.sparse_csr:
        raise ValueError(f"x must be strided or sparse CSR, got {x.layout}")
    crow, col, val = x.crow_indices(), x.col_indices(), x.values()
    counts = (crow[1:] - crow[:-1]).long()
    row = torch.repeat_interleave(torch.arange(x.shape[0], device=x.device), counts)
    out = torch.zeros(x.shape, dtype=val.dtype, device=x.device)
    return out.index_put_((row, col.long()), val, accumulate=True)


def with_bias_column(x: Tensor) -> Tensor:
    """[N, d] -> [N, d+1], the input with a ones column appended."""
    return torch.cat([x, torch.ones(x.shape[0], 1, dtype=x.dtype, device=x.device)], dim=1)


def weighted_gram(x: Tensor, row_weight: Optional[Tensor]) -> tuple[Tensor, float]:
    """x̄ᵀ diag(w) x̄ and Σw for x [N, D] and w [N] (ones when None)."""
    if row_weight is None:
        return x.T @ x, float(x.shape[0])
    w = row_weight.to(x.dtype)
    return x.T @ (x * w[:, None]), float(w.sum())


def factor_update(
    factor: Tensor,
    x: Tensor,
    decay: float,
    append_bias: bool,
    row_weight: Optional[Tensor] = None,
    compute_dtype: Optional[torch.dtype] = torch.float64,
) -> Tensor:
    """decay·factor + (1−decay)·x̄ᵀ diag(w) x̄ / Σw, returned as a new tensor in factor's dtype.

    factor [D, D] with D = d (+1 with append_bias); x [N, d]; row_weight [N] or None.
    With Σw = 0 the factor is returned unchanged.
    """
    xs = _as(csr_to_dense(x), compute_dtype)
    if append_bias:
        xs = with_bias_column(xs)
    gram, total = weighted_gram(xs, None if row_weight is None else _as(row_weight, xs.dtype))
    f = _as(factor, compute_dtype)
    if total == 0.0:
        return factor.clone()
    old = f * decay if decay != 0.0 else torch.zeros_like(f)
    return (old + (1.0 - decay) * gram / total).to(factor.dtype)


def factor_update_(factor: Tensor, x: Tensor, decay: float, append_bias: bool,
                   row_weight: Optional[Tensor] = None,
                   compute_dtype: Optional[torch.dtype] = torch.float64) -> Tensor:
    """In-place :func:`factor_update`."""
    return factor.copy_(factor_update(factor, x, decay, append_bias, row_weight, compute_dtype))


def sparse_aggregate(rowptr: Tensor, col: Tensor, value: Optional[Tensor], x: Tensor) -> Tensor:
    """Dense ÂX for the CSR Â (rowptr [M+1], col [nnz], value [nnz] or None) and x [N, d]."""
    rows = rowptr.numel() - 1
    counts = rowptr[1:] - rowptr[:-1]
    dst = torch.repeat_interleave(torch.arange(rows, device=x.device), counts)
    msg = x[col]
    if value is not None:
        msg = msg * value.to(x.dtype)[:, None]
    out = torch.zeros(rows, x.shape[1], dtype=x.dtype, device=x.device)
    return out.index_add_(0, dst, msg)


def _dense_aggregate(rowptr: Tensor, col: Tensor, value: Optional[Tensor], x: Tensor,
                     compute_dtype: Optional[torch.dtype]) -> Tensor:
    """ÂX [M, d] as a dense tensor in compute_dtype (x dense or sparse CSR)."""
    xs = _as(csr_to_dense(x), compute_dtype)
    vs = None if value is None else value.to(xs.dtype)
    return sparse_aggregate(rowptr, col, vs, xs)


def sparse_factor_update(
    factor: Tensor,
    rowptr: Tensor,
    col: Tensor,
    value: Optional[Tensor],
    x: Tensor,
    decay: float,
    append_bias: bool,
    row_weight: Optional[Tensor] = None,
    compute_dtype: Optional[torch.dtype] = torch.float64,
) -> Tensor:
    """:func:`factor_update` of the aggregate ÂX, materialised densely."""
    agg = _dense_aggregate(rowptr, col, value, x, compute_dtype)
    return factor_update(factor, agg, decay, append_bias, row_weight, compute_dtype)


def sparse_factor_update_(factor: Tensor, rowptr: Tensor, col: Tensor, value: Optional[Tensor],
                          x: Tensor, decay: float, append_bias: bool,
                          row_weight: Optional[Tensor] = None,
                          compute_dtype: Optional[torch.dtype] = torch.float64) -> Tensor:
    """In-place :func:`sparse_factor_update`."""
    new = sparse_factor_update(factor, rowptr, col, value, x, decay, append_bias, row_weight,
                               compute_dtype)
    return factor.copy_(new)


def block_factor_update(
    blocks: Sequence[Tensor],
    x: Tensor,
    decay: float,
    append_bias: bool,
    row_weight: Optional[Tensor] = None,
    compute_dtype: Optional[torch.dtype] = torch.float64,
) -> list[Tensor]:
    """The diagonal blocks of :func:`factor_update`, as new tensors.

    blocks: K tensors [n_k, n_k] partitioning the D = d (+1) columns of x̄ contiguously, in
    order (the bias column is column D − 1). Each block needs only its own columns of x̄, so no
    D×D matrix is formed. With Σw = 0 the blocks are returned unchanged.
    """
    xs = _as(csr_to_dense(x), compute_dtype)
    if append_bias:
        xs = with_bias_column(xs)
    w = None if row_weight is None else _as(row_weight, xs.dtype)
    out, start = [], 0
    for b in blocks:
        n = b.shape[0]
        gram, total = weighted_gram(xs[:, start:start + n], w)
        start += n
        if total == 0.0:
            out.append(b.clone())
            continue
        f = _as(b, compute_dtype)
        old = f * decay if decay != 0.0 else torch.zeros_like(f)
        out.append((old + (1.0 - decay) * gram / total).to(b.dtype))
    return out


def block_factor_update_(blocks: Sequence[Tensor], x: Tensor, decay: float, append_bias: bool,
                         row_weight: Optional[Tensor] = None,
                         compute_dtype: Optional[torch.dtype] = torch.float64) -> list[Tensor]:
    """In-place :func:`block_factor_update`."""
    new = block_factor_update(blocks, x, decay, append_bias, row_weight, compute_dtype)
    return [b.copy_(n) for b, n in zip(blocks, new)]


def sparse_block_factor_update(
    blocks: Sequence[Tensor],
    rowptr: Tensor,
    col: Tensor,
    value: Optional[Tensor],
    x: Tensor,
    decay: float,
    append_bias: bool,
    row_weight: Optional[Tensor] = None,
    compute_dtype: Optional[torch.dtype] = torch.float64,
) -> list[Tensor]:
    """:func:`block_factor_update` of the aggregate ÂX, materialised densely."""
    agg = _dense_aggregate(rowptr, col, value, x, compute_dtype)
    return block_factor_update(blocks, agg, decay, append_bias, row_weight, compute_dtype)


def sparse_block_factor_update_(blocks: Sequence[Tensor], rowptr: Tensor, col: Tensor,
                                value: Optional[Tensor], x: Tensor, decay: float,
                                append_bias: bool, row_weight: Optional[Tensor] = None,
                                compute_dtype: Optional[torch.dtype] = torch.float64
                                ) -> list[Tensor]:
    """In-place :func:`sparse_block_factor_update`."""
    new = sparse_block_factor_update(blocks, rowptr, col, value, x, decay, append_bias,
                                     row_weight, compute_dtype)
    return [b.copy_(n) for b, n in zip(blocks, new)]


def batched_eigh(
    matrices: Sequence[Tensor], compute_dtype: Optional[torch.dtype] = torch.float64
) -> tuple[list[Tensor], list[Tensor]]:
    """Ascending eigenvalues [n] and orthonormal eigenvectors [n, n] of each symmetric matrix."""
    values, vectors = [], []
    for a in matrices:
        lam, q = torch.linalg.eigh(_as(a, compute_dtype))
        values.append(lam.to(a.dtype))
        vectors.append(q.to(a.dtype))
    return values, vectors


def precondition(
    grads: Sequence[Tensor],
    QA: Sequence[Tensor],
    lamA: Sequence[Tensor],
    QG: Sequence[Tensor],
    lamG: Sequence[Tensor],
    damping: float,
    compute_dtype: Optional[torch.dtype] = torch.float64,
) -> list[Tensor]:
    """Q_G[(Q_Gᵀ g Q_A) / (λ_G λ_Aᵀ + damping)]Q_Aᵀ per layer; g [d_out, d_in(+1)]."""
    out = []
    for g, qa, la, qg, lg in zip(grads, QA, lamA, QG, lamG):
        g_, qa_, la_, qg_, lg_ = (_as(t, compute_dtype) for t in (g, qa, la, qg, lg))
        t = qg_.T @ g_ @ qa_
        t = t / (lg_[:, None] * la_[None, :] + damping)
        out.append((qg_ @ t @ qa_.T).to(g.dtype))
    return out
