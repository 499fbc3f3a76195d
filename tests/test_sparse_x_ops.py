"""The factor ops with a sparse CSR x, and the block-diagonal ops, against the float64 reference."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from ngcuda import ops, reference

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]
DTYPES = [torch.float32, torch.float64]
INDEX_DTYPES = [torch.int32, torch.int64]
TOL = {torch.float32: 1e-5, torch.float64: 1e-10}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().cpu(), b.double().cpu()
    assert torch.isfinite(a).all(), "non-finite output"
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def spd(d: int, gen: torch.Generator, dtype: torch.dtype) -> torch.Tensor:
    m = torch.randn(d, d, generator=gen, dtype=torch.float64)
    s = m @ m.T / max(d, 1) + torch.eye(d, dtype=torch.float64)
    return ((s + s.T) / 2).to(dtype)


def csr_x(n: int, d: int, density: float, gen: torch.Generator, dtype: torch.dtype,
          index_dtype: torch.dtype, messy: bool = False) -> torch.Tensor:
    """A sparse CSR [n, d] like bag-of-words features: small counts, some rows with no entries.

    messy: columns unsorted within rows and some repeated (their values add up).
    """
    mask = torch.rand(n, d, generator=gen) < density
    if n > 1:
        mask[torch.randperm(n, generator=gen)[: max(1, n // 6)]] = False  # rows with no entries
    rows, cols = mask.nonzero(as_tuple=True)
    vals = torch.randint(1, 4, (rows.numel(),), generator=gen).to(dtype)
    vals = vals * (torch.rand(rows.numel(), generator=gen, dtype=torch.float64) + 0.5).to(dtype)
    if messy and rows.numel() > 0:
        dup = torch.rand(rows.numel(), generator=gen) < 0.3
        rows = torch.cat([rows, rows[dup]])
        cols = torch.cat([cols, cols[dup]])
        vals = torch.cat([vals, -0.5 * vals[dup]])
        key = rows * (d + 1) + torch.randint(0, d + 1, (rows.numel(),), generator=gen)
        order = torch.argsort(key)  # rows ascending, columns shuffled within each row
        rows, cols, vals = rows[order], cols[order], vals[order]
    crow = torch.zeros(n + 1, dtype=torch.long)
    crow[1:] = torch.cumsum(torch.bincount(rows, minlength=n), 0)
    return torch.sparse_csr_tensor(crow.to(index_dtype), cols.to(index_dtype), vals, (n, d),
                                   check_invariants=False)


def adjacency(rows: int, cols: int, avg_deg: float, gen: torch.Generator):
    """CSR Â with isolated rows and duplicate edges."""
    deg = torch.poisson(torch.full((rows,), avg_deg), generator=gen).long()
    if rows > 1:
        deg[torch.randperm(rows, generator=gen)[: max(1, rows // 5)]] = 0
    rowptr = torch.zeros(rows + 1, dtype=torch.long)
    rowptr[1:] = torch.cumsum(deg, 0)
    col = torch.randint(0, cols, (int(rowptr[-1]),), generator=gen)
    if col.numel() > 1:
        col[1::3] = col[0:-1:3][: col[1::3].numel()]
    return rowptr, col


def row_weights(kind: str, n: int, gen: torch.Generator, dtype: torch.dtype):
    if kind == "random":
        return torch.rand(n, generator=gen, dtype=dtype)
    if kind == "mask":
        return (torch.rand(n, generator=gen) < 0.3).to(dtype)
    if kind == "empty_mask":
        return torch.zeros(n, dtype=dtype)
    return None


def partition(D: int, kind: str, gen: torch.Generator) -> list[int]:
    """Sizes of contiguous blocks summing to D."""
    if kind == "whole":
        return [D]
    if kind == "ones":
        return [1] * D
    if kind == "larger_than_D":
        return [D]  # one block of size ≥ D, as block:k with k ≥ D gives
    if kind == "random":  # free sizes, empty blocks included
        cuts = sorted(torch.randint(0, D + 1, (3,), generator=gen).tolist())
        return [b - a for a, b in zip([0] + cuts, cuts + [D])]
    size = int(kind)  # fixed size with a short last block
    return [size] * (D // size) + ([D % size] if D % size else [])


def to(t, device):
    return None if t is None else t.to(device)


PARTITIONS = ["whole", "ones", "larger_than_D", "random", "2", "3", "7", "64"]


# ------------------------------------------------------------------ full factors, sparse x

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@given(
    n=st.integers(0, 300),
    d=st.integers(1, 300),
    density=st.sampled_from([0.0, 0.02, 0.1, 0.5]),
    bias=st.booleans(),
    messy=st.booleans(),
    index_dtype=st.sampled_from(INDEX_DTYPES),
    weights=st.sampled_from(["none", "random", "mask", "empty_mask"]),
    decay=st.sampled_from([0.0, 0.5, 0.95, 1.0]),
    seed=st.integers(0, 2**31 - 1),
)
def test_csr_factor_update_matches_reference(device, dtype, n, d, density, bias, messy,
                                             index_dtype, weights, decay, seed):
    gen = torch.Generator().manual_seed(seed)
    x = csr_x(n, d, density, gen, dtype, index_dtype, messy)
    w = row_weights(weights, n, gen, dtype)
    f0 = spd(d + int(bias), gen, dtype)
    expected = reference.factor_update(f0, x, decay, bias, w)
    f = f0.clone().to(device)
    out = ops.factor_update_(f, x.to(device), decay, bias, to(w, device))
    assert out is f
    assert rel_err(f, expected) <= TOL[dtype]
    assert torch.equal(f.cpu(), f.cpu().T), "the factor must be exactly symmetric"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@given(
    rows=st.integers(1, 300),
    nodes=st.integers(1, 300),
    d=st.integers(1, 300),
    density=st.sampled_from([0.0, 0.02, 0.1]),
    bias=st.booleans(),
    valued=st.booleans(),
    messy=st.booleans(),
    index_dtype=st.sampled_from(INDEX_DTYPES),
    weights=st.sampled_from(["none", "random", "mask", "empty_mask"]),
    decay=st.sampled_from([0.0, 0.9]),
    seed=st.integers(0, 2**31 - 1),
)
def test_csr_sparse_factor_update_matches_reference(device, dtype, rows, nodes, d, density, bias,
                                                    valued, messy, index_dtype, weights, decay,
                                                    seed):
    gen = torch.Generator().manual_seed(seed)
    rowptr, col = adjacency(rows, nodes, 3.0, gen)
    value = torch.rand(col.numel(), generator=gen, dtype=dtype) if valued else None
    x = csr_x(nodes, d, density, gen, dtype, index_dtype, messy)
    w = row_weights(weights, rows, gen, dtype)
    f0 = spd(d + int(bias), gen, dtype)
    expected = reference.sparse_factor_update(f0, rowptr, col, value, x, decay, bias, w)
    f = f0.clone().to(device)
    ops.sparse_factor_update_(f, rowptr.to(device), col.to(device), to(value, device),
                              x.to(device), decay, bias, to(w, device))
    assert rel_err(f, expected) <= TOL[dtype]
    assert torch.equal(f.cpu(), f.cpu().T)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_csr_equals_dense(device, dtype):
    """A sparse x gives what its dense form gives, for both ops."""
    gen = torch.Generator().manual_seed(3)
    x = csr_x(120, 70, 0.05, gen, dtype, torch.int64)
    rowptr, col = adjacency(90, 120, 4.0, gen)
    for sparse_op in (False, True):
        a = spd(71, gen, dtype).to(device)
        b = a.clone()
        if sparse_op:
            ops.sparse_factor_update_(a, rowptr.to(device), col.to(device), None, x.to(device),
                                      0.5, True)
            ops.sparse_factor_update_(b, rowptr.to(device), col.to(device), None,
                                      x.to_dense().to(device), 0.5, True)
        else:
            ops.factor_update_(a, x.to(device), 0.5, True)
            ops.factor_update_(b, x.to_dense().to(device), 0.5, True)
        assert rel_err(a, b) <= TOL[dtype]


def test_csr_masked_rows_are_never_read():
    """Rows of weight 0 are skipped: NaN in them cannot reach the factor."""
    gen = torch.Generator().manual_seed(5)
    x = csr_x(40, 12, 0.3, gen, torch.float64, torch.int64)
    w = (torch.arange(40) % 3 == 0).double()
    crow, col, val = x.crow_indices(), x.col_indices(), x.values().clone()
    row = torch.repeat_interleave(torch.arange(40), crow[1:] - crow[:-1])
    val[w[row] == 0] = float("nan")
    poisoned = torch.sparse_csr_tensor(crow, col, val, x.shape)
    f = torch.zeros(13, 13, dtype=torch.float64)
    ops.factor_update_(f, poisoned, 0.0, True, w)
    clean = torch.sparse_csr_tensor(crow, col, torch.where(val.isnan(), 0.0, val), x.shape)
    expected = reference.factor_update(torch.zeros(13, 13, dtype=torch.float64), clean, 0.0, True, w)
    assert rel_err(f, expected) <= 1e-12


# Blocks of at most 512 (as the factor of d = 200 here) take the CPU's walk over x's rows,
# larger ones (d = 700) the walk over its columns.
@pytest.mark.parametrize("d", [200, 700])
@pytest.mark.parametrize("op", ["dense", "aggregated"])
def test_csr_result_does_not_depend_on_thread_count(op, d):
    gen = torch.Generator().manual_seed(11)
    x = csr_x(300, d, 0.05, gen, torch.float32, torch.int64)
    rowptr, col = adjacency(300, 300, 5.0, gen)
    results = []
    threads = torch.get_num_threads()
    try:
        for t in (1, 2, 3):
            torch.set_num_threads(t)
            f = torch.eye(d + 1)
            if op == "dense":
                ops.factor_update_(f, x, 0.5, True)
            else:
                ops.sparse_factor_update_(f, rowptr, col, None, x, 0.5, True)
            results.append(f)
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(results[0], r) for r in results[1:]), "must be bitwise deterministic"


# ------------------------------------------------------------------ block-diagonal factors

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["dense", "csr"])
@given(
    n=st.integers(0, 300),
    d=st.integers(1, 300),
    bias=st.booleans(),
    kind=st.sampled_from(PARTITIONS),
    index_dtype=st.sampled_from(INDEX_DTYPES),
    weights=st.sampled_from(["none", "random", "mask", "empty_mask"]),
    decay=st.sampled_from([0.0, 0.9, 1.0]),
    seed=st.integers(0, 2**31 - 1),
)
def test_block_factor_update_matches_reference(device, dtype, layout, n, d, bias, kind,
                                               index_dtype, weights, decay, seed):
    gen = torch.Generator().manual_seed(seed)
    x = csr_x(n, d, 0.1, gen, dtype, index_dtype, messy=seed % 2 == 0)
    if layout == "dense":
        x = x.to_dense()
    w = row_weights(weights, n, gen, dtype)
    sizes = partition(d + int(bias), kind, gen)
    blocks0 = [spd(s, gen, dtype) for s in sizes]
    expected = reference.block_factor_update(blocks0, x, decay, bias, w)
    blocks = [b.clone().to(device) for b in blocks0]
    out = ops.block_factor_update_(blocks, x.to(device), decay, bias, to(w, device))
    assert all(o is b for o, b in zip(out, blocks))
    for got, exp in zip(blocks, expected):
        if exp.numel():
            assert rel_err(got, exp) <= TOL[dtype]
            assert torch.equal(got.cpu(), got.cpu().T)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["dense", "csr"])
@given(
    rows=st.integers(1, 200),
    nodes=st.integers(1, 200),
    d=st.integers(1, 200),
    bias=st.booleans(),
    valued=st.booleans(),
    kind=st.sampled_from(PARTITIONS),
    index_dtype=st.sampled_from(INDEX_DTYPES),
    weights=st.sampled_from(["none", "random", "mask"]),
    seed=st.integers(0, 2**31 - 1),
)
def test_sparse_block_factor_update_matches_reference(device, dtype, layout, rows, nodes, d, bias,
                                                      valued, kind, index_dtype, weights, seed):
    gen = torch.Generator().manual_seed(seed)
    rowptr, col = adjacency(rows, nodes, 3.0, gen)
    value = torch.rand(col.numel(), generator=gen, dtype=dtype) if valued else None
    x = csr_x(nodes, d, 0.05, gen, dtype, index_dtype, messy=seed % 2 == 0)
    if layout == "dense":
        x = x.to_dense()
    w = row_weights(weights, rows, gen, dtype)
    sizes = partition(d + int(bias), kind, gen)
    blocks0 = [spd(s, gen, dtype) for s in sizes]
    expected = reference.sparse_block_factor_update(blocks0, rowptr, col, value, x, 0.8, bias, w)
    blocks = [b.clone().to(device) for b in blocks0]
    ops.sparse_block_factor_update_(blocks, rowptr.to(device), col.to(device), to(value, device),
                                    x.to(device), 0.8, bias, to(w, device))
    for got, exp in zip(blocks, expected):
        if exp.numel():
            assert rel_err(got, exp) <= TOL[dtype]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", ["dense", "csr"])
def test_blocks_are_the_diagonal_of_the_full_factor(device, layout):
    gen = torch.Generator().manual_seed(2)
    x = csr_x(150, 40, 0.2, gen, torch.float64, torch.int64)
    x = x.to_dense() if layout == "dense" else x
    full = torch.zeros(41, 41, dtype=torch.float64, device=device)
    ops.factor_update_(full, x.to(device), 0.0, True)
    sizes = [16, 16, 9]
    blocks = [torch.zeros(s, s, dtype=torch.float64, device=device) for s in sizes]
    ops.block_factor_update_(blocks, x.to(device), 0.0, True)
    start = 0
    for b, s in zip(blocks, sizes):
        assert rel_err(b, full[start:start + s, start:start + s]) <= 1e-12
        start += s
    assert blocks[-1][-1, -1].item() == pytest.approx(1.0), "the bias corner is Σw/Σw"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("op", ["dense", "aggregated"])
def test_row_walk_and_column_walk_give_the_same_bits(dtype, op):
    # The full 1101² factor takes the CPU's column walk, its two diagonal blocks (≤ 512) the row
    # walk: each entry is the same sum in the same order, so the blocks equal the full factor's.
    gen = torch.Generator().manual_seed(5)
    x = csr_x(250, 1100, 0.01, gen, dtype, torch.int64)
    rowptr, col = adjacency(120, 250, 4.0, gen)
    sizes = [512, 512, 77]
    full0 = spd(1101, gen, dtype)
    blocks0 = [full0[a:a + s, a:a + s].clone() for a, s in zip((0, 512, 1024), sizes)]
    full, blocks = full0.clone(), [b.clone() for b in blocks0]
    if op == "dense":
        ops.factor_update_(full, x, 0.7, True)
        ops.block_factor_update_(blocks, x, 0.7, True)
        expected = reference.factor_update(full0, x, 0.7, True)
    else:
        ops.sparse_factor_update_(full, rowptr, col, None, x, 0.7, True)
        ops.sparse_block_factor_update_(blocks, rowptr, col, None, x, 0.7, True)
        expected = reference.sparse_factor_update(full0, rowptr, col, None, x, 0.7, True)
    assert rel_err(full, expected) <= TOL[dtype]
    for b, a, s in zip(blocks, (0, 512, 1024), sizes):
        assert torch.equal(b, full[a:a + s, a:a + s])


def test_block_with_only_the_bias_column():
    x = torch.randn(10, 3, dtype=torch.float64)
    blocks = [torch.zeros(3, 3, dtype=torch.float64), torch.full((1, 1), 5.0, dtype=torch.float64)]
    ops.block_factor_update_(blocks, x.to_sparse_csr(), 0.5, True)
    assert blocks[1].item() == pytest.approx(0.5 * 5.0 + 0.5)
    assert rel_err(blocks[0], 0.5 * x.T @ x / 10) <= 1e-12


# ------------------------------------------------------------------ bad input

def _unchanged_after_error(call, tensors, match, error=RuntimeError):
    before = [t.clone() for t in tensors]
    with pytest.raises(error, match=match):
        call()
    assert all(torch.equal(t, b) for t, b in zip(tensors, before)), "nothing may be modified"


def _raw_csr(crow, col, val, shape):
    return torch.sparse_csr_tensor(torch.tensor(crow), torch.tensor(col),
                                   torch.tensor(val, dtype=torch.float32), shape,
                                   check_invariants=False)


@pytest.mark.parametrize(
    "x, match",
    [
        (_raw_csr([0, 2, 1, 3], [0, 1, 2], [1.0, 1.0, 1.0], (3, 2)),
         r"x.crow_indices\(\) must be non-decreasing"),
        (_raw_csr([0, 1, 2, 3], [0, 1, 2], [1.0, 1.0, 1.0], (3, 2)),
         r"x.col_indices\(\) holds 2 in row 2, outside the 2 columns of x"),
        (_raw_csr([0, 1, 2, 3], [0, -1, 1], [1.0, 1.0, 1.0], (3, 2)), "outside the 2 columns"),
        (_raw_csr([1, 1, 2, 3], [0, 1, 1], [1.0, 1.0, 1.0], (3, 2)),
         r"x.crow_indices\(\) must start at 0"),
        (_raw_csr([0, 1, 2, 2], [0, 1, 1], [1.0, 1.0, 1.0], (3, 2)),
         r"x.crow_indices\(\) must end at nnz = 3"),
        (torch.sparse_csr_tensor(torch.tensor([0, 1, 1, 1]), torch.tensor([0]),
                                 torch.tensor([1], dtype=torch.int32), (3, 2)),
         "x must be float32 or float64"),
        (_raw_csr([0, 1, 2, 3], [0, 1, 1], [1.0, 1.0], (3, 2)), "3 column indices but 2 values"),
        (torch.sparse_csr_tensor(torch.tensor([0, 1, 2, 3], dtype=torch.int32), torch.tensor([0, 1, 1]),
                                 torch.ones(3), (3, 2), check_invariants=False),
         r"x.crow_indices\(\) is Int but x.col_indices\(\) is Long"),
        (torch.eye(3, 2).to_sparse_csc(), "x must be a strided"),
        (torch.eye(3, 2)[:, :, None].to_sparse_csr(dense_dim=1), "must be 2-D"),
    ],
)
@pytest.mark.parametrize("op", ["factor", "block", "sparse", "sparse_block"])
def test_bad_csr_x(x, match, op):
    factor = torch.eye(3)
    blocks = [torch.eye(2), torch.eye(1)]
    rowptr, col = torch.tensor([0, 1, 3]), torch.tensor([0, 2, 1])
    raw = torch.ops.ngcuda
    calls = {
        "factor": (lambda: raw.factor_update_(factor, x, 0.5, True, None), [factor]),
        "block": (lambda: raw.block_factor_update_(blocks, x, 0.5, True, None), blocks),
        "sparse": (lambda: raw.sparse_factor_update_(factor, rowptr, col, None, x, 0.5, True, None),
                   [factor]),
        "sparse_block": (lambda: raw.sparse_block_factor_update_(blocks, rowptr, col, None, x, 0.5,
                                                                 True, None), blocks),
    }
    call, outputs = calls[op]
    _unchanged_after_error(call, outputs, match)


def test_coo_x_is_refused_by_the_front():
    x = torch.eye(3, 2).to_sparse()
    f = torch.eye(3)
    _unchanged_after_error(lambda: ops.factor_update_(f, x, 0.5, True), [f],
                           "must be a dense .* or sparse CSR", error=ValueError)


@pytest.mark.parametrize("layout", ["dense", "csr"])
@pytest.mark.parametrize(
    "sizes, match",
    [
        ([2, 1, 1], r"block sizes must sum to D = 3"),
        ([2], r"block sizes must sum to D = 3"),
        ([[2, 3], 1], r"blocks\[0\] must be square 2-D"),
        ([2, "f64"], r"blocks\[1\] is Double but blocks\[0\] is Float"),
        ([2, "int"], r"blocks\[1\] must be float32 or float64"),
        ([1, "strided"], r"blocks\[1\] must be contiguous"),
    ],
)
def test_bad_blocks(layout, sizes, match):
    blocks = []
    for s in sizes:
        if isinstance(s, list):
            blocks.append(torch.zeros(*s))
        elif s == "f64":
            blocks.append(torch.eye(1, dtype=torch.float64))
        elif s == "int":
            blocks.append(torch.zeros(1, 1, dtype=torch.int32))
        elif s == "strided":
            blocks.append(torch.zeros(2, 4)[:, :2])
        else:
            blocks.append(torch.eye(s))
    x = torch.randn(5, 2)
    x = x.to_sparse_csr() if layout == "csr" else x
    rowptr, col = torch.tensor([0, 1, 3]), torch.tensor([0, 2, 1])
    _unchanged_after_error(lambda: ops.block_factor_update_(blocks, x, 0.5, True), blocks, match)
    _unchanged_after_error(
        lambda: ops.sparse_block_factor_update_(blocks, rowptr, col, None, x, 0.5, True), blocks,
        match)


@pytest.mark.parametrize("layout", ["dense", "csr"])
def test_bad_block_arguments_leave_blocks_untouched(layout):
    x = torch.randn(5, 2)
    x = x.to_sparse_csr() if layout == "csr" else x
    blocks = [torch.eye(2), torch.eye(1)]
    _unchanged_after_error(lambda: ops.block_factor_update_(blocks, x, 1.5, True), blocks,
                           r"decay must lie in \[0, 1\]")
    _unchanged_after_error(lambda: ops.block_factor_update_(blocks, x, 0.5, True, -torch.ones(5)),
                           blocks, "row_weight must be non-negative")
    _unchanged_after_error(lambda: ops.block_factor_update_(blocks, x, 0.5, True, torch.ones(4)),
                           blocks, "row_weight must have 5 entries")
    rowptr, col = torch.tensor([0, 1, 3]), torch.tensor([0, 9, 1])
    _unchanged_after_error(
        lambda: ops.sparse_block_factor_update_(blocks, rowptr, col, None, x, 0.5, True), blocks,
        "outside the 5 rows of x")


# ------------------------------------------------------------------ tracing

def test_meta_kernels_take_sparse_csr_and_blocks():
    m = lambda *s: torch.empty(*s, device="meta")  # noqa: E731
    x = torch.sparse_csr_tensor(torch.zeros(11, dtype=torch.long, device="meta"),
                                torch.zeros(0, dtype=torch.long, device="meta"),
                                torch.zeros(0, device="meta"), (10, 3))
    torch.ops.ngcuda.factor_update_(m(4, 4), x, 0.5, True, None)
    torch.ops.ngcuda.block_factor_update_([m(3, 3), m(1, 1)], x, 0.5, True, None)
    torch.ops.ngcuda.block_factor_update_([m(3, 3), m(1, 1)], m(10, 3), 0.5, True, None)
    rowptr, col = m(5).long(), m(7).long()
    torch.ops.ngcuda.sparse_block_factor_update_([m(2, 2), m(2, 2)], rowptr, col, None, x, 0.5,
                                                 True, None)
    with pytest.raises(RuntimeError, match="block sizes must sum to D = 4"):
        torch.ops.ngcuda.block_factor_update_([m(3, 3)], x, 0.5, True, None)


def test_torch_compile_fullgraph_traces_block_ops():
    # torch.compile takes no sparse tensors at all (torch 2.14: "Attempted to wrap sparse
    # Tensor"), so the compiled form is the dense-x one.
    def step(b0, b1, x, rowptr, col):
        ops.block_factor_update_([b0, b1], x, 0.9, True)
        ops.sparse_block_factor_update_([b0, b1], rowptr, col, None, x, 0.9, True)
        return b0.sum() + b1.sum()

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    torch.manual_seed(0)
    x = torch.randn(8, 3)
    rowptr, col = torch.tensor([0, 2, 3, 3, 5, 6, 6, 7, 8]), torch.tensor([0, 1, 2, 3, 4, 5, 6, 7])
    eager = [torch.eye(2), torch.eye(2)]
    comp = [torch.eye(2), torch.eye(2)]
    expected = step(*eager, x, rowptr, col)
    got = compiled(*comp, x, rowptr, col)
    assert torch.allclose(got, expected, atol=1e-6)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(comp, eager)), \
        "the in-place update must survive compilation"


def test_opcheck_block_ops():
    from torch.library import opcheck

    x = torch.randn(6, 3)
    opcheck(torch.ops.ngcuda.block_factor_update_.default,
            ([torch.eye(3), torch.eye(1)], x, 0.5, True, None))
    opcheck(torch.ops.ngcuda.block_factor_update_.default,
            ([torch.eye(2), torch.eye(2)], x, 0.5, True, torch.rand(6)))
    rowptr, col = torch.tensor([0, 2, 3, 3]), torch.tensor([0, 2, 1])
    opcheck(torch.ops.ngcuda.sparse_block_factor_update_.default,
            ([torch.eye(2), torch.eye(2)], rowptr, col, None, torch.randn(3, 3), 0.5, True, None))
