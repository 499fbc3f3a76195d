"""Planetoid citation graphs (Cora, CiteSeer, PubMed) from the raw `ind.<name>.*` files of kimiyoung/planetoid.

The raw files are Python 2 pickles. They are read only through `RestrictedUnpickler`, which resolves the
handful of numpy/scipy/builtin names those files use and refuses everything else, so a tampered file cannot
run code. Cora and CiteSeer ship inside the package; every known file is also checked against its sha256.
"""
from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp
import torch

from .graph import FILES, Graph, clean_adjacency, index_to_mask, missing_file, random_split, verify_sha256

SHIPPED = ("cora", "citeseer")
SPLITS = ("public", "full", "random")


def _reconstruct():
    try:
        from numpy._core.multiarray import _reconstruct
    except ImportError:  # numpy < 2
        from numpy.core.multiarray import _reconstruct
    return _reconstruct


def _latin1_encode(text: str, encoding: str = "utf-8") -> bytes:
    """Python 3 pickles bytes under protocol 2 as _codecs.encode(str, "latin1"); allow just that codec."""
    if encoding != "latin1" or not isinstance(text, str):
        raise pickle.UnpicklingError(f"ngcuda: refusing _codecs.encode with encoding {encoding!r}")
    return text.encode("latin1")


def _build_allowed() -> dict[tuple[str, str], Any]:
    """(module, name) -> object for the names the Planetoid pickles use. numpy and scipy moved these private
    paths between versions, so both spellings are listed; each resolves to the same public object."""
    from collections import defaultdict

    recon = _reconstruct()
    return {
        ("numpy", "dtype"): np.dtype,
        ("numpy", "ndarray"): np.ndarray,
        ("numpy.core.multiarray", "_reconstruct"): recon,
        ("numpy._core.multiarray", "_reconstruct"): recon,
        ("scipy.sparse.csr", "csr_matrix"): sp.csr_matrix,
        ("scipy.sparse._csr", "csr_matrix"): sp.csr_matrix,
        ("collections", "defaultdict"): defaultdict,
        ("__builtin__", "list"): list,
        ("builtins", "list"): list,
        ("_codecs", "encode"): _latin1_encode,
    }


class RestrictedUnpickler(pickle._Unpickler):
    """Unpickler that resolves only the classes the Planetoid files use; anything else is an UnpicklingError.

    It is the pure-Python unpickler, so that BUILD can be refused on a class: with the C one a pickle could
    set attributes of an allowed class (``csr_matrix.toarray = list``) for the rest of the process.
    """

    dispatch = dict(pickle._Unpickler.dispatch)

    def find_class(self, module: str, name: str) -> Any:
        allowed = _build_allowed()
        try:
            return allowed[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(
                f"ngcuda: refusing to unpickle {module}.{name}: Planetoid files may only reference "
                "numpy arrays, scipy csr_matrix, collections.defaultdict and list"
            ) from None

    def load_build(self) -> None:
        if len(self.stack) >= 2 and isinstance(self.stack[-2], type):
            raise pickle.UnpicklingError(
                f"ngcuda: refusing to set the state of the class {self.stack[-2].__name__} (BUILD on a class)")
        super().load_build()

    dispatch[pickle.BUILD[0]] = load_build


def restricted_load(path: Path) -> Any:
    """Load a Python 2 pickle through `RestrictedUnpickler` (encoding latin1)."""
    with open(path, "rb") as f:
        return RestrictedUnpickler(f, encoding="latin1").load()


def _load_pickle(path: Path) -> Any:
    """`restricted_load`, with a file that is not a (complete, allowed) pickle reported as a ValueError."""
    try:
        return restricted_load(path)
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError) as e:
        raise ValueError(f"{path}: not a readable Planetoid pickle ({type(e).__name__}: {e})") from e


def _file(root: Path, name: str, suffix: str) -> Path:
    path = root / f"ind.{name}.{suffix}"
    if not path.is_file():
        hint = ""
        if name == "pubmed" and suffix == "allx":
            hint = (
                " (ind.pubmed.allx, 7,578,385 bytes, from kimiyoung/planetoid data/ or tkipf/gcn gcn/data/, "
                "is not shipped with ngcuda)"
            )
        raise missing_file(path, f"Planetoid {name!r}{hint}")
    return path


def _as_csr(obj: Any, path: Path) -> sp.csr_matrix:
    if sp.issparse(obj):
        return sp.csr_matrix(obj)
    if isinstance(obj, np.ndarray):
        return sp.csr_matrix(obj)
    raise ValueError(f"{path}: expected a feature matrix (scipy sparse or ndarray), got {type(obj).__name__}")


def _as_array(obj: Any, path: Path) -> np.ndarray:
    if sp.issparse(obj):
        obj = obj.toarray()
    if not isinstance(obj, np.ndarray) or obj.ndim != 2:
        raise ValueError(f"{path}: expected a 2-D one-hot label array, got {type(obj).__name__}")
    return obj


def load_planetoid(
    name: str, root: str | Path | None = None, split: str = "public", seed: int = 0, num_val: int = 500
) -> Graph:
    """Load a Planetoid graph.

    name:  "cora", "citeseer" or "pubmed" (any `ind.<name>.*` set when `root` is given).
    root:  folder holding the raw files; None uses the copies shipped with ngcuda (Cora, CiteSeer only).
    split: "public" (train = the labelled x/y rows, val = the next `num_val` (500) nodes, test = test.index),
           "full" (train = every labelled node outside val/test), or
           "random" (20 per class for training, then 500 val and 1000 test, drawn with `seed`).
    Returns a Graph with dense float32 x [N, F] (raw, not row-normalised).

    CiteSeer's test.index skips 15 ids, which have no feature or label rows. As in PyG they get zero features
    and label 0; unlike PyG's "full" split they are kept out of every mask (`Graph.labelled` is False), so
    no unlabelled node is trained on. The public val/test masks are exactly PyG's.
    """
    name = name.lower()
    if split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    if root is None:
        if name not in SHIPPED:
            raise FileNotFoundError(
                f"Planetoid {name!r} is not shipped with ngcuda (only {', '.join(SHIPPED)} are): "
                "pass root= (command line: --data-root DIR) with a folder holding "
                f"ind.{name}.{{x,tx,allx,y,ty,ally,graph,test.index}}"
            )
        folder = FILES / "planetoid"
    else:
        folder = Path(root)
        if (folder / "planetoid").is_dir() and not (folder / f"ind.{name}.graph").exists():
            folder = folder / "planetoid"
    paths = {k: _file(folder, name, k) for k in ("x", "tx", "allx", "y", "ty", "ally", "graph", "test.index")}
    for path in paths.values():
        verify_sha256(path)
    objs = {k: _load_pickle(p) for k, p in paths.items() if k != "test.index"}
    index_path = paths["test.index"]
    try:
        test_index = np.loadtxt(index_path, dtype=np.int64, ndmin=1)
    except ValueError as e:
        raise ValueError(f"{index_path}: expected one node id per line ({e})") from e
    if test_index.size == 0:
        raise ValueError(f"{index_path}: no test node ids")

    x, tx, allx = (_as_csr(objs[k], folder / f"ind.{name}.{k}") for k in ("x", "tx", "allx"))
    y, ty, ally = (_as_array(objs[k], folder / f"ind.{name}.{k}") for k in ("y", "ty", "ally"))
    graph = objs["graph"]
    if not isinstance(graph, dict):
        raise ValueError(f"{paths['graph']}: expected a dict of neighbour lists, got {type(graph).__name__}")
    if tx.shape[0] != ty.shape[0] or tx.shape[0] > test_index.size:
        raise ValueError(
            f"Planetoid {name!r}: tx has {tx.shape[0]} rows, ty {ty.shape[0]}, test.index {test_index.size}"
        )

    sorted_test = np.sort(test_index)
    lo, hi = int(sorted_test[0]), int(sorted_test[-1])
    # Ids in lo..hi that test.index skips (CiteSeer) get zero feature and label rows.
    place = sp.csr_matrix(
        (np.ones(sorted_test.size, np.float32), (sorted_test - lo, np.arange(sorted_test.size))),
        shape=(hi - lo + 1, tx.shape[0]),
    )
    tx_ext = (place @ tx).tocsr()
    ty_ext = np.zeros((hi - lo + 1, ty.shape[1]), dtype=ty.dtype)
    ty_ext[sorted_test - lo, :] = ty
    features = sp.vstack([allx, tx_ext]).tocsr()
    labels = np.vstack([ally, ty_ext])
    # Row test_index[i] must hold the row of sorted(test_index)[i].
    perm = np.arange(features.shape[0])
    perm[test_index] = sorted_test
    features = features[perm]
    labels = labels[perm]

    n = features.shape[0]
    labelled = torch.from_numpy(labels.sum(1) > 0)
    rows = [u for u, vs in graph.items() for _ in vs]
    cols = [v for vs in graph.values() for v in vs]
    n_graph = max(n, max(graph.keys()) + 1 if graph else 0)
    if n_graph != n:
        raise ValueError(f"Planetoid {name!r}: graph has {n_graph} nodes but features have {n} rows")
    adj = sp.coo_matrix((np.ones(len(rows), np.float32), (rows, cols)), shape=(n, n))

    num_classes = labels.shape[1]
    y_t = torch.from_numpy(labels.argmax(1).astype(np.int64))
    g = Graph(
        x=torch.from_numpy(features.toarray().astype(np.float32)),
        edge_index=clean_adjacency(adj),
        y=y_t,
        train_mask=torch.zeros(n, dtype=torch.bool),
        val_mask=torch.zeros(n, dtype=torch.bool),
        test_mask=torch.zeros(n, dtype=torch.bool),
        num_classes=num_classes,
        name=name,
        labelled=labelled,
    )
    n_train = y.shape[0]
    val = index_to_mask(np.arange(n_train, n_train + num_val), n) if n_train + num_val <= n else None
    test = index_to_mask(test_index, n)
    if val is None or (val & test).any():
        raise ValueError(
            f"Planetoid {name!r}: the {num_val} validation nodes after the {n_train} training nodes "
            f"run into the test nodes or past the {n} nodes; pass a smaller num_val"
        )
    if split == "public":
        train = index_to_mask(np.arange(n_train), n)
    elif split == "full":
        train = labelled & ~(val | test)
    else:
        train, val, test = random_split(
            y_t, num_classes, 20, seed, num_val=num_val, num_test=test_index.size, labelled=labelled
        )
    return g.with_split(train, val, test)
