"""factor_update_ and sparse_factor_update_ against the float64 reference, on every device."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from ngcuda import ops, reference

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]
DTYPES = [torch.float32, torch.float64]
TOL = {torch.float32: 1e-5, torch.float64: 1e-10}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().cpu(), b.double().cpu()
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def spd(d: int, gen: torch.Generator, dtype: torch.dtype) -> torch.Tensor:
    m = torch.randn(d, d, generator=gen, dtype=torch.float64)
    s = m @ m.T / d + torch.eye(d, dtype=torch.float64)
    return ((s + s.T) / 2).to(dtype)


def random_csr(rows: int, cols: int, avg_deg: float, gen: torch.Generator, duplicates: bool = True,
               empty_rows: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """CSR with isolated (empty) rows and repeated columns within a row."""
    deg = torch.poisson(torch.full((rows,), avg_deg), generator=gen).long()
    if empty_rows and rows > 1:
        deg[torch.randperm(rows, generator=gen)[: max(1, rows // 5)]] = 0
    if cols == 0:
        deg.zero_()
    rowptr = torch.zeros(rows + 1, dtype=torch.long)
    rowptr[1:] = torch.cumsum(deg, 0)
    nnz = int(rowptr[-1])
    col = torch.randint(0, max(cols, 1), (nnz,), generator=gen)
    if duplicates and nnz > 1:
        col[1::3] = col[0:-1:3][: col[1::3].numel()]
    return rowptr, col


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@given(
    n=st.integers(0, 300),
    d=st.integers(1, 300),
    bias=st.booleans(),
    weights=st.sampled_from(["none", "random", "mask", "empty_mask"]),
    decay=st.sampled_from([0.0, 0.5, 0.95, 1.0]),
    seed=st.integers(0, 2**31 - 1),
)
def test_factor_update_matches_reference(device, dtype, n, d, bias, weights, decay, seed):
    gen = torch.Generator().manual_seed(seed)
    D = d + int(bias)
    x = torch.randn(n, d, generator=gen, dtype=dtype)
    w = None
    if weights == "random":
        w = torch.rand(n, generator=gen, dtype=dtype)
    elif weights == "mask":
        w = (torch.rand(n, generator=gen) < 0.3).to(dtype)
    elif weights == "empty_mask":
        w = torch.zeros(n, dtype=dtype)
    f0 = spd(D, gen, dtype)
    expected = reference.factor_update(f0, x, decay, bias, w)
    f = f0.clone().to(device)
    out = ops.factor_update_(f, x.to(device), decay, bias, None if w is None else w.to(device))
    assert out is f
    assert rel_err(f, expected) <= TOL[dtype]
    assert torch.equal(f.cpu(), f.cpu().T), "the factor must be exactly symmetric"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@given(
    rows=st.integers(1, 300),
    cols=st.integers(1, 300),
    d=st.integers(1, 300),
    bias=st.booleans(),
    valued=st.booleans(),
    weights=st.sampled_from(["none", "random", "mask", "empty_mask"]),
    decay=st.sampled_from([0.0, 0.9]),
    seed=st.integers(0, 2**31 - 1),
)
def test_sparse_factor_update_matches_reference(device, dtype, rows, cols, d, bias, valued, weights,
                                                decay, seed):
    gen = torch.Generator().manual_seed(seed)
    rowptr, col = random_csr(rows, cols, 3.0, gen)
    value = torch.rand(col.numel(), generator=gen, dtype=dtype) if valued else None
    x = torch.randn(cols, d, generator=gen, dtype=dtype)
    w = None
    if weights == "random":
        w = torch.rand(rows, generator=gen, dtype=dtype)
    elif weights == "mask":
        w = (torch.rand(rows, generator=gen) < 0.2).to(dtype)
    elif weights == "empty_mask":
        w = torch.zeros(rows, dtype=dtype)
    f0 = spd(d + int(bias), gen, dtype)
    expected = reference.sparse_factor_update(f0, rowptr, col, value, x, decay, bias, w)
    f = f0.clone().to(device)
    to = (lambda t: None if t is None else t.to(device))
    ops.sparse_factor_update_(f, rowptr.to(device), col.to(device), to(value), x.to(device), decay,
                              bias, to(w))
    assert rel_err(f, expected) <= TOL[dtype]


@pytest.mark.parametrize("device", DEVICES)
def test_sparse_equals_dense_of_aggregate(device):
    """The fused op equals factor_update_ of the explicitly aggregated ÂX."""
    gen = torch.Generator().manual_seed(0)
    rowptr, col = random_csr(50, 40, 4.0, gen)
    value = torch.rand(col.numel(), generator=gen, dtype=torch.float64)
    x = torch.randn(40, 7, generator=gen, dtype=torch.float64)
    agg = reference.sparse_aggregate(rowptr, col, value, x)
    a = torch.zeros(8, 8, dtype=torch.float64, device=device)
    b = torch.zeros(8, 8, dtype=torch.float64, device=device)
    ops.sparse_factor_update_(a, rowptr.to(device), col.to(device), value.to(device), x.to(device),
                              0.0, True)
    ops.factor_update_(b, agg.to(device), 0.0, True)
    assert rel_err(a, b) <= 1e-12


def test_row_weight_zero_rows_are_excluded_exactly():
    x = torch.randn(10, 4, dtype=torch.float64)
    w = torch.zeros(10, dtype=torch.float64)
    w[[2, 5]] = 1.0
    f = torch.zeros(5, 5, dtype=torch.float64)
    ops.factor_update_(f, x, 0.0, True, w)
    g = torch.zeros(5, 5, dtype=torch.float64)
    ops.factor_update_(g, x[[2, 5]], 0.0, True)
    assert rel_err(f, g) <= 1e-14


def test_float32_x_into_float64_factor():
    x = torch.randn(20, 3)
    f = torch.zeros(3, 3, dtype=torch.float64)
    ops.factor_update_(f, x, 0.0, False)
    assert rel_err(f, x.double().T @ x.double() / 20) <= 1e-12


def test_decay_zero_forgets_nonfinite_factor():
    f = torch.full((3, 3), float("nan"))
    ops.factor_update_(f, torch.randn(5, 2), 0.0, True)
    assert torch.isfinite(f).all()


# --- bad input: a clear message naming the argument, and nothing modified ---------------------

def _unchanged_after_error(call, factor, match):
    before = factor.clone()
    with pytest.raises(RuntimeError, match=match):
        call()
    assert torch.equal(factor, before), "a failed check must leave the factor untouched"


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(x=torch.randn(4, 3)), r"factor must be \[4, 4\]"),
        (dict(x=torch.randn(4)), "x must be 2-D"),
        (dict(x=torch.randn(4, 2).int()), "x must be float32 or float64"),
        (dict(decay=1.5), r"decay must lie in \[0, 1\]"),
        (dict(row_weight=torch.ones(3)), "row_weight must have 4 entries"),
        (dict(row_weight=-torch.ones(4)), "row_weight must be non-negative"),
        (dict(row_weight=torch.tensor([1.0, float("nan"), 1.0, 1.0])), "row_weight must be finite"),
    ],
)
def test_factor_update_bad_input(kwargs, match):
    factor = torch.eye(3)
    args = dict(x=torch.randn(4, 2), decay=0.5, append_bias=True, row_weight=None)
    args.update(kwargs)
    _unchanged_after_error(lambda: ops.factor_update_(factor, **args), factor, match)


def test_factor_update_rejects_non_square_and_int_factor():
    with pytest.raises(RuntimeError, match="factor must be square"):
        ops.factor_update_(torch.zeros(3, 4), torch.randn(2, 2), 0.5, True)
    with pytest.raises(RuntimeError, match="factor must be float32 or float64"):
        ops.factor_update_(torch.zeros(3, 3, dtype=torch.int32), torch.randn(2, 2), 0.5, True)


@pytest.mark.parametrize(
    "rowptr, col, match",
    [
        ([0, 2, 1, 3], [0, 1, 2], "rowptr must be non-decreasing"),
        ([0, 1, 2, 3], [0, 1, 9], r"col holds indices in \[0, 9\], outside the 4 rows of x"),
        ([0, 1, 2, 3], [0, -1, 2], "outside the 4 rows of x"),
        ([1, 1, 2, 3], [0, 1, 2], "rowptr must start at 0"),
        ([0, 1, 2, 2], [0, 1, 2], "rowptr must end at nnz = 3"),
    ],
)
def test_sparse_factor_update_bad_csr(rowptr, col, match):
    factor = torch.eye(3)
    call = lambda: ops.sparse_factor_update_(  # noqa: E731
        factor, torch.tensor(rowptr), torch.tensor(col), None, torch.randn(4, 2), 0.5, True
    )
    _unchanged_after_error(call, factor, match)


def test_sparse_factor_update_bad_shapes():
    factor = torch.eye(3)
    rowptr, col = torch.tensor([0, 1, 2]), torch.tensor([0, 1])
    x = torch.randn(4, 2)
    with pytest.raises(RuntimeError, match="value must have nnz = 2"):
        ops.sparse_factor_update_(factor, rowptr, col, torch.ones(3), x, 0.5, True)
    with pytest.raises(RuntimeError, match="rowptr must be int64"):
        ops.sparse_factor_update_(factor, rowptr.int(), col, None, x, 0.5, True)
    with pytest.raises(RuntimeError, match="row_weight must have 2 entries"):
        ops.sparse_factor_update_(factor, rowptr, col, None, x, 0.5, True, torch.ones(4))


@pytest.mark.parametrize("sparse", [False, True])
def test_factor_update_reads_the_upper_triangle_of_a_non_symmetric_factor(sparse):
    """As documented: the kernels read only the factor's upper triangle and write it back exactly
    symmetric, so a non-symmetric factor comes back symmetrised from its upper triangle."""
    gen = torch.Generator().manual_seed(7)
    f0 = torch.randn(4, 4, generator=gen, dtype=torch.float64)
    x = torch.randn(5, 3, generator=gen, dtype=torch.float64)
    upper = torch.triu(f0) + torch.triu(f0, 1).T
    expected = reference.factor_update(upper, x, 0.5, True)
    f = f0.clone()
    ops.factor_update_(f, x.to_sparse_csr() if sparse else x, 0.5, True)
    assert torch.equal(f, f.T)
    assert rel_err(f, expected) <= 1e-12
