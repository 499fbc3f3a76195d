"""batched_eigh against a float64 reference (ngcuda.reference), cold and warm, plus its errors.

Eigenvectors are checked through the residual ‖AQ − QΛ‖_F/‖A‖_F and ‖QᵀQ − I‖_F, never by sign.
The CPU kernel refines warm starts for WARM_MIN_N[dtype] ≤ n ≤ WARM_MAX_N[dtype] (iterative
refinement by matrix products); other sizes are solved cold, so tests of the refinement use sizes
in that range (28 to 96 for both dtypes). Cold, float32 n ≤ 96 and float64 n ≤ 256 go to the Householder + QL
solver (TRIDIAGONAL_MAX_N), which works in float64.
"""
from __future__ import annotations

import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import ngcuda
from ngcuda import ops, reference

# conftest.py has the refinement taken on every CPU (without AVX-512 it is off by default).
_WARM_N = {dt: ngcuda.build_info()["eigh_warm_n"][str(dt).removeprefix("torch.")]
           for dt in (torch.float32, torch.float64)}
assert all(_WARM_N.values()), f"conftest.py should have forced the warm refinement on: {_WARM_N}"
WARM_MIN_N = {dt: r[0] for dt, r in _WARM_N.items()}
WARM_MAX_N = {dt: r[1] for dt, r in _WARM_N.items()}
TRIDIAGONAL_MAX_N = {torch.float32: 96, torch.float64: 256}
# A warm start off by more than this fraction of ‖A‖_F (‖offdiag(QᵀAQ)‖_F) is solved cold at once;
# test_far_starts_refined_when_allowed reruns the tests below that depend on it with no limit.
MAX_START_OFF = float(os.environ.get("NGCUDA_EIGH_WARM_MAX_START_OFF", "3e-3"))


def start_off(a: torch.Tensor, q: torch.Tensor) -> float:
    """‖offdiag(QᵀAQ)‖_F / ‖A‖_F in float64; asserts it is clear of MAX_START_OFF, so that the
    kernel's float32 estimate of it lands on the same side."""
    a, q = a.double(), q.double()
    s = q.T @ a @ q
    off = ((s - torch.diag(torch.diag(s))).norm() / a.norm()).item()
    assert not 0.8 * MAX_START_OFF <= off <= 1.25 * MAX_START_OFF, off
    return off

TOL = {torch.float32: 1e-5, torch.float64: 1e-10}
OK, FALLBACK = ops.EighStatus.OK, ops.EighStatus.WARM_FALLBACK


def orth_bound(n: int, dtype: torch.dtype) -> float:
    """‖QᵀQ − I‖_F bound: 1e-5 in float32 up to n = 83; beyond, LAPACK's own float32 result
    (torch.linalg.eigh alike) grows as ~7e-8·n on average (1.0e-5 at n = 127, 1.9e-5 at n = 300)
    and reaches 1.004e-5 at n = 100 for some matrices (found by hypothesis), so 1.2e-7·n there.
    1e-10 in float64."""
    return max(TOL[dtype], 1.2e-7 * n) if dtype == torch.float32 else TOL[dtype]


def refined_orth_bound(n: int, dtype: torch.dtype, tol: float | None = None) -> float:
    """What the refinement delivers. float32: its stop test allows ‖QᵀQ − I‖_F of half the tol
    within [1e-6, 5e-6] (5e-6 at the default tol of 1e-5), plus the rounding of the result to
    float32, ε·√(2n/3) (3e-7 at n = 64); at tol = 1e-7 that is below LAPACK's float32 result at
    n ≥ 48 (6.5e-6 at n = 64), so the bound then fails if a warm start is quietly solved cold."""
    if dtype == torch.float64:
        return 1e-12
    stop = min(max(0.5 * (1e-5 if tol is None else tol), 1e-6), 5e-6)
    return 1.5 * stop + 2e-7 * math.sqrt(n)


def random_symmetric(n: int, gen: torch.Generator, psd: bool) -> torch.Tensor:
    g = torch.randn(n, n, dtype=torch.float64, generator=gen)
    return g @ g.T / max(n, 1) if psd else (g + g.T) / 2


def random_orthogonal(n: int, gen: torch.Generator) -> torch.Tensor:
    q, r = torch.linalg.qr(torch.randn(n, n, dtype=torch.float64, generator=gen))
    return q * torch.sign(torch.diagonal(r))


def kfac_factor(n: int, gen: torch.Generator, rank: int | None = None) -> torch.Tensor:
    """XᵀX/m with column scales decaying over 1.5 decades (a spectrum over three decades, its
    small end crowded), m = 2n samples, or m = rank for a rank-deficient factor."""
    m = 2 * n if rank is None else rank
    scales = torch.logspace(0.0, -1.5, n, dtype=torch.float64)
    x = torch.randn(m, n, dtype=torch.float64, generator=gen) * scales
    return x.T @ x / m


def drift(a: torch.Tensor, rel: float, gen: torch.Generator) -> torch.Tensor:
    """A + rel·‖A‖_F·P/‖P‖_F with P PSD: the slow change of a K-FAC factor."""
    h = torch.randn(a.shape[0], a.shape[0], dtype=torch.float64, generator=gen)
    p = h @ h.T
    return a + rel * (a.norm() + 1e-30) * p / (p.norm() + 1e-30)


def with_spectrum(spectrum: list[float], gen: torch.Generator) -> torch.Tensor:
    q = random_orthogonal(len(spectrum), gen)
    return q @ torch.diag(torch.tensor(spectrum, dtype=torch.float64)) @ q.T


def check(mats64: list[torch.Tensor], values, vectors, dtype: torch.dtype,
          orth=orth_bound) -> None:
    """Eigenvalues vs the float64 reference (error relative to ‖A‖_F), residual, orthogonality."""
    assert len(values) == len(vectors) == len(mats64)
    ref_values, _ = reference.batched_eigh(mats64)
    for i, (a, lam, q, ref) in enumerate(zip(mats64, values, vectors, ref_values)):
        n = a.shape[0]
        assert lam.shape == (n,) and q.shape == (n, n), i
        assert lam.dtype == dtype and q.dtype == dtype, i
        if n == 0:
            continue
        scale = a.norm().item() + 1e-300
        lam64, q64 = lam.double(), q.double()
        assert bool((lam64[1:] >= lam64[:-1]).all()), f"matrices[{i}]: eigenvalues not ascending"
        assert (lam64 - ref).abs().max().item() <= TOL[dtype] * scale, f"matrices[{i}] eigenvalues"
        res = (a @ q64 - q64 * lam64).norm().item() / scale
        err = (q64.T @ q64 - torch.eye(n, dtype=torch.float64)).norm().item()
        assert res <= TOL[dtype], f"matrices[{i}] (n={n}): residual {res:.2e}"
        assert err <= orth(n, dtype), f"matrices[{i}] (n={n}): orthogonality {err:.2e}"


def warm(mats64, prevs64, dtype, **kwargs):
    return ops.batched_eigh_with_status([a.to(dtype) for a in mats64],
                                        [q.to(dtype) for q in prevs64], **kwargs)


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


def tridiagonal_bound(n: int, dtype: torch.dtype) -> float:
    """Residual and ‖QᵀQ − I‖_F of the Householder + QL solver: float64 work, so in float32 only
    the final rounding, ~5e-8·√n (3.5e-7 at n = 64), well below LAPACK's float32 result (6.5e-6
    at n = 64), which a silent fallback would show."""
    return 1e-7 * math.sqrt(n) if dtype == torch.float32 else 1e-12


def structured(kind: str, n: int, gen: torch.Generator) -> torch.Tensor:
    if kind == "graded_down":  # large entries at the top: T is reversed before QL
        return kfac_factor(n, gen)
    if kind == "graded_up":
        return kfac_factor(n, gen).flip(0, 1)
    if kind == "diagonal":
        return torch.diag(torch.randn(n, dtype=torch.float64, generator=gen))
    if kind == "tridiagonal":  # no reflection needed: every H_k = I
        t = torch.diag(torch.randn(n, dtype=torch.float64, generator=gen))
        off = torch.randn(n - 1, dtype=torch.float64, generator=gen)
        return t + torch.diag(off, 1) + torch.diag(off, -1)
    if kind == "repeated":  # rank one plus identity: n − 1 equal eigenvalues
        v = torch.randn(n, 1, dtype=torch.float64, generator=gen)
        return torch.eye(n, dtype=torch.float64) + v @ v.T
    if kind == "zero":
        return torch.zeros(n, n, dtype=torch.float64)
    return random_symmetric(n, gen, psd=kind == "psd")


KINDS = ["symmetric", "psd", "graded_down", "graded_up", "diagonal", "tridiagonal", "repeated",
         "zero"]


@given(
    sizes=st.lists(st.integers(11, 256), min_size=1, max_size=9),
    kind=st.sampled_from(KINDS),
    scale_exp=st.sampled_from([0, -30, 30]),
    seed=st.integers(0, 2**31 - 1),
)
@pytest.mark.parametrize("dtype", DTYPES)
def test_tridiagonal_cold_path(dtype, sizes, kind, scale_exp, seed):
    """Cold matrices of 11 ≤ n ≤ TRIDIAGONAL_MAX_N go to the Householder + QL solver, several
    interleaved per work item (1 to 9 matrices here: groups of 1 to 4): structured inputs, both
    gradings, and scales of 1e±30 (float32's squares would overflow) against the float64
    reference, within the solver's own tight bound."""
    gen = torch.Generator().manual_seed(seed)
    sizes = [min(n, TRIDIAGONAL_MAX_N[dtype]) for n in sizes]
    mats = [structured(kind, n, gen) * 10.0**scale_exp for n in sizes]
    values, vectors, status = ops.batched_eigh_with_status([a.to(dtype) for a in mats])
    assert status.tolist() == [OK] * len(mats)
    check(mats, values, vectors, dtype, orth=tridiagonal_bound)
    for a, lam, q in zip(mats, values, vectors):
        res = (a @ q.double() - q.double() * lam.double()).norm() / (a.norm() + 1e-300)
        assert res.item() <= tridiagonal_bound(a.shape[0], dtype)
        if kind == "zero":
            assert bool((lam == 0).all())


def test_tridiagonal_exact_on_diagonal_input():
    """A diagonal matrix needs no reflection and no rotation, and the power-of-two scaling rounds
    nothing: the eigenvalues are the sorted diagonal and the vectors a permutation, bit for bit."""
    d = torch.randperm(33, generator=torch.Generator().manual_seed(4)).double() * 0.37 - 5.0
    for dtype in DTYPES:
        (lam,), (q,) = ops.batched_eigh([torch.diag(d).to(dtype)])
        order = torch.argsort(d.to(dtype))
        assert torch.equal(lam, d.to(dtype)[order])
        assert torch.equal(q, torch.eye(33, dtype=dtype)[:, order])


def test_tridiagonal_fallback_to_lapack():
    """NGCUDA_EIGH_QL_MAX_ITERATIONS=0 makes every QL give up at once: each matrix is then solved
    by LAPACK, alone, in its own slot, and the results are as correct (run in a fresh process,
    the setting is read once)."""
    code = textwrap.dedent("""
        import torch
        from ngcuda import ops, reference
        gen = torch.Generator().manual_seed(8)
        sizes = [11, 64, 33, 64, 96, 20]
        mats = []
        for n in sizes:
            g = torch.randn(n, n, dtype=torch.float64, generator=gen)
            mats.append(g @ g.T / n)
        ref, _ = reference.batched_eigh(mats)
        for dtype, tol in ((torch.float32, 1e-5), (torch.float64, 1e-10)):
            values, vectors, status = ops.batched_eigh_with_status([a.to(dtype) for a in mats])
            assert status.tolist() == [0] * len(sizes), status
            for a, lam, q, r in zip(mats, values, vectors, ref):
                lam, q = lam.double(), q.double()
                assert (lam - r).abs().max() <= tol * a.norm()
                assert (a @ q - q * lam).norm() <= tol * a.norm()
                assert (q.T @ q - torch.eye(a.shape[0], dtype=torch.float64)).norm() <= 1.2e-7 * 96
        print("ok")
    """)
    root = os.path.dirname(os.path.dirname(os.path.abspath(ngcuda.__file__)))
    env = dict(os.environ, NGCUDA_EIGH_QL_MAX_ITERATIONS="0",
               PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.strip() == "ok"


def test_warm_range_follows_the_cpu():
    """By default (no NGCUDA_EIGH_WARM_* override) warm starts are refined only with the AVX-512
    kernels: float32 28 ≤ n ≤ 192, float64 28 ≤ n ≤ 96. Capped to AVX2, a warm start that the
    refinement would hand back (a basis unrelated to the matrix) is not even tried: solved cold,
    status OK; with the range forced it is tried and reported as WARM_FALLBACK."""
    script = textwrap.dedent("""
        import torch, ngcuda
        from ngcuda import ops
        gen = torch.Generator().manual_seed(0)
        a = torch.randn(64, 64, generator=gen); a = a @ a.T
        q = torch.linalg.qr(torch.randn(64, 64, generator=gen))[0]
        _, _, status = ops.batched_eigh_with_status([a], [q])
        info = ngcuda.build_info()
        print(info["cpu_kernels"], info["eigh_warm_n"], status.tolist())
    """)
    root = os.path.dirname(os.path.dirname(os.path.abspath(ngcuda.__file__)))
    base = {k: v for k, v in os.environ.items()
            if not k.startswith(("NGCUDA_EIGH_WARM_", "NGCUDA_CPU_ISA"))}
    base["PYTHONPATH"] = root + os.pathsep + os.environ.get("PYTHONPATH", "")

    def run(**env: str) -> str:
        done = subprocess.run([sys.executable, "-c", script], env=dict(base, **env),
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr
        return done.stdout.strip()

    avx512 = ngcuda.build_info()["cpu_kernels"] == "avx512"
    native = ("{'float32': (28, 192), 'float64': (28, 96)} [4]" if avx512
              else "{'float32': None, 'float64': None} [0]")
    assert run() == ngcuda.build_info()["cpu_kernels"] + " " + native
    assert run(NGCUDA_CPU_ISA="avx2") == "avx2 {'float32': None, 'float64': None} [0]"
    assert run(NGCUDA_CPU_ISA="avx2", NGCUDA_EIGH_WARM_MAX_N="100") == \
        "avx2 {'float32': (28, 100), 'float64': (28, 100)} [4]"


def test_far_starts_refined_when_allowed():
    """NGCUDA_EIGH_WARM_MAX_START_OFF=inf lifts the limit on how far off a refined start may be:
    the tests that depend on it, rerun in a fresh process (the setting is read once), then refine
    the starts that are otherwise solved cold, and converge."""
    if MAX_START_OFF == math.inf:
        pytest.skip("already the rerun")
    root = os.path.dirname(os.path.dirname(os.path.abspath(ngcuda.__file__)))
    env = dict(os.environ, NGCUDA_EIGH_WARM_MAX_START_OFF="inf",
               PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", os.path.abspath(__file__),
         "-k", "warm_refinement_converges or degenerate_eigenvalues"],
        env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    assert " passed" in done.stdout and "failed" not in done.stdout, done.stdout


@pytest.mark.parametrize("dtype", DTYPES)
def test_large_matrices_beside_small_ones(dtype):
    """n ≥ 768 is solved by LAPACK outside the parallel loop, one size at a time: two equal large
    sizes (one stack), one odd one, and small matrices on either side of them, each in its slot,
    with or without warm starts (unused at these sizes)."""
    gen = torch.Generator().manual_seed(21)
    sizes = [5, 768, 40, 769, 768, 64]
    mats = [random_symmetric(n, gen, psd=n % 2 == 0) for n in sizes]
    prev = [torch.linalg.eigh(a)[1] for a in mats]
    for starts in (None, prev):
        values, vectors, status = (ops.batched_eigh_with_status([a.to(dtype) for a in mats])
                                   if starts is None else warm(mats, starts, dtype))
        assert status.tolist() == [OK] * len(sizes)
        check(mats, values, vectors, dtype)


@given(
    sizes=st.lists(st.integers(1, 110), min_size=1, max_size=5),
    prev_kind=st.sampled_from(["exact", "drifted", "random_orthogonal"]),
    rel=st.sampled_from([1e-6, 1e-3, 1e-2, 1e-1]),
    kind=st.sampled_from(["kfac", "psd", "symmetric"]),
    seed=st.integers(0, 2**31 - 1),
)
@pytest.mark.parametrize("dtype", DTYPES)
def test_warm_start(dtype, sizes, prev_kind, rel, kind, seed):
    """Any warm start, good or useless, gives a correct result; a matrix only falls back to the
    cold solver (status WARM_FALLBACK) in the refinement's size range."""
    gen = torch.Generator().manual_seed(seed)
    make = {"kfac": lambda n: kfac_factor(n, gen), "psd": lambda n: random_symmetric(n, gen, True),
            "symmetric": lambda n: random_symmetric(n, gen, False)}[kind]
    old = [make(n) for n in sizes]
    if prev_kind == "exact":
        new, prev = old, [torch.linalg.eigh(a)[1] for a in old]
    elif prev_kind == "drifted":
        new, prev = [drift(a, rel, gen) for a in old], [torch.linalg.eigh(a)[1] for a in old]
    else:
        new, prev = old, [random_orthogonal(n, gen) for n in sizes]
    values, vectors, status = warm(new, prev, dtype)
    for n, code in zip(sizes, status.tolist()):
        assert code == OK or (code == FALLBACK and WARM_MIN_N[dtype] <= n <= WARM_MAX_N[dtype]), (n, code)
    check(new, values, vectors, dtype)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, None), (torch.float32, 1e-7),
                                       (torch.float64, None)])
@pytest.mark.parametrize("rel", [0.0, 1e-6, 1e-3, 1e-2])
def test_warm_refinement_converges(dtype, tol, rel):
    """K-FAC-like factors after a drift: every matrix in the range whose start is within
    MAX_START_OFF is refined (no fallback), at the default tol (float32: finished from float32
    products where n allows) and at a tight one (float32: to an orthogonality LAPACK's float32
    result does not reach); a start further off (rel = 1e-2: 7e-3) is solved cold at once."""
    gen = torch.Generator().manual_seed(11)
    sizes = [28, 31, 33, 48, 64, 65, 96]
    old = [kfac_factor(n, gen) for n in sizes]
    new = [drift(a, rel, gen) for a in old]
    prev = [torch.linalg.eigh(a.to(dtype))[1].double() for a in old]
    values, vectors, status = warm(new, prev, dtype, tol=tol)
    expected = [OK if start_off(a, q) <= MAX_START_OFF else FALLBACK for a, q in zip(new, prev)]
    assert expected == [FALLBACK if rel == 1e-2 and MAX_START_OFF < 7e-3 else OK] * len(sizes)
    assert status.tolist() == expected
    check(new, values, vectors, dtype, orth=lambda n, dt: refined_orth_bound(n, dt, tol))


@pytest.mark.parametrize("dtype", DTYPES)
def test_warm_large_drift(dtype):
    """A drift of 10% of ‖A‖ (a factor that changed a lot between decompositions): refined or
    handed to the cold solver, correct either way."""
    gen = torch.Generator().manual_seed(12)
    sizes = [12, 40, 64, 96]
    old = [kfac_factor(n, gen) for n in sizes]
    new = [drift(a, 0.1, gen) for a in old]
    prev = [torch.linalg.eigh(a)[1] for a in old]
    values, vectors, status = warm(new, prev, dtype)
    assert set(status.tolist()) <= {OK, FALLBACK}
    check(new, values, vectors, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_wrong_basis_falls_back(dtype):
    """A basis unrelated to the matrix: most pairs are strongly coupled, so the kernel gives up
    at once and solves cold, reporting it; batched_eigh does not raise."""
    gen = torch.Generator().manual_seed(13)
    sizes = [40, 64, 96]
    mats = [kfac_factor(n, gen) for n in sizes]
    prev = [random_orthogonal(n, gen) for n in sizes]
    values, vectors, status = warm(mats, prev, dtype)
    assert status.tolist() == [FALLBACK] * len(sizes)
    check(mats, values, vectors, dtype)
    values, vectors = ops.batched_eigh([a.to(dtype) for a in mats], [q.to(dtype) for q in prev])
    check(mats, values, vectors, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_max_sweeps_bounds_the_refinement(dtype):
    """A 1e-3 drift needs a few refinement steps: with max_sweeps = 1 the kernel falls back (and
    says so), with the default it refines."""
    gen = torch.Generator().manual_seed(14)
    old = [kfac_factor(64, gen) for _ in range(3)]
    new = [drift(a, 1e-3, gen) for a in old]
    prev = [torch.linalg.eigh(a)[1] for a in old]
    for max_sweeps, expected in [(1, FALLBACK), (15, OK)]:
        values, vectors, status = warm(new, prev, dtype, max_sweeps=max_sweeps)
        assert status.tolist() == [expected] * 3, max_sweeps
        check(new, values, vectors, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_rank_deficient_factors(dtype):
    """Factors of rank n/4 (a cluster of zero eigenvalues three quarters of the matrix), exact and
    after the samples drift, which keeps the rank."""
    gen = torch.Generator().manual_seed(15)
    sizes = [32, 48, 64, 96]
    xs = [torch.randn(n // 4, n, dtype=torch.float64, generator=gen) for n in sizes]
    old = [x.T @ x / x.shape[0] for x in xs]
    prev = [torch.linalg.eigh(a)[1] for a in old]
    for rel in [0.0, 1e-3, 1e-1]:
        moved = [x + rel * torch.randn(x.shape, dtype=torch.float64, generator=gen) for x in xs]
        new = [x.T @ x / x.shape[0] for x in moved]
        values, vectors, status = warm(new, prev, dtype)
        assert set(status.tolist()) <= {OK, FALLBACK}
        if rel <= 1e-3:
            assert status.tolist() == [OK] * len(sizes), rel
        check(new, values, vectors, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_repeated_and_clustered_eigenvalues(dtype):
    """Multiplicities and tight clusters (gaps of 1e-9 relative) survive a drift of the matrix."""
    gen = torch.Generator().manual_seed(16)
    spectra = [
        [float(i % 4) for i in range(64)],                             # four eigenvalues, 16 each
        [1.0] * 30 + [1.0 + 1e-9 * i for i in range(10)] + [2.0] * 8,  # a cluster inside a block
        [1.0 + 1e-3 * i for i in range(33)],                           # all within 3% of each other
        [0.0] * 40 + [1.0] * 20,                                       # two thirds of it zero
    ]
    old = [with_spectrum(sp, gen) for sp in spectra]
    prev = [torch.linalg.eigh(a)[1] for a in old]
    for rel in [0.0, 1e-6, 1e-3]:
        new = [drift(a, rel, gen) if rel else a for a in old]
        values, vectors, status = warm(new, prev, dtype)
        # The first and third are refined. A drift splits a 40-fold eigenvalue (the others) into
        # 40 directions the warm start knows nothing about, a cold problem: refined or handed
        # over, correct either way.
        assert status.tolist()[0] == OK and status.tolist()[2] == OK, rel
        assert set(status.tolist()) <= {OK, FALLBACK}
        check(new, values, vectors, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_identity_accepts_any_basis(dtype):
    """Every orthonormal basis diagonalises c·I: the warm start is returned as it is, refined only
    for orthonormality."""
    gen = torch.Generator().manual_seed(17)
    sizes = [28, 40, 96]
    mats = [3.0 * torch.eye(n, dtype=torch.float64) for n in sizes]
    prev = [random_orthogonal(n, gen) for n in sizes]
    values, vectors, status = warm(mats, prev, dtype)
    assert status.tolist() == [OK] * len(sizes)
    check(mats, values, vectors, dtype, orth=refined_orth_bound)
    for q, q0 in zip(vectors, prev):
        # Same basis up to the order of the columns (all eigenvalues equal: any order).
        overlap = (q.double().T @ q0).abs().max(dim=1).values
        assert bool((overlap > 1 - 1e-5).all())


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("scale", [0.0, 1e-30, 1e30])
def test_warm_scale_and_zero(dtype, scale):
    """The refinement works on A scaled to unit norm: tiny and huge factors (1e±30, beyond
    float32's squares) behave like unit ones, and a zero factor keeps its basis."""
    gen = torch.Generator().manual_seed(19)
    old = [kfac_factor(n, gen) for n in (28, 40)]
    new = [scale * drift(a, 1e-3, gen) for a in old]
    prev = [torch.linalg.eigh(a)[1] for a in old]
    values, vectors, status = warm(new, prev, dtype)
    assert status.tolist() == [OK, OK]
    if scale == 0.0:
        for lam, q in zip(values, vectors):
            assert bool((lam == 0).all())
            check([torch.zeros(q.shape[0], q.shape[0], dtype=torch.float64)], [lam], [q], dtype)
    else:
        check(new, values, vectors, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_mixed_sizes_in_one_warm_call(dtype):
    """Sizes below, inside and above the refinement range (n = 1, odd sizes, the padded 65 and 97)
    in one call, each against the reference."""
    gen = torch.Generator().manual_seed(18)
    sizes = [1, 3, 9, 10, 17, 31, 64, 65, 96, 97, 130, 2]
    old = [kfac_factor(n, gen) for n in sizes]
    new = [drift(a, 1e-3, gen) for a in old]
    prev = [torch.linalg.eigh(a)[1] for a in old]
    values, vectors, status = warm(new, prev, dtype)
    assert status.tolist() == [OK] * len(sizes)
    check(new, values, vectors, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("warm", [False, True])
def test_degenerate_eigenvalues(dtype, warm):
    gen = torch.Generator().manual_seed(2)
    mats = [torch.eye(5, dtype=torch.float64), 3.0 * torch.eye(30, dtype=torch.float64)]
    for n, spectrum in [(6, [1.0, 1.0, 1.0, 2.0, 2.0, 3.0]), (28, [0.0] * 14 + [5.0] * 14),
                        (40, [1.0] * 39 + [-1.0])]:
        q = random_orthogonal(n, gen)
        mats.append(q @ torch.diag(torch.tensor(spectrum, dtype=torch.float64)) @ q.T)
    prev = [random_orthogonal(a.shape[0], gen).to(dtype) for a in mats] if warm else None
    values, vectors, status = ops.batched_eigh_with_status([a.to(dtype) for a in mats], prev)
    # A random basis for the 40×40 matrix couples most pairs: solved cold, and reported. So is
    # the 28×28 one's (two blocks of equal eigenvalues), unless starts that far off are allowed,
    # when the cluster rotations solve it.
    far = warm and start_off(mats[3], prev[3]) > MAX_START_OFF
    expected = [OK, OK, OK, FALLBACK if far else OK, FALLBACK if warm else OK]
    assert status.tolist() == expected
    check(mats, values, vectors, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_diagonal_input_needs_no_sweep(dtype):
    """A diagonal matrix with an identity warm start (n = 28, refined) converges with
    max_sweeps=0; the result is the sorted diagonal and a permutation matrix, exactly."""
    d = torch.randperm(28, generator=torch.Generator().manual_seed(5)).to(dtype) * 0.5 - 4.0
    a = torch.diag(d)
    eye = torch.eye(28, dtype=dtype)
    values, vectors, status = ops.batched_eigh_with_status([a, a], [eye, eye], max_sweeps=0)
    assert status.tolist() == [0, 0]
    order = torch.argsort(d)
    for lam, q in zip(values, vectors):
        assert torch.equal(lam, d[order])
        assert torch.equal(q, eye[:, order])
    # Cold (the Householder + QL solver at both sizes) gives the same answer.
    for n in (4, 50):
        dd = torch.linspace(-1, 1, n, dtype=dtype).flip(0)
        (lam,), (q,) = ops.batched_eigh([torch.diag(dd)])
        torch.testing.assert_close(lam, dd.flip(0))
        torch.testing.assert_close(q.abs(), torch.eye(n, dtype=dtype).flip(1))


@pytest.mark.parametrize("dtype", DTYPES)
def test_max_sweeps_zero_only_accepts_a_finished_start(dtype):
    """max_sweeps = 0 allows no refinement: a start that already passes the stop test is taken as
    it is, any other is solved cold and reported as WARM_FALLBACK."""
    gen = torch.Generator().manual_seed(3)
    n = 40
    a = random_symmetric(n, gen, psd=True)
    prev = [random_orthogonal(n, gen).to(dtype)]
    values, vectors, status = ops.batched_eigh_with_status([a.to(dtype)], prev, max_sweeps=0)
    assert status.tolist() == [FALLBACK]
    check([a], values, vectors, dtype)
    # A tolerance the start already meets needs no step (float64: the basis is orthonormal to
    # float64 rounding; float32: its rounding, ~1e-6, is within the 5e-6 that a loose tol allows).
    _, vectors, status = ops.batched_eigh_with_status([a.to(dtype)], prev, tol=10.0, max_sweeps=0)
    assert status.tolist() == [OK]
    # Taken as it is: each column is one of the start's, bit for bit.
    match = (vectors[0].T @ prev[0]).abs().argmax(dim=1)
    assert torch.equal(vectors[0], prev[0][:, match])
    # float32 at a tol that asks for float64 work: the same start needs steps it may not take.
    if dtype == torch.float32:
        _, _, status = ops.batched_eigh_with_status([a.to(dtype)], prev, tol=1e-7, max_sweeps=0)
        assert status.tolist() == [FALLBACK]
    # The exact eigenvectors pass (float32: rounding them alone leaves a residual near 1e-7).
    exact = [torch.linalg.eigh(a)[1].to(dtype)]
    _, _, status = ops.batched_eigh_with_status([a.to(dtype)], exact, max_sweeps=0,
                                                tol=1e-5 if dtype == torch.float32 else None)
    assert status.tolist() == [OK]


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
    assert values[0].tolist() == [-2.5] and vectors[0].abs().tolist() == [[1.0]]


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


@pytest.mark.parametrize("where", [(4, 1), (1, 4)])  # the solvers read the lower triangle only,
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])  # the screen reads all
def test_non_finite_matrix_names_its_index(bad, where):
    mats = [torch.eye(3), torch.eye(40), torch.eye(5)]
    mats[2][where] = bad
    with pytest.raises(ValueError, match=r"matrices\[2\] holds NaN or Inf"):
        torch.ops.ngcuda.batched_eigh(mats, None, None, 15)
    with pytest.raises(ValueError, match=r"matrices\[2\] holds NaN or Inf"):
        ops.batched_eigh(mats)
    prev = [torch.eye(3), torch.eye(40), torch.eye(5)]
    prev[1][0, 0] = bad
    with pytest.raises(ValueError, match=r"prev_eigenvectors\[1\] holds NaN or Inf"):
        ops.batched_eigh([torch.eye(3), torch.eye(40), torch.eye(5)], prev)


@pytest.mark.parametrize("threads", [1, 2])
def test_non_finite_check_names_the_first_of_many(threads):
    # Enough matrices that the check is split over threads; the later bad matrix may be seen first.
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        gen = torch.Generator().manual_seed(5)
        for first, second in [(3, 200), (150, 151), (0, 255), (255, 255)]:
            mats = [torch.eye(24) for _ in range(256)]
            prev = [torch.eye(24) for _ in range(256)]
            for i in (first, second):
                mats[i][int(torch.randint(24, (1,), generator=gen)), 0] = float("nan")
                prev[i][0, int(torch.randint(24, (1,), generator=gen))] = float("inf")
            with pytest.raises(ValueError, match=rf"matrices\[{first}\] holds NaN or Inf"):
                ops.batched_eigh(mats)
            clean = [torch.eye(24) for _ in range(256)]
            with pytest.raises(ValueError, match=rf"prev_eigenvectors\[{first}\] holds NaN or Inf"):
                ops.batched_eigh(clean, prev)
    finally:
        torch.set_num_threads(old)


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
    ([torch.eye(32)], [2.0 * torch.eye(32)], {}, r"prev_eigenvectors\[0\] is not orthonormal"),
    # Far off as well as not orthonormal: still the caller's error, not a quiet cold solve.
    ([torch.diag(torch.arange(1.0, 33.0))], [1.5 * torch.ones(32, 32) / 32 ** 0.5 + torch.eye(32)], {},
     r"prev_eigenvectors\[0\] is not orthonormal"),
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
