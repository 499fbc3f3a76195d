"""CPU tests of the CUDA kernels' host-side planning (csrc/cuda/eigh_plan.h).

The planner is C++ shared by the kernels and the launchers; the CUDA build exposes it through the
test ops ``torch.ops.ngcuda._eigh_plan`` and friends, which run on the CPU. The last tests replay
the Jacobi kernel's algorithm (same schedule from ``_round_robin``, same rotation formulas, same
phases and stopping rule) in NumPy, to check the algorithm itself without a GPU.
"""
from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

import ngcuda  # noqa: F401  (loads the extension)


def _has_plan_ops() -> bool:
    try:
        torch.ops.ngcuda._eigh_plan
    except (AttributeError, RuntimeError):
        return False
    return True


pytestmark = pytest.mark.skipif(
    not _has_plan_ops(), reason="the planner test ops are built with the CUDA kernels only"
)

H100_SMEM = 232448  # sharedMemPerBlockOptin, 227 KB
A100_SMEM = 166912  # 163 KB
DEFAULT_SMEM = 49152

EMPTY, JACOBI, BATCHED, SYEVD = 0, 1, 2, 3


def layout(n: int) -> dict[str, int]:
    keys = ["m", "lda", "a_off", "v_off", "rot_off", "red_off", "pq_off", "rank_off", "bytes",
            "threads"]
    return dict(zip(keys, torch.ops.ngcuda._jacobi_layout(n)))


@pytest.mark.parametrize("n", list(range(1, 41)) + [63, 64, 117, 118, 119])
def test_round_robin_meets_every_pair_once_in_disjoint_rounds(n):
    flat = torch.ops.ngcuda._round_robin(n)
    m = layout(n)["m"]
    assert m == n + (n % 2) or (n == 1 and m == 2)
    pairs = list(zip(flat[0::2], flat[1::2]))
    per_round = m // 2
    assert len(pairs) == (m - 1) * per_round
    for r in range(m - 1):
        players = [x for pq in pairs[r * per_round:(r + 1) * per_round] for x in pq]
        assert sorted(players) == list(range(m)), f"round {r} is not a perfect matching"
    assert all(p < q for p, q in pairs)
    assert sorted(pairs) == list(itertools.combinations(range(m), 2))


@pytest.mark.parametrize("n", [1, 2, 3, 16, 33, 64, 100, 119, 160])
def test_jacobi_layout_sections_are_aligned_and_disjoint(n):
    L = layout(n)
    assert L["lda"] % 2 == 1 and L["lda"] >= n
    m, half = L["m"], L["m"] // 2
    sections = [
        ("a_off", n * L["lda"] * 8),
        ("v_off", n * L["lda"] * 8),
        ("rot_off", 4 * half * 8),
        ("red_off", 34 * 8),
        ("pq_off", 2 * half * 4),
        ("rank_off", n * 4),
    ]
    end = 0
    for key, size in sections:
        assert L[key] % 16 == 0
        assert L[key] >= end, f"{key} overlaps the section before it"
        end = L[key] + size
    assert L["bytes"] >= end and L["bytes"] % 16 == 0
    assert L["threads"] % 32 == 0 and 32 <= L["threads"] <= 1024


@pytest.mark.parametrize("smem", [DEFAULT_SMEM, A100_SMEM, H100_SMEM])
def test_jacobi_max_n_is_the_largest_fitting_size(smem):
    n = torch.ops.ngcuda._jacobi_max_n(smem)
    assert layout(n)["bytes"] <= smem < layout(n + 1)["bytes"]


def test_jacobi_max_n_on_known_devices():
    # float64 A and V: 16·n² bytes, so ≈ sqrt(227 KB / 16) on H100.
    assert torch.ops.ngcuda._jacobi_max_n(H100_SMEM) == 119
    assert torch.ops.ngcuda._jacobi_max_n(A100_SMEM) == 101


def test_eigh_plan_paths():
    sizes = [0, 1, 5, 119, 120, 120, 500, 1024, 1024, 1025, 1025, 3000, 5]
    got = torch.ops.ngcuda._eigh_plan(sizes, H100_SMEM)
    assert got == [EMPTY, JACOBI, JACOBI, JACOBI, BATCHED, BATCHED, SYEVD, BATCHED, BATCHED,
                   SYEVD, SYEVD, SYEVD, JACOBI]
    # A smaller shared memory moves the boundary, nothing else.
    got = torch.ops.ngcuda._eigh_plan([101, 102, 102], A100_SMEM)
    assert got == [JACOBI, BATCHED, BATCHED]


@pytest.mark.parametrize("rows", [0, 1, 100, 511, 512, 513, 5000, 10**6])
@pytest.mark.parametrize("tiles", [1, 3, 136, 8778])
def test_syrk_split(rows, tiles):
    sms = 132
    k = torch.ops.ngcuda._syrk_split(rows, tiles, sms)
    assert 1 <= k <= 64
    if k > 1:
        assert -(-rows // k) >= 512 or rows // (k - 1) >= 512  # at least ~512 rows per split
        assert (k - 1) * tiles < 2 * sms  # no more splits than filling the device needs
    if tiles >= 2 * sms:
        assert k == 1


# ---- the Jacobi kernel's algorithm, replayed in NumPy ----

SKIP_RMS, SKIP_THETA = 0.1, 100.0  # plan::kSkipRms, plan::kSkipTheta


def jacobi_replay(a: np.ndarray, tol: float, max_sweeps: int, v0: np.ndarray | None = None):
    """What jacobi_eigh_kernel computes, phase by phase, in float64. Returns (λ, V, status)."""
    n = a.shape[0]
    if not np.isfinite(a).all():
        return np.full(n, np.nan), np.full((n, n), np.nan), 1
    A = np.tril(a).astype(np.float64)
    A = A + np.tril(A, -1).T
    V = np.eye(n) if v0 is None else v0.astype(np.float64).copy()
    flat = torch.ops.ngcuda._round_robin(n)
    m = layout(n)["m"]
    half = m // 2
    rounds = np.array(flat, dtype=np.int64).reshape(m - 1, half, 2)
    stop2 = tol * tol * float((A * A).sum())
    converged = False
    sweep = 0
    while True:
        off = A - np.diag(np.diag(A))
        off2 = float((off * off).sum())  # summed directly, as the kernel does: no cancellation
        if off2 <= stop2:
            converged = True
            break
        if sweep >= max_sweeps:
            break
        sweep += 1
        skip_below = SKIP_RMS * np.sqrt(off2 / (n * (n - 1)))
        for r in range(m - 1):
            P, Q = rounds[r, :, 0], rounds[r, :, 1]
            keep = Q < n
            P, Q = P[keep], Q[keep]
            apq, app, aqq = A[P, Q], A[P, P], A[Q, Q]
            tiny_in_cluster = (np.abs(apq) < skip_below) & (
                np.abs(aqq - app) < 2 * SKIP_THETA * np.abs(apq))
            keep = (apq != 0) & ~tiny_in_cluster
            P, Q, apq, app, aqq = P[keep], Q[keep], apq[keep], app[keep], aqq[keep]
            theta = (aqq - app) / (2 * apq)
            big = np.abs(theta) > 1e15
            t = np.where(big, 0.5 / np.where(big, theta, 1.0),
                         np.where(theta >= 0, 1.0, -1.0) / (np.abs(theta) + np.sqrt(1 + theta**2)))
            c = 1 / np.sqrt(1 + t * t)
            s = t * c
            dp, dq = app - t * apq, aqq + t * apq
            x, y = A[P, :].copy(), A[Q, :].copy()
            A[P, :], A[Q, :] = c[:, None] * x - s[:, None] * y, s[:, None] * x + c[:, None] * y
            x, y = A[:, P].copy(), A[:, Q].copy()
            A[:, P], A[:, Q] = c * x - s * y, s * x + c * y
            x, y = V[:, P].copy(), V[:, Q].copy()
            V[:, P], V[:, Q] = c * x - s * y, s * x + c * y
            A[P, P], A[Q, Q], A[P, Q], A[Q, P] = dp, dq, 0.0, 0.0
    d = np.diag(A).copy()
    order = np.lexsort((np.arange(n), d))  # ascending, ties by index: the kernel's ranks
    return d[order], V[:, order], 0 if converged else 2


def _spd(rng, n, spread=1.0):
    x = rng.standard_normal((2 * n + 3, n)) * np.linspace(1, spread, n)
    return x.T @ x / (2 * n + 3)


@pytest.mark.parametrize("n", [1, 2, 3, 7, 16, 33, 50])
def test_jacobi_replay_matches_lapack(n):
    rng = np.random.default_rng(n)
    a = _spd(rng, n, spread=10.0)
    lam, V, status = jacobi_replay(a, 1e-14, 15)
    assert status == 0
    ref = np.linalg.eigvalsh(a)
    norm = np.linalg.norm(a)
    assert np.abs(lam - ref).max() <= 1e-12 * norm
    assert np.linalg.norm(a @ V - V * lam) <= 1e-12 * norm
    assert np.linalg.norm(V.T @ V - np.eye(n)) <= 1e-12
    assert np.all(np.diff(lam) >= 0)


def test_jacobi_replay_uses_the_lower_triangle_and_handles_repeats():
    rng = np.random.default_rng(1)
    n = 9
    a = np.diag([2.0] * 4 + [5.0] * 5)
    q, _ = np.linalg.qr(rng.standard_normal((n, n)))
    sym = q @ a @ q.T
    garbage_upper = np.tril(sym) + np.triu(rng.standard_normal((n, n)), 1)
    lam, V, status = jacobi_replay(garbage_upper, 1e-14, 15)
    assert status == 0
    np.testing.assert_allclose(lam, np.diag(a), atol=1e-12)
    assert np.linalg.norm(sym @ V - V * lam) <= 1e-12 * np.linalg.norm(sym)


def test_jacobi_replay_status_codes():
    rng = np.random.default_rng(2)
    a = _spd(rng, 6)
    assert jacobi_replay(a, 1e-14, 0)[2] == 2  # no sweep allowed, not diagonal
    assert jacobi_replay(np.diag([3.0, 1.0, 2.0]), 1e-14, 0)[2] == 0
    a[2, 1] = np.nan
    assert jacobi_replay(a, 1e-14, 15)[2] == 1
    assert jacobi_replay(np.zeros((4, 4)), 1e-14, 15)[2] == 0


def test_warm_start_replay_takes_few_sweeps():
    """The warm start of batched_eigh.cpp: one Newton–Schulz step on the old basis, B = QᵀAQ, then
    Jacobi from V = Q. A slightly changed matrix needs fewer sweeps than a cold start."""
    rng = np.random.default_rng(3)
    n = 40
    a = _spd(rng, n, spread=5.0)
    _, q_old = np.linalg.eigh(a)
    q_old = q_old.astype(np.float32).astype(np.float64)  # a float32 basis from the last call
    a2 = a + 1e-3 * _spd(rng, n)
    q = q_old @ (1.5 * np.eye(n) - 0.5 * q_old.T @ q_old)
    assert np.linalg.norm(q.T @ q - np.eye(n)) <= 1e-11
    b = q.T @ a2 @ q

    def sweeps(mat, v0):
        for s in range(16):
            if jacobi_replay(mat, 1e-14, s, v0)[2] == 0:
                return s
        return 99

    warm, cold = sweeps(b, q), sweeps(a2, None)
    assert warm < cold
    lam, V, status = jacobi_replay(b, 1e-14, 15, q)
    assert status == 0
    assert np.linalg.norm(a2 @ V - V * lam) <= 1e-11 * np.linalg.norm(a2)
    assert np.linalg.norm(V.T @ V - np.eye(n)) <= 1e-11


def _clustered(rng, n, values):
    q, _ = np.linalg.qr(rng.standard_normal((n, n)))
    lam = np.repeat(values, [n // len(values)] * (len(values) - 1) + [n - (len(values) - 1) * (n // len(values))])
    return q @ np.diag(lam) @ q.T, np.sort(lam)


@pytest.mark.parametrize("n", [40, 118])
@pytest.mark.parametrize("kind", ["clusters", "rank_deficient", "dead_features"])
def test_jacobi_replay_converges_in_15_sweeps_on_hard_spectra(n, kind):
    """Exactly repeated eigenvalues (K-FAC factors have them: dead features, rank-deficient
    batches) converge within the default 15 sweeps at the float64 default tol."""
    rng = np.random.default_rng(n)
    if kind == "clusters":
        a, _ = _clustered(rng, n, [2.0, 5.0, 7.0])
    elif kind == "rank_deficient":
        x = rng.standard_normal((n // 4, n))
        a = x.T @ x
    else:
        a = np.zeros((n, n))
        a[: n // 2, : n // 2] = _spd(rng, n // 2)
    lam, V, status = jacobi_replay(a, 1e-14, 15)
    assert status == 0
    norm = np.linalg.norm(a)
    assert np.linalg.norm(a @ V - V * lam) <= 1e-13 * norm
    assert np.abs(lam - np.linalg.eigvalsh(a)).max() <= 1e-13 * norm
