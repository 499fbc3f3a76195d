"""The plain-PyTorch expressions ngcuda's factor ops replace, one function each.

Each updates ``factor ← decay·factor + (1−decay)·x̄ᵀx̄ / N`` with ``x̄ = [x, 1]``; the sparse
ones first form the aggregate ``ÂX`` densely (which ngcuda never does), in one of the ways a
PyTorch user would: ``torch.sparse.mm``, an edge-wise ``scatter_add_``, or torch_scatter's
``scatter`` when that optional package is installed.
"""
from __future__ import annotations

import importlib.util
import warnings
from typing import Callable, Optional

import torch
from torch import Tensor

DECAY = 0.95


def dense_factor_update_(factor: Tensor, x: Tensor) -> None:
    """``cat([x, 1])`` then one in-place ``addmm_``: the torch expression of factor_update_."""
    xb = torch.cat([x, torch.ones(x.shape[0], 1, dtype=x.dtype, device=x.device)], 1)
    factor.mul_(DECAY).addmm_(xb.T, xb, alpha=(1 - DECAY) / x.shape[0])


def csr_tensor(rowptr: Tensor, col: Tensor, value: Tensor, n: int) -> Tensor:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        return torch.sparse_csr_tensor(rowptr, col, value, (n, n), check_invariants=False)


def edge_rows(rowptr: Tensor) -> Tensor:
    """The destination row of every CSR entry (the COO row index)."""
    counts = rowptr[1:] - rowptr[:-1]
    return torch.repeat_interleave(torch.arange(counts.numel(), device=rowptr.device), counts)


def aggregate_sparse_mm(a_csr: Tensor, x: Tensor) -> Tensor:
    return torch.sparse.mm(a_csr, x)


def aggregate_scatter_add(row: Tensor, col: Tensor, value: Tensor, x: Tensor) -> Tensor:
    """ÂX by gathering x[col]·value per edge and summing into the destination rows."""
    msg = x[col] * value[:, None]
    index = row[:, None].expand_as(msg)
    return torch.zeros_like(x).scatter_add_(0, index, msg)


def torch_scatter_available() -> bool:
    """Whether the optional torch_scatter package is installed (it is never required)."""
    return importlib.util.find_spec("torch_scatter") is not None


def aggregate_torch_scatter() -> Optional[Callable[[Tensor, Tensor, Tensor, Tensor], Tensor]]:
    """torch_scatter's sum aggregation, or None when the package is absent."""
    if not torch_scatter_available():
        return None
    from torch_scatter import scatter  # type: ignore[import-not-found]

    def aggregate(row: Tensor, col: Tensor, value: Tensor, x: Tensor) -> Tensor:
        return scatter(x[col] * value[:, None], row, dim=0, dim_size=x.shape[0], reduce="sum")

    return aggregate
