"""Which gradients build the output factor G: the true Fisher or the empirical Fisher.

* ``"true"`` (default; Martens 2020): targets ``ỹ_i ~ p(y | z_i)`` are sampled from the model's
  predictive distribution and G is built from the gradients of ``Σ_i √w_i · (−log p(ỹ_i | z_i))`` at
  every registered layer's output. This needs the model outputs and a likelihood, given with
  :meth:`ngcuda.KFAC.set_outputs` after the forward pass and before ``loss.backward()``; on
  factor-update steps it runs ONE extra backward pass down to the first registered layer (retaining
  the graph for the user's backward). Parameter gradients are not touched.
* ``"empirical"``: G from the gradients of the user's own loss (no extra cost). Kunstner et al.
  (2019) show it can precondition badly far from the optimum.

Likelihoods (``outputs`` are per-row, ``[N, ...]``):

* ``"categorical"`` (cross-entropy): ``outputs`` are logits or log-probabilities;
  ``ỹ ~ softmax(z)``, ``−log p = −log_softmax(z)[ỹ]``.
* ``"gaussian"`` (squared error): ``outputs`` are means; ``ỹ = z + ε``, ``ε ~ N(0, I)``,
  ``−log p = ½‖z − ỹ‖²`` (unit variance; ``F.mse_loss``'s mean over the columns rescales the
  Fisher by a constant, which lr and damping absorb).
* ``"bernoulli"`` (binary cross-entropy): ``outputs`` are logits; ``ỹ ~ Bernoulli(σ(z))``.

Extra loss terms (``set_outputs(..., extra_terms=[(t, h), ...])``): a term of the loss that is a
convex function of an intermediate tensor ``t`` (not a likelihood of observed targets), with a
diagonal Hessian ``diag(h)`` w.r.t. each row of ``t``, e.g. a VAE's KL term w.r.t. ``μ`` and
``log σ²``. Its generalised Gauss-Newton block ``Jᵀ diag(h) J`` is added to the sampled Fisher by
backpropagating the probe ``√h ⊙ ξ`` (``ξ ~ N(0, I)``) from ``t`` in the same backward pass as the
sampled targets: ``E[ξ] = 0`` makes the cross terms vanish in expectation, so the output-gradient
covariance is the sum of the two curvatures. This is the sampled Fisher of a Gaussian with precision
``h`` centred at ``t`` (:func:`probe_term`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["FISHER_TYPES", "LIKELIHOODS", "ExampleRows", "example_rows", "normalize_likelihood",
           "probe_term", "row_weights", "sampled_nll"]

FISHER_TYPES = ("true", "empirical")
LIKELIHOODS = ("categorical", "gaussian", "bernoulli")
_ALIASES = {
    "ce": "categorical", "cross_entropy": "categorical", "nll": "categorical",
    "mse": "gaussian", "normal": "gaussian",
    "bce": "bernoulli", "binary_cross_entropy": "bernoulli",
}


def normalize_likelihood(name: Optional[str]) -> Optional[str]:
    """Canonical likelihood name (or None); raises naming the argument on an unknown one."""
    if name is None:
        return None
    key = _ALIASES.get(name.lower(), name.lower())
    if key not in LIKELIHOODS:
        raise ValueError(f"likelihood must be one of {LIKELIHOODS} (or an alias in "
                         f"{sorted(_ALIASES)}), got {name!r}")
    return key


def row_weights(outputs: Tensor, mask: Optional[Tensor]) -> Tensor:
    """Per-row weights [N] (float, on the outputs' device) from a bool mask, weights, or None."""
    n = outputs.shape[0]
    if mask is None:
        return torch.ones(n, dtype=outputs.dtype, device=outputs.device)
    if mask.dtype == torch.bool:
        if mask.shape != (n,):
            raise ValueError(f"mask must be a bool tensor of shape [{n}], got {tuple(mask.shape)}")
        return mask.to(device=outputs.device, dtype=outputs.dtype)
    if not mask.dtype.is_floating_point:  # node indices
        idx = mask.to(outputs.device).reshape(-1).long()
        if idx.numel():
            lo, hi = (int(v) for v in torch.aminmax(idx))  # one sync for both bounds
            if not -n <= lo <= hi < n:
                raise ValueError(f"mask (node indices) must lie in [-{n}, {n}), got [{lo}, {hi}]")
        # a repeated index weighs as often as out[idx] repeats that row in the loss
        w = torch.zeros(n, dtype=outputs.dtype, device=outputs.device)
        w.index_add_(0, torch.where(idx < 0, idx + n, idx), torch.ones_like(idx, dtype=w.dtype))
        return w
    if mask.shape != (n,):
        raise ValueError(f"mask must have shape [{n}], got {tuple(mask.shape)}")
    w = mask.to(device=outputs.device, dtype=outputs.dtype)
    if not bool(torch.isfinite(w).all()) or bool((w < 0).any()):
        raise ValueError("mask (row weights) must be finite and non-negative")
    return w


@dataclass(frozen=True)
class ExampleRows:
    """The rows a loss averages over, from :func:`row_weights`.

    weight: [N] row weights; rows: [R] indices of the rows with weight > 0; total: Σ weight;
    unit: every kept weight is 1 (a mask or node indices), so the √w factor is skipped.
    """

    weight: Tensor
    rows: Tensor
    total: float
    unit: bool


def example_rows(outputs: Tensor, mask: Optional[Tensor]) -> ExampleRows:
    """:class:`ExampleRows` of ``outputs`` [N, ...] for a mask as :func:`row_weights` takes it."""
    w = row_weights(outputs, mask)
    rows = torch.nonzero(w > 0).flatten()
    unit = mask is None or mask.dtype == torch.bool or (
        not mask.dtype.is_floating_point and (w.numel() == 0 or float(w.max()) <= 1.0))
    return ExampleRows(w, rows, float(w.sum()), unit)


def _per_row(t: Tensor) -> Tensor:
    """[R, ...] -> [R, prod(...)]; unlike reshape(R, -1), also for R = 0 (an empty selection)."""
    return t.reshape(t.shape[0], math.prod(t.shape[1:]))


def sampled_nll(outputs: Tensor, likelihood: str, weight: Union[Tensor, ExampleRows],
                generator: Optional[torch.Generator]) -> Tensor:
    """``Σ_i √w_i · (−log p(ỹ_i | z_i))`` with ``ỹ_i`` sampled from the model (scalar).

    The square root makes a row of weight ``w_i`` contribute ``w_i ĝ_i ĝ_iᵀ`` to the output
    factor, so ``G = Σ_i w_i ĝ_i ĝ_iᵀ / Σ_i w_i`` is a weighted mean (pseudo-label weights).
    Only rows with ``w_i > 0`` are sampled and differentiated. ``weight`` is [N], or the
    :class:`ExampleRows` of an earlier step with the same mask.
    """
    ex = weight if isinstance(weight, ExampleRows) else example_rows(outputs, weight)
    z = outputs.index_select(0, ex.rows)
    with torch.no_grad():
        zd = z.detach().float()
        if likelihood == "categorical":
            probs = torch.softmax(_per_row(zd), dim=1)
            target = torch.multinomial(probs, 1, generator=generator).flatten()
        elif likelihood == "gaussian":
            noise = torch.randn(zd.shape, generator=generator, device=zd.device, dtype=zd.dtype)
            target = (zd + noise).to(z.dtype)
        else:
            target = torch.bernoulli(torch.sigmoid(zd), generator=generator).to(z.dtype)
    if likelihood == "categorical":
        nll = F.cross_entropy(_per_row(z), target, reduction="none")
    elif likelihood == "gaussian":
        nll = 0.5 * _per_row((z - target).pow(2)).sum(1)
    else:
        nll = F.binary_cross_entropy_with_logits(z, target, reduction="none")
        nll = _per_row(nll).sum(1)
    if ex.unit:
        return nll.sum()
    # √w: a row of weight w then adds w·(its per-row Fisher) to Σ ĝĝᵀ, i.e. a weighted mean.
    return (ex.weight.index_select(0, ex.rows).sqrt() * nll).sum()


def probe_term(tensor: Tensor, hessian: Union[Tensor, float], weight: Tensor,
               generator: Optional[torch.Generator]) -> Tensor:
    """``Σ_i √w_i · Σ_j √h_ij ξ_ij t_ij`` with ``ξ ~ N(0, 1)`` (scalar), for an extra loss term.

    Its gradient w.r.t. row ``t_i`` is ``√(w_i h_i) ⊙ ξ_i``, of covariance ``w_i diag(h_i)``: so
    backpropagated, it adds ``w_i Jᵀ diag(h_i) J`` to the sampled curvature (see the module notes).

    Args:
        tensor: [N, ...] part of the autograd graph (e.g. a VAE's μ or log σ²).
        hessian: the loss term's per-row Hessian diagonal w.r.t. ``tensor``: a float or a tensor
            broadcastable to ``tensor``, finite and >= 0 (detached here).
        weight: [N] row weights (as for :func:`sampled_nll`).
    """
    if not isinstance(tensor, Tensor) or tensor.dim() == 0 or tensor.shape[0] != weight.shape[0]:
        got = tuple(tensor.shape) if isinstance(tensor, Tensor) else type(tensor).__name__
        raise ValueError(f"extra_terms: each tensor must have the outputs' {weight.shape[0]} rows, "
                         f"got {got}")
    h = torch.as_tensor(hessian, dtype=tensor.dtype, device=tensor.device).detach()
    if not bool(torch.isfinite(h).all()) or bool((h < 0).any()):
        raise ValueError("extra_terms: each Hessian diagonal must be finite and >= 0")
    with torch.no_grad():
        xi = torch.randn(tensor.shape, generator=generator, device=tensor.device,
                         dtype=tensor.dtype)
        scale = torch.broadcast_to(h, tensor.shape).sqrt() * xi
        scale = scale * weight.to(tensor.dtype).sqrt().reshape((-1,) + (1,) * (tensor.dim() - 1))
    return (scale * tensor).sum()
