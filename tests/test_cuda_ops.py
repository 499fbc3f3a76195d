"""The CUDA kernels against the float64 oracle of :mod:`ngcuda.reference`.

Every test here needs a GPU and the CUDA build (``@pytest.mark.cuda``; skipped otherwise by
conftest). Inputs are fresh random data; outputs of in-place ops start from random values.
"""
from __future__ import annotations

import pytest
import torch

import ngcuda
from ngcuda import ops, reference

pytestmark = pytest.mark.cuda

DEV = "cuda"
RTOL = {torch.float32: 1e-5, torch.float64: 1e-10}
DTYPES = [torch.float32, torch.float64]


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double().cpu(), ref.double().cpu()
    assert torch.isfinite(out).all(), "non-finite output"
    return float((out - ref).norm() / ref.norm().clamp_min(1e-300))


def random_factor(D: int, dtype, gen) -> torch.Tensor:
    a = torch.randn(D, D, dtype=torch.float64, generator=gen)
    a = a @ a.T / max(D, 1)
    return ((a + a.T) / 2).to(dtype).to(DEV)  # exactly symmetric


def csr(rows: int, cols: int, nnz: int, gen, isolated: int = 0):
    """Random CSR with duplicate edges, and `isolated` rows with no entries at the end."""
    r = torch.randint(0, max(rows - isolated, 1), (nnz,), generator=gen)
    c = torch.randint(0, cols, (nnz,), generator=gen)
    r, order = torch.sort(r, stable=True)
    c = c[order]
    rowptr = torch.zeros(rows + 1, dtype=torch.long)
    rowptr[1:] = torch.cumsum(torch.bincount(r, minlength=rows), 0)
    return rowptr, c


# ---------------------------------------------------------------- factor_update_


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("N,d", [(1, 1), (5, 7), (300, 64), (300, 65), (97, 130), (5000, 33)])
@pytest.mark.parametrize("append_bias", [False, True])
@pytest.mark.parametrize("weights", ["none", "random", "mask"])
def test_factor_update_matches_reference(dtype, N, d, append_bias, weights):
    gen = torch.Generator().manual_seed(N * 1000 + d)
    D = d + int(append_bias)
    x = torch.randn(N, d, dtype=torch.float64, generator=gen)
    x_in = x.clone()
    w = None
    if weights == "random":
        w = torch.rand(N, dtype=torch.float64, generator=gen)
    elif weights == "mask":
        w = (torch.rand(N, generator=gen) < 0.3).double()
        w[0] = 1.0
        x[w == 0] = 0.0
        x_in[w == 0] = float("nan")  # masked rows must not reach the factor
    factor = random_factor(D, dtype, gen)
    ref = reference.factor_update(factor.cpu(), x, 0.3, append_bias, w)
    torch.ops.ngcuda.factor_update_(factor, x_in.to(dtype).to(DEV), 0.3, append_bias,
                                    None if w is None else w.to(dtype).to(DEV))
    assert rel_err(factor, ref) <= RTOL[dtype]
    assert torch.equal(factor, factor.T), "factor must be exactly symmetric"


@pytest.mark.parametrize("dtype", DTYPES)
def test_factor_update_edge_cases(dtype):
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(6, 4, dtype=dtype, generator=gen).to(DEV)
    f = random_factor(5, dtype, gen)
    before = f.clone()
    torch.ops.ngcuda.factor_update_(f, x, 0.5, True, torch.zeros(6, dtype=dtype, device=DEV))
    assert torch.equal(f, before), "Σw = 0 must leave the factor unchanged"
    torch.ops.ngcuda.factor_update_(f, x[:0], 0.5, True, None)
    assert torch.equal(f, before), "N = 0 must leave the factor unchanged"
    torch.ops.ngcuda.factor_update_(f, x, 1.0, True, None)
    assert torch.allclose(f, before, rtol=0, atol=0), "decay 1 keeps the factor"
    f.fill_(float("inf"))
    torch.ops.ngcuda.factor_update_(f, x, 0.0, True, None)
    ref = reference.factor_update(torch.zeros(5, 5, dtype=torch.float64), x.cpu(), 0.0, True)
    assert rel_err(f, ref) <= RTOL[dtype], "decay 0 forgets even an Inf factor"


@pytest.mark.parametrize("bad", [-1.0, float("nan"), float("inf")])
def test_factor_update_invalid_weight_poisons_factor(bad):
    """On CUDA an invalid weight cannot raise without a host sync: the factor becomes NaN."""
    x = torch.randn(8, 3, device=DEV)
    w = torch.ones(8, device=DEV)
    w[3] = bad
    f = torch.eye(4, device=DEV)
    torch.ops.ngcuda.factor_update_(f, x, 0.5, True, w)
    assert torch.isnan(f).all()


@pytest.mark.parametrize("api", ["allow_tf32", "fp32_precision"])
@pytest.mark.parametrize("append_bias", [False, True])
def test_factor_update_tf32_path(append_bias, api):
    """float32 with TF32 allowed by the legacy flag or by torch's fp32_precision alone (with which
    allowTF32CuBLAS() raises): cuBLAS on tensor cores, same rules."""
    gen = torch.Generator().manual_seed(9)
    N, d = 700, 90
    x = torch.randn(N, d, dtype=torch.float64, generator=gen)
    w = (torch.rand(N, generator=gen) < 0.5).double() * torch.rand(N, dtype=torch.float64,
                                                                   generator=gen)
    x_in = x.clone()
    x_in[w == 0] = float("nan")
    x[w == 0] = 0.0
    D = d + int(append_bias)
    factor = random_factor(D, torch.float32, gen)
    ref = reference.factor_update(factor.cpu(), x, 0.3, append_bias, w)
    old = torch.backends.cuda.matmul.fp32_precision
    if api == "allow_tf32":
        torch.backends.cuda.matmul.allow_tf32 = True
    else:
        torch.backends.cuda.matmul.fp32_precision = "tf32"
    try:
        torch.ops.ngcuda.factor_update_(factor, x_in.float().to(DEV), 0.3, append_bias,
                                        w.float().to(DEV))
        before = factor.clone()
        torch.ops.ngcuda.factor_update_(factor, x_in.float().to(DEV), 0.3, append_bias,
                                        torch.zeros(N, device=DEV))
        assert torch.equal(factor, before), "Σw = 0 must leave the factor unchanged"
        bad = w.float().to(DEV)
        bad[1] = -1.0
        poisoned = factor.clone()
        torch.ops.ngcuda.factor_update_(poisoned, x_in.float().to(DEV), 0.3, append_bias, bad)
        assert torch.isnan(poisoned).all()
    finally:
        torch.backends.cuda.matmul.fp32_precision = old
    assert rel_err(factor, ref) <= 2e-3
    assert torch.equal(factor, factor.T)


def test_factor_update_is_deterministic():
    x = torch.randn(20000, 40, device=DEV)
    f1 = torch.eye(41, device=DEV)
    f2 = f1.clone()
    torch.ops.ngcuda.factor_update_(f1, x, 0.1, True, None)
    torch.ops.ngcuda.factor_update_(f2, x, 0.1, True, None)
    assert torch.equal(f1, f2)


# ---------------------------------------------------------------- sparse_factor_update_


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M,N,d,nnz", [(1, 1, 1, 0), (7, 5, 3, 20), (300, 280, 64, 2000),
                                        (150, 300, 131, 900)])
@pytest.mark.parametrize("append_bias", [False, True])
@pytest.mark.parametrize("with_value", [False, True])
@pytest.mark.parametrize("weights", ["none", "mask", "zero"])
def test_sparse_factor_update_matches_reference(dtype, M, N, d, nnz, append_bias, with_value,
                                                weights):
    gen = torch.Generator().manual_seed(M * 7 + nnz)
    rowptr, col = csr(M, N, nnz, gen, isolated=min(3, M - 1))
    value = torch.rand(nnz, dtype=torch.float64, generator=gen) if with_value else None
    x = torch.randn(N, d, dtype=torch.float64, generator=gen)
    w = None
    if weights == "mask":
        w = (torch.rand(M, generator=gen) < 0.5).double()
        w[0] = 1.0
    elif weights == "zero":
        w = torch.zeros(M, dtype=torch.float64)
    D = d + int(append_bias)
    factor = random_factor(D, dtype, gen)
    ref = reference.sparse_factor_update(factor.cpu(), rowptr, col, value, x, 0.25, append_bias, w)
    torch.ops.ngcuda.sparse_factor_update_(
        factor, rowptr.to(DEV), col.to(DEV), None if value is None else value.to(dtype).to(DEV),
        x.to(dtype).to(DEV), 0.25, append_bias, None if w is None else w.to(dtype).to(DEV))
    assert rel_err(factor, ref) <= RTOL[dtype]
    assert torch.equal(factor, factor.T)


def test_sparse_factor_update_several_row_chunks():
    """d = 4100 in float32 stages 1023 rows per pass: 3 passes accumulate into one result."""
    gen = torch.Generator().manual_seed(11)
    M, N, d = 2100, 2100, 4100
    rowptr, col = csr(M, N, 12000, gen, isolated=5)
    x = torch.randn(N, d, generator=gen)
    w = torch.rand(M, generator=gen)
    factor = torch.zeros(d + 1, d + 1, device=DEV)
    # The float64 oracle runs on the GPU here: 35 GFLOP would take a while on the CPU.
    ref = reference.sparse_factor_update(
        torch.zeros(d + 1, d + 1, dtype=torch.float64, device=DEV), rowptr.to(DEV), col.to(DEV),
        None, x.double().to(DEV), 0.0, True, w.double().to(DEV))
    torch.ops.ngcuda.sparse_factor_update_(factor, rowptr.to(DEV), col.to(DEV), None, x.to(DEV),
                                           0.0, True, w.to(DEV))
    assert rel_err(factor, ref) <= 1e-5


@pytest.mark.parametrize("rowptr,col", [
    ([0, 2, 3, 5], [0, 1, 4, 2, 10]),   # a column past the 10 rows of x
    ([0, 2, 3, 5], [0, -1, 4, 2, 3]),   # a negative column
    ([0, 3, 2, 5], [0, 1, 4, 2, 3]),    # rowptr decreasing
    ([0, 2, 3, 4], [0, 1, 4, 2, 3]),    # rowptr ending before nnz
    ([1, 2, 3, 5], [0, 1, 4, 2, 3]),    # rowptr not starting at 0
    ([0, 2, 3, 7], [0, 1, 4, 2, 3]),    # rowptr past nnz
])
def test_sparse_factor_update_invalid_csr_poisons_factor(rowptr, col):
    """On CUDA a malformed CSR cannot raise without a host sync: it is bound-checked in the
    kernel (nothing is read out of range) and the factor becomes NaN."""
    x = torch.randn(10, 3, device=DEV)
    f = torch.eye(4, device=DEV)
    torch.ops.ngcuda.sparse_factor_update_(
        f, torch.tensor(rowptr, device=DEV), torch.tensor(col, device=DEV), None, x, 0.5, True,
        None)
    assert torch.isnan(f).all()


@pytest.mark.parametrize("layout", ["dense", "csr"])
def test_sparse_factor_update_bad_rowptr_on_a_weightless_row_poisons_factor(layout):
    """A broken Â row pointer poisons the factor whether or not that row carries weight, for a
    dense x and a sparse-CSR x alike."""
    x = torch.randn(4, 3, device=DEV)
    if layout == "csr":
        x = x.to_sparse_csr()
    w = torch.tensor([1.0, 1.0, 0.0], device=DEV)
    f = torch.eye(4, device=DEV)
    torch.ops.ngcuda.sparse_factor_update_(
        f, torch.tensor([0, 2, 3, 7], device=DEV), torch.tensor([0, 1, 2, 3, 1], device=DEV), None,
        x, 0.5, True, w)
    assert torch.isnan(f).all()


def test_sparse_factor_update_checks_columns_of_a_bias_only_factor():
    """x with no columns: the factor is the bias entry alone, and an out-of-range column still
    poisons it."""
    x = torch.randn(10, 0, device=DEV)
    good, bad = torch.ones(1, 1, device=DEV), torch.ones(1, 1, device=DEV)
    rowptr = torch.tensor([0, 2, 3], device=DEV)
    torch.ops.ngcuda.sparse_factor_update_(good, rowptr, torch.tensor([0, 9, 4], device=DEV), None, x,
                                           0.5, True, None)
    torch.testing.assert_close(good, torch.ones(1, 1, device=DEV))
    torch.ops.ngcuda.sparse_factor_update_(bad, rowptr, torch.tensor([0, 10, 4], device=DEV), None, x,
                                           0.5, True, None)
    assert torch.isnan(bad).all()


def test_sparse_factor_update_is_deterministic():
    gen = torch.Generator().manual_seed(5)
    rowptr, col = csr(3000, 3000, 40000, gen)
    x = torch.randn(3000, 70, generator=gen).to(DEV)
    f1 = torch.eye(71, device=DEV)
    f2 = f1.clone()
    for f in (f1, f2):
        torch.ops.ngcuda.sparse_factor_update_(f, rowptr.to(DEV), col.to(DEV), None, x, 0.2,
                                               True, None)
    assert torch.equal(f1, f2)


# ---------------------------------------------------------------- batched_eigh

# Jacobi sizes (≤ 119 on H100, ≤ 101 on A100), a batched pair and a lone syevd size.
EIGH_SIZES = [1, 2, 3, 5, 16, 33, 64, 100, 118, 119, 150, 150, 300]


def spd(n: int, dtype, gen, spread: float = 10.0) -> torch.Tensor:
    x = torch.randn(2 * n + 3, n, dtype=torch.float64, generator=gen)
    x = x * torch.linspace(1, spread, n, dtype=torch.float64)
    return (x.T @ x / (2 * n + 3)).to(dtype).to(DEV)


def check_eigh(a: torch.Tensor, lam: torch.Tensor, q: torch.Tensor, tol: float, orth_tol: float):
    n = a.shape[0]
    a64 = a.double().cpu()
    a64 = a64.tril() + a64.tril(-1).T
    lam64, q64 = lam.double().cpu(), q.double().cpu()
    norm = float(a64.norm()) or 1.0
    assert torch.all(lam64[1:] >= lam64[:-1]), "eigenvalues must ascend"
    assert float((a64 @ q64 - q64 * lam64).norm()) <= tol * norm
    assert float((q64.T @ q64 - torch.eye(n, dtype=torch.float64)).norm()) <= orth_tol
    ref = torch.linalg.eigvalsh(a64)
    assert n == 0 or float((lam64 - ref).abs().max()) <= tol * norm


def orth_tol(n: int, dtype) -> float:
    # The Jacobi sizes compute in float64 (eigh_plan.h); cuSOLVER's float32 results are
    # orthonormal to about LAPACK's float32 level, ~2e-5 at n = 300.
    if dtype == torch.float64:
        return 1e-10
    return 1e-5 if n <= 101 else 5e-5


@pytest.mark.parametrize("dtype", DTYPES)
def test_batched_eigh_mixed_sizes(dtype):
    gen = torch.Generator().manual_seed(0)
    mats = [spd(n, dtype, gen) for n in EIGH_SIZES]
    values, vectors, status = torch.ops.ngcuda.batched_eigh(mats, None, None, 15)
    assert status.dtype == torch.int32 and status.device.type == "cuda"
    assert status.tolist() == [0] * len(mats)
    for a, lam, q in zip(mats, values, vectors):
        assert lam.dtype == dtype and q.shape == a.shape and lam.shape == (a.shape[0],)
        check_eigh(a, lam, q, RTOL[dtype], orth_tol(a.shape[0], dtype))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", ["clusters", "rank_deficient", "zero", "diagonal"])
def test_batched_eigh_hard_spectra(dtype, kind):
    gen = torch.Generator().manual_seed(1)
    mats = []
    for n in (9, 40, 118, 200):
        if kind == "clusters":
            q, _ = torch.linalg.qr(torch.randn(n, n, dtype=torch.float64, generator=gen))
            lam = torch.tensor([2.0, 5.0, 7.0], dtype=torch.float64).repeat_interleave(
                torch.tensor([n // 3, n // 3, n - 2 * (n // 3)]))
            a = q @ torch.diag(lam) @ q.T
        elif kind == "rank_deficient":
            x = torch.randn(n // 4 + 1, n, dtype=torch.float64, generator=gen)
            a = x.T @ x
        elif kind == "zero":
            a = torch.zeros(n, n, dtype=torch.float64)
        else:
            a = torch.diag(torch.randn(n, dtype=torch.float64, generator=gen))
        mats.append(a.to(dtype).to(DEV))
    values, vectors, status = torch.ops.ngcuda.batched_eigh(mats, None, None, 15)
    jacobi = [a.shape[0] <= 101 for a in mats]
    for a, lam, q, st, jac in zip(mats, values, vectors, status.tolist(), jacobi):
        if kind == "zero" and not jac:
            continue  # cuSOLVER may reject an all-zero matrix (pytorch #94772)
        assert st == 0
        check_eigh(a, lam, q, RTOL[dtype], orth_tol(a.shape[0], dtype))


@pytest.mark.parametrize("dtype", DTYPES)
def test_batched_eigh_uses_lower_triangle(dtype):
    gen = torch.Generator().manual_seed(2)
    mats = [spd(n, dtype, gen) for n in (7, 64, 150, 150)]
    garbled = [a.tril() + torch.randn_like(a).triu(1) for a in mats]
    values, vectors, status = torch.ops.ngcuda.batched_eigh(garbled, None, None, 15)
    assert status.tolist() == [0] * len(mats)
    for a, lam, q in zip(mats, values, vectors):
        check_eigh(a, lam, q, RTOL[dtype], orth_tol(a.shape[0], dtype))


@pytest.mark.parametrize("dtype", DTYPES)
def test_batched_eigh_warm_start(dtype):
    gen = torch.Generator().manual_seed(3)
    sizes = [4, 33, 100, 150]
    mats = [spd(n, dtype, gen) for n in sizes]
    _, q_old, status = torch.ops.ngcuda.batched_eigh(mats, None, None, 15)
    assert status.tolist() == [0] * len(sizes)
    new = [a + 1e-3 * spd(a.shape[0], dtype, gen) for a in mats]
    values, vectors, status = torch.ops.ngcuda.batched_eigh(new, q_old, None, 15)
    assert status.tolist() == [0] * len(sizes)
    for a, lam, q in zip(new, values, vectors):
        check_eigh(a, lam, q, RTOL[dtype], orth_tol(a.shape[0], dtype))
    # From the old basis 3 sweeps suffice (1e-3 → 1e-6 → 1e-12 → below tol); from scratch not.
    _, _, status = torch.ops.ngcuda.batched_eigh(new[1:3], q_old[1:3], None, 3)
    assert status.tolist() == [0, 0]
    _, _, status = torch.ops.ngcuda.batched_eigh(new[1:3], None, None, 3)
    assert status.tolist() == [2, 2]
    # A wrong basis (not orthonormal) falls back to a cold start instead of a wrong answer.
    junk = [torch.randn_like(q) for q in q_old]
    values, vectors, status = torch.ops.ngcuda.batched_eigh(new, junk, None, 15)
    assert status.tolist() == [0] * len(sizes)
    for a, lam, q in zip(new, values, vectors):
        check_eigh(a, lam, q, RTOL[dtype], orth_tol(a.shape[0], dtype))


@pytest.mark.parametrize("dtype", DTYPES)
def test_batched_eigh_status_codes(dtype):
    gen = torch.Generator().manual_seed(4)
    mats = [spd(n, dtype, gen) for n in (5, 50, 150, 150, 300)]
    mats[1][3, 2] = float("nan")
    mats[2][0, 0] = float("inf")
    mats[4][10, 1] = float("nan")
    values, vectors, status = torch.ops.ngcuda.batched_eigh(mats, None, None, 15)
    assert status.tolist() == [0, 1, 1, 0, 1]
    # the Jacobi path (n = 50) and the cuSOLVER paths (150, 300) alike: no answer for a NaN input
    for i in (1, 2, 4):
        assert torch.isnan(values[i]).all() and torch.isnan(vectors[i]).all(), i
    for i in (0, 3):
        check_eigh(mats[i], values[i], vectors[i], RTOL[dtype], orth_tol(mats[i].shape[0], dtype))
    with pytest.raises(ValueError, match=r"matrices\[1\] holds NaN or Inf"):
        ops.batched_eigh(mats)
    # No sweep allowed: a full matrix is not converged, a diagonal one is.
    a = spd(20, dtype, gen)
    _, _, status = torch.ops.ngcuda.batched_eigh([a, torch.diag(torch.diagonal(a))], None, None, 0)
    assert status.tolist() == [2, 0]


def test_batched_eigh_empty_and_mixed_dtypes():
    gen = torch.Generator().manual_seed(5)
    mats = [torch.zeros(0, 0, device=DEV), spd(6, torch.float64, gen), spd(6, torch.float32, gen)]
    values, vectors, status = torch.ops.ngcuda.batched_eigh(mats, None, None, 15)
    assert values[0].shape == (0,) and vectors[0].shape == (0, 0)
    assert status.tolist() == [0, 0, 0]
    assert values[1].dtype == torch.float64 and values[2].dtype == torch.float32
    check_eigh(mats[1], values[1], vectors[1], 1e-10, 1e-10)
    check_eigh(mats[2], values[2], vectors[2], 1e-5, 1e-5)


def test_batched_eigh_bad_arguments():
    a = torch.eye(3, device=DEV)
    with pytest.raises(RuntimeError, match="max_sweeps"):
        torch.ops.ngcuda.batched_eigh([a], None, None, -1)
    with pytest.raises(RuntimeError, match="tol"):
        torch.ops.ngcuda.batched_eigh([a], None, -1.0, 15)
    with pytest.raises(RuntimeError, match=r"prev_eigenvectors\[0\]"):
        torch.ops.ngcuda.batched_eigh([a], [torch.eye(4, device=DEV)], None, 15)
    with pytest.raises(RuntimeError, match=r"matrices\[1\]"):
        torch.ops.ngcuda.batched_eigh([a, torch.ones(2, 3, device=DEV)], None, None, 15)


# ---------------------------------------------------------------- precondition


@pytest.mark.parametrize("dtype", DTYPES)
def test_precondition_matches_reference(dtype):
    gen = torch.Generator().manual_seed(6)
    shapes = [(16, 1434), (7, 17), (7, 17), (7, 17), (1, 1), (64, 65)]
    grads, QA, lamA, QG, lamG = [], [], [], [], []
    for dout, din in shapes:
        grads.append(torch.randn(dout, din, dtype=torch.float64, generator=gen))
        for d, qs, ls in ((din, QA, lamA), (dout, QG, lamG)):
            q, _ = torch.linalg.qr(torch.randn(d, d, dtype=torch.float64, generator=gen))
            qs.append(q)
            ls.append(0.5 + torch.rand(d, dtype=torch.float64, generator=gen))
    lists = [[t.to(dtype) for t in ts] for ts in (grads, QA, lamA, QG, lamG)]
    # The oracle sees the same (rounded) inputs, so only the kernel's arithmetic is measured.
    ref = reference.precondition(*lists, 0.1)
    out = torch.ops.ngcuda.precondition(*[[t.to(DEV) for t in ts] for ts in lists], 0.1)
    for o, r, g in zip(out, ref, grads):
        assert o.shape == g.shape and o.dtype == dtype
        assert rel_err(o, r) <= RTOL[dtype]


def test_precondition_refuses_layers_on_two_devices():
    g, q, lam = torch.randn(3, 4, device=DEV), torch.eye(4, device=DEV), torch.ones(4, device=DEV)
    qg, lg = torch.eye(3, device=DEV), torch.ones(3, device=DEV)
    cpu = [t.cpu() for t in (g, q, lam, qg, lg)]
    with pytest.raises(RuntimeError, match=r"grads\[1\] is on cpu.*one call takes one device"):
        torch.ops.ngcuda.precondition([g, cpu[0]], [q, cpu[1]], [lam, cpu[2]], [qg, cpu[3]], [lg, cpu[4]],
                                      0.1)


def test_build_lists_cuda():
    assert "cuda" in ngcuda.build_info()["backends"]
