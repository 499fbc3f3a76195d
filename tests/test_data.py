"""Data loaders: shipped data (counts from shared/data/README.md), tiny files written here, and bad input."""
from __future__ import annotations

import gzip
import os
import pickle
import shutil
import struct
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from ngcuda.data import (
    Graph,
    load_graph,
    load_mnist,
    load_npz,
    load_planetoid,
    random_split,
    read_idx,
    restricted_load,
)
from ngcuda.data.graph import FILES

SHARED = Path("/work/shared/data")


def check_graph_invariants(g: Graph) -> None:
    n = g.num_nodes
    ei = g.edge_index
    assert ei.dtype == torch.int64 and ei.shape[0] == 2
    assert (ei[0] != ei[1]).all(), "self-loop left"
    keys = ei[0] * n + ei[1]
    assert keys.unique().numel() == keys.numel(), "duplicate edge"
    rev = ei[1] * n + ei[0]
    assert torch.equal(keys.sort().values, rev.sort().values), "not symmetric"
    assert g.x.dtype == torch.float32 and g.x.shape[0] == n
    assert g.y.dtype == torch.int64 and g.y.shape == (n,)
    for m in (g.train_mask, g.val_mask, g.test_mask):
        assert m.dtype == torch.bool and m.shape == (n,)
    assert not (g.train_mask & g.val_mask).any()
    assert not (g.train_mask & g.test_mask).any()
    assert not (g.val_mask & g.test_mask).any()
    masked = g.train_mask | g.val_mask | g.test_mask
    assert g.labelled[masked].all(), "an unlabelled node is in a mask"


# ---------------------------------------------------------------- Planetoid, shipped files

@pytest.mark.parametrize(
    "name,nodes,feats,classes,edges,train,unlabelled,isolated,nnz",
    [("cora", 2708, 1433, 7, 10556, 140, 0, 0, 49216), ("citeseer", 3327, 3703, 6, 9104, 120, 15, 48, 105165)],
)
def test_planetoid_shipped_counts(name, nodes, feats, classes, edges, train, unlabelled, isolated, nnz):
    g = load_planetoid(name)
    check_graph_invariants(g)
    assert (g.num_nodes, g.num_features, g.num_classes, g.num_edges) == (nodes, feats, classes, edges)
    assert (int(g.train_mask.sum()), int(g.val_mask.sum()), int(g.test_mask.sum())) == (train, 500, 1000)
    assert torch.bincount(g.y[g.train_mask], minlength=classes).tolist() == [20] * classes
    assert torch.equal(g.train_mask.nonzero().flatten(), torch.arange(train))
    assert torch.equal(g.val_mask.nonzero().flatten(), torch.arange(train, train + 500))
    assert int((~g.labelled).sum()) == unlabelled
    assert int((g.y[~g.labelled] != 0).sum()) == 0
    deg = torch.bincount(g.edge_index[0], minlength=nodes)
    assert int((deg == 0).sum()) == isolated
    assert int((g.x != 0).sum()) == nnz and set(g.x.unique().tolist()) == {0.0, 1.0}


@pytest.mark.parametrize("name", ["cora", "citeseer"])
def test_planetoid_matches_pyg_reader(name):
    pyg_io = pytest.importorskip("torch_geometric.io")
    from torch_geometric.utils import coalesce

    ref = pyg_io.read_planetoid_data(str(FILES / "planetoid"), name)
    g = load_planetoid(name)
    assert torch.equal(ref.x, g.x)
    assert torch.equal(ref.y, g.y)
    assert torch.equal(coalesce(ref.edge_index, num_nodes=g.num_nodes), g.edge_index)
    for split in ("train", "val", "test"):
        assert torch.equal(getattr(ref, f"{split}_mask"), getattr(g, f"{split}_mask"))


@pytest.mark.parametrize("name,full_train", [("cora", 1208), ("citeseer", 3327 - 1500 - 15)])
def test_planetoid_full_and_random_splits(name, full_train):
    pub = load_planetoid(name)
    full = load_planetoid(name, split="full")
    check_graph_invariants(full)
    assert int(full.train_mask.sum()) == full_train
    assert torch.equal(full.val_mask, pub.val_mask) and torch.equal(full.test_mask, pub.test_mask)
    assert (full.train_mask | full.val_mask | full.test_mask | ~full.labelled).all()

    r1 = load_planetoid(name, split="random", seed=1)
    r1b = load_planetoid(name, split="random", seed=1)
    r2 = load_planetoid(name, split="random", seed=2)
    check_graph_invariants(r1)
    assert torch.bincount(r1.y[r1.train_mask], minlength=r1.num_classes).tolist() == [20] * r1.num_classes
    assert (int(r1.val_mask.sum()), int(r1.test_mask.sum())) == (500, 1000)
    assert torch.equal(r1.train_mask, r1b.train_mask) and torch.equal(r1.test_mask, r1b.test_mask)
    assert not torch.equal(r1.train_mask, r2.train_mask)


def test_bad_split_and_unknown_dataset():
    with pytest.raises(ValueError, match="split"):
        load_planetoid("cora", split="complete")
    with pytest.raises(ValueError, match="unknown dataset"):
        load_graph("reddit")
    with pytest.raises(ValueError, match="only 'random'"):
        load_graph("amazon-photo", root="/nonexistent", split="public")


def test_graph_to_pyg_and_dense():
    g = load_planetoid("cora")
    d = g.to_pyg()
    assert d.num_nodes == 2708 and d.num_edges == 10556 and torch.equal(d.x, g.x)
    assert g.dense_features() is g.x


# ---------------------------------------------------------------- Planetoid, tiny files written here

def write_planetoid(folder: Path, name: str, skip: frozenset[str] = frozenset()) -> dict:
    """A 9-node Planetoid set, pickled with protocol 2 as the originals: x/y = nodes 0,1; allx/ally = 0..4;
    test ids 8, 5, 7 (unsorted, id 6 skipped as in CiteSeer); 2 classes, 3 features.
    The graph has a self-loop, a duplicate and a one-way edge."""
    folder.mkdir(parents=True, exist_ok=True)
    allx = np.array([[1, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 0], [0, 1, 1]], np.float32)
    ally = np.array([[1, 0], [0, 1], [1, 0], [0, 1], [1, 0]], np.int32)
    tx = np.array([[2, 0, 0], [0, 3, 0], [0, 0, 4]], np.float32)  # rows of sorted test ids 5, 7, 8
    ty = np.array([[0, 1], [1, 0], [0, 1]], np.int32)
    graph = defaultdict(list, {0: [1, 1, 0], 1: [0], 2: [3], 3: [], 4: [8], 5: [7], 6: [], 7: [], 8: []})
    objs = {
        "x": sp.csr_matrix(allx[:2]), "tx": sp.csr_matrix(tx), "allx": sp.csr_matrix(allx),
        "y": ally[:2], "ty": ty, "ally": ally, "graph": graph,
    }
    for k, v in objs.items():
        if k not in skip:
            with open(folder / f"ind.{name}.{k}", "wb") as f:
                pickle.dump(v, f, protocol=2)
    if "test.index" not in skip:
        (folder / f"ind.{name}.test.index").write_text("8\n5\n7\n")
    return {"allx": allx, "ally": ally, "tx": tx, "ty": ty}


def test_planetoid_tiny_semantics(tmp_path):
    d = write_planetoid(tmp_path, "tiny")
    with pytest.raises(ValueError, match="num_val"):
        load_planetoid("tiny", root=tmp_path)  # the default 500 validation nodes do not fit
    g = load_planetoid("tiny", root=tmp_path, num_val=2)
    check_graph_invariants(g)
    assert g.num_nodes == 9 and g.num_classes == 2
    # Sorted test ids 5, 7, 8 hold tx rows 0, 1, 2; then row test_index[i] takes the row of sorted[i]:
    # test_index = [8, 5, 7], sorted = [5, 7, 8] -> new[8] = old[5], new[5] = old[7], new[7] = old[8].
    expect_x = np.zeros((9, 3), np.float32)
    expect_x[:5] = d["allx"]
    expect_x[8], expect_x[5], expect_x[7] = d["tx"][0], d["tx"][1], d["tx"][2]
    assert torch.equal(g.x, torch.from_numpy(expect_x))
    expect_y = [0, 1, 0, 1, 0, 0, 0, 1, 1]  # node 6: no label -> 0, unlabelled
    expect_y[8], expect_y[5], expect_y[7] = 1, 0, 1
    assert g.y.tolist() == expect_y
    assert g.labelled.tolist() == [True] * 6 + [False] + [True] * 2
    edges = sorted(map(tuple, g.edge_index.t().tolist()))
    assert edges == [(0, 1), (1, 0), (2, 3), (3, 2), (4, 8), (5, 7), (7, 5), (8, 4)]
    assert g.train_mask.tolist() == [True, True] + [False] * 7
    assert g.val_mask.nonzero().flatten().tolist() == [2, 3]
    assert g.test_mask.nonzero().flatten().tolist() == [5, 7, 8]
    full = load_planetoid("tiny", root=tmp_path, split="full", num_val=2)
    assert full.train_mask.nonzero().flatten().tolist() == [0, 1, 4]  # not 6: it has no label
    rnd = load_planetoid("tiny", root=tmp_path, split="random", num_val=2)
    assert not rnd.train_mask[6] and not rnd.val_mask[6] and not rnd.test_mask[6]


def test_planetoid_tiny_loads_from_root_subfolder(tmp_path):
    write_planetoid(tmp_path / "planetoid", "tiny")
    assert load_planetoid("tiny", root=tmp_path, num_val=2).num_nodes == 9


class _Evil:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_restricted_unpickler_rejects_code(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pkl"
    path.write_bytes(pickle.dumps(_Evil(marker), protocol=2))
    with pytest.raises(pickle.UnpicklingError, match=r"system"):
        restricted_load(path)
    assert not marker.exists()
    path.write_bytes(pickle.dumps(eval, protocol=2))
    with pytest.raises(pickle.UnpicklingError, match=r"__builtin__\.eval"):
        restricted_load(path)
    # _codecs.encode is allowed only as protocol 2's way of writing bytes (latin1)
    def binunicode(t: str) -> bytes:
        return b"X" + struct.pack("<I", len(t)) + t.encode()

    path.write_bytes(b"\x80\x02c_codecs\nencode\n" + binunicode("abc") + binunicode("rot13") + b"\x86R.")
    with pytest.raises(pickle.UnpicklingError, match="rot13"):
        restricted_load(path)
    path.write_bytes(b"\x80\x02c_codecs\nencode\n" + binunicode("abc") + binunicode("latin1") + b"\x86R.")
    assert restricted_load(path) == b"abc"


def test_restricted_unpickler_rejects_code_inside_a_dataset(tmp_path):
    write_planetoid(tmp_path, "tiny")
    marker = tmp_path / "pwned"
    (tmp_path / "ind.tiny.graph").write_bytes(pickle.dumps(_Evil(marker), protocol=2))
    with pytest.raises(ValueError, match=r"ind\.tiny\.graph: not a readable Planetoid pickle.*refusing"):
        load_planetoid("tiny", root=tmp_path)
    assert not marker.exists()


def test_restricted_unpickler_refuses_state_on_a_class(tmp_path):
    # GLOBAL csr_matrix, then BUILD with slot state {"toarray": list}: with the C unpickler this would
    # set csr_matrix.toarray = list for the whole process.
    before = dict(vars(sp.csr_matrix))
    path = tmp_path / "patch.pkl"
    path.write_bytes(b"\x80\x02cscipy.sparse._csr\ncsr_matrix\nN}X\x07\x00\x00\x00toarray"
                     b"c__builtin__\nlist\ns\x86b.")
    with pytest.raises(pickle.UnpicklingError, match="BUILD on a class"):
        restricted_load(path)
    assert dict(vars(sp.csr_matrix)) == before
    assert sp.csr_matrix(np.eye(2)).toarray().tolist() == [[1, 0], [0, 1]]


@pytest.mark.parametrize("damage", ["truncated", "empty", "text"])
def test_planetoid_damaged_files_name_the_file(tmp_path, damage):
    write_planetoid(tmp_path, "tiny")
    path = tmp_path / "ind.tiny.allx"
    data = path.read_bytes()
    path.write_bytes({"truncated": data[: len(data) // 2], "empty": b"", "text": b"<html>404</html>"}[damage])
    with pytest.raises(ValueError, match=r"ind\.tiny\.allx: not a readable Planetoid pickle"):
        load_planetoid("tiny", root=tmp_path, num_val=2)


def test_planetoid_bad_test_index(tmp_path):
    write_planetoid(tmp_path, "tiny")
    (tmp_path / "ind.tiny.test.index").write_text("8\nfive\n7\n")
    with pytest.raises(ValueError, match=r"ind\.tiny\.test\.index: expected one node id per line"):
        load_planetoid("tiny", root=tmp_path, num_val=2)
    (tmp_path / "ind.tiny.test.index").write_text("")
    with pytest.raises(ValueError, match="no test node ids"):
        load_planetoid("tiny", root=tmp_path, num_val=2)


def test_restricted_unpickler_reads_allowed_types(tmp_path):
    obj = [np.arange(5, dtype=np.float32), sp.csr_matrix(np.eye(3)), defaultdict(list, {1: [2]})]
    path = tmp_path / "ok.pkl"
    path.write_bytes(pickle.dumps(obj, protocol=2))
    a, m, d = restricted_load(path)
    assert np.array_equal(a, obj[0]) and (m != obj[1]).nnz == 0 and d == {1: [2]}


def test_planetoid_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"ind\.cora\.x.*--data-root"):
        load_planetoid("cora", root=tmp_path)
    with pytest.raises(FileNotFoundError, match="--data-root"):
        load_planetoid("pubmed")
    write_planetoid(tmp_path, "pubmed", skip=frozenset({"allx"}))
    with pytest.raises(FileNotFoundError, match=r"ind\.pubmed\.allx.*not shipped"):
        load_planetoid("pubmed", root=tmp_path)


def test_planetoid_sha256_mismatch(tmp_path):
    for f in (FILES / "planetoid").glob("ind.cora.*"):
        shutil.copy(f, tmp_path / f.name)
    assert load_planetoid("cora", root=tmp_path).num_nodes == 2708
    with open(tmp_path / "ind.cora.y", "ab") as f:
        f.write(b"\0")
    with pytest.raises(ValueError, match=r"ind\.cora\.y: sha256"):
        load_planetoid("cora", root=tmp_path)


@pytest.mark.skipif(not (SHARED / "planetoid" / "pubmed_partial").is_dir(), reason="needs shared/data")
def test_pubmed_partial_names_missing_allx():
    with pytest.raises(FileNotFoundError, match=r"ind\.pubmed\.allx"):
        load_planetoid("pubmed", root=SHARED / "planetoid" / "pubmed_partial")


# ---------------------------------------------------------------- random_split

def test_random_split_reference():
    y = torch.tensor([0] * 30 + [1] * 5 + [2] * 40)
    tr, va, te = random_split(y, 3, 10, seed=0, val_per_class=3)
    assert torch.bincount(y[tr], minlength=3).tolist() == [10, 5, 10]  # class 1 has only 5 nodes
    assert torch.bincount(y[va], minlength=3).tolist() == [3, 0, 3]
    assert int(te.sum()) == 75 - 20 - 6 - 5 + 0 + 0 + 1 - 1  # every node left over
    assert not (tr & va).any() and not (tr & te).any() and not (va & te).any()
    assert (tr | va | te).all()
    tr2, va2, te2 = random_split(y, 3, 2, seed=5, num_val=7, num_test=11)
    assert (int(tr2.sum()), int(va2.sum()), int(te2.sum())) == (6, 7, 11)


@pytest.mark.cuda
def test_random_split_of_labels_on_the_gpu_is_the_cpu_split():
    y = torch.randint(0, 4, (200,), generator=torch.Generator().manual_seed(1))
    labelled = torch.rand(200, generator=torch.Generator().manual_seed(2)) < 0.8
    cpu = random_split(y, 4, 5, seed=3, val_per_class=4, labelled=labelled)
    gpu = random_split(y.cuda(), 4, 5, seed=3, val_per_class=4, labelled=labelled.cuda())
    for a, b in zip(cpu, gpu):
        assert b.device.type == "cuda" and torch.equal(a, b.cpu())


# ---------------------------------------------------------------- npz

def write_npz(path: Path, adj: np.ndarray, attr: np.ndarray, labels: np.ndarray) -> None:
    a, x = sp.csr_matrix(adj), sp.csr_matrix(attr)
    np.savez(
        path,
        adj_data=a.data, adj_indices=a.indices, adj_indptr=a.indptr, adj_shape=np.array(a.shape),
        attr_data=x.data, attr_indices=x.indices, attr_indptr=x.indptr, attr_shape=np.array(x.shape),
        labels=labels,
    )


def tiny_npz_arrays():
    rng = np.random.default_rng(0)
    n = 40
    adj = (rng.random((n, n)) < 0.1).astype(np.float32) * 3.0  # weighted, asymmetric
    adj[0, 0] = 1.0  # a self-loop
    attr = (rng.random((n, 7)) < 0.3) * rng.integers(1, 4, (n, 7))
    labels = np.repeat(np.arange(2), n // 2).astype(np.int32)
    return adj, attr.astype(np.float32), labels


def test_npz_tiny(tmp_path):
    adj, attr, labels = tiny_npz_arrays()
    write_npz(tmp_path / "tiny.npz", adj, attr, labels)
    g = load_npz("tiny.npz", root=tmp_path, seed=3, train_per_class=4, val_per_class=5)
    check_graph_invariants(g)
    sym = ((adj + adj.T) != 0).astype(np.int64)
    np.fill_diagonal(sym, 0)
    expect = sorted(zip(*np.nonzero(sym)))
    assert sorted(map(tuple, g.edge_index.t().tolist())) == [tuple(map(int, e)) for e in expect]
    assert torch.equal(g.x, torch.from_numpy(attr))
    assert g.num_classes == 2 and g.y.tolist() == labels.tolist()
    assert torch.bincount(g.y[g.train_mask]).tolist() == [4, 4]
    assert torch.bincount(g.y[g.val_mask]).tolist() == [5, 5]
    assert int(g.test_mask.sum()) == 40 - 18
    s = load_npz("tiny.npz", root=tmp_path, seed=3, train_per_class=4, val_per_class=5, sparse=True)
    assert s.x.layout == torch.sparse_csr and torch.equal(s.dense_features(), g.x)
    assert torch.equal(s.train_mask, g.train_mask)


def test_npz_rejects_pickles_and_bad_layout(tmp_path):
    adj, attr, labels = tiny_npz_arrays()
    a = sp.csr_matrix(adj)
    np.savez(tmp_path / "obj.npz", adj_data=np.array([a], dtype=object), labels=labels)
    with pytest.raises(ValueError):
        load_npz("obj.npz", root=tmp_path)
    np.savez(tmp_path / "half.npz", labels=labels)
    with pytest.raises(ValueError, match="adj_data"):
        load_npz("half.npz", root=tmp_path)
    with pytest.raises(ValueError, match="unknown npz dataset"):
        load_npz("cora", root=tmp_path)


@pytest.mark.parametrize("damage", ["truncated", "empty", "npy", "text"])
def test_npz_damaged_files_name_the_file(tmp_path, damage):
    adj, attr, labels = tiny_npz_arrays()
    path = tmp_path / "tiny.npz"
    write_npz(path, adj, attr, labels)
    data = path.read_bytes()
    if damage == "npy":
        with open(path, "wb") as f:
            np.save(f, labels)
    else:
        path.write_bytes({"truncated": data[: len(data) // 2], "empty": b"", "text": b"version https://git-lfs"}[damage])
    with pytest.raises(ValueError, match=r"tiny\.npz: (not a readable \.npz|a damaged \.npz|holds a single)"):
        load_npz("tiny.npz", root=tmp_path)


def test_npz_inconsistent_csr_names_the_file(tmp_path):
    adj, attr, labels = tiny_npz_arrays()
    a, x = sp.csr_matrix(adj), sp.csr_matrix(attr)
    np.savez(tmp_path / "bad.npz", adj_data=a.data, adj_indices=a.indices, adj_indptr=a.indptr[:-5],
             adj_shape=np.array(a.shape), attr_data=x.data, attr_indices=x.indices, attr_indptr=x.indptr,
             attr_shape=np.array(x.shape), labels=labels)
    with pytest.raises(ValueError, match=r"bad\.npz: adj_\* do not form a CSR matrix"):
        load_npz("bad.npz", root=tmp_path)


def test_npz_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"amazon_electronics_photo\.npz.*--data-root"):
        load_npz("amazon-photo", root=tmp_path)
    with pytest.raises(FileNotFoundError, match="--data-root"):
        load_npz("coauthor-cs")


@pytest.mark.skipif(not (SHARED / "npz").is_dir(), reason="needs shared/data/npz")
@pytest.mark.parametrize(
    "name,nodes,feats,classes,edges,sparse",
    [
        ("amazon-computers", 13752, 767, 10, 491722, False),
        ("amazon-photo", 7650, 745, 8, 238162, False),
        ("coauthor-cs", 18333, 6805, 15, 163788, True),
        ("coauthor-physics", 34493, 8415, 5, 495924, True),
    ],
)
def test_npz_shared_counts(name, nodes, feats, classes, edges, sparse):
    g = load_graph(name, root=SHARED)  # found in root/npz/
    check_graph_invariants(g)
    assert (g.num_nodes, g.num_features, g.num_classes, g.num_edges) == (nodes, feats, classes, edges)
    assert (g.x.layout == torch.sparse_csr) == sparse
    assert int(g.train_mask.sum()) == 20 * classes and int(g.val_mask.sum()) == 30 * classes
    assert int(g.test_mask.sum()) == nodes - 50 * classes


# ---------------------------------------------------------------- MNIST

def write_idx(path: Path, arr: np.ndarray, compress: bool) -> None:
    header = struct.pack(">BBBB", 0, 0, 0x08, arr.ndim) + struct.pack(f">{arr.ndim}I", *arr.shape)
    data = header + arr.astype(np.uint8).tobytes()
    if compress:
        with gzip.open(path, "wb") as f:
            f.write(data)
    else:
        path.write_bytes(data)


@pytest.mark.parametrize("compress", [True, False])
def test_mnist_tiny(tmp_path, compress):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (5, 28, 28), dtype=np.uint8)
    labels = np.array([3, 1, 4, 1, 5], np.uint8)
    suffix = ".gz" if compress else ""
    write_idx(tmp_path / f"t10k-images-idx3-ubyte{suffix}", images, compress)
    write_idx(tmp_path / f"t10k-labels-idx1-ubyte{suffix}", labels, compress)
    x, y = load_mnist(tmp_path, train=False)
    assert x.shape == (5, 784) and x.dtype == torch.float32
    assert torch.equal(x, torch.from_numpy(images.reshape(5, 784).astype(np.float32) / 255))
    assert y.tolist() == [3, 1, 4, 1, 5] and y.dtype == torch.int64
    with pytest.raises(FileNotFoundError, match=r"train-images-idx3-ubyte\.gz.*--data-root"):
        load_mnist(tmp_path, train=True)


def test_idx_bad_files(tmp_path):
    p = tmp_path / "bad"
    p.write_bytes(b"\x01\x02\x08\x01" + b"\0" * 8)
    with pytest.raises(ValueError, match="magic"):
        read_idx(p)
    p.write_bytes(struct.pack(">BBBBI", 0, 0, 8, 1, 10) + b"\0" * 9)
    with pytest.raises(ValueError, match="holds 9"):
        read_idx(p)


@pytest.mark.parametrize("damage", ["truncated", "not-gzip", "empty"])
def test_idx_damaged_gz_names_the_file(tmp_path, damage):
    p = tmp_path / "t10k-labels-idx1-ubyte.gz"
    write_idx(p, np.arange(200, dtype=np.uint8), compress=True)
    data = p.read_bytes()
    p.write_bytes({"truncated": data[: len(data) // 2], "not-gzip": b"<html>404</html>", "empty": b""}[damage])
    with pytest.raises(ValueError, match=r"t10k-labels-idx1-ubyte\.gz: (cannot be read as gzipped IDX|not an IDX)"):
        read_idx(p)


def test_mnist_shipped():
    x_tr, y_tr = load_mnist()
    x_te, y_te = load_mnist(train=False)
    assert x_tr.shape == (8000, 784) and x_te.shape == (2000, 784)
    assert float(x_tr.min()) == 0.0 and float(x_tr.max()) == 1.0
    counts = torch.bincount(torch.cat([y_tr, y_te]), minlength=10).tolist()
    assert counts == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
