"""Per-layer structure of the input factor ``A`` [D×D], D = d_in (+1 for the bias).

``G`` [d_out×d_out] is always kept full (d_out is a hidden width or a class count). What differs
is what is stored of ``A``, how it is refreshed and how ``(A⊗G + γI)⁻¹`` is applied:

============ ============================================ ======================= ===========
structure    approximation of A                           flops / factor update   memory
============ ============================================ ======================= ===========
``full``     none                                         2·R·D²                  D² (+ D²)
``block:k``  block-diagonal, contiguous blocks ≤ k, each  2·R·D·k                 D·k (+ D·k)
             eigendecomposed in the one batched_eigh call
``lowrank:r`` U Λ Uᵀ + σ(I − UUᵀ): top-r eigenpairs plus  4·(nnz(X)+nnz(Â))·p     3·D·p
             the mean of the remaining eigenvalues σ      (p = r + oversampling)
``diag``     diag(A)                                      nnz(X̄)                  D
============ ============================================ ======================= ===========

R = rows (nodes), X̄ = the layer's rows (``[X, 1]`` or ``[ÂX, 1]``). Eigendecomposition per
``inverse_every``: full ~4·D³, block ~4·D·k², low rank ~6·D·p² + 4·p³, diag nothing.
Preconditioning per step: full 4·d_out·D², block 4·d_out·D·k, low rank 4·d_out·D·r, diag 2·d_out·D.
All four are exact for the matrix they store, with Tikhonov damping exact in the eigenbasis of
that matrix ⊗ G: ``(λ_G λ_Aᵀ + γ)`` per eigenpair.

Low rank, as a moving average. The exact average ``A_t = ε A_{t−1} + (1−ε) S_t`` is never formed.
Between eigendecompositions a test matrix ``Ω = [W, R]`` [D, p] stays fixed (W: the previous top-r
basis, R: fresh random directions orthogonal to it) and only the sketch ``Y = A Ω`` is averaged:
``Y ← ε Y + (1−ε) S_t Ω``, which is exact for the average because the sketch is linear in A. Each
``S_t Ω`` is two sparse products each way through ``X`` (and ``Â``), never a D×D matrix. At an
eigendecomposition, the Nyström approximation ``Y (ΩᵀY)⁻¹ Yᵀ`` (shifted, Tropp et al. 2017) gives
the top r eigenpairs through the p×p matrix ``BᵀB``, which joins the one batched_eigh call;
``σ = (tr A − Σλ)/(D − r)`` with ``tr A`` estimated from the sketch (exact on W, unbiased on the
random R). Then ``Ω`` is re-drawn around the new basis and the sketch restarted as
``Y = (U Λ Uᵀ + σ(I − UUᵀ)) Ω``: from then on the history is the previous low-rank model plus the
new statistics applied implicitly. Each period is one step of subspace iteration, warm-started
from the last basis; the first update runs ``power_iters`` extra passes. With r = D the sketch
spans everything and the structure is exactly ``full``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence, Union

import torch
from torch import Tensor

from .rows import RowSource, block_bounds, block_statistics, full_statistic_

__all__ = ["FactorStructure", "Full", "Block", "LowRank", "Diag", "LayerShape", "Cost",
           "parse_structure", "choose_structure", "Spec"]

Spec = Union[str, "FactorStructure"]

# Cost model weights, in dense-matmul flops: a sparse multiply-add costs ~SPARSE of them
# (measured: torch/scipy sparse @ dense at 1–4 GFLOP/s against ~50 GFLOP/s for a dense GEMM on
# this 2-core CPU), a symmetric eigendecomposition of n ~EIGH·n³.
SPARSE = 20.0
EIGH = 4.0
# A sparse × sparse product (ÂX with a sparse X, for diag) per multiply-add: torch and scipy both
# took ~0.8 s for Coauthor CS's 11M (hash-accumulated), ~2000 dense flops each.
SPGEMM = 2000.0


@dataclass(frozen=True)
class LayerShape:
    """What the automatic choice and the cost estimates know of a layer (at its first update)."""

    D: int               # factor size d_in (+1)
    d_out: int
    rows: int            # R: rows of X̄ per factor update
    nnz_x: int           # stored entries of X (R·d when dense)
    sparse_x: bool
    nnz_adj: int = 0     # entries of Â (GCN), 0 otherwise

    def x_product(self, p: int) -> float:
        """Work of ``X V`` for V [d, p] (the same for ``Xᵀ Z``)."""
        return (SPARSE if self.sparse_x else 1.0) * 2.0 * self.nnz_x * p

    def adj_product(self, p: int) -> float:
        return SPARSE * 2.0 * self.nnz_adj * p

    def step_work(self) -> float:
        """The layer's own forward + backward (about what an Adam step spends on it)."""
        return 3.0 * (self.x_product(self.d_out) + self.adj_product(self.d_out))


@dataclass(frozen=True)
class Cost:
    """Estimated work (dense-flop units) and persistent memory of one structure on one layer."""

    update: float
    decompose: float
    precondition: float
    memory_bytes: int

    def per_step(self, factor_every: int, inverse_every: int, constant_input: bool = False
                 ) -> float:
        """Work per step; with a constant input A's update and eigendecomposition happen once,
        so they are spread over :data:`CONSTANT_INPUT_STEPS` steps."""
        if constant_input:
            return (self.update + self.decompose) / CONSTANT_INPUT_STEPS + self.precondition
        return (self.update / max(1, factor_every) + self.decompose / max(1, inverse_every)
                + self.precondition)


# A constant input's A is formed and decomposed once: its one-off cost is charged as if spread over
# this many steps (a short training run), so a one-off D³ that would take minutes still rules full out.
CONSTANT_INPUT_STEPS = 100


# A pair (i, j) of non-zeros of one sparse row added into a factor: ~200 dense flops (measured:
# the sparse-x full update of Coauthor CS, 1.9e9 pairs, 7.8 s on one thread).
PAIR = 200.0


def _sparse_gather(s: LayerShape) -> float:
    """Forming the sparse rows of X̄ (for a GCN layer the sparse ÂX, row by row)."""
    if s.nnz_adj:
        return SPGEMM * s.nnz_adj * max(1.0, s.nnz_x / max(1, s.rows))
    return SPARSE * s.nnz_x


def _sparse_pairs(s: LayerShape) -> float:
    """Σ_rows nnz(row)²/2 for the rows of X̄, with ÂX's fill-in estimated from the degrees."""
    per_row = s.nnz_x / max(1, s.rows)
    if s.nnz_adj:
        per_row = min(float(s.D), per_row * s.nnz_adj / max(1, s.rows))
    return s.rows * per_row * per_row / 2.0


class FactorStructure:
    """One layer's A structure: its state lives in the optimizer's per-weight state ``st``.

    Keys it owns in ``st``: ``"A"`` (the averaged statistic in the structure's own form), its
    eigen-data (``"QA"``, ``"lamA"``, …) and ``"A_structure"`` (its name, for checkpoints).
    """

    name = "full"
    # full layers are preconditioned together by ops.precondition; the others one by one
    batched = False

    # ---------------------------------------------------------------- factor update
    def statistic(self, sources: Sequence[RowSource], st: dict, dtype: torch.dtype,
                  device: torch.device) -> list[Tensor]:
        """This step's statistic, in the structure's form (finite-checked by the caller)."""
        raise NotImplementedError

    def same(self, st: dict, stat: list[Tensor]) -> bool:
        """Whether ``stat`` equals the stored average (a constant input seen again)."""
        a = st["A"]
        a = a if isinstance(a, list) else [a]
        return len(a) == len(stat) and all(torch.equal(x, y) for x, y in zip(a, stat))

    def blend(self, st: dict, stat: list[Tensor], decay: float, first: bool) -> None:
        """``A ← decay·A + (1 − decay)·stat`` (``A ← stat`` on the first update)."""
        if first:
            st["A"] = stat if len(stat) > 1 or isinstance(self, Block) else stat[0]
            return
        a = st["A"]
        for x, y in zip(a if isinstance(a, list) else [a], stat):
            x.mul_(decay).add_(y, alpha=1.0 - decay)

    # ---------------------------------------------------------------- decomposition
    def ready(self, st: dict) -> bool:
        return "QA" in st

    def eigh_items(self, st: dict) -> list[tuple[Tensor, Tensor]]:
        """(matrix, warm start) pairs for the one batched_eigh call."""
        a = st["A"]
        q = st.get("QA")
        return [(a, q if isinstance(q, Tensor) and q.shape == a.shape else _eye_like(a))]

    def take_eigh(self, st: dict, results: list[tuple[Tensor, Tensor]]) -> None:
        vals, vecs = results[0]
        st["lamA"] = vals.clamp(min=0.0)
        st["QA"] = vecs.contiguous()

    # ---------------------------------------------------------------- preconditioning
    def precondition(self, g: Tensor, st: dict, QG: Tensor, lamG: Tensor, damping: float
                     ) -> Tensor:
        """``(A⊗G + γI)⁻¹ vec(g)`` for g [d_out, D] (reference path; full layers are batched)."""
        QA, lamA = st["QA"], st["lamA"]
        t = (QG.T @ g @ QA) / (lamG[:, None] * lamA[None, :] + damping)
        return QG @ t @ QA.T

    def right_apply(self, st: dict, m: Tensor) -> Tensor:
        """``m A`` with A the stored model (from its eigen-data), m [k, D]."""
        QA, lamA = st["QA"], st["lamA"]
        return ((m @ QA) * lamA[None, :]) @ QA.T

    # ---------------------------------------------------------------- cost
    def cost(self, s: LayerShape) -> Cost:
        D = s.D
        if s.sparse_x:  # the sparse-x op: gather each row of X̄ sparsely, add its pairs
            upd = _sparse_gather(s) + PAIR * _sparse_pairs(s)
        else:
            upd = 2.0 * s.rows * D * D + s.adj_product(D)
        return Cost(upd, EIGH * D ** 3, 4.0 * s.d_out * D * D, 4 * 3 * D * D)

    def __repr__(self) -> str:
        return self.name


def _eye_like(a: Tensor) -> Tensor:
    return torch.eye(a.shape[0], dtype=a.dtype, device=a.device)


class Full(FactorStructure):
    """The dense D×D factor (the ops' fast path, batched across layers)."""

    name = "full"
    batched = True

    def statistic(self, sources, st, dtype, device):
        D = sources[0].size
        out = torch.zeros(D, D, dtype=dtype, device=device)
        return [full_statistic_(out, sources)]


class Block(FactorStructure):
    """Block-diagonal A over a contiguous partition into blocks of at most k columns."""

    def __init__(self, k: int) -> None:
        if k < 1:
            raise ValueError(f"block size must be >= 1, got {k}")
        self.k = int(k)
        self.name = f"block:{self.k}"

    def statistic(self, sources, st, dtype, device):
        return block_statistics(sources, block_bounds(sources[0].size, self.k), dtype)

    def eigh_items(self, st):
        qs = st.get("QA")
        out = []
        for j, a in enumerate(st["A"]):
            q = qs[j] if isinstance(qs, list) and j < len(qs) else None
            out.append((a, q if q is not None and q.shape == a.shape else _eye_like(a)))
        return out

    def take_eigh(self, st, results):
        st["lamA"] = [v.clamp(min=0.0) for v, _ in results]
        st["QA"] = [q.contiguous() for _, q in results]

    def _blocks(self, st: dict):
        j0 = 0
        for q, lam in zip(st["QA"], st["lamA"]):
            yield j0, j0 + q.shape[0], q, lam
            j0 += q.shape[0]

    def precondition(self, g, st, QG, lamG, damping):
        gg = QG.T @ g
        out = torch.empty_like(gg)
        for j0, j1, q, lam in self._blocks(st):
            t = (gg[:, j0:j1] @ q) / (lamG[:, None] * lam[None, :] + damping)
            out[:, j0:j1] = t @ q.T
        return QG @ out

    def right_apply(self, st, m):
        out = torch.empty_like(m)
        for j0, j1, q, lam in self._blocks(st):
            out[:, j0:j1] = ((m[:, j0:j1] @ q) * lam[None, :]) @ q.T
        return out

    def cost(self, s):
        D, k = s.D, min(self.k, s.D)
        if s.sparse_x:  # pairs within a block only
            upd = 2.0 * _sparse_gather(s) + PAIR * _sparse_pairs(s) * k / D
        else:
            upd = 2.0 * s.rows * D * k + s.adj_product(D)
        return Cost(upd, EIGH * D * k * k, 4.0 * s.d_out * D * k, 4 * 3 * D * k)


class Diag(FactorStructure):
    """diag(A) only: preconditioning divides by ``λ_G a_j + γ`` in G's eigenbasis."""

    name = "diag"

    def statistic(self, sources, st, dtype, device):
        total = float(sum(s.rows for s in sources))
        acc = None
        for s in sources:
            d = s.diag().to(dtype)
            acc = d if acc is None else acc.add_(d)
        return [acc.div_(total)]

    def ready(self, st):
        return "lamA" in st

    def eigh_items(self, st):
        return []

    def take_eigh(self, st, results):
        st["lamA"] = st["A"].clamp(min=0.0)

    def precondition(self, g, st, QG, lamG, damping):
        return QG @ ((QG.T @ g) / (lamG[:, None] * st["lamA"][None, :] + damping))

    def right_apply(self, st, m):
        return m * st["lamA"][None, :]

    def cost(self, s):
        if s.nnz_adj and s.sparse_x:  # a sparse ÂX
            upd = SPGEMM * s.nnz_adj * max(1.0, s.nnz_x / max(1, s.rows))
        else:
            upd = s.adj_product(s.D) + 2.0 * s.nnz_x
        return Cost(upd, 0.0, 2.0 * s.d_out * s.D, 4 * 3 * s.D)


class LowRank(FactorStructure):
    """``U Λ Uᵀ + σ(I − UUᵀ)``: top-r eigenpairs by a streaming Nyström sketch (module docstring).

    Args:
        r: rank (clamped to D).
        oversample: extra random columns of the test matrix (exploration and σ's estimate).
        power_iters: subspace-iteration passes at the first update.
        seed: seed of the random test directions.
    """

    def __init__(self, r: int, oversample: Optional[int] = None, power_iters: int = 2,
                 seed: int = 0) -> None:
        if r < 1:
            raise ValueError(f"rank must be >= 1, got {r}")
        self.r = int(r)
        self.oversample = oversample
        self.power_iters = int(power_iters)
        self.name = f"lowrank:{self.r}"
        self.seed = int(seed)
        self._pending: Optional[tuple[Tensor, float, int]] = None

    def sizes(self, D: int) -> tuple[int, int]:
        """(r, p): rank and sketch width for a factor of size D."""
        r = min(self.r, D)
        extra = self.oversample if self.oversample is not None else max(8, r // 4)
        return r, min(D, r + extra)

    def _randn(self, st: dict, D: int, k: int, like: Tensor) -> Tensor:
        # Draw n of a layer is seeded by (seed, n), with n kept in the state: a checkpoint
        # resumes with the same random directions.
        n = st.get("A_draws", 0)
        st["A_draws"] = n + 1
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + n)
        return torch.randn(D, k, generator=gen, dtype=torch.float64).to(like.dtype).to(
            like.device)

    def _test_matrix(self, st: dict, W: Tensor, p: int) -> Tensor:
        """Ω = [W, R]: W [D, r] orthonormal, R random orthonormal and orthogonal to W."""
        D, r = W.shape
        if p == r:
            return W
        R = self._randn(st, D, p - r, W)
        R = R - W @ (W.T @ R)
        R = R - W @ (W.T @ R)  # twice is enough (Kahan–Parlett)
        R = torch.linalg.qr(R).Q
        return torch.cat([W, R], 1)

    @staticmethod
    def _apply(sources: Sequence[RowSource], v: Tensor) -> Tensor:
        total = float(sum(s.rows for s in sources))
        out = None
        for s in sources:
            y = s.apply(v)
            out = y if out is None else out.add_(y)
        return out.div_(total)

    def statistic(self, sources, st, dtype, device):
        D = sources[0].size
        r, p = self.sizes(D)
        if "A_omega" in st:
            omega = st["A_omega"]
        else:  # first update: a few passes of subspace iteration from random directions
            like = torch.empty(0, dtype=dtype, device=device)
            w = torch.linalg.qr(self._randn(st, D, p, like)).Q
            for _ in range(self.power_iters):
                w = torch.linalg.qr(self._apply(sources, w)).Q
            omega = self._test_matrix(st, w[:, :r], p)
        return [self._apply(sources, omega), omega]

    def same(self, st, stat):
        return False  # the sketch basis moves between updates; blending an equal S is a no-op

    def blend(self, st, stat, decay, first):
        y, omega = stat
        if first or "A_omega" not in st:
            st["A"], st["A_omega"] = y, omega
        else:
            st["A"].mul_(decay).add_(y, alpha=1.0 - decay)

    def eigh_items(self, st):
        y, omega = st["A"], st["A_omega"]
        D, p = omega.shape
        # shifted Nyström (Tropp et al. 2017, Alg. 3): Y_ν = Y + νΩ, M = ΩᵀY_ν = LLᵀ,
        # B = Y_ν L⁻ᵀ; then A_ν = BBᵀ, whose eigenpairs come from the p×p BᵀB.
        eps = torch.finfo(y.dtype).eps
        nu = math.sqrt(D) * eps * float(y.norm())
        for _ in range(6):
            y_nu = y + nu * omega
            m = omega.T @ y_nu
            L, info = torch.linalg.cholesky_ex(0.5 * (m + m.T))
            if int(info) == 0:
                break
            nu = max(nu * 10.0, eps)
        b = torch.linalg.solve_triangular(L, y_nu.T, upper=False).T  # Y_ν L⁻ᵀ
        self._pending = (b, nu, p)
        return [(b.T @ b, _eye_like(m))]

    def take_eigh(self, st, results):
        b, nu, p = self._pending
        self._pending = None
        s, v = results[0]
        D = b.shape[0]
        r = min(self.r, D)
        s, v = s.flip(0)[:r], v.flip(1)[:, :r]  # descending, top r
        keep = s > 0
        s_safe = torch.where(keep, s, torch.ones_like(s))
        U = (b @ v) / s_safe.sqrt()[None, :]
        basis = torch.linalg.qr(U).Q
        # With fewer non-zero eigenvalues than r (fewer rows than r), the columns whose s is
        # within rounding of ν are noise, and in float32 far from orthonormal (‖UᵀU − I‖ 0.02–0.2
        # against ~3e-6 otherwise); the preconditioner assumes UᵀU = I. Their λ is ~0 either way.
        if float(torch.linalg.matrix_norm(U.T @ U - _eye_like(U.T @ U))) > 1e-3:
            U = basis
        lam = (s - nu).clamp(min=0.0) * keep
        trace = self._trace(st, r)
        sigma = (trace - lam.sum()).clamp(min=0.0) / (D - r) if D > r else lam.new_zeros(())
        st["QA"], st["lamA"], st["A_sigma"] = U.contiguous(), lam, sigma
        # restart the sketch around the new basis: the history becomes the low-rank model
        omega = self._test_matrix(st, basis, p)
        st["A_omega"] = omega
        st["A"] = self.right_apply(st, omega.T).T

    @staticmethod
    def _trace(st: dict, r: int) -> Tensor:
        """tr A from the sketch: exact on W = Ω[:, :r], unbiased on the random rest."""
        y, omega = st["A"], st["A_omega"]
        D, p = omega.shape
        diag = (omega * y).sum(0)
        est = diag[:r].sum()
        if p > r:
            est = est + diag[r:].sum() * (D - r) / (p - r)
        return est

    def _split(self, m: Tensor, U: Tensor) -> tuple[Tensor, Tensor]:
        mu = m @ U
        return mu, m - mu @ U.T

    def precondition(self, g, st, QG, lamG, damping):
        U, lam, sigma = st["QA"], st["lamA"], st["A_sigma"]
        gg = QG.T @ g
        gu, rest = self._split(gg, U)
        top = (gu / (lamG[:, None] * lam[None, :] + damping)) @ U.T
        return QG @ (top + rest / (lamG[:, None] * sigma + damping))

    def right_apply(self, st, m):
        U, lam, sigma = st["QA"], st["lamA"], st["A_sigma"]
        mu, rest = self._split(m, U)
        return (mu * lam[None, :]) @ U.T + sigma * rest

    def cost(self, s):
        r, p = self.sizes(s.D)
        apply = 2.0 * (s.x_product(p) + s.adj_product(p))
        return Cost(apply, EIGH * p ** 3 + 6.0 * s.D * p * p, 4.0 * s.d_out * s.D * r,
                    4 * 3 * s.D * p)


def parse_structure(spec: Spec, seed: int = 0) -> FactorStructure:
    """``"full"``, ``"block:k"``, ``"lowrank:r"``, ``"diag"`` (or a structure) -> a structure."""
    if isinstance(spec, FactorStructure):
        return spec
    if not isinstance(spec, str):
        raise TypeError(f"factor structure must be a string, got {type(spec).__name__}")
    text = spec.strip().lower()
    kind, _, arg = text.partition(":")
    try:
        if kind == "full" and not arg:
            return Full()
        if kind == "diag" and not arg:
            return Diag()
        if kind == "block" and arg:
            return Block(int(arg))
        if kind == "lowrank" and arg:
            return LowRank(int(arg), seed=seed)
    except ValueError as e:
        raise ValueError(f"bad factor structure {spec!r}: {e}") from None
    raise ValueError(f"unknown factor structure {spec!r}: use full, block:K, lowrank:R, diag "
                     "or auto")


# Tried in order by the automatic choice: the first that fits the budget wins.
AUTO_CANDIDATES = ("full", "lowrank:256", "lowrank:128", "lowrank:64", "lowrank:32",
                   "lowrank:16", "block:128", "block:32", "diag")
# Below this much work per step (dense-flop units) any structure is fine: full.
AUTO_FLOOR = 5e7
# When none fits, the richest structure within this factor of the cheapest's work is taken: a
# small factor of a GCN layer costs its ÂH whatever the structure (on Coauthor Physics' output
# layer, D = 17, full is 5% dearer than diag: without the slack diag would be taken).
AUTO_SLACK = 1.1


def choose_structure(shape: LayerShape, factor_every: int = 1, inverse_every: int = 10,
                     budget: float = 1.0, seed: int = 0, constant_input: bool = False
                     ) -> FactorStructure:
    """The automatic choice: the first of :data:`AUTO_CANDIDATES` whose estimated extra work per
    step (update / factor_every + eigendecomposition / inverse_every + preconditioning) is at most
    ``max(budget × the layer's own forward+backward work, AUTO_FLOOR)``; otherwise the first whose
    work is within :data:`AUTO_SLACK` of the cheapest's.
    Ranks and block sizes not smaller than D are skipped (they would be ``full``).
    ``constant_input``: the layer's input is the same tensor every step (a feature matrix without
    input dropout), so A is updated and decomposed once (see :meth:`Cost.per_step`)."""
    limit = max(budget * shape.step_work(), AUTO_FLOOR)
    over: list[tuple[FactorStructure, float]] = []
    for spec in AUTO_CANDIDATES:
        s = parse_structure(spec, seed)
        if isinstance(s, LowRank) and s.r >= shape.D or isinstance(s, Block) and s.k >= shape.D:
            continue
        c = s.cost(shape).per_step(factor_every, inverse_every, constant_input)
        if c <= limit:
            return s
        over.append((s, c))
    cheapest = min(c for _, c in over)
    return next(s for s, c in over if c <= AUTO_SLACK * cheapest)
