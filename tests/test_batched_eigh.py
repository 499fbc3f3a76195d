"""batched_eigh against a float64 torch.linalg.eigh reference, cold and warm, plus its errors.

Eigenvectors are checked through the residual ‖AQ − QΛ‖_F/‖A‖_F and ‖QᵀQ − I‖_F, never by sign.
"""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from ngcuda import ops

# The CPU kernel solves warm starts with Jacobi up to this n (above it, LAPACK is faster and the
# warm start is ignored), so tests of Jacobi-only behaviour use sizes at or below it.
WARM_JACOBI_MAX_N = 24

TOL = {torch.float32: 1e-5, torch.float64: 1e-10}


def orth_bound(n: int, dtype: torch.dtype) -> float:
    """‖QᵀQ − I‖_F bound: 1e-5 in float32 up to n = 100; beyond, LAPACK's own float32 result
    (torch.linalg.eigh alike) drifts as ~7e-8·n (1.0e-5 at n = 127, 1.9e-5 at n = 300).
    1e-10 in float64."""
    return max(TOL[dtype], 1e-7 * n) if dtype == torch.float32 else TOL[dtype]


def random_symmetric(n: int, gen: torch.Generator, psd: bool) -> torch.Tensor:
    g = torch.randn(n, n, dtype=torch.float64, generator=gen)
    return g @ g.T / max(n, 1) if psd else (g + g.T) / 2


def random_orthogonal(n: int, gen: torch.Generator) -> torch.Tensor:
    q, r = torch.linalg.qr(torch.randn(n, n, dtype=torch.float64, generator=gen))
    return q * torch.sign(torch.diagonal(r))


def drift(a: torch.Tensor, rel: float, gen: torch.Generator) -> torch.Tensor:
    """A + rel·‖A‖_F·P/‖P‖_F with P PSD: the slow change of a K-FAC factor."""
    h = torch.randn(a.shape[0], a.shape[0], dtype=torch.float64, generator=gen)
    p = h @ h.T
    return a + rel * (a.norm() + 1e-30) * p / (p.norm() + 1e-30)


def check(mats64: list[torch.Tensor], values, vectors, dtype: torch.dtype) -> None:
    """Eigenvalues vs float64 eigvalsh (error relative to ‖A‖_F), residual and orthogonality."""
    assert len(values) == len(vectors) == len(mats64)
    for i, (a, lam, q) in enumerate(zip(mats64, values, vectors)):
        n = a.shape[0]
        assert lam.shape == (n,) and q.shape == (n, n), i
        assert lam.dtype == dtype and q.dtype == dtype, i
        if n == 0:
            continue
        scale = a.norm().item() + 1e-300
        ref = torch.linalg.eigvalsh(a)
        lam64, q64 = lam.double(), q.double()
        assert bool((lam64[1:] >= lam64[:-1]).all()), f"matrices[{i}]: eigenvalues not ascending"
        assert (lam64 - ref).abs().max().item() <= TOL[dtype] * scale, f"matrices[{i}] eigenvalues"
        res = (a @ q64 - q64 * lam64).norm().item() / scale
        orth = (q64.T @ q64 - torch.eye(n, dtype=torch.float64)).norm().item()
        assert res <= TOL[dtype], f"matrices[{i}] (n={n}): residual {res:.2e}"
        assert orth <= orth_bound(n, dtype), f"matrices[{i}] (n={n}): orthogonality {orth:.2e}"


DTYPES = [torch.float32, torch.float64]


@given(
    sizes=st.lists(st.integers(1, 40), min_size=1, max_size=6),
    big=st.one_of(st.none(), st.integers(41, 300)),
    psd=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
@pytest.mark.parametrize("dtype", DTYPES)
def test_cold_mixed_sizes(dtype, sizes, big, psd, seed):
    gen = torch.Generator().manual_seed(seed)
    if big is not None:
        sizes = sizes + [big]
    mats = [random_symmetric(n, gen, psd) for n in sizes]
    values, vectors, status = ops.batched_eigh_with_status([m.to(dtype) for m in mats])
    assert status.dtype == torch.int32 and status.shape == (len(mats),)
    assert status.tolist() == [0] * len(mats)
    check(mats, values, vectors, dtype)


@given(
    sizes=st.lists(st.integers(1, 60), min_size=1, max_size=6),
    prev_kind=st.sampled_from(["exact", "drifted", "random_orthogonal"]),
    rel=st.sampled_from([1e-3, 1e-2]),
    psd=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
@pytest.mark.parametrize("dtype", DTYPES)
def test_warm_start(dtype, sizes, prev_kind, rel, psd, seed):
    gen = torch.Generator().manual_seed(seed)
    old = [random_symmetric(n, gen, psd) for n in sizes]
    if prev_kind == "exact":
        new, prev = old, [torch.linalg.eigh(a)[1] for a in old]
    elif prev_kind == "drifted":
        new, prev = [drift(a, rel, gen) for a in old], [torch.linalg.eigh(a)[1] for a in old]
    else:
        new, prev = old, [random_orthogonal(n, gen) for n in sizes]
    values, vectors, status = ops.batched_eigh_with_status(
        [a.to(dtype) for a in new], [q.to(dtype) for q in prev])
    assert status.tolist() == [0] * len(sizes)
    check(new, values, vectors, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_warm_start_chain_stays_orthonormal(dtype):
    """Feeding each result back as the next warm start must not accumulate rounding."""
    gen = torch.Generator().manual_seed(1)
    sizes = [3, 16, WARM_JACOBI_MAX_N]
    mats = [random_symmetric(n, gen, psd=True) for n in sizes]
    _, vectors = ops.batched_eigh([a.to(dtype) for a in mats])
    for _ in range(30):
        mats = [drift(a, 1e-2, gen) for a in mats]
        values, vectors = ops.batched_eigh([a.to(dtype) for a in mats], vectors)
    check(mats, values, vectors, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("warm", [False, True])
def test_degenerate_eigenvalues(dtype, warm):
    gen = torch.Generator().manual_seed(2)
    mats = [torch.eye(5, dtype=torch.float64), 3.0 * torch.eye(30, dtype=torch.float64)]
    for n, spectrum in [(6, [1.0, 1.0, 1.0, 2.0, 2.0, 3.0]), (20, [0.0] * 10 + [5.0] * 10),
                        (40, [1.0] * 39 + [-1.0])]:
        q = random_orthogonal(n, gen)
        mats.append(q @ torch.diag(torch.tensor(spectrum, dtype=torch.float64)) @ q.T)
    prev = [random_orthogonal(a.shape[0], gen).to(dtype) for a in mats] if warm else None
    values, vectors, status = ops.batched_eigh_with_status([a.to(dtype) for a in mats], prev)
    assert status.tolist() == [0] * len(mats)
    check(mats, values, vectors, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_diagonal_input_needs_no_sweep(dtype):
    """A diagonal matrix with an identity warm start converges with max_sweeps=0; the result is
    the sorted diagonal and a permutation matrix, exactly."""
    d = torch.tensor([3.0, -1.0, 2.0, 0.5, 7.0, -4.0], dtype=dtype)
    a = torch.diag(d)
    eye = torch.eye(6, dtype=dtype)
    values, vectors, status = ops.batched_eigh_with_status([a, a], [eye, eye], max_sweeps=0)
    assert status.tolist() == [0, 0]
    order = torch.argsort(d)
    for lam, q in zip(values, vectors):
        assert torch.equal(lam, d[order])
        assert torch.equal(q, eye[:, order])
    # Cold, the tiny-matrix Jacobi and LAPACK agree on the same answer.
    for n in (4, 50):
        dd = torch.linspace(-1, 1, n, dtype=dtype).flip(0)
        (lam,), (q,) = ops.batched_eigh([torch.diag(dd)])
        torch.testing.assert_close(lam, dd.flip(0))
        torch.testing.assert_close(q.abs(), torch.eye(n, dtype=dtype).flip(1))


@pytest.mark.parametrize("dtype", DTYPES)
def test_max_sweeps_zero_reports_not_converged(dtype):
    gen = torch.Generator().manual_seed(3)
    n = WARM_JACOBI_MAX_N
    a = random_symmetric(n, gen, psd=True)
    prev = [random_orthogonal(n, gen).to(dtype)]
    _, _, status = ops.batched_eigh_with_status([a.to(dtype)], prev, max_sweeps=0)
    assert status.tolist() == [ops.EighStatus.NOT_CONVERGED]
    with pytest.raises(ValueError, match=r"matrices\[0\] did not converge"):
        ops.batched_eigh([a.to(dtype)], prev, max_sweeps=0)
    # A tolerance the start already meets needs no sweep.
    _, _, status = ops.batched_eigh_with_status([a.to(dtype)], prev, tol=10.0, max_sweeps=0)
    assert status.tolist() == [0]


def test_edge_sizes_and_empty_list():
    # An empty list holds no tensor to dispatch on, so only the Python front accepts it.
    assert ops.batched_eigh([]) == ([], [])
    values, vectors, status = ops.batched_eigh_with_status([])
    assert values == [] and vectors == [] and status.shape == (0,)
    a1 = torch.tensor([[-2.5]])
    a0 = torch.zeros(0, 0)
    values, vectors, status = torch.ops.ngcuda.batched_eigh([a1, a0, a1], None, None, 15)
    assert status.dtype == torch.int32 and status.tolist() == [0, 0, 0]
    assert values[0].tolist() == [-2.5] and vectors[0].abs().tolist() == [[1.0]]
    assert values[1].shape == (0,) and vectors[1].shape == (0, 0)
    values, vectors = ops.batched_eigh([a1, a0], [torch.tensor([[-1.0]]), torch.zeros(0, 0)])
    assert values[0].tolist() == [-2.5] and vectors[0].tolist() == [[-1.0]]


def test_reads_lower_triangle_and_non_contiguous_input():
    gen = torch.Generator().manual_seed(4)
    for n in (7, 30):
        g = torch.randn(n, n, dtype=torch.float64, generator=gen)
        lower = torch.tril(g) + torch.tril(g, -1).T
        (lam,), (q,) = ops.batched_eigh([g.T.contiguous().T])  # a column-major view of g
        check([lower], [lam], [q], torch.float64)
        prev = [torch.linalg.eigh(lower)[1].T.contiguous().T]
        (lam,), (q,) = ops.batched_eigh([g], prev)
        check([lower], [lam], [q], torch.float64)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_matrix_names_its_index(bad):
    mats = [torch.eye(3), torch.eye(40), torch.eye(5)]
    mats[2][4, 1] = bad
    with pytest.raises(ValueError, match=r"matrices\[2\] holds NaN or Inf"):
        torch.ops.ngcuda.batched_eigh(mats, None, None, 15)
    with pytest.raises(ValueError, match=r"matrices\[2\] holds NaN or Inf"):
        ops.batched_eigh(mats)
    prev = [torch.eye(3), torch.eye(40), torch.eye(5)]
    prev[1][0, 0] = bad
    with pytest.raises(ValueError, match=r"prev_eigenvectors\[1\] holds NaN or Inf"):
        ops.batched_eigh([torch.eye(3), torch.eye(40), torch.eye(5)], prev)


BAD_INPUTS = [
    ([torch.eye(3), torch.ones(3, 4)], None, {}, r"matrices\[1\] must be square"),
    ([torch.ones(3)], None, {}, r"matrices\[0\] must be 2-D"),
    ([torch.eye(2), torch.ones(2, 2, 2)], None, {}, r"matrices\[1\] must be 2-D"),
    ([torch.eye(3), torch.eye(3, dtype=torch.float64)], None, {}, r"matrices\[1\] is Double"),
    ([torch.eye(3, dtype=torch.int64)], None, {}, r"matrices\[0\] must be float32 or float64"),
    ([torch.eye(3), torch.eye(2)], [torch.eye(3)], {}, r"prev_eigenvectors must hold one tensor"),
    ([torch.eye(3), torch.eye(2)], [torch.eye(3), torch.eye(3)], {},
     r"prev_eigenvectors\[1\] must have the shape of matrices\[1\]"),
    ([torch.eye(3)], [torch.eye(3, dtype=torch.float64)], {}, r"prev_eigenvectors\[0\] is Double"),
    ([torch.eye(3)], [2.0 * torch.eye(3)], {}, r"prev_eigenvectors\[0\] is not orthonormal"),
    ([torch.eye(3)], None, {"tol": -1.0}, r"tol must be finite and >= 0"),
    ([torch.eye(3)], None, {"tol": math.nan}, r"tol must be finite and >= 0"),
    ([torch.eye(3)], None, {"max_sweeps": -1}, r"max_sweeps must be >= 0"),
]


@pytest.mark.parametrize("mats,prev,kwargs,message", BAD_INPUTS)
def test_bad_input_is_named(mats, prev, kwargs, message):
    with pytest.raises((RuntimeError, ValueError), match=message):
        ops.batched_eigh_with_status(mats, prev, **kwargs)


def test_status_device_and_meta_shapes():
    mats = [torch.eye(4), torch.eye(50)]
    _, _, status = torch.ops.ngcuda.batched_eigh(mats, None, None, 15)
    assert status.device.type == "cpu" and status.dtype == torch.int32
    meta = [m.to("meta") for m in mats]
    values, vectors, status = torch.ops.ngcuda.batched_eigh(meta, None, None, 15)
    assert [v.shape for v in values] == [(4,), (50,)]
    assert [v.shape for v in vectors] == [(4, 4), (50, 50)]
    assert status.shape == (2,) and status.dtype == torch.int32
