"""Mini-batch GNN training with PyG's ``NeighborLoader``, without pyg-lib or torch-sparse.

PyG's ``NeighborSampler`` calls ``pyg_lib`` or ``torch_sparse`` kernels for the sampling itself and
raises ``ImportError`` when neither is installed (the case in this project's environment). Everything
around it (CSC conversion, ``NeighborLoader``, ``filter_data``, ``batch_size``/``n_id`` bookkeeping)
is plain PyTorch, so :class:`TorchNeighborSampler` replaces only ``_sample`` with a vectorised torch
version and is handed to ``NeighborLoader(neighbor_sampler=...)``. It supports what node
classification needs: homogeneous graphs, directional sampling, without replacement, uniform.

Each batch is a subgraph whose first ``batch_size`` nodes are the seed (training) nodes; K-FAC's
GCN factors then come from that subgraph's own adjacency (``GCNConv(cached=False)``): ``A`` is the row
mean over the subgraph's nodes, ``G`` averages over the seeds given to ``set_outputs``.
"""
from __future__ import annotations

import functools
import warnings
from typing import Any, Optional, Sequence

import torch
from torch import Tensor

__all__ = ["TorchNeighborSampler", "neighbor_loader", "rank_share", "uncache_gcn"]


@functools.cache
def _sampler_class() -> type:
    """Built on first use, so that importing this module (and so `ngcuda train-ae --help`) does not
    need torch_geometric."""
    from torch_geometric.sampler import NeighborSampler

    class TorchNeighborSampler(NeighborSampler):  # type: ignore[misc]
        """``torch_geometric.sampler.NeighborSampler`` with its sampling in plain torch.

        Args:
            data: a homogeneous ``torch_geometric.data.Data``.
            num_neighbors: neighbours per node and hop (``-1``: all), e.g. ``[10, 10]``.
            seed: seed of the sampling generator (so a run is reproducible).
        """

        def __init__(self, data: Any, num_neighbors: Sequence[int], seed: int = 0) -> None:
            with warnings.catch_warnings():  # "without pyg-lib is deprecated": that is the point
                warnings.simplefilter("ignore")
                super().__init__(data, list(num_neighbors))
            self.data_ref = data  # what NeighborLoader filters the batches from
            self.generator = torch.Generator().manual_seed(seed)

        def _sample(self, seed: Any, seed_time: Optional[Tensor] = None, **kwargs: Any) -> Any:
            from torch_geometric.sampler import SamplerOutput

            if isinstance(seed, dict) or seed_time is not None or self.disjoint or self.replace:
                raise NotImplementedError("TorchNeighborSampler: homogeneous, non-temporal, "
                                          "non-disjoint sampling without replacement only")
            colptr, row = self.colptr, self.row
            num_nodes = colptr.numel() - 1
            node = seed.to(torch.long)
            local = torch.full((num_nodes,), -1, dtype=torch.long)
            local[node] = torch.arange(node.numel())
            frontier = node
            rows, cols, edges = [], [], []
            for k in self.num_neighbors.get_mapped_values():
                start = colptr[frontier]
                deg = colptr[frontier + 1] - start
                seg = torch.repeat_interleave(torch.arange(frontier.numel()), deg)
                offset = torch.arange(int(deg.sum())) - torch.repeat_interleave(deg.cumsum(0) - deg, deg)
                pos = start[seg] + offset  # every in-edge of the frontier, grouped by target
                if k >= 0 and pos.numel():
                    # k uniform picks per target: a random order inside each group, keep the first k
                    order = torch.argsort(torch.rand(pos.numel(), generator=self.generator))
                    order = order[torch.argsort(seg[order], stable=True)]
                    seg, pos = seg[order], pos[order]
                    keep = offset < k  # offsets restart at 0 in each (still grouped) segment
                    seg, pos = seg[keep], pos[keep]
                src = row[pos]
                new = torch.unique(src[local[src] < 0])
                local[new] = torch.arange(node.numel(), node.numel() + new.numel())
                node = torch.cat([node, new])
                rows.append(local[src])
                cols.append(local[frontier[seg]])
                edges.append(pos)
                frontier = new
            return SamplerOutput(node=node, row=torch.cat(rows), col=torch.cat(cols),
                                 edge=torch.cat(edges), batch=None)

    return TorchNeighborSampler


def __getattr__(name: str) -> Any:
    if name == "TorchNeighborSampler":
        return _sampler_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def rank_share(ids: Tensor, rank: int, world: int, epoch: Optional[int] = None,
               seed: int = 0, pad: bool = True) -> Tensor:
    """This rank's share of ``ids`` [K]: a shuffle shared by all ranks (when ``epoch`` is given),
    with ``pad`` wrapped around to a multiple of ``world`` so that every rank gets the same count
    and so the same number of batches (as ``DistributedSampler``), then every ``world``-th entry
    from ``rank``."""
    if epoch is not None:
        g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
        ids = ids[torch.randperm(ids.numel(), generator=g)]
    pad = pad and (-ids.numel()) % world
    if pad:
        ids = torch.cat([ids, ids[:pad]])
    return ids[rank::world]


def neighbor_loader(data: Any, input_nodes: Tensor, num_neighbors: Sequence[int],
                    batch_size: int, shuffle: bool = False, seed: int = 0) -> Any:
    """``torch_geometric.loader.NeighborLoader`` over ``input_nodes`` (seed ids) driven by
    :class:`TorchNeighborSampler`. Batches: ``batch.x``, ``batch.edge_index``, ``batch.y`` of the
    subgraph, seeds first (``batch.batch_size`` of them), ``batch.n_id`` the global ids."""
    from torch_geometric.loader import NeighborLoader

    sampler = _sampler_class()(data, num_neighbors, seed=seed)
    return NeighborLoader(data, num_neighbors=list(num_neighbors), input_nodes=input_nodes,
                          batch_size=batch_size, shuffle=shuffle, neighbor_sampler=sampler)


def uncache_gcn(model: torch.nn.Module) -> torch.nn.Module:
    """Turns off ``GCNConv``'s cached normalisation (every sampled subgraph has its own)."""
    from torch_geometric.nn import GCNConv

    for m in model.modules():
        if isinstance(m, GCNConv):
            m.cached = False
            m._cached_edge_index = None
    return model
