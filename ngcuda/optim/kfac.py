"""``ngcuda.KFAC``: Kronecker-factored natural-gradient descent for MLPs and PyG GNNs.

One step, top-down (:meth:`KFAC.step`):

1. **Capture.** Module hooks keep each registered layer's inputs and output gradients, on
   factor-update steps only (every ``factor_every`` steps); other steps pay nothing.
2. **Factors.** ``A ← ε·A + (1−ε)·mean(ā āᵀ)`` and ``G ← ε·G + (1−ε)·Σ ĝ ĝᵀ / n`` with
   ``ε = factor_decay`` (0 at a layer's first update), via :func:`ngcuda.ops.factor_update_` /
   :func:`ngcuda.ops.sparse_factor_update_`.
3. **Eigendecomposition** every ``inverse_every`` steps: ONE :func:`ngcuda.ops.batched_eigh` call over
   every factor that changed, warm-started from the previous eigenvectors.
4. **Preconditioning** every step: ONE :func:`ngcuda.ops.precondition` call over all layers gives
   ``(A⊗G + γI)⁻¹ vec(g + η θ)``; then KL clipping, momentum (or the base optimizer), update.

Distributed (:mod:`.distributed`, on when a process group of more than one rank exists): gradients
and the step-2 statistics are averaged across ranks, weighted by example / row counts; step 3 is
split across ranks; its results (or step 4's, ``broadcast="gradients"``) are broadcast.

Each layer's ``A`` has a structure (:mod:`ngcuda.optim.structure`: ``full``, ``block:k``,
``lowrank:r``, ``diag``; chosen automatically under a cost budget by default). Steps 2–4 dispatch
through it: it computes its statistic from the layer's rows (:mod:`ngcuda.optim.rows`, sparse CSR
inputs included), blends it, adds its matrices to the one ``batched_eigh`` call and preconditions
its layer; ``full`` layers keep the batched ``ops.precondition`` call.

Scaling (documented choice). The loss is a mean over ``n`` examples (labelled nodes), so the
per-example output gradient is ``ĝ_i = n·∂L/∂z_i``. ``G = Σ_i ĝ_i ĝ_iᵀ / n`` sums over every row of
the layer output (for inner GCN layers these include the unlabelled neighbours that ``Â`` couples
in: K-FAC-expand) and divides by the number of examples ``n``. ``A`` is the mean of ``ā āᵀ`` over
ALL rows (all N nodes, as Izadi et al.), whatever the mask. ``n`` is the total row weight passed to
:meth:`KFAC.set_outputs` (the mask), or, without it, the number of non-zero rows of the output
gradient of the layer that ran forward last; both are summed over the calls of the step (k
accumulated micro-batches, see :meth:`KFAC.set_outputs`). With sampled targets (true Fisher)
``ĝ_i`` is the gradient of ``Σ_i √w_i·(−log p(ỹ_i|z_i))``, so a row of weight ``w_i`` (a
pseudo-label weight) contributes ``w_i`` times its per-row Fisher and ``G`` is a weighted mean.
"""
from __future__ import annotations

import copy
import functools
import math
import warnings
import weakref
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from .. import ops
from .distributed import REMOTE, LocalStatistics, eigh_cost, make_communicator
from .damping import (LMConfig, damped_curvature_energy, ekfac_precondition, ekfac_scales,
                      kl_clip_scale, lm_update)
from .fisher import (FISHER_TYPES, ExampleRows, example_rows, normalize_likelihood, probe_term,
                     sampled_nll)
from .layers import CaptureState, KFACLayer, LayerInfo, discover
from .structure import Full, LayerShape, choose_structure, parse_structure

__all__ = ["KFAC", "EighOptions", "KFACWarning"]

# Errors of the device itself (torch.AcceleratorError where torch has it), which no retry of the
# eigensolver can cure: they must reach the user, not turn into "keeping the previous basis".
_DEVICE_ERRORS: tuple[type[BaseException], ...] = tuple(
    e for e in (getattr(torch, "AcceleratorError", None),) if e is not None)

Hyper = Union[float, Callable[[int], float]]


class KFACWarning(UserWarning):
    """Warnings of :class:`KFAC` (skipped layers, fallbacks, unsupported parameters)."""


@dataclass(frozen=True)
class EighOptions:
    """Eigensolver settings, passed to :func:`ngcuda.ops.batched_eigh`.

    Attributes:
        tol: relative off-diagonal stop; None = the op's default for the dtype.
        max_sweeps: most Jacobi sweeps (CUDA) or refinement steps (CPU warm starts) per matrix.
        warm_start: start from the previous eigenvectors.
        retry_float64: on a failed matrix, retry it in float64 before keeping the old basis.
    """

    tol: Optional[float] = None
    max_sweeps: int = 15
    warm_start: bool = True
    retry_float64: bool = True


def _resolve(value: Any, step: int) -> Any:
    return value(step) if callable(value) else value


def _as_float(v: Any) -> float:
    return float(v.detach()) if isinstance(v, Tensor) else float(v)


def _checked(name: str, value: Any, t: int, positive: bool = False,
             upper: Optional[float] = None) -> float:
    """``value`` at step ``t`` as a float. The constructor checks plain numbers; what a callable
    returns (or what was written into a param group since) is only known here."""
    v = _resolve(value, t)
    ok = isinstance(v, (int, float, Tensor)) and not isinstance(v, bool)
    f = _as_float(v) if ok else math.nan
    if not (math.isfinite(f) and (f > 0.0 if positive else f >= 0.0)
            and (upper is None or f <= upper)):
        bound = f"{'> 0' if positive else '>= 0'}" + ("" if upper is None else f" and <= {upper}")
        raise ValueError(f"{name} at step {t} must be a finite number {bound}, got {v!r}")
    return f


def _checked_period(name: str, value: Any, t: int) -> int:
    """A period (factor_every, inverse_every) at step ``t``: an int >= 1."""
    v = _resolve(value, t)
    if not isinstance(v, int) or isinstance(v, bool) or v < 1:
        raise ValueError(f"{name} at step {t} must be an int >= 1, got {v!r}")
    return v


def _all_finite(tensors: list[Tensor]) -> list[bool]:
    """Per tensor: no NaN/Inf. One host sync for the whole list, since the max-abs norm
    propagates NaN and turns any Inf into Inf."""
    if not tensors:
        return []
    if any(t.is_sparse for t in tensors) or len({t.device for t in tensors}) > 1:
        return [bool(torch.isfinite(t.coalesce().values() if t.is_sparse else t).all())
                for t in tensors]
    return torch.isfinite(torch.stack(torch._foreach_norm(tensors, math.inf))).tolist()


def _tied_layers(model: nn.Module, layers: list[KFACLayer]) -> list[KFACLayer]:
    """Registered layers with a parameter that another module also holds (tied weights); a
    module used twice is one layer, not tied."""
    owners: dict[int, set[int]] = {}
    for m in model.modules():
        for p in m.parameters(recurse=False):
            owners.setdefault(id(p), set()).add(id(m))
    return [layer for layer in layers
            if any(len(owners.get(id(p), ())) > 1 for p in layer.params())]


def _detach_layers(layers: list[KFACLayer]) -> None:
    for layer in layers:
        layer.detach()
        layer.clear()


def _same_signature(a: Optional[tuple], b: Optional[tuple]) -> bool:
    if a is None or b is None or len(a) != len(b):
        return False
    for x, y in zip(a, b):
        if isinstance(x, Tensor) or isinstance(y, Tensor):
            if x is not y:
                return False
        elif x != y:
            return False
    return True


class KFAC(torch.optim.Optimizer):
    """K-FAC natural-gradient optimizer (or preconditioner in front of another optimizer).

    Example (true Fisher; drop ``set_outputs`` and pass ``fisher_type="empirical"`` to skip the
    extra backward)::

        opt = ngcuda.KFAC(model, lr=0.02, damping=1e-2, momentum=0.9, weight_decay=5e-4,
                          inverse_every=10, kl_clip=1e-2)
        for info in opt.layers():                    # what got registered, with factor sizes
            print(info)
        for epoch in range(100):
            opt.zero_grad()
            out = model(data.x, data.edge_index)
            opt.set_outputs(out, likelihood="categorical", mask=data.train_mask)
            F.cross_entropy(out[data.train_mask], data.y[data.train_mask]).backward()
            opt.step()

    Adam-KFAC: ``ngcuda.KFAC(model, base_optimizer=torch.optim.Adam(model.parameters(), 1e-2))``
    (then LR schedulers belong on the base optimizer).

    Args:
        model: the module whose Linear / PyG layers are registered (see :meth:`layers`).
        lr: learning rate (ignored with ``base_optimizer``, which has its own).
        damping: Tikhonov γ > 0, exact in the eigenbasis: ``(A⊗G + γI)⁻¹`` (A and G are often
            singular, e.g. G of a softmax output, so γ = 0 divides by zero).
        momentum: heavy-ball momentum on the preconditioned update (standalone mode).
        weight_decay: η; ``η θ`` is ADDED TO THE GRADIENT BEFORE PRECONDITIONING (an L2 penalty),
            unless ``decoupled_weight_decay``; parameters of no registered layer get ``g + η θ``
            unpreconditioned. The same with a ``base_optimizer`` (which sees these gradients;
            its own weight decay, if any, comes on top).
        decoupled_weight_decay: decay the weights directly, ``θ ← (1 − lr·η) θ``, outside the
            preconditioner, the momentum and the KL clip (as AdamW / SGDW; Zhang et al. 2019 found it
            the better regulariser for K-FAC). Standalone mode only: a base optimizer decays its own.
        factor_decay: moving-average decay ε of A and G.
        factor_every, inverse_every: factor refresh / eigendecomposition periods (in steps).
        kl_clip: κ of the KL trust region over the whole step (the first param group's is
            used); None or 0 turns clipping off.
        fisher_type: ``"true"`` (sampled targets, needs :meth:`set_outputs`) or ``"empirical"``.
        likelihood: default likelihood for :meth:`set_outputs` (``"categorical"``, ``"gaussian"``,
            ``"bernoulli"``).
        ekfac: eigenvalue-corrected K-FAC (George et al. 2018).
        adaptive_damping: Levenberg–Marquardt adaptation of γ; needs ``step(closure)``. One γ
            for every param group (it starts from the first group's).
        lm: its settings (:class:`~ngcuda.optim.damping.LMConfig`).
        gcn_factoring: ``"aggregated"`` (A from ÂH, Izadi et al.) or ``"input"`` (A from H, G at
            HW; better on CiteSeer and Coauthor CS in the README's results).
        base_optimizer: preconditioner-only mode ("Adam-KFAC"): ``.grad`` is replaced by the
            preconditioned gradient, then ``base_optimizer.step()`` runs with its own lr / decay.
        eigh: :class:`EighOptions`.
        seed: seed of the generator that samples true-Fisher targets (saved in the state dict);
            in a distributed run rank r uses ``seed + r``, so that ranks sample independently.
        distributed: None (default: on when a ``torch.distributed`` group of more than one rank
            is initialised), True, False, or :class:`~ngcuda.optim.distributed.DistributedOptions`
            (broadcast eigenbases or preconditioned gradients, bucket size, timeout); see
            :mod:`ngcuda.optim.distributed`. World size 1 makes no collective calls.
        factor_structure: structure of each layer's input factor A (see
            :mod:`ngcuda.optim.structure`): ``"auto"`` (default), ``"full"``, ``"block:k"``,
            ``"lowrank:r"``, ``"diag"``, or a dict layer name → one of these (unnamed layers:
            ``"auto"``). ``"auto"`` decides at a layer's first factor update, from its shape.
        factor_budget: the automatic choice's budget: a layer's extra K-FAC work per step at most
            this many times its own forward+backward work.

    Param groups: ``lr``, ``momentum``, ``weight_decay`` and ``damping`` are read per group (a
    layer's preconditioning takes the group of its weight). ``kl_clip`` is one trust region over
    the whole step, read from the first group only; with ``adaptive_damping`` the damping adapted
    from the first group's is written into every group. These and ``factor_decay`` /
    ``factor_every`` / ``inverse_every`` may be numbers or callables of the step (a callable's
    value is checked at each step).
    """

    def __init__(
        self,
        model: nn.Module,
        lr: Hyper = 0.01,
        damping: Hyper = 1e-2,
        momentum: Hyper = 0.0,
        weight_decay: Hyper = 0.0,
        decoupled_weight_decay: bool = False,
        factor_decay: Hyper = 0.95,
        factor_every: Union[int, Callable[[int], int]] = 1,
        inverse_every: Union[int, Callable[[int], int]] = 10,
        kl_clip: Optional[Hyper] = 1e-3,
        fisher_type: str = "true",
        likelihood: Optional[str] = "categorical",
        ekfac: bool = False,
        adaptive_damping: bool = False,
        lm: LMConfig = LMConfig(),
        gcn_factoring: str = "aggregated",
        base_optimizer: Optional[torch.optim.Optimizer] = None,
        eigh: EighOptions = EighOptions(),
        seed: int = 0,
        distributed: Any = None,
        factor_structure: Union[str, dict[str, str]] = "auto",
        factor_budget: float = 1.0,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        for name, v in (("lr", lr), ("damping", damping), ("momentum", momentum),
                        ("weight_decay", weight_decay), ("factor_decay", factor_decay),
                        ("kl_clip", 0.0 if kl_clip is None else kl_clip)):
            bad_number = (not isinstance(v, (int, float)) or isinstance(v, bool) or v < 0
                          or not math.isfinite(v))  # a bool is an int, never meant as 0 or 1
            if not callable(v) and bad_number:
                raise ValueError(f"{name} must be a finite number >= 0 or a callable, got {v!r}")
        if not callable(damping) and damping <= 0:
            raise ValueError(f"damping must be > 0 (A and G are often singular), got {damping!r}")
        if not callable(factor_decay) and factor_decay > 1:
            raise ValueError(f"factor_decay must be in [0, 1], got {factor_decay}")
        for name, v in (("factor_every", factor_every), ("inverse_every", inverse_every)):
            if not callable(v) and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
                raise ValueError(f"{name} must be an int >= 1 or a callable, got {v!r}")
        if fisher_type not in FISHER_TYPES:
            raise ValueError(f"fisher_type must be one of {FISHER_TYPES}, got {fisher_type!r}")
        if adaptive_damping and callable(damping):
            raise ValueError("adaptive_damping needs a float damping, not a callable")
        if base_optimizer is not None and not isinstance(base_optimizer, torch.optim.Optimizer):
            raise TypeError("base_optimizer must be a torch.optim.Optimizer")
        if not isinstance(decoupled_weight_decay, bool):
            raise TypeError(f"decoupled_weight_decay must be a bool, got {decoupled_weight_decay!r}")
        if decoupled_weight_decay and base_optimizer is not None:
            raise ValueError("decoupled_weight_decay applies to the standalone update; with a "
                             "base_optimizer, let it decay the weights (e.g. torch.optim.AdamW)")
        params = [p for p in model.parameters() if p.requires_grad]
        if not params:
            raise ValueError("model has no parameters that require grad")
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay, damping=damping,
                        kl_clip=kl_clip, decoupled_weight_decay=decoupled_weight_decay)
        super().__init__(params, defaults)

        self.model = model
        self.factor_decay = factor_decay
        self.factor_every = factor_every
        self.inverse_every = inverse_every
        self.fisher_type = fisher_type
        self.likelihood = normalize_likelihood(likelihood)
        self.ekfac = bool(ekfac)
        self.adaptive_damping = bool(adaptive_damping)
        self.lm = lm
        self.gcn_factoring = gcn_factoring
        self.base_optimizer = base_optimizer
        self.eigh = eigh
        self.seed = int(seed)

        self._capture = CaptureState()
        self._layers, quiet, frozen_weight = discover(model, self._capture, gcn_factoring)
        tied = _tied_layers(model, self._layers)
        if tied:
            # One state per weight, so each layer would blend its statistics into the other's
            # factors; the shared weight's Fisher is not a single Kronecker product anyway.
            self._layers = [layer for layer in self._layers if layer not in tied]
            quiet |= {id(p) for layer in tied for p in layer.params()}
            warnings.warn(
                f"ngcuda.KFAC: layers {', '.join(layer.name for layer in tied)} share parameters "
                "(tied weights) and get the plain (unpreconditioned) update", KFACWarning,
                stacklevel=2)
        self._names = {id(p): n for n, p in model.named_parameters()}
        covered = {id(p) for layer in self._layers for p in layer.params()}
        plain = [self._names[id(p)] for p in params if id(p) not in covered and id(p) not in quiet]
        self._plain_names = plain
        if plain:
            why = [n + (" (its layer's weight is frozen)" if id(p) in frozen_weight else "")
                   for n, p in model.named_parameters() if n in plain]
            warnings.warn(
                f"ngcuda.KFAC: {len(plain)} parameter(s) belong to no supported layer and get the "
                f"plain (unpreconditioned) update: {', '.join(why)}", KFACWarning, stacklevel=2)
        self.factor_budget = float(factor_budget)
        self._structures = self._configure_structures(factor_structure)
        # layers whose automatic choice assumed a constant input, to be checked at their next update
        self._provisional: set[int] = set()
        self._rows_cache: Optional[tuple] = None  # (mask, key, ExampleRows), see _example_rows
        for layer in self._layers:
            layer.attach()
        # The hooks live on the model: without this, a deleted optimizer's hooks would keep
        # capturing (and never clearing) every later forward pass's inputs and graph.
        weakref.finalize(self, _detach_layers, list(self._layers))
        # Distributed: None when off or world size 1 (then no collective call is ever made).
        self._dist = make_communicator(
            distributed, model, [eigh_cost(lay.a_size) + eigh_cost(lay.g_size)
                                 for lay in self._layers])
        if self._dist is not None:
            if self.ekfac or self.adaptive_damping:
                raise ValueError("ngcuda.KFAC: ekfac and adaptive_damping are not supported in "
                                 "distributed runs yet (their statistics are not averaged)")
            # The all-reduce averages dense D×D statistics; the other structures keep theirs in
            # other forms (sketches, blocks), which are not averaged yet.
            structured = [lay.name for lay in self._layers
                          if not isinstance(self._structures.get(id(lay)) or Full(), Full)]
            if structured:
                raise ValueError("ngcuda.KFAC: distributed runs support factor_structure='full' "
                                 f"only; got other structures for {', '.join(structured)}")
            self._structures = {id(lay): Full() for lay in self._layers}
            self.seed += self._dist.rank
        self._pending_factors: Optional[tuple] = None
        self._decompose_next = False  # set by a distributed load_state_dict
        self._step = 0
        self._generators: dict[str, torch.Generator] = {}
        # Sampling states from a checkpoint, by device type, taken by the generator of the first
        # device of that type that samples (a run saved on cuda:1 resumes on cuda:0 or elsewhere).
        self._saved_generators: dict[str, Tensor] = {}
        self._warned: set[str] = set()
        self._reset_step_state()

    # ------------------------------------------------------------------------------- public
    def layers(self) -> list[LayerInfo]:
        """Registered layers: name, kind, factor sizes and the parameters they cover."""
        return [layer.info(self._names, self._structure_name(layer)) for layer in self._layers]

    @property
    def steps(self) -> int:
        """Completed optimizer steps."""
        return self._step

    def remove_hooks(self) -> None:
        """Detaches every module hook (the optimizer then only does plain updates)."""
        for layer in self._layers:
            layer.detach()

    def set_outputs(self, outputs: Tensor, likelihood: Optional[str] = None,
                    mask: Optional[Tensor] = None,
                    extra_terms: Sequence[tuple[Tensor, Union[Tensor, float]]] = ()) -> None:
        """Gives the model outputs, likelihood and example rows of this step; call it after the
        forward pass and before ``loss.backward()``.

        Args:
            outputs: [N, ...] model outputs (logits / log-probs, means, or Bernoulli logits).
            likelihood: overrides the constructor's likelihood.
            mask: [N] bool mask, node indices, or non-negative row weights (e.g. pseudo-label
                weights) of the rows the loss averages over; their total is ``n``. The true
                Fisher is then ``Σ_i w_i F_i / n``. The empirical Fisher takes the loss's own
                gradient rows, which already carry the loss's weighting, so there a row
                weighted w in the loss enters G as w² (as in Izadi et al.'s code).
            extra_terms: ``(tensor [N, ...], hessian)`` pairs for loss terms that are not a
                likelihood of ``outputs`` but a convex function of ``tensor`` with per-row Hessian
                diagonal ``hessian`` (e.g. a VAE's KL term: ``(μ, 1)``, ``(log σ², σ²/2)``);
                their Gauss-Newton curvature joins the true Fisher in the same backward
                (:func:`~ngcuda.optim.fisher.probe_term`). Ignored by the empirical Fisher, whose
                loss gradients already hold those terms.

        Cost: with ``fisher_type="true"``, on factor-update steps only, one sampled-target
        backward pass through the graph (which is retained for your backward); otherwise nothing.

        Gradient accumulation: for k micro-batches, call it after each forward (and backward
        ``loss_j · n_j / n``, i.e. ``loss / k`` when they are of equal size, so that the gradient
        is the full batch's mean), then ``step()`` once; the rows and example counts of every call
        add up, so the factors are those of the full batch. (Not in distributed runs with the true
        Fisher.)
        """
        if not self._capture.enabled:
            return
        if not isinstance(outputs, Tensor):
            raise TypeError(f"outputs must be a Tensor, got {type(outputs).__name__}")
        if self.fisher_type == "true" and outputs.dim() != 2 and \
                (normalize_likelihood(likelihood) or self.likelihood) == "categorical":
            # one categorical per row: [N, T, C] would be sampled as one over T·C classes
            raise ValueError(f"categorical outputs must be [N, C] logits, got "
                             f"{tuple(outputs.shape)}; for a sequence pass outputs.reshape(-1, C) "
                             "(and a mask of that many rows)")
        ex = self._example_rows(outputs, mask)
        launch = self._dist is not None and self.fisher_type == "true" and self._capture.active
        if launch and self._n_examples is not None:
            raise RuntimeError("ngcuda.KFAC: set_outputs was called twice in one step; gradient "
                               "accumulation over micro-batches is not supported in distributed "
                               "runs with the true Fisher (the factor all-reduce starts here)")
        # Micro-batches (forward, set_outputs, backward, k times, then one step): G sums the rows
        # of every call, so it divides by every call's examples, as the full batch would.
        self._n_examples = (self._n_examples or 0.0) + ex.total
        if self.fisher_type != "true" or not self._capture.active:
            return
        lik = normalize_likelihood(likelihood) or self.likelihood
        if lik is None:
            raise ValueError("set_outputs needs a likelihood (none was given to KFAC either)")
        if not outputs.requires_grad:
            raise ValueError("outputs must be part of the autograd graph (requires_grad)")
        edges = [r.edge for layer in self._layers for r in layer.records]
        loss = None
        if edges and ex.rows.numel():  # an empty selection has no Fisher to sample
            gen = self._generator(outputs.device)
            loss = sampled_nll(outputs, lik, ex, gen)
            for tensor, hessian in extra_terms:
                loss = loss + probe_term(tensor, hessian, ex.weight, gen)
        if loss is not None and loss.requires_grad:
            self._capture.phase = "fisher"
            try:
                torch.autograd.grad(loss, edges, retain_graph=True, allow_unused=True)
            finally:
                self._capture.phase = "loss"
            self._fisher_ready = True
        if self._dist is not None:
            # Everything G and A need is known now: the factor all-reduce runs during the
            # user's backward. Launched on every rank alike, whatever its data.
            self._dist.step = self._step
            self._pending_factors = self._launch_factors(self._step)

    def _example_rows(self, outputs: Tensor, mask: Optional[Tensor]) -> ExampleRows:
        """The mask's rows, reused while the same mask tensor comes back unchanged (a training
        loop passes its train mask every step; finding its rows again is a handful of ops)."""
        try:
            version = None if mask is None else mask._version
        except RuntimeError:  # an inference-mode tensor has no version counter: never reused
            self._rows_cache = None
            return example_rows(outputs, mask)
        key = (outputs.shape[0], outputs.dtype, outputs.device, version)
        cached = self._rows_cache
        if cached is not None and cached[0] is mask and cached[1] == key:
            return cached[2]
        ex = example_rows(outputs, mask)
        self._rows_cache = (mask, key, ex)
        return ex

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], Any]] = None) -> Any:
        """One K-FAC step (see the module docstring); returns the closure's loss if given."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        t = self._step
        groups = {id(p): g for g in self.param_groups for p in g["params"]}

        finish_grads = None
        if self._dist is not None:
            self._dist.step = t
            ran = [layer.fired for layer in self._layers]
            if self._dist.average_grads:
                n = self._examples()
                if n is None:
                    self._warn("dist-n", "the example count of this step is unknown (no "
                                         "set_outputs call), so ranks' gradients are averaged with "
                                         "equal weights; call set_outputs(outputs, mask=...) every "
                                         "step (the empirical Fisher only counts there) to weight "
                                         "them by their examples")
                finish_grads = self._dist.average_gradients(
                    [p for g in self.param_groups for p in g["params"]], n, ran)
            elif self._layers:
                flags = torch.tensor(ran, dtype=torch.float64, device=self._layers[0].weight.device)
                self._agree_ran(self._dist.sum_now(flags, "the layers-ran flags").tolist())
        if self._capture.active:
            self._update_factors(t)  # overlaps the gradient all-reduce
        if finish_grads is not None:
            self._agree_ran(finish_grads())
        self._check_hooks()
        bad = self._nonfinite_grads()
        every = _checked_period("inverse_every", self.inverse_every, t)
        missing = any("A" in self.state[lay.weight] and not self._has_basis(lay, "A")
                      for lay in self._layers)
        if t % every == 0 or missing or self._decompose_next:
            self._decompose_next = False
            self._decompose(t)
        if self.ekfac and self._ekfac_rows:
            self._update_ekfac(t)

        adapt = (self.adaptive_damping and closure is not None and loss is not None
                 and t % self.lm.interval == 0)
        if self.adaptive_damping and closure is None and "lm" not in self._warned:
            self._warn("lm", "adaptive_damping needs step(closure); damping is not adapted")
        if adapt:
            before = {id(p): (p.detach().clone(), p.grad.detach().clone())
                      for g in self.param_groups for p in g["params"]
                      if p.grad is not None and id(p) not in bad}

        updates, precond = self._precondition(groups, bad, t)
        if self.base_optimizer is None:
            self._apply(updates, bad, t)
        else:
            self._apply_base(updates, bad, t)

        if adapt:
            self._adapt_damping(closure, _as_float(loss), before, precond, groups, t)
        self._step += 1
        self._reset_step_state()
        return loss

    def state_dict(self) -> dict[str, Any]:
        """The torch optimizer state (factors, eigenbases, EKFAC scales and momentum buffers live
        in the per-parameter state of each layer's weight) plus the step counter, the sampling
        generator and, in preconditioner-only mode, the base optimizer's state."""
        sd = super().state_dict()
        # States loaded but not yet taken by a generator (no step sampled since) are kept too,
        # by device type as they were loaded.
        generators = dict(self._saved_generators)
        generators.update({k: g.get_state() for k, g in self._generators.items()})
        sd["kfac"] = {
            "step": self._step,
            "generators": generators,
            "structures": {layer.name: s.name for layer in self._layers
                           if (s := self._structures.get(id(layer))) is not None},
            # automatic choices still to be confirmed at the layer's next update
            "provisional": [layer.name for layer in self._layers if id(layer) in self._provisional],
        }
        if self.base_optimizer is not None:
            sd["base"] = self.base_optimizer.state_dict()
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        sd = copy.deepcopy(dict(state_dict))
        extra = sd.pop("kfac", {})
        base = sd.pop("base", None)
        if base is not None and self.base_optimizer is None:
            raise ValueError("state_dict holds a base optimizer state but this KFAC has none")
        saved = extra.get("structures", {})
        unknown = sorted(set(saved) - {layer.name for layer in self._layers})
        if unknown:
            raise ValueError(f"state_dict was saved for layer(s) {', '.join(unknown)}, which this "
                             "model does not have; registered: "
                             f"{', '.join(layer.name for layer in self._layers)} (for renamed "
                             "layers, rename the keys of state_dict['kfac']['structures'])")
        if self._dist is not None:
            structured = sorted(name for name, text in saved.items() if text != "full")
            if structured:
                raise ValueError(f"state_dict holds {', '.join(f'{n} ({saved[n]})' for n in structured)}"
                                 "; distributed runs support factor_structure='full' only")
        previous = self.state, self.param_groups
        super().load_state_dict(sd)
        try:
            self._check_loaded_shapes()
        except ValueError:
            self.state, self.param_groups = previous  # as before the call
            raise
        self._step = int(extra.get("step", 0))
        self._generators = {}
        # set_state takes a CPU byte tensor: map_location may have moved the states anywhere.
        self._saved_generators = {torch.device(key).type: st.detach().cpu()
                                  for key, st in extra.get("generators", {}).items()}
        if base is not None:
            self.base_optimizer.load_state_dict(base)
        # A distributed run is full-only and chooses nothing: a choice still to be confirmed by a
        # single-process run that saved it would be made again here, and could pick a low rank.
        provisional = set(extra.get("provisional", ())) if self._dist is None else set()
        self._provisional = {id(layer) for layer in self._layers if layer.name in provisional}
        for i, layer in enumerate(self._layers):
            layer.a_signature = None
            layer.ekfac_cache = None
            st = self.state[layer.weight]
            for key in ("A", "G"):
                # "another rank holds this basis" was true of the run that saved it, not of this
                # one: without the flag a missing basis is decomposed again, by its owner here
                if st.pop(f"{key}_remote", False):
                    st[f"{key}_dirty"] = True
                # Ranks may have loaded different checkpoints (each its own, broadcast=
                # "gradients": each holds other bases); the factors agree, so every rank
                # decomposes all of them again at the next step, in the same collective.
                if self._dist is not None and key in st:
                    st[f"{key}_dirty"] = True
                    self._decompose_next = True
            if layer.name in saved:  # the factors are stored in that structure's form
                self._structures[id(layer)] = parse_structure(saved[layer.name], self.seed + i)
                if "A_structure" in st:  # torch's loader rebuilt the string as an iterable
                    st["A_structure"] = saved[layer.name]
        self._reset_step_state()

    def _check_loaded_shapes(self) -> None:
        """Torch's loader matches states to parameters by position and checks only their number:
        a model with other layer sizes would fail at the next step with a bare size mismatch."""
        for layer in self._layers:
            st = self.state.get(layer.weight, {})
            a, g = layer.a_size, layer.g_size
            found = {}
            if "G" in st:
                found["G"] = (tuple(st["G"].shape), (g, g))
            if "A" in st:  # any structure's stored form has one row per input column
                stored = st["A"]
                rows = (sum(x.shape[0] for x in stored) if isinstance(stored, list)
                        else stored.shape[0])
                found["A"] = (rows, a)
            if "S" in st:
                found["S"] = (tuple(st["S"].shape), (g, a))
            for key, (got, want) in found.items():
                if got != want:
                    raise ValueError(
                        f"state_dict does not fit layer '{layer.name}' ({layer.kind}, A {a}x{a}, "
                        f"G {g}x{g}): its {key} has size {got}, expected {want}")
        for group in self.param_groups:
            for p in group["params"]:
                buf = self.state.get(p, {}).get("momentum_buffer")
                if buf is not None and buf.shape != p.shape:
                    raise ValueError(
                        f"state_dict does not fit parameter '{self._names.get(id(p), '?')}': its "
                        f"momentum buffer has shape {tuple(buf.shape)}, expected {tuple(p.shape)}")

    # ---------------------------------------------------------------------------- internals
    def _configure_structures(self, spec: Union[str, dict[str, str]]) -> dict[int, Any]:
        """id(layer) → its structure, or None for "auto" (chosen at the layer's first update)."""
        names = {layer.name for layer in self._layers}
        if isinstance(spec, dict):
            unknown = sorted(set(spec) - names)
            if unknown:
                raise ValueError(f"factor_structure names unknown layer(s) {', '.join(unknown)}; "
                                 f"registered: {', '.join(sorted(names))}")
            per = {layer.name: spec.get(layer.name, "auto") for layer in self._layers}
        elif isinstance(spec, str):
            per = {layer.name: spec for layer in self._layers}
        else:
            raise TypeError("factor_structure must be a string or a dict name -> string")
        out: dict[int, Any] = {}
        for i, layer in enumerate(self._layers):
            text = per[layer.name]
            auto = isinstance(text, str) and text.strip().lower() == "auto"
            out[id(layer)] = None if auto else parse_structure(text, self.seed + i)
            if self.ekfac and out[id(layer)] is not None and not out[id(layer)].batched:
                self._warn(None, f"ekfac=True applies to full factors only; layer "
                                 f"'{layer.name}' ({text}) gets plain K-FAC scaling")
        return out

    def _structure(self, layer: KFACLayer, sources: Optional[list] = None,
                   constant_input: bool = False) -> Any:
        """The layer's factor structure; "auto" is resolved from the first rows it sees."""
        s = self._structures.get(id(layer))
        if s is None:
            if sources is None:
                return Full()  # not updated yet: nothing is stored, full is the neutral answer
            src = sources[0]
            shape = LayerShape(D=layer.a_size, d_out=layer.g_size,
                               rows=sum(x.rows for x in sources),
                               nnz_x=sum(x.nnz() for x in sources),
                               sparse_x=src.x.layout != torch.strided,
                               nnz_adj=sum(x.adj_nnz() for x in sources))
            s = choose_structure(shape,
                                 _checked_period("factor_every", self.factor_every, self._step),
                                 _checked_period("inverse_every", self.inverse_every, self._step),
                                 self.factor_budget, self.seed + self._layers.index(layer),
                                 constant_input)
            self._structures[id(layer)] = s
            if constant_input:
                self._provisional.add(id(layer))
        return s

    def _rechoose_structure(self, layer: KFACLayer, st: dict, sources: list) -> None:
        """A layer's input looked constant at its first update (so "auto" charged A's update and
        eigendecomposition once) but has changed: choose again, and if the choice differs, drop
        A's state so that the next update starts the new structure (G's average restarts too)."""
        old = self._structures.pop(id(layer))
        new = self._structure(layer, sources, constant_input=False)
        if new.name != old.name:
            for key in [k for k in st if k.startswith("A") or k in ("QA", "lamA", "S", "S_step")]:
                del st[key]
            layer.ekfac_cache = None

    def _structure_name(self, layer: KFACLayer) -> str:
        s = self._structures.get(id(layer))
        return "auto" if s is None else s.name

    def _warn(self, key: Optional[str], msg: str) -> None:
        if key is not None:
            if key in self._warned:
                return
            self._warned.add(key)
        warnings.warn(f"ngcuda.KFAC: {msg}", KFACWarning, stacklevel=3)

    def _generator(self, device: torch.device) -> torch.Generator:
        key = str(device if device.index is not None or device.type == "cpu"
                  else torch.device(device.type, torch.cuda.current_device()))
        gen = self._generators.get(key)
        if gen is None:
            gen = torch.Generator(device=key)
            saved = self._saved_generators.pop(device.type, None)
            if saved is None:
                gen.manual_seed(self.seed)
            else:
                gen.set_state(saved)
                if self._dist is not None:
                    # Every rank loaded the same state (rank 0's, or one process's): branch it by
                    # rank, as seed + rank does for a fresh run, or all ranks sample alike.
                    base = int(torch.randint(0, 2**62, (1,), generator=gen, device=gen.device))
                    gen.manual_seed(base + self._dist.rank)
            self._generators[key] = gen
        return gen

    def _reset_step_state(self) -> None:
        for layer in self._layers:
            layer.clear()
        self._n_examples: Optional[float] = None
        self._fisher_ready = False
        self._pending_factors = None
        self._ekfac_rows: dict[int, tuple[Tensor, list, Optional[tuple]]] = {}
        every = _checked_period("factor_every", self.factor_every, self._step)
        self._capture.active = self._step % every == 0
        self._capture.seq = 0

    def _check_hooks(self) -> None:
        for layer in self._layers:
            if layer.fired:
                if self._capture.active and layer.has_grad() and not layer.used_records() \
                        and layer.records:
                    self._warn(None, f"layer '{layer.name}' ran forward but no output gradient "
                                     "reached its hook; its factors are not updated this step")
                continue
            if layer.has_grad():
                self._warn(None, f"layer '{layer.name}' ({layer.kind}) has gradients but its "
                                 "forward hook never fired this step (called through a functional "
                                 "API or .forward bypassing hooks?); its gradient gets the plain "
                                 "unpreconditioned update")
            else:
                self._warn(None, f"registered layer '{layer.name}' ({layer.kind}) did not run "
                                 "during this step; its parameters are not updated")

    def _agree_ran(self, counts: list[float]) -> None:
        """Distributed: a layer that ran forward on any rank counts as run on this one too (its
        averaged gradient is here), so every rank preconditions, and with broadcast="gradients"
        exchanges, the same layers; a data-dependent branch would otherwise hang or split them."""
        for layer, c in zip(self._layers, counts):
            if c > 0:
                layer.fired = True

    def _nonfinite_grads(self) -> set[int]:
        """Ids of parameters to leave untouched this step: their layer has a NaN/Inf gradient."""
        params = [p for g in self.param_groups for p in g["params"] if p.grad is not None]
        if not params:
            return set()
        flags = _all_finite([p.grad for p in params])
        bad = {id(p) for p, ok in zip(params, flags) if not ok}
        if not bad:
            return bad
        for layer in self._layers:
            ids = {id(p) for p in layer.params()}
            if ids & bad:
                bad |= ids
        names = sorted(self._names.get(i, "?") for i in bad)
        self._warn(None, f"non-finite gradient in {', '.join(names)}; those parameters (whole "
                         "layers) are skipped this step and their state is left unchanged")
        return bad

    def _examples(self) -> Optional[float]:
        if self._n_examples is not None:
            return self._n_examples
        last = max(((layer, r) for layer in self._layers for r in layer.records
                    if r.grad is not None), key=lambda e: e[1].seq, default=None)
        if last is None:
            return None
        # every call of that layer counts: k accumulated micro-batches are k calls
        rows = [(r.grad.reshape(r.grad.shape[0], math.prod(r.grad.shape[1:])) != 0).any(1).sum()
                for r in last[0].records if r.grad is not None]  # (the reshape takes 0 rows too)
        return float(sum(rows))

    def _factor_statistics(self, t: int) -> list[tuple]:
        """This process's statistics: per captured layer ``(layer, state, A stat or None when its
        constant input did not change, G stat, signature, records, G rows)``."""
        n = self._examples()
        if not n:
            return []  # an empty batch or mask: no statistics, the factors stay as they are
        fisher = self.fisher_type == "true" and self._fisher_ready
        if self.fisher_type == "true" and not self._fisher_ready:
            self._warn("fisher", "fisher_type='true' but set_outputs(...) was not called before "
                                 "backward; falling back to the empirical Fisher")
        pending = []
        for layer in self._layers:
            recs = layer.used_records()
            if not recs:
                continue
            g_rows = layer.grad_rows(recs, fisher)
            if g_rows is None:
                self._warn(None, f"layer '{layer.name}' got no sampled-target gradient (is it "
                                 "upstream of the outputs given to set_outputs?); G not updated")
                continue
            st = self.state[layer.weight]
            w = layer.weight
            rows = g_rows.shape[0]
            scale = math.sqrt(rows / n) * (1.0 if fisher else n)
            g_rows = g_rows * scale
            tg = torch.zeros(layer.g_size, layer.g_size, dtype=w.dtype, device=w.device)
            ops.factor_update_(tg, g_rows, 0.0, False)
            sig = layer.signature(recs)
            ta = None
            provisional = id(layer) in self._provisional and "A" in st
            self._provisional.discard(id(layer))
            if not ("A" in st and st["A_pure"] and _same_signature(sig, layer.a_signature)):
                sources = layer.row_sources(recs)
                if provisional:
                    self._rechoose_structure(layer, st, sources)
                struct = self._structure(layer, sources, constant_input=sig is not None)
                ta = struct.statistic(sources, st, w.dtype, w.device)
            pending.append((layer, st, ta, tg, sig, recs, g_rows))
        return pending

    def _launch_factors(self, t: int) -> tuple[dict[int, tuple], Any]:
        """Distributed: forms the local statistics and launches their weighted all-reduce."""
        local = {id(e[0]): e for e in self._factor_statistics(t)}
        n = self._examples() or 0.0
        stats: list[Optional[LocalStatistics]] = []
        for layer in self._layers:
            e = local.get(id(layer))
            stats.append(None if e is None else LocalStatistics(
                None if e[2] is None else e[2][0], float(layer.a_count(e[5])), e[3], n,
                functools.partial(self._a_statistic, layer, e[5])))
        templates = [((lay.a_size, lay.a_size), (lay.g_size, lay.g_size), lay.weight.dtype,
                      lay.weight.device) for lay in self._layers]
        return local, self._dist.average_factors(stats, templates)

    def _a_statistic(self, layer: KFACLayer, recs: list) -> Tensor:
        # the local path's own rows (a CSR x or a GCN's ÂH stays implicit); distributed is full-only
        w = layer.weight
        return Full().statistic(layer.row_sources(recs), self.state[w], w.dtype, w.device)[0]

    def _averaged_statistics(self, t: int) -> list[tuple]:
        """Distributed: the statistics averaged over every rank, as :meth:`_factor_statistics`
        lays them out (a layer this rank did not capture has no signature, records or rows)."""
        local, pending = self._pending_factors or self._launch_factors(t)
        self._pending_factors = None
        out = []
        for layer, r in zip(self._layers, pending.wait()):
            if r is not None:
                sig, recs, g_rows = local[id(layer)][4:] if id(layer) in local else (None,) * 3
                ta = None if r[0] is None else [r[0]]  # a full factor, in Full's list form
                out.append((layer, self.state[layer.weight], ta, r[1], sig, recs, g_rows))
        return out

    def _update_factors(self, t: int) -> None:
        """Moving averages of A and G for every layer that was captured (step 2)."""
        if self._dist is not None:
            pending = self._averaged_statistics(t)
        else:
            pending = self._factor_statistics(t)
        if not pending:
            return
        decay = _checked("factor_decay", self.factor_decay, t, upper=1.0)
        stats = [[tg] if ta is None else [tg, *ta] for (_, _, ta, tg, *_rest) in pending]
        finite = iter(_all_finite([t for group in stats for t in group]))
        flags = [all([next(finite) for _ in group]) for group in stats]
        for (layer, st, ta, tg, sig, recs, g_rows), ok in zip(pending, flags):
            if not ok:
                self._warn(None, f"non-finite factor statistics in layer '{layer.name}' (NaN/Inf "
                                 "activations or gradients); its factors are left unchanged")
                continue
            first = "A" not in st
            struct = self._structure(layer)
            if first:
                struct.blend(st, ta, decay, True)
                st["G"] = tg
                st["A_structure"] = struct.name
                st["A_pure"] = True
                st["A_dirty"] = st["G_dirty"] = True
                st["factor_updates"] = 1
            else:
                if ta is not None:
                    if st["A_pure"] and struct.same(st, ta):
                        pass  # the same constant input again: the average is unchanged
                    else:
                        struct.blend(st, ta, decay, False)
                        st["A_pure"] = decay == 0.0
                        st["A_dirty"] = True
                st["G"].mul_(decay).add_(tg, alpha=1.0 - decay)
                st["G_dirty"] = True
                st["factor_updates"] += 1
            layer.a_signature = sig
            if self.ekfac:
                self._ekfac_rows[id(layer)] = (g_rows, recs, sig)

    def _eigh(self, mats: list[Tensor], prevs: Optional[list[Tensor]]
              ) -> list[Optional[tuple[Tensor, Tensor]]]:
        """ONE batched call; failed matrices are retried in float64; None where all failed."""
        out: list[Optional[tuple[Tensor, Tensor]]] = [None] * len(mats)
        try:
            vals, vecs, status = ops.batched_eigh_with_status(mats, prevs, self.eigh.tol,
                                                              self.eigh.max_sweeps)
            okf = torch.stack([torch.isfinite(v).all() & torch.isfinite(q).all()
                               for v, q in zip(vals, vecs)])
            ok = (okf.cpu() & ops.EighStatus.succeeded(status.cpu())).tolist()  # one sync each
            for i, good in enumerate(ok):
                if good:
                    out[i] = (vals[i], vecs[i])
        except _DEVICE_ERRORS:
            raise  # a device fault (e.g. an illegal address) is not a matrix the solver failed on
        except (RuntimeError, ValueError) as err:
            self._warn(None, f"batched_eigh failed ({err}); retrying")
        failed = [i for i, o in enumerate(out) if o is None]
        if failed and self.eigh.retry_float64:
            for i in failed:
                try:
                    v, q = ops.batched_eigh([mats[i].double()], None, None, self.eigh.max_sweeps)
                    if bool(torch.isfinite(v[0]).all()) and bool(torch.isfinite(q[0]).all()):
                        out[i] = (v[0].to(mats[i].dtype), q[0].to(mats[i].dtype))
                except _DEVICE_ERRORS:
                    raise
                except (RuntimeError, ValueError):
                    pass
        return out

    def _decompose(self, t: int) -> None:
        """Step 3: eigendecompose every factor that changed since its last decomposition."""
        # Each slot is (layer, st, key, number of matrices): G is one matrix, A as many as its
        # structure asks for (a full factor: 1, block-diagonal: one per block, diag: none).
        slots, mats, prevs = [], [], []
        for layer in self._layers:
            st = self.state[layer.weight]
            if "A" not in st:
                continue
            struct = self._structure(layer)
            if st["A_dirty"] or not self._has_basis(layer, "A"):
                items = struct.eigh_items(st)
                slots.append((layer, st, "A", len(items)))
                mats += [m for m, _ in items]
                prevs += [q for _, q in items]
            if st["G_dirty"] or not self._has_basis(layer, "G"):
                slots.append((layer, st, "G", 1))
                mats.append(st["G"])
                q = st.get("QG")
                prevs.append(q if q is not None else torch.eye(
                    st["G"].shape[0], dtype=st["G"].dtype, device=st["G"].device))
        # No early return without matrices: a diag A has none but still takes its eigen-data.
        warm = prevs if self.eigh.warm_start else None
        if not mats:
            res = []
        elif self._dist is not None:  # split across ranks; REMOTE: another rank owns it
            units = [self._layers.index(layer) for layer, _, _, count in slots
                     for _ in range(count)]
            res = self._dist.decompose(mats, warm, units, self._eigh)
        else:
            res = self._eigh(mats, warm)
        at = 0
        for layer, st, key, count in slots:
            r, at = res[at:at + count], at + count
            if any(x is REMOTE for x in r):
                st[f"{key}_dirty"] = False
                st[f"{key}_remote"] = True
                continue
            if any(x is None for x in r):
                self._warn(None, f"eigendecomposition of {key} of layer '{layer.name}' failed, "
                                 "also in float64; keeping its previous eigenbasis")
                continue
            if key == "A":
                self._structure(layer).take_eigh(st, r)
            else:
                st["lamG"] = r[0][0].clamp(min=0.0)
                st["QG"] = r[0][1].contiguous()
            st[f"{key}_dirty"] = False
            st["basis_step"] = t

    def _has_basis(self, layer: KFACLayer, key: str) -> bool:
        """Whether factor ``key``'s eigen-data exists here or (broadcast="gradients") on its
        owner."""
        st = self.state[layer.weight]
        here = self._structure(layer).ready(st) if key == "A" else "QG" in st
        return here or bool(st.get(f"{key}_remote"))

    def _update_ekfac(self, t: int) -> None:
        decay = _checked("factor_decay", self.factor_decay, t, upper=1.0)
        for layer in self._layers:
            item = self._ekfac_rows.get(id(layer))
            st = self.state[layer.weight]
            if item is None or "QA" not in st or "QG" not in st or \
                    not self._structure(layer).batched:
                continue  # EKFAC scales need the full eigenbasis of A
            g_rows, recs, sig = item
            QA = st["QA"]
            cache = layer.ekfac_cache
            if cache is not None and cache[1] is QA and _same_signature(cache[0], sig):
                pa2 = cache[2]  # constant input, same basis: (Q_Aᵀ ā_r)² is unchanged
            else:
                pa2 = (layer.a_rows(recs).to(QA.dtype) @ QA).square_()
                layer.ekfac_cache = (sig, QA, pa2) if sig is not None else None
            s = ekfac_scales(g_rows, pa2, st["QG"], g_rows.shape[0])
            if not bool(torch.isfinite(s).all()):
                self._warn(None, f"non-finite EKFAC scales in layer '{layer.name}'; skipped")
                continue
            if "S" not in st or st.get("S_step", -1) < st.get("basis_step", 0):
                st["S"] = s  # a new eigenbasis invalidates the old running scales
            else:
                st["S"].mul_(decay).add_(s, alpha=1.0 - decay)
            st["S_step"] = t

    def _ekfac_scales(self, st: dict) -> Optional[Tensor]:
        """The EKFAC scales S if they were estimated in the current eigenbasis, else None (plain
        K-FAC eigenvalues): when factor_every and inverse_every differ, a new basis can come
        before the rows that re-estimate S in it, and S of the old basis would scale the wrong
        directions."""
        if not self.ekfac or "S" not in st or st.get("S_step", -1) < st.get("basis_step", 0):
            return None
        return st["S"]

    def _lr_of(self, groups: dict[int, dict], p: nn.Parameter, t: int) -> float:
        if self.base_optimizer is not None:
            for g in self.base_optimizer.param_groups:
                if any(q is p for q in g["params"]):
                    return float(_resolve(g["lr"], t))
        return _checked("lr", groups[id(p)]["lr"], t)

    def _precondition(self, groups: dict[int, dict], bad: set[int], t: int
                      ) -> tuple[dict[int, Tensor], list[tuple[KFACLayer, Tensor, Tensor]]]:
        """Step 4: ONE ops.precondition call (per distinct damping) and KL clipping.

        Returns the update of every preconditioned parameter and, per layer, (layer, gradient
        matrix, preconditioned matrix)."""
        batch: dict[float, list] = {}
        done: list[tuple[KFACLayer, Tensor, Tensor, float]] = []
        # broadcast="gradients": each layer with factors is preconditioned by its owner only.
        shared = self._dist is not None and self._dist.options.broadcast == "gradients"
        cands: list[tuple[int, KFACLayer, Tensor]] = []
        for i, layer in enumerate(self._layers):
            st = self.state[layer.weight]
            struct = self._structure(layer)
            if not layer.fired or not layer.has_grad() or id(layer.weight) in bad:
                continue
            mine = ("A" in st and struct.ready(st) and "QG" in st
                    and (not shared or self._dist.owns(i)))
            if not mine and not (shared and "A" in st):
                continue
            group = groups[id(layer.weight)]
            g = layer.grad_matrix()
            wd = _checked("weight_decay", group["weight_decay"], t)
            if wd and not group.get("decoupled_weight_decay", False):
                g = torch.add(g, layer.param_matrix(), alpha=wd)
            damping = _checked("damping", group["damping"], t, positive=True)
            if shared:
                cands.append((i, layer, g))
                if not mine:
                    continue
            S = self._ekfac_scales(st)
            if S is not None and struct.batched:
                v = ekfac_precondition(g, st["QA"], st["QG"], S, damping)
                done.append((layer, g, v, self._lr_of(groups, layer.weight, t)))
            elif not struct.batched:
                v = struct.precondition(g, st, st["QG"], st["lamG"], damping)
                done.append((layer, g, v, self._lr_of(groups, layer.weight, t)))
            else:
                batch.setdefault(damping, []).append((layer, g.contiguous(), st))
        for damping, items in batch.items():
            vs = ops.precondition([g for _, g, _ in items], [s["QA"] for *_, s in items],
                                  [s["lamA"] for *_, s in items], [s["QG"] for *_, s in items],
                                  [s["lamG"] for *_, s in items], damping)
            for (layer, g, _), v in zip(items, vs):
                done.append((layer, g, v, self._lr_of(groups, layer.weight, t)))
        if shared and cands:
            local = {self._layers.index(layer): v for layer, _, v, _ in done}
            vs = self._dist.share_preconditioned([i for i, _, _ in cands],
                                                 [g for _, _, g in cands], local)
            done = [(layer, g, v, self._lr_of(groups, layer.weight, t))
                    for (_, layer, g), v in zip(cands, vs) if v is not None]
        if not done:
            return {}, []
        kl_clip = self.param_groups[0]["kl_clip"]
        kl = None if kl_clip is None else _checked("kl_clip", kl_clip, t)
        dots: list[float] = []
        if kl:
            dots = torch.stack([torch.vdot(v.reshape(-1), g.reshape(-1))
                                for _, g, v, _ in done]).tolist()
            # g is finite (bad gradients were left out), so a NaN/Inf in v makes vᵀg non-finite:
            # the clip's one host sync also finds the non-finite updates.
            finite = [math.isfinite(d) for d in dots]
        else:
            finite = _all_finite([v for _, _, v, _ in done])
        if not all(finite):
            # e.g. a tiny damping over a near-singular factor: treated as a non-finite gradient
            skipped = [layer for (layer, *_), ok in zip(done, finite) if not ok]
            for layer in skipped:
                bad.update(id(p) for p in layer.params())
            self._warn(None, "non-finite preconditioned update in layer(s) "
                             f"{', '.join(lay.name for lay in skipped)} (damping too small?); "
                             "those layers are skipped this step and their state is left unchanged")
            dots = [d for d, ok in zip(dots, finite) if ok]
            done = [e for e, ok in zip(done, finite) if ok]
        nu = 1.0
        if kl and done:
            vg = sum(d * lr * lr for d, (*_, lr) in zip(dots, done))
            nu = kl_clip_scale(vg, 1.0, kl)
        updates: dict[int, Tensor] = {}
        for layer, _, v, _ in done:
            if nu != 1.0:
                v = v * nu
            for p, u in layer.split(v):
                updates[id(p)] = u
        return updates, [(layer, g, v) for layer, g, v, _ in done]

    def _apply(self, updates: dict[int, Tensor], bad: set[int], t: int) -> None:
        """Standalone update: momentum on the (preconditioned) direction, then θ ← θ − lr·d."""
        for group in self.param_groups:
            lr = _checked("lr", group["lr"], t)
            mom = _checked("momentum", group["momentum"], t)
            wd = _checked("weight_decay", group["weight_decay"], t)
            decoupled = group.get("decoupled_weight_decay", False)
            for p in group["params"]:
                if p.grad is None or id(p) in bad:
                    continue
                d = updates.get(id(p))
                if d is None:
                    d = p.grad if not wd or decoupled else p.grad + wd * p.detach()
                if mom:
                    st = self.state[p]
                    buf = st.get("momentum_buffer")
                    if buf is None:
                        st["momentum_buffer"] = buf = d.detach().clone()
                    else:
                        buf.mul_(mom).add_(d)
                    d = buf
                if wd and decoupled:
                    p.mul_(1.0 - lr * wd)
                p.add_(d, alpha=-lr)

    def _apply_base(self, updates: dict[int, Tensor], bad: set[int], t: int) -> None:
        """Preconditioner-only mode: write the preconditioned gradients, then the base step."""
        for group in self.param_groups:
            wd = _checked("weight_decay", group["weight_decay"], t)
            for p in group["params"]:
                if id(p) in bad:
                    p.grad = None  # the base optimizer skips parameters without a gradient
                    continue
                u = updates.get(id(p))
                if u is not None:
                    if p.grad is None:
                        p.grad = u.clone()
                    else:
                        p.grad.copy_(u)
                elif p.grad is not None and wd:
                    # the L2 penalty, as the standalone update adds it to unpreconditioned
                    # parameters (preconditioned ones got it before preconditioning)
                    p.grad.add_(p.detach(), alpha=wd)
        self.base_optimizer.step()

    def _adapt_damping(self, closure: Callable[[], Any], loss_old: float,
                       before: dict[int, tuple[Tensor, Tensor]],
                       precond: list[tuple[KFACLayer, Tensor, Tensor]],
                       groups: dict[int, dict], t: int) -> None:
        """Levenberg–Marquardt: compare the loss change with the quadratic model's prediction.

        The model is ``M(δ) − M(0) = ∇Lᵀδ + ½ δᵀF̃δ`` with the UNDAMPED K-FAC curvature F̃
        (the damping is the trust-region device being tuned, as in Martens & Grosse 2015); layers
        without K-FAC blocks contribute their linear term only. δ is the update actually applied.
        """
        damping = float(self.param_groups[0]["damping"])
        lin = torch.zeros((), dtype=torch.float64)
        quad = torch.zeros((), dtype=torch.float64)
        layer_of = {id(p): layer for layer, _, _ in precond for p in layer.params()}
        for group in self.param_groups:
            for p in group["params"]:
                if id(p) not in before:
                    continue
                old, grad = before[id(p)]
                delta = p.detach() - old
                lin += (grad * delta).sum().double().cpu()
        for layer, _, _ in precond:
            if not all(id(p) in before for p in layer.params()):
                continue
            st = self.state[layer.weight]
            mats = []
            for p in layer.params():
                d = p.detach() - before[id(p)][0]
                mats.append(d.reshape(layer.d_out, -1))
            delta = torch.cat(mats, 1)
            struct = self._structure(layer)
            if not struct.batched:  # δᵀ(A⊗G)δ = Σ (G δ) ∘ (δ A)
                gd = st["QG"] @ (st["lamG"][:, None] * (st["QG"].T @ delta))
                quad += (gd * struct.right_apply(st, delta)).sum().double().cpu()
                continue
            quad += damped_curvature_energy(delta, st["QA"], st["lamA"], st["QG"], st["lamG"],
                                            0.0, self._ekfac_scales(st)).double().cpu()
        predicted = float(lin + 0.5 * quad)
        self._capture.enabled = False
        try:
            with torch.enable_grad():
                loss_new = _as_float(closure())
        finally:
            self._capture.enabled = True
        if predicted >= 0.0:
            return
        rho = (loss_new - loss_old) / predicted
        new = lm_update(damping, rho, self.lm)
        for group in self.param_groups:
            group["damping"] = new
        self.last_rho = rho
