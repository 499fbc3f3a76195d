"""Graphs for the sparse factor-update benchmark: real datasets and random graphs of any size.

Every graph is held the way a GCN layer's K-FAC input factor consumes it: the CSR of the
symmetric-normalised adjacency with self-loops, Â = D^-1/2 (A + I) D^-1/2, and dense features.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

# Shipped with ngcuda; the gnn-benchmark npz graphs are read from --data-root when it is given.
SHIPPED = ("cora", "citeseer")
FROM_ROOT = ("amazon-photo", "amazon-computers", "coauthor-cs", "coauthor-physics")


@dataclass
class BenchGraph:
    name: str
    rowptr: torch.Tensor  # [N+1] int64
    col: torch.Tensor  # [nnz] int64
    value: torch.Tensor  # [nnz] float32
    x: torch.Tensor  # [N, d] float32, dense

    @property
    def nodes(self) -> int:
        return self.rowptr.numel() - 1

    @property
    def nnz(self) -> int:
        return self.col.numel()

    @property
    def features(self) -> int:
        return self.x.shape[1]

    def to(self, device: torch.device | str) -> "BenchGraph":
        return BenchGraph(self.name, *(t.to(device) for t in (self.rowptr, self.col, self.value, self.x)))


def gcn_csr(edge_index: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """CSR (rowptr, col, value) of D^-1/2 (A + I) D^-1/2 for a symmetric loop-free edge_index."""
    loops = torch.arange(n, dtype=torch.long)
    row = torch.cat([edge_index[0], loops])
    col = torch.cat([edge_index[1], loops])
    order = torch.argsort(row * n + col)
    row, col = row[order], col[order]
    deg = torch.bincount(row, minlength=n)
    rowptr = torch.zeros(n + 1, dtype=torch.long)
    rowptr[1:] = deg.cumsum(0)
    dinv = deg.float().rsqrt()
    return rowptr, col, dinv[row] * dinv[col]


def read_real(name: str, root: Optional[Path]):
    """The dataset as ngcuda loads it (features may still be sparse); FileNotFoundError when it
    is neither shipped nor under ``root``."""
    from ngcuda.data import load_graph

    return load_graph(name, root=root)


def bench_graph(g, max_features: Optional[int] = None) -> BenchGraph:
    """The GCN-normalised CSR and dense features of an ngcuda Graph, optionally keeping only the
    first ``max_features`` feature columns (--quick)."""
    rowptr, col, value = gcn_csr(g.edge_index, g.num_nodes)
    x = g.dense_features().float()
    if max_features is not None:
        x = x[:, :max_features]
    return BenchGraph(g.name, rowptr, col, value, x.contiguous())


def random_graph(n: int, d: int, avg_degree: float = 4.9, seed: int = 0) -> BenchGraph:
    """A random graph with Poisson degrees (mean ``avg_degree`` including the self-loop, Cora's
    is 4.9), GCN-like values deg_i^-1/2 deg_j^-1/2, and dense Gaussian features [n, d] (like the
    hidden activations a second GCN layer sees)."""
    gen = torch.Generator().manual_seed(seed)
    deg = torch.poisson(torch.full((n,), avg_degree - 1.0), generator=gen).long() + 1
    rowptr = torch.zeros(n + 1, dtype=torch.long)
    rowptr[1:] = deg.cumsum(0)
    col = torch.randint(0, n, (int(rowptr[-1]),), generator=gen)
    col[rowptr[:-1]] = torch.arange(n)  # the self-loop
    row = torch.repeat_interleave(torch.arange(n), deg)
    value = (deg[row].float() * deg[col].float()).rsqrt()
    x = torch.randn(n, d, generator=gen)
    return BenchGraph(f"random-{n}", rowptr, col, value, x)
