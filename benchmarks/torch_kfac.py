"""A plain-PyTorch K-FAC, the baseline of the step benchmark.

It runs the same algorithm as ``ngcuda.KFAC`` in its standalone mode (true or empirical Fisher,
factor moving averages every step, eigendecomposition of the factors that changed every
``inverse_every`` steps, exact Tikhonov damping in the eigenbasis, weight decay added before
preconditioning, KL clipping, heavy-ball momentum), with the same bookkeeping (a constant input's
factor is computed once), but every numerical step is a plain torch expression from
:mod:`ngcuda.reference` in float32: ``torch.linalg.eigh`` per matrix with no warm start, the
aggregate ``ÂX`` formed densely with ``index_add_``, and a per-layer loop of GEMMs. So the step
benchmark's ratio against it is what ngcuda's kernels and batching buy, not a different method.

Layers: ``nn.Linear`` and PyG ``GCNConv`` (A from ``[ÂX, 1]`` over the layer's own normalised
adjacency, as ``gcn_factoring="aggregated"``). With the same seed it samples the same true-Fisher
targets as ``ngcuda.KFAC``, so both follow the same trajectory up to rounding.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor, nn

from ngcuda import reference
from ngcuda.optim.damping import kl_clip_scale
from ngcuda.optim.fisher import normalize_likelihood, row_weights, sampled_nll


def _gcn_conv_type() -> Optional[type]:
    try:
        from torch_geometric.nn import GCNConv
    except ImportError:  # pragma: no cover - PyG is a test dependency
        return None
    return GCNConv


def _normalised_csr(conv: nn.Module, edge_index: Tensor, n: int, dtype: torch.dtype
                    ) -> tuple[Tensor, Tensor, Tensor]:
    """Â of a GCNConv (gcn_norm with the layer's flags) as CSR with rows = target nodes."""
    from torch_geometric.nn.conv.gcn_conv import gcn_norm

    ei, ew = gcn_norm(edge_index, None, n, conv.improved, conv.add_self_loops, conv.flow, dtype)
    src, dst = (ei[0], ei[1]) if conv.flow == "source_to_target" else (ei[1], ei[0])
    perm = torch.argsort(dst, stable=True)
    rowptr = torch.zeros(n + 1, dtype=torch.long, device=ei.device)
    rowptr[1:] = torch.bincount(dst, minlength=n).cumsum(0)
    return rowptr, src[perm], ew[perm]


class _Layer:
    """One Linear or GCNConv: its captured input and output gradient, factors and eigenbases."""

    def __init__(self, module: nn.Module, gcn: bool) -> None:
        self.module, self.gcn = module, gcn
        self.weight: nn.Parameter = module.lin.weight if gcn else module.weight
        self.bias: Optional[nn.Parameter] = module.bias
        self.x: Optional[Tensor] = None
        self.edge_index: Optional[Tensor] = None
        self.out: Optional[Tensor] = None
        self.grad: Optional[Tensor] = None  # ∂loss/∂output (the last backward through it wins)
        self.fisher_grad: Optional[Tensor] = None  # gradient of the sampled-target NLL
        self.factors: dict[str, Tensor] = {}  # A, G
        self.eig: dict[str, tuple[Tensor, Tensor]] = {}  # A, G -> (eigenvalues, eigenvectors)
        self.dirty = {"A": True, "G": True}
        self.a_key: Optional[tuple] = None  # the constant input A was last built from
        self.a_pure = False  # A is exactly the statistic of a_key (not a blend of several)
        self.adjacency: Optional[tuple[Tensor, tuple[Tensor, Tensor, Tensor]]] = None
        module.register_forward_hook(self._forward)

    def _forward(self, module: nn.Module, args: tuple, output: Tensor) -> None:
        if not (torch.is_grad_enabled() and output.requires_grad):
            return
        x = args[0]
        self.x = x if not x.requires_grad else x.detach()
        self.edge_index = args[1] if self.gcn else None
        self.out = output
        output.register_hook(self._keep_grad)

    def _keep_grad(self, grad: Tensor) -> None:
        self.grad = grad.detach()

    def params(self) -> list[nn.Parameter]:
        return [self.weight] + ([self.bias] if self.bias is not None else [])

    def grad_matrix(self) -> Tensor:
        g = self.weight.grad.reshape(self.weight.shape[0], -1)
        return g if self.bias is None else torch.cat([g, self.bias.grad[:, None]], 1)

    def param_matrix(self) -> Tensor:
        w = self.weight.detach().reshape(self.weight.shape[0], -1)
        return w if self.bias is None else torch.cat([w, self.bias.detach()[:, None]], 1)

    def a_update(self, decay: float) -> None:
        """A ← decay·A + (1−decay)·mean(ā āᵀ), skipped when the input is the same constant tensor."""
        x = self.x
        key = (x, x._version, self.edge_index) if x.grad_fn is None else None
        same = key is not None and self.a_key is not None and all(a is b if isinstance(a, Tensor) else a == b
                                                                  for a, b in zip(key, self.a_key))
        if same and "A" in self.factors and self.a_pure:
            return  # the moving average of a constant statistic is that statistic
        first = "A" not in self.factors
        size = x.shape[1] + (1 if self.bias is not None else 0)
        old = self.factors.get("A", torch.zeros(size, size, dtype=x.dtype, device=x.device))
        d = 0.0 if first else decay
        if self.gcn:
            rowptr, col, value = self._adjacency(x.shape[0], x.dtype)
            new = reference.sparse_factor_update(old, rowptr, col, value, x, d, self.bias is not None,
                                                 compute_dtype=None)
        else:
            new = reference.factor_update(old, x.reshape(-1, x.shape[-1]), d, self.bias is not None,
                                          compute_dtype=None)
        self.a_pure = first or d == 0.0
        self.factors["A"], self.a_key, self.dirty["A"] = new, key, True

    def _adjacency(self, n: int, dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor]:
        ei = self.edge_index
        if self.adjacency is None or self.adjacency[0] is not ei:
            self.adjacency = (ei, _normalised_csr(self.module, ei, n, dtype))
        return self.adjacency[1]

    def g_update(self, rows: Tensor, n_examples: float, fisher: bool, decay: float) -> None:
        """G ← decay·G + (1−decay)·Σ ĝ ĝᵀ / n, with ĝ = n·∂L/∂z for the empirical Fisher."""
        rows = rows.reshape(-1, rows.shape[-1])
        scale = math.sqrt(rows.shape[0] / n_examples) * (1.0 if fisher else n_examples)
        stat = reference.factor_update(torch.zeros(rows.shape[1], rows.shape[1], dtype=rows.dtype,
                                                   device=rows.device), rows * scale, 0.0, False,
                                       compute_dtype=None)
        old = self.factors.get("G")
        self.factors["G"] = stat if old is None else old.mul_(decay).add_(stat, alpha=1.0 - decay)
        self.dirty["G"] = True


class TorchKFAC:
    """Plain-PyTorch K-FAC with ``ngcuda.KFAC``'s update rule; the same constructor arguments.

    Use: ``zero_grad()``, forward, ``set_outputs(out, mask=...)``, ``loss.backward()``, ``step()``.
    """

    def __init__(self, model: nn.Module, lr: float = 0.01, damping: float = 1e-2, momentum: float = 0.0,
                 weight_decay: float = 0.0, factor_decay: float = 0.95, inverse_every: int = 10,
                 kl_clip: Optional[float] = 1e-3, fisher_type: str = "true",
                 likelihood: str = "categorical", seed: int = 0) -> None:
        gcn = _gcn_conv_type()
        self.layers = [_Layer(m, gcn is not None and isinstance(m, gcn)) for m in model.modules()
                       if isinstance(m, nn.Linear) or (gcn is not None and isinstance(m, gcn))]
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.lr, self.damping, self.momentum, self.weight_decay = lr, damping, momentum, weight_decay
        self.factor_decay, self.inverse_every, self.kl_clip = factor_decay, inverse_every, kl_clip
        self.fisher_type, self.likelihood, self.seed = fisher_type, normalize_likelihood(likelihood), seed
        self.generator: Optional[torch.Generator] = None
        self.n_examples: Optional[float] = None
        self.momentum_buffers: dict[int, Tensor] = {}
        self.t = 0

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.params:
            p.grad = None

    def set_outputs(self, outputs: Tensor, likelihood: Optional[str] = None, mask: Optional[Tensor] = None) -> None:
        """Records n (the mask's total weight) and, for the true Fisher, backpropagates the NLL of
        targets sampled from the model to every layer output (one extra backward)."""
        w = row_weights(outputs, mask)
        self.n_examples = float(w.sum())
        if self.fisher_type != "true":
            return
        if self.generator is None:
            self.generator = torch.Generator(device=outputs.device).manual_seed(self.seed)
        loss = sampled_nll(outputs, normalize_likelihood(likelihood) or self.likelihood, w, self.generator)
        outs = [layer.out for layer in self.layers]
        grads = torch.autograd.grad(loss, outs, retain_graph=True, allow_unused=True)
        for layer, g in zip(self.layers, grads):
            layer.fisher_grad = None if g is None else g.detach()

    @torch.no_grad()
    def step(self) -> None:
        fisher = self.fisher_type == "true"
        n = self.n_examples if self.n_examples else float((self.layers[-1].grad != 0).any(1).sum())
        for layer in self.layers:
            layer.a_update(self.factor_decay)
            layer.g_update(layer.fisher_grad if fisher else layer.grad, n, fisher, self.factor_decay)
        if self.t % self.inverse_every == 0:
            self._decompose()
        self._apply(self._precondition())
        self.t += 1
        self.n_examples = None

    def _decompose(self) -> None:
        """torch.linalg.eigh of every factor that changed, one matrix at a time."""
        todo = [(layer, k) for layer in self.layers for k in ("A", "G") if layer.dirty[k] or k not in layer.eig]
        mats = [layer.factors[k] for layer, k in todo]
        values, vectors = reference.batched_eigh(mats, compute_dtype=None)
        for (layer, k), a, lam, q in zip(todo, mats, values, vectors):
            if not (bool(torch.isfinite(lam).all()) and bool(torch.isfinite(q).all())):
                # as ngcuda.KFAC does (EighOptions.retry_float64): float32 LAPACK returns NaN on
                # some factors with exactly zero rows (MNIST's blank pixels) at one thread
                lam, q = (t.to(a.dtype) for t in torch.linalg.eigh(a.double()))
            layer.eig[k] = (lam.clamp(min=0.0), q)
            layer.dirty[k] = False

    def _precondition(self) -> dict[int, Tensor]:
        """(A⊗G + γI)⁻¹ vec(g + ηθ) per layer via the per-layer loop, then KL clipping."""
        grads = [layer.grad_matrix() + self.weight_decay * layer.param_matrix() for layer in self.layers]
        lam_a, q_a = [layer.eig["A"][0] for layer in self.layers], [layer.eig["A"][1] for layer in self.layers]
        lam_g, q_g = [layer.eig["G"][0] for layer in self.layers], [layer.eig["G"][1] for layer in self.layers]
        vs = reference.precondition(grads, q_a, lam_a, q_g, lam_g, self.damping, compute_dtype=None)
        if self.kl_clip:
            vg = float(torch.stack([(v * g).sum() * self.lr**2 for v, g in zip(vs, grads)]).sum())
            nu = kl_clip_scale(vg, 1.0, self.kl_clip)
            vs = [v * nu for v in vs] if nu != 1.0 else vs
        updates: dict[int, Tensor] = {}
        for layer, v in zip(self.layers, vs):
            updates[id(layer.weight)] = v[:, :layer.weight[0].numel()].reshape(layer.weight.shape)
            if layer.bias is not None:
                updates[id(layer.bias)] = v[:, -1]
        return updates

    def _apply(self, updates: dict[int, Tensor]) -> None:
        """Heavy-ball momentum on the preconditioned direction, then θ ← θ − lr·d."""
        for p in self.params:
            if p.grad is None:
                continue
            d = updates.get(id(p))
            if d is None:  # a parameter of no registered layer: plain gradient with decay
                d = p.grad + self.weight_decay * p
            if self.momentum:
                buf = self.momentum_buffers.get(id(p))
                d = self.momentum_buffers[id(p)] = d.clone() if buf is None else buf.mul_(self.momentum).add_(d)
            p.add_(d, alpha=-self.lr)
