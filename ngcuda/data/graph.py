"""The `Graph` container shared by every graph loader, and the helpers that build it."""
from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import scipy.sparse as sp
import torch

FILES = Path(__file__).parent / "files"


@dataclass
class Graph:
    """A node-classification graph.

    x:          [N, F] float32 features. Dense, or a sparse CSR tensor for feature matrices too large to
                hold densely (Coauthor CS/Physics); `dense_features()` always gives the dense form.
    edge_index: [2, E] int64, symmetric (both directions stored), no self-loops, no duplicates, sorted.
    y:          [N] int64 class ids. Nodes without a label (CiteSeer's 15 missing test ids) hold 0, as in
                PyG; `labelled` is False for them and they are in no mask.
    train_mask, val_mask, test_mask: [N] bool, pairwise disjoint.
    """

    x: torch.Tensor
    edge_index: torch.Tensor
    y: torch.Tensor
    train_mask: torch.Tensor
    val_mask: torch.Tensor
    test_mask: torch.Tensor
    num_classes: int
    name: str
    labelled: torch.Tensor | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.labelled is None:
            self.labelled = torch.ones(self.y.shape[0], dtype=torch.bool)

    @property
    def num_nodes(self) -> int:
        return int(self.y.shape[0])

    @property
    def num_features(self) -> int:
        return int(self.x.shape[1])

    @property
    def num_edges(self) -> int:
        """Directed edge count (each undirected edge counted twice), as PyG's `num_edges`."""
        return int(self.edge_index.shape[1])

    def dense_features(self) -> torch.Tensor:
        """[N, F] float32 dense features."""
        return self.x.to_dense() if self.x.layout != torch.strided else self.x

    def to(self, device: torch.device | str) -> "Graph":
        """A copy with every tensor on `device`."""
        return replace(
            self,
            **{
                k: getattr(self, k).to(device)
                for k in ("x", "edge_index", "y", "train_mask", "val_mask", "test_mask", "labelled")
            },
        )

    def with_split(self, train: torch.Tensor, val: torch.Tensor, test: torch.Tensor) -> "Graph":
        """A copy with new masks ([N] bool each)."""
        return replace(self, train_mask=train, val_mask=val, test_mask=test)

    def to_pyg(self):
        """The same graph as a `torch_geometric.data.Data`."""
        from torch_geometric.data import Data

        return Data(
            x=self.x,
            edge_index=self.edge_index,
            y=self.y,
            train_mask=self.train_mask,
            val_mask=self.val_mask,
            test_mask=self.test_mask,
            num_classes=self.num_classes,
        )


def clean_adjacency(adj: sp.spmatrix) -> torch.Tensor:
    """[2, E] int64 edge_index of `adj` symmetrised, binarised, without diagonal, deduplicated, row-major sorted."""
    adj = sp.csr_matrix(adj, dtype=np.float32)
    adj = (adj + adj.T).tocsr()
    adj.data[:] = 1.0
    adj.setdiag(0)
    adj.eliminate_zeros()
    adj.sort_indices()
    coo = adj.tocoo()
    return torch.from_numpy(np.vstack([coo.row, coo.col]).astype(np.int64))


def index_to_mask(index: torch.Tensor | np.ndarray, n: int) -> torch.Tensor:
    mask = torch.zeros(n, dtype=torch.bool)
    mask[torch.as_tensor(index, dtype=torch.long)] = True
    return mask


def random_split(
    y: torch.Tensor,
    num_classes: int,
    train_per_class: int,
    seed: int,
    val_per_class: int | None = None,
    num_val: int | None = None,
    num_test: int | None = None,
    labelled: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Seeded random split over the labelled nodes: `train_per_class` per class for training; validation is
    `val_per_class` per class or `num_val` nodes overall; test is `num_test` of the rest (None: all the rest).

    Classes smaller than the request give all their nodes. Returns three [N] bool masks on y's
    device; the split itself is drawn on the CPU, so a seed gives the same split on any device.
    """
    device = y.device
    y = y.cpu()
    n = y.shape[0]
    labelled = torch.ones(n, dtype=torch.bool) if labelled is None else labelled.cpu()
    gen = torch.Generator().manual_seed(seed)
    train, val = [], []
    taken = torch.zeros(n, dtype=torch.bool)
    for c in range(num_classes):
        idx = torch.nonzero((y == c) & labelled).flatten()
        idx = idx[torch.randperm(idx.numel(), generator=gen)]
        train.append(idx[:train_per_class])
        if val_per_class is not None:
            val.append(idx[train_per_class : train_per_class + val_per_class])
    train_idx = torch.cat(train)
    taken[train_idx] = True
    if val_per_class is not None:
        val_idx = torch.cat(val)
        taken[val_idx] = True
        rest = torch.nonzero(~taken & labelled).flatten()
        rest = rest[torch.randperm(rest.numel(), generator=gen)]
        test_idx = rest if num_test is None else rest[:num_test]
    else:
        rest = torch.nonzero(~taken & labelled).flatten()
        rest = rest[torch.randperm(rest.numel(), generator=gen)]
        val_idx = rest[: num_val or 0]
        test_idx = rest[num_val or 0 :] if num_test is None else rest[num_val or 0 : (num_val or 0) + num_test]
    return tuple(index_to_mask(i, n).to(device) for i in (train_idx, val_idx, test_idx))


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


@functools.lru_cache(maxsize=1)
def known_sha256() -> dict[str, str]:
    """File name -> sha256 of every data file whose content is known (SHA256SUMS, shipped with the package)."""
    table = {}
    for line in (FILES / "SHA256SUMS").read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            digest, name = line.split()
            table[Path(name).name] = digest
    return table


def verify_sha256(path: Path) -> None:
    """Raise ValueError if `path` is a known file whose sha256 differs from the recorded one."""
    expected = known_sha256().get(path.name)
    if expected is None:
        return
    got = sha256(path)
    if got != expected:
        raise ValueError(
            f"{path}: sha256 {got} does not match the recorded {expected} "
            "(corrupt or different file; see ngcuda/data/files/SOURCES.md)"
        )


def missing_file(path: Path, what: str) -> FileNotFoundError:
    return FileNotFoundError(
        f"{what}: file {path} not found. Put the file there, or pass the folder that holds it as "
        "root= (command line: --data-root DIR). See ngcuda/data/files/SOURCES.md for where to get it."
    )
