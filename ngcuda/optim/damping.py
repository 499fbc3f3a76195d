"""Damping, trust region and eigenvalue-corrected scaling.

* Tikhonov damping, exact in the eigenbasis: with ``A = Q_A Λ_A Q_Aᵀ`` and ``G = Q_G Λ_G Q_Gᵀ``,
  ``(A⊗G + γI)⁻¹ vec(g) = vec(Q_G [(Q_Gᵀ g Q_A) / (λ_G λ_Aᵀ + γ)] Q_Aᵀ)`` — no factored (π)
  approximation of the damping.
* EKFAC (George et al. 2018): the Kronecker eigenvalues ``λ_G λ_Aᵀ`` are replaced by the second
  moments of the per-example gradients in the Kronecker eigenbasis,
  ``S = Σ_i (Q_Gᵀ ĝ_i)² (Q_Aᵀ ā_i)²ᵀ / n``; preconditioning divides by ``S + γ``.
* KL clipping (Ba, Grosse & Martens 2017): the preconditioned step is scaled by
  ``ν = min(1, sqrt(κ / (lr² Σ_layers gᵀ F̃⁻¹ g)))``.
* Levenberg–Marquardt adaptation (Martens & Grosse 2015 §6.5): ``ρ = (L(θ+δ) − L(θ)) / (M(δ) − M(0))``
  with ``M(δ) − M(0) = ∇Lᵀδ + ½ δᵀF̃δ`` (undamped K-FAC curvature); ``ρ > 3/4`` → ``γ ← ω γ``, ``ρ < 1/4`` → ``γ ← γ / ω``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

from torch import Tensor

__all__ = ["LMConfig", "kl_clip_scale", "lm_update", "ekfac_scales", "ekfac_precondition",
           "damped_curvature_energy"]


@dataclass(frozen=True)
class LMConfig:
    """Levenberg–Marquardt damping adaptation (``adaptive_damping=True``).

    Attributes:
        interval: adapt every ``interval`` steps (each costs one extra closure evaluation).
        omega: multiplicative factor < 1; default ``(19/20)**interval`` as in K-FAC.
        min_damping, max_damping: clamp of the adapted damping.
    """

    interval: int = 5
    omega: Optional[float] = None
    min_damping: float = 1e-8
    max_damping: float = 1e4

    def __post_init__(self) -> None:
        if not isinstance(self.interval, int) or isinstance(self.interval, bool) \
                or self.interval < 1:
            raise ValueError(f"LMConfig: interval must be an int >= 1, got {self.interval!r}")
        # omega >= 1 would grow the damping when the model is trustworthy: the rule reversed
        if self.omega is not None and not 0.0 < self.omega < 1.0:
            raise ValueError(f"LMConfig: omega must be in (0, 1), got {self.omega!r}")
        if not 0.0 < self.min_damping < math.inf:
            raise ValueError(f"LMConfig: min_damping must be a finite number > 0 (KFAC needs a "
                             f"positive damping), got {self.min_damping!r}")
        if not self.min_damping <= self.max_damping < math.inf:
            raise ValueError(f"LMConfig: max_damping must be finite and >= min_damping "
                             f"({self.min_damping}), got {self.max_damping!r}")

    def factor(self) -> float:
        return self.omega if self.omega is not None else (19.0 / 20.0) ** self.interval


def kl_clip_scale(vg: float, lr: float, kl_clip: Optional[float]) -> float:
    """ν = min(1, sqrt(κ / (lr² · vg))) with ``vg = Σ gᵀF̃⁻¹g``; 1 when clipping is off."""
    if not kl_clip or lr == 0.0 or not math.isfinite(vg) or vg <= 0.0:
        return 1.0
    return min(1.0, math.sqrt(kl_clip / (lr * lr * vg)))


def lm_update(damping: float, rho: float, cfg: LMConfig) -> float:
    """The Levenberg–Marquardt rule: shrink γ when the quadratic model is trustworthy."""
    if not math.isfinite(rho):
        rho = -math.inf
    if rho > 0.75:
        damping *= cfg.factor()
    elif rho < 0.25:
        damping /= cfg.factor()
    return float(min(max(damping, cfg.min_damping), cfg.max_damping))


def ekfac_scales(g_rows: Tensor, pa2: Tensor, QG: Tensor, n_rows: int) -> Tensor:
    """S [d_out, a_size] = Σ_r (Q_Gᵀ ĝ_r)² (Q_Aᵀ ā_r)²ᵀ / R.

    ``g_rows`` [R, d_out] are the scaled output-gradient rows with ``G = Σ ĝĝᵀ / R``; ``pa2``
    [R, a_size] holds ``(ā_r Q_A)²`` for the input rows with ``A = Σ āāᵀ / R``, so that
    ``S = λ_G λ_Aᵀ`` when the two are independent.
    """
    pg = (g_rows.to(QG.dtype) @ QG).square_()
    return (pg.T @ pa2) / float(n_rows)


def ekfac_precondition(g: Tensor, QA: Tensor, QG: Tensor, S: Tensor, damping: float) -> Tensor:
    """Q_G [(Q_Gᵀ g Q_A) / (S + γ)] Q_Aᵀ for one layer."""
    t = (QG.T @ g @ QA) / (S + damping)
    return QG @ t @ QA.T


def damped_curvature_energy(delta: Tensor, QA: Tensor, lamA: Tensor, QG: Tensor, lamG: Tensor,
                            damping: float, S: Optional[Tensor] = None) -> Tensor:
    """δᵀ(F̃ + γI)δ for one layer's update matrix δ [d_out, a_size] (a 0-dim tensor)."""
    t = QG.T @ delta @ QA
    scale = (lamG[:, None] * lamA[None, :] if S is None else S) + damping
    return (t.square() * scale).sum()
