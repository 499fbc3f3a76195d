"""gnn-benchmark graphs (Shchur et al. 2018): Amazon Computers/Photo and Coauthor CS/Physics, from CSR npz files.

The files are read with `np.load(..., allow_pickle=False)`: only plain arrays, never pickles. They are not
shipped with ngcuda (11 MB); pass the folder that holds them as `root`.
"""
from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
import scipy.sparse as sp
import torch

from .graph import Graph, clean_adjacency, missing_file, random_split

FILES_BY_NAME = {
    "amazon-computers": "amazon_electronics_computers.npz",
    "amazon-photo": "amazon_electronics_photo.npz",
    "coauthor-cs": "ms_academic_cs.npz",
    "coauthor-physics": "ms_academic_phy.npz",
}

# Above this many feature entries x stays a sparse CSR tensor (Coauthor CS: 125M entries, 0.5 GB dense).
DENSE_LIMIT = 64 * 1024 * 1024


def _csr(f: np.lib.npyio.NpzFile, prefix: str, path: Path) -> sp.csr_matrix:
    keys = [f"{prefix}_{k}" for k in ("data", "indices", "indptr", "shape")]
    missing = [k for k in keys if k not in f.files]
    if missing:
        raise ValueError(f"{path}: missing arrays {', '.join(missing)} (expected gnn-benchmark CSR layout)")
    data, indices, indptr, shape = (_member(f, k, path) for k in keys)
    try:
        return sp.csr_matrix((data, indices, indptr), shape=tuple(int(s) for s in shape))
    except (ValueError, TypeError) as e:
        raise ValueError(f"{path}: {prefix}_* do not form a CSR matrix ({e})") from e


def _member(f: np.lib.npyio.NpzFile, key: str, path: Path) -> np.ndarray:
    try:
        return f[key]
    except ValueError as e:  # an object array (a pickle), refused by allow_pickle=False
        raise ValueError(f"{path}: array {key!r} cannot be read without unpickling ({e})") from e


def _read_npz(path: Path) -> tuple[sp.csr_matrix, sp.csr_matrix, np.ndarray]:
    """(adjacency, float32 attributes, labels) of a gnn-benchmark file; a file that is not a readable npz
    archive in that layout is a ValueError naming it."""
    try:
        f = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise
    except (OSError, EOFError, ValueError, zipfile.BadZipFile) as e:
        raise ValueError(f"{path}: not a readable .npz archive ({type(e).__name__}: {e})") from e
    if not isinstance(f, np.lib.npyio.NpzFile):
        raise ValueError(f"{path}: holds a single .npy array, not an .npz archive of the gnn-benchmark layout")
    try:
        with f:
            adj = _csr(f, "adj", path)
            attr = _csr(f, "attr", path).astype(np.float32)
            if "labels" not in f.files:
                raise ValueError(f"{path}: no 'labels' array")
            labels = _member(f, "labels", path)
    except (OSError, EOFError, zipfile.BadZipFile) as e:  # a member cut short
        raise ValueError(f"{path}: a damaged .npz archive ({type(e).__name__}: {e})") from e
    return adj, attr, labels


def load_npz(
    name: str,
    root: str | Path | None = None,
    seed: int = 0,
    train_per_class: int = 20,
    val_per_class: int = 30,
    sparse: bool | None = None,
) -> Graph:
    """Load a gnn-benchmark graph with a seeded random split (Shchur et al.: 20 per class train, 30 per class
    validation, every other node test).

    name:   "amazon-computers", "amazon-photo", "coauthor-cs" or "coauthor-physics"; or a path to any
            npz file in the same layout (adj_*, attr_*, labels).
    root:   folder holding the file (also looked up in root/npz/).
    sparse: keep x as a sparse CSR tensor; None decides by size (above DENSE_LIMIT entries).
    Returns a Graph; edges symmetrised (Amazon stores some one way only), binarised, no self-loops.
    """
    key = name.lower()
    if key in FILES_BY_NAME:
        if root is None:
            raise FileNotFoundError(
                f"{name!r} is not shipped with ngcuda: pass root= (command line: --data-root DIR), "
                f"a folder holding {FILES_BY_NAME[key]} (see ngcuda/data/files/SOURCES.md)"
            )
        folder = Path(root)
        path = folder / FILES_BY_NAME[key]
        if not path.is_file() and (folder / "npz" / FILES_BY_NAME[key]).is_file():
            path = folder / "npz" / FILES_BY_NAME[key]
    else:
        path = Path(name) if root is None else Path(root) / name
        if path.suffix != ".npz":
            raise ValueError(
                f"unknown npz dataset {name!r}: use one of {', '.join(FILES_BY_NAME)} or a path ending in .npz"
            )
    if not path.is_file():
        raise missing_file(path, f"dataset {name!r}")

    adj, attr, labels = _read_npz(path)
    n = adj.shape[0]
    if adj.shape != (n, n) or attr.shape[0] != n or labels.shape != (n,):
        raise ValueError(f"{path}: adjacency {adj.shape}, attributes {attr.shape} and labels {labels.shape} disagree")
    y = torch.from_numpy(labels.astype(np.int64))
    num_classes = int(y.max()) + 1 if n else 0

    if sparse is None:
        sparse = attr.shape[0] * attr.shape[1] > DENSE_LIMIT
    if sparse:
        attr.sort_indices()
        x = torch.sparse_csr_tensor(
            torch.from_numpy(attr.indptr.astype(np.int64)),
            torch.from_numpy(attr.indices.astype(np.int64)),
            torch.from_numpy(attr.data),
            size=attr.shape,
            check_invariants=True,
        )
    else:
        x = torch.from_numpy(attr.toarray())

    train, val, test = random_split(y, num_classes, train_per_class, seed, val_per_class=val_per_class)
    return Graph(
        x=x,
        edge_index=clean_adjacency(adj),
        y=y,
        train_mask=train,
        val_mask=val,
        test_mask=test,
        num_classes=num_classes,
        name=key if key in FILES_BY_NAME else path.stem,
    )
