"""The rows of a layer's input factor, held implicitly: ``A = X̄ᵀX̄ / R`` without forming ``X̄``.

A layer's input statistic is the mean outer product of its rows ``ā_i``:

* ``linear``: ``X̄ = [X, 1]`` (the ones column only with a bias);
* ``gcn``:    ``X̄ = [ÂX, 1]`` with ``Â`` the layer's normalised adjacency (sparse CSR).

``X`` is dense ``[N, d]`` or a sparse CSR tensor. Wide bag-of-words inputs (Coauthor Physics:
34,493 × 8,415, 0.4% non-zero) are never densified here, and ``ÂX`` is never held as a whole:
the structures of :mod:`ngcuda.optim.structure` only need

* :meth:`RowSource.apply`: ``A V`` for a block of vectors ``V`` ``[D, p]`` (two sparse products
  each way, ``O((nnz(X) + nnz(Â))·p)``), the low-rank structure's whole interface to the data;
* :meth:`RowSource.blocks`: the diagonal blocks ``X̄_Jᵀ X̄_J / R`` of a contiguous partition;
* :meth:`RowSource.diag`: ``diag(A)``;
* :meth:`RowSource.full`: the dense ``D × D`` statistic (the ``full`` structure).

The dense statistics (:func:`full_statistic_`, :func:`block_statistics`) are the C++ ops, which
take a dense or sparse CSR ``x`` (``factor_update_``, ``sparse_factor_update_`` and their block
versions); the products of :meth:`RowSource.apply` are sparse × dense (:func:`spmm`).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

from .. import ops

__all__ = ["RowSource", "full_statistic_", "block_statistics", "block_bounds", "csr_transpose"]

# (crow ptr, col ptr, shape, nnz) -> (crowT, colT, perm): one transpose pattern per sparsity
# pattern. Input dropout rebuilds the CSR tensor every step with new values but the same
# index tensors, so the pattern (an argsort, the costly part) is computed once.
_TRANSPOSE_CACHE: dict[tuple, tuple[Tensor, Tensor, Tensor, Tensor, Tensor]] = {}


def is_csr(x: Tensor) -> bool:
    return x.layout == torch.sparse_csr


def spmm(a: Tensor, b: Tensor, transpose: bool = False, cache: bool = True) -> Tensor:
    """``a @ b`` (or ``aᵀ @ b``) for a CSR ``a`` and a dense ``b``.

    On the CPU this goes through scipy, whose single-threaded CSR/CSC kernels were 3–8× faster
    than ``torch.sparse.mm`` on this project's 2-core machine (Coauthor Physics, p = 16…64);
    elsewhere torch.sparse.mm with ``aᵀ``'s pattern cached, unless ``cache`` is False (an ``a``
    built for one step only would fill the cache with patterns never asked for again).
    """
    if a.device.type == "cpu" and b.dtype in (torch.float32, torch.float64):
        import scipy.sparse as sp

        m = sp.csr_matrix((a.values().detach().numpy(), a.col_indices().numpy(),
                           a.crow_indices().numpy()), shape=tuple(a.shape))
        bn = b.detach().contiguous().numpy()
        if m.dtype != bn.dtype:
            m = m.astype(bn.dtype)
        out = (m.T @ bn) if transpose else (m @ bn)
        return torch.from_numpy(out)
    return torch.sparse.mm(csr_transpose(a, cache) if transpose else a, b.contiguous())


def csr_row_ids(x: Tensor) -> Tensor:
    """The row of each stored entry of a CSR ``x`` [N, d]: int64 [nnz]."""
    crow = x.crow_indices()
    return torch.repeat_interleave(torch.arange(x.shape[0], device=crow.device), crow[1:] - crow[:-1])


def csr_transpose(x: Tensor, cache: bool = True) -> Tensor:
    """``xᵀ`` as a CSR tensor ``[d, N]`` for a CSR ``x`` ``[N, d]``; the pattern is cached unless
    ``cache`` is False."""
    crow, col, val = x.crow_indices(), x.col_indices(), x.values()
    key = (crow.data_ptr(), col.data_ptr(), tuple(x.shape), col.numel(), str(x.device))
    hit = _TRANSPOSE_CACHE.get(key) if cache else None
    # the cached index tensors are kept alive with the entry, so their pointers stay unique
    if hit is None or hit[3] is not crow and not torch.equal(hit[3], crow):
        n, d = x.shape
        rows = csr_row_ids(x)
        perm = torch.argsort(col.long() * n + rows)  # int32 indices: d·N may pass 2³¹
        counts = torch.bincount(col, minlength=d)
        crow_t = torch.zeros(d + 1, dtype=torch.long, device=col.device)
        torch.cumsum(counts, 0, out=crow_t[1:])
        hit = (crow_t, rows[perm].contiguous(), perm, crow, col)
        if cache:
            if len(_TRANSPOSE_CACHE) > 8:
                _TRANSPOSE_CACHE.clear()
            _TRANSPOSE_CACHE[key] = hit
    crow_t, col_t, perm = hit[0], hit[1], hit[2]
    return torch.sparse_csr_tensor(crow_t, col_t, val[perm], size=(x.shape[1], x.shape[0]),
                                   check_invariants=False)


def drop_stored_zeros(x: Tensor) -> Tensor:
    """A CSR ``x`` [N, d] without its explicitly stored zeros (``x`` itself if it has none).

    Dropout on a CSR input keeps the pattern and zeroes values (``ngcuda.models.input_dropout``),
    so half the stored entries can be zeros; every factor op and product costs its stored entries
    (the block update's pairs: their square), and a zero adds nothing to any of them. NaN and Inf
    values are kept.
    """
    val = x.values()
    keep = val != 0
    if bool(keep.all()):
        return x
    crow = x.crow_indices()
    kept_before = torch.cat([crow.new_zeros(1), torch.cumsum(keep, 0, dtype=crow.dtype)])
    return torch.sparse_csr_tensor(kept_before[crow], x.col_indices()[keep], val[keep], size=x.shape,
                                   check_invariants=False)


def summed_duplicates(x: Tensor) -> tuple[Tensor, Tensor]:
    """Column indices and values [nnz'] of a CSR ``x``'s entries with a column repeated within a
    row summed into one entry (squares of entries are then squares of the matrix's entries)."""
    crow, col, val = x.crow_indices(), x.col_indices(), x.values()
    if col.numel() < 2:
        return col, val
    increasing = col[1:] > col[:-1]
    row_starts = crow[1:-1]
    increasing[row_starts[(row_starts > 0) & (row_starts < col.numel())] - 1] = True
    if bool(increasing.all()):
        return col, val
    rows = csr_row_ids(x)
    c = torch.sparse_coo_tensor(torch.stack([rows, col.long()]), val, tuple(x.shape),
                                check_invariants=False).coalesce()
    return c.indices()[1], c.values()


def block_bounds(size: int, k: int) -> list[int]:
    """Contiguous partition of ``size`` columns into ``ceil(size/k)`` blocks of near-equal size
    ≤ k: the returned bounds ``[0, b_1, …, size]``. The last block holds the bias column."""
    nb = max(1, -(-size // max(1, k)))
    base, extra = divmod(size, nb)
    bounds = [0]
    for i in range(nb):
        bounds.append(bounds[-1] + base + (1 if i < extra else 0))
    return bounds


class RowSource:
    """The rows ``ā_i`` of one forward call of a layer, implicitly (see the module docstring).

    Args:
        x: [N, d] dense, or sparse CSR.
        adj: [M, N] sparse CSR aggregation ``Â`` (GCN), or None (the rows are ``X``'s own).
        bias: append the ones column.
    """

    def __init__(self, x: Tensor, adj: Optional[Tensor], bias: bool) -> None:
        self.x = drop_stored_zeros(x) if is_csr(x) else x
        self._own_x = self.x is not x  # built here, for this statistic only
        self.adj = adj
        self.bias = bias

    @property
    def rows(self) -> int:
        return int(self.adj.shape[0] if self.adj is not None else self.x.shape[0])

    @property
    def d(self) -> int:
        return int(self.x.shape[1])

    @property
    def size(self) -> int:
        return self.d + (1 if self.bias else 0)

    def nnz(self) -> int:
        """Stored entries of ``X`` (N·d when dense)."""
        return int(self.x.values().numel() if is_csr(self.x) else self.x.numel())

    def adj_nnz(self) -> int:
        return 0 if self.adj is None else int(self.adj.values().numel())

    # ------------------------------------------------------------------ products
    def _forward(self, v: Tensor) -> Tensor:
        """``X̄ V``: [R, p] for V [D, p]."""
        x = self.x
        z = x @ v[: self.d] if not is_csr(x) else spmm(x, v[: self.d])
        if self.adj is not None:
            z = spmm(self.adj, z)
        if self.bias:
            z = z + v[self.d][None, :]
        return z

    def _backward(self, z: Tensor) -> Tensor:
        """``X̄ᵀ Z``: [D, p] for Z [R, p]."""
        t = z if self.adj is None else spmm(self.adj, z, transpose=True)
        top = ((t.T @ self.x).T if not is_csr(self.x)
               else spmm(self.x, t, transpose=True, cache=not self._own_x))
        if self.bias:
            top = torch.cat([top, z.sum(0, keepdim=True)])
        return top

    def apply(self, v: Tensor) -> Tensor:
        """``X̄ᵀ X̄ V`` (a sum over rows, not yet divided by R) for V [D, p]."""
        return self._backward(self._forward(v.to(self.x.dtype))).to(v.dtype)

    def diag(self) -> Tensor:
        """``diag(X̄ᵀX̄)`` [D] (a sum over rows)."""
        x = self.x
        if self.adj is not None:
            z = torch.sparse.mm(self.adj, x)  # sparse x: a sparse ÂX, never dense
        else:
            z = x
        if is_csr(z):
            col, val = summed_duplicates(z)  # torch's sparse ÂX may repeat a column too
            out = torch.zeros(self.d, dtype=z.dtype, device=z.device)
            out.index_add_(0, col, val.square())
        else:
            out = z.square().sum(0)
        if self.bias:
            out = torch.cat([out, out.new_full((1,), float(self.rows))])
        return out


def _blend_sources(sources: Sequence[RowSource], update) -> None:
    """Runs ``update(source, decay)`` per source with the decay that makes the result the mean
    over all rows of all sources (the first replaces, decay 0)."""
    seen = 0
    for s in sources:
        rows = s.rows
        update(s, seen / (seen + rows) if seen else 0.0)
        seen += rows


def full_statistic_(out: Tensor, sources: Sequence[RowSource]) -> Tensor:
    """``out ← mean ā āᵀ`` over every row of every source; out [D, D], by the C++ ops, dense or
    sparse CSR x (a CSR x is never densified; ``ÂX`` never formed)."""
    def update(s: RowSource, decay: float) -> None:
        if s.adj is None:
            ops.factor_update_(out, s.x, decay, s.bias)
        else:
            a = s.adj
            ops.sparse_factor_update_(out, a.crow_indices(), a.col_indices(), a.values(), s.x,
                                      decay, s.bias)

    _blend_sources(sources, update)
    return out


def block_statistics(sources: Sequence[RowSource], bounds: Sequence[int],
                     dtype: torch.dtype) -> list[Tensor]:
    """The diagonal blocks ``mean_i ā_{i,J} ā_{i,J}ᵀ`` of the partition ``bounds``, each
    [b_{j+1} − b_j]², by the block factor ops: the off-diagonal blocks are never computed."""
    device = sources[0].x.device
    blocks = [torch.zeros(j1 - j0, j1 - j0, dtype=dtype, device=device)
              for j0, j1 in zip(bounds[:-1], bounds[1:])]

    def update(s: RowSource, decay: float) -> None:
        if s.adj is None:
            ops.block_factor_update_(blocks, s.x, decay, s.bias)
        else:
            a = s.adj
            ops.sparse_block_factor_update_(blocks, a.crow_indices(), a.col_indices(),
                                            a.values(), s.x, decay, s.bias)

    _blend_sources(sources, update)
    return blocks
