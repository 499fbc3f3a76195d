"""Datasets: Planetoid citation graphs, gnn-benchmark npz graphs and MNIST.

Cora, CiteSeer and the MNIST 10k test set ship inside the package (see files/SOURCES.md for sources,
licenses and checksums); the others are read from a folder given as `root` (command line: --data-root).
"""
from __future__ import annotations

from pathlib import Path

from .graph import Graph, random_split
from .mnist import load_mnist, read_idx
from .npz import FILES_BY_NAME as NPZ_DATASETS
from .npz import load_npz
from .planetoid import RestrictedUnpickler, load_planetoid, restricted_load

PLANETOID_DATASETS = ("cora", "citeseer", "pubmed")
GRAPH_DATASETS = PLANETOID_DATASETS + tuple(NPZ_DATASETS)


def load_graph(name: str, root: str | Path | None = None, split: str | None = None, seed: int = 0) -> Graph:
    """Load any graph dataset by name (one of GRAPH_DATASETS).

    split: Planetoid: "public" (default), "full" or "random"; npz graphs: only "random" (the default).
    seed:  seeds the random split.
    """
    name = name.lower()
    if name in PLANETOID_DATASETS:
        return load_planetoid(name, root=root, split=split or "public", seed=seed)
    if name in NPZ_DATASETS:
        if split not in (None, "random"):
            raise ValueError(f"{name} has no {split!r} split: only 'random' (20/30 per class, seeded)")
        return load_npz(name, root=root, seed=seed)
    raise ValueError(f"unknown dataset {name!r}: use one of {', '.join(GRAPH_DATASETS)}")


__all__ = [
    "Graph",
    "GRAPH_DATASETS",
    "NPZ_DATASETS",
    "PLANETOID_DATASETS",
    "RestrictedUnpickler",
    "load_graph",
    "load_mnist",
    "load_npz",
    "load_planetoid",
    "random_split",
    "read_idx",
    "restricted_load",
]
