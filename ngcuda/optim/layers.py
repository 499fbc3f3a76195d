"""One small helper per layer kind: what a layer captures, how its factors are built.

A helper owns the module hooks of one registered layer and knows three things:

* which parameters it preconditions jointly, as one ``[d_out, d_in(+1)]`` matrix (the last column
  is the bias when the layer has one that requires grad: a frozen bias is a constant, and the
  layer is treated as bias-free);
* how to turn the captured forward inputs into the statistic of its input factor ``A``;
* where its output gradients (the rows of ``G``) come from.

Layer kinds:

* ``linear``: ``torch.nn.Linear`` and ``torch_geometric.nn.Linear``, anywhere in the model (also the
  Linear layers of a GIN MLP, of SAGEConv/GraphConv and of any other conv). ``A`` is built from the
  layer's input rows ``[x, 1]``; ``G`` from the gradient at the layer's output. This is exact
  K-FAC-expand for any Linear, because its weight gradient is ``Σ_rows g_r x̄_rᵀ`` whatever the
  surrounding message passing does.
* SAGEConv's ``lin_l`` and GraphConv's ``lin_rel`` get kinds ``sage-neighbour`` /
  ``graphconv-neighbour``: PyG materialises their mean / sum aggregated input before calling them,
  so the hook reads the aggregate ``ÂX`` directly (with the row-normalised / summing adjacency the
  layer itself used); nothing is recomputed. ``lin_r`` / ``lin_root`` see ``x`` (``*-root``).
* ``gcn`` (``GCNConv``, default ``gcn_factoring="aggregated"``, Izadi et al.): the layer computes
  ``Z = Â(XW) + b``, so ``∇W = (ÂX)ᵀ ∂L/∂Z``. ``A`` is built from ``[ÂX, 1]`` with
  :func:`ngcuda.ops.sparse_factor_update_` over the layer's own normalised adjacency (``gcn_norm``
  with the layer's ``improved``/``add_self_loops``/``normalize``/``flow`` flags and its cache), never
  materialising ``ÂX``; ``G`` from ``∂L/∂Z``; ``lin.weight`` and ``bias`` are preconditioned jointly.
* ``gcn-input`` (``gcn_factoring="input"``): ``conv.lin`` is treated as a plain Linear: ``A`` from
  ``X`` (no bias column), ``G`` from the gradient at ``lin``'s output ``Âᵀ∂L/∂Z``. Both factorings
  give the same gradient; they are different Kronecker approximations of its covariance. The conv's
  bias then gets the plain (unpreconditioned) update, since it bypasses ``Â``.
"""
from __future__ import annotations

import sys
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
from torch import Tensor, nn
from torch.autograd.graph import get_gradient_edge

from .. import ops
from .rows import RowSource, is_csr

_PYG: Optional[dict[str, Any]] = None


def _pyg() -> dict[str, Any]:
    """PyG's classes, imported on first use (PyG is optional and slow to import)."""
    global _PYG
    if _PYG is None:
        try:
            import torch_geometric.nn as pyg_nn
            from torch_geometric.nn.conv.gcn_conv import gcn_norm
            from torch_geometric.nn.dense.linear import Linear as PygLinear
        except ImportError:  # pragma: no cover
            _PYG = {}
        else:
            _PYG = {"GCNConv": pyg_nn.GCNConv, "GIN": (pyg_nn.GINConv, pyg_nn.GINEConv),
                    "Linear": PygLinear, "gcn_norm": gcn_norm}
    return _PYG

__all__ = ["LayerInfo", "CaptureState", "KFACLayer", "LinearLayer", "GCNLayer", "discover"]


class CaptureState:
    """Shared between the optimizer and every hook: whether to keep tensors, and the phase.

    ``active``: keep inputs and output gradients (factor-update steps only).
    ``phase``: ``"loss"`` for the user's backward, ``"fisher"`` during the sampled-target backward.
    """

    def __init__(self) -> None:
        self.active = False
        self.enabled = True
        self.phase = "loss"
        self.seq = 0

    def next_seq(self) -> int:
        self.seq += 1
        return self.seq


def _statistic_dtype(t: Tensor) -> Tensor:
    """Half-precision rows (activations and output gradients under torch.autocast) in float32:
    the factors are kept in the weight's dtype, and summing squares in 16 bits loses them."""
    if t.layout == torch.strided and t.dtype in (torch.float16, torch.bfloat16):
        return t.float()
    return t


class _Record:
    """What one forward call of a layer left behind."""

    __slots__ = ("x", "edge", "grad", "fgrad", "seq", "extra")

    def __init__(self, x: Tensor, edge: Any, seq: int, extra: Any = None) -> None:
        self.x = x
        self.edge = edge  # GradientEdge of the output, to drive the Fisher backward
        self.grad: Optional[Tensor] = None  # gradient at the output from the user's loss
        self.fgrad: Optional[Tensor] = None  # gradient at the output from sampled targets
        self.seq = seq
        self.extra = extra


@dataclass(frozen=True)
class LayerInfo:
    """A registered layer as :meth:`ngcuda.KFAC.layers` lists it."""

    name: str
    kind: str
    a_size: int
    g_size: int
    params: tuple[str, ...]
    structure: str = "full"  # of A: full, block:k, lowrank:r, diag; "auto" until chosen

    def __str__(self) -> str:
        a, g = self.a_size, self.g_size
        return f"{self.name}: {self.kind}, A {a}x{a} {self.structure}, G {g}x{g}"


class KFACLayer:
    """Base helper: hooks, captured records, gradient matrix in and out."""

    kind = "linear"

    def __init__(self, name: str, module: nn.Module, weight: nn.Parameter,
                 bias: Optional[nn.Parameter], state: CaptureState) -> None:
        if isinstance(weight, nn.parameter.UninitializedParameter):
            raise ValueError(
                f"ngcuda.KFAC: layer '{name}' has uninitialised (lazy) parameters; run one forward "
                "pass before building the optimizer")
        self.name = name
        self.module = module
        self.weight = weight
        # A frozen bias is a constant added to the output: the weight's Fisher block is then
        # A(x)⊗G without a ones column, and a zero bias column would change its Schur complement.
        self.bias = bias if bias is not None and bias.requires_grad else None
        self.state = state
        self.records: list[_Record] = []
        self.fired = False
        self.handles: list[Any] = []
        # The last input statistic's inputs, to skip recomputing A when they did not change.
        self.a_signature: Optional[tuple] = None
        # EKFAC: (signature, Q_A, (ā Q_A)²) for a constant input.
        self.ekfac_cache: Optional[tuple] = None

    # sizes -------------------------------------------------------------------------------
    @property
    def d_out(self) -> int:
        return self.weight.shape[0]

    @property
    def d_in(self) -> int:
        return self.weight.shape[1]

    @property
    def a_size(self) -> int:
        return self.d_in + (1 if self.bias is not None else 0)

    @property
    def g_size(self) -> int:
        return self.d_out

    def params(self) -> list[nn.Parameter]:
        return [self.weight] + ([self.bias] if self.bias is not None else [])

    def info(self, names: dict[int, str], structure: str = "full") -> LayerInfo:
        return LayerInfo(self.name, self.kind, self.a_size, self.g_size,
                         tuple(names.get(id(p), "?") for p in self.params()), structure)

    # hooks -------------------------------------------------------------------------------
    def attach(self) -> None:
        self.handles.append(self.module.register_forward_hook(self._forward_hook, with_kwargs=True))

    def detach(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()

    def _keep(self, output: Any) -> bool:
        self.fired = True
        return (self.state.active and self.state.enabled and torch.is_grad_enabled()
                and isinstance(output, Tensor) and output.requires_grad)

    def _track_output(self, output: Tensor, x: Tensor, extra: Any = None) -> None:
        # A constant input (a feature matrix) is kept as the same object, so that an unchanged
        # input can be recognised at the next factor update (see KFACLayer.signature).
        rec = _Record(_statistic_dtype(x if not x.requires_grad else x.detach()),
                      get_gradient_edge(output), self.state.next_seq(), extra)
        state = self.state

        def grad_hook(grad: Tensor) -> None:
            # The last backward through this output wins (an earlier torch.autograd.grad call
            # of the user, e.g. for a penalty, must not add to the statistics).
            if state.phase == "fisher":
                rec.fgrad = _statistic_dtype(grad.detach())
            else:
                rec.grad = _statistic_dtype(grad.detach())

        output.register_hook(grad_hook)
        self.records.append(rec)

    def _forward_hook(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        if self._keep(output):
            x = args[0] if args else kwargs.get("input", kwargs.get("x"))
            self._track_output(output, x)

    def clear(self) -> None:
        # The grad hook of each record lives on the output's autograd node and refers back to
        # the record, which holds that node's GradientEdge: a cycle through C++ that Python's
        # GC cannot see, which kept every step's graph (and its saved inputs: 15 MB a step on
        # Cora) alive. Emptying the records breaks it.
        for r in self.records:
            r.x = r.edge = r.grad = r.fgrad = r.extra = None
        self.records.clear()
        self.fired = False

    # statistics --------------------------------------------------------------------------
    def used_records(self) -> list[_Record]:
        """Forward calls that took part in the backward (the others have no output gradient)."""
        return [r for r in self.records if r.grad is not None or r.fgrad is not None]

    def signature(self, recs: list[_Record]) -> Optional[tuple]:
        """Identifies the A statistic's inputs when they are constant tensors (a fixed feature
        matrix): same objects, same versions, no gradient. None when they may differ."""
        if len(recs) != 1 or recs[0].x.requires_grad or recs[0].x.grad_fn is not None:
            return None
        x = recs[0].x
        return (x, x._version)

    def a_rows(self, recs: list[_Record]) -> Tensor:
        """Dense ā rows [R, a_size] (EKFAC and tests)."""
        x = torch.cat([r.x.reshape(-1, self.d_in) for r in recs])
        if self.bias is not None:
            x = torch.cat([x, torch.ones(x.shape[0], 1, dtype=x.dtype, device=x.device)], 1)
        return x

    def row_sources(self, recs: list[_Record]) -> list[RowSource]:
        """The rows ā of each captured call, implicitly (dense or sparse CSR x)."""
        return [RowSource(r.x if is_csr(r.x) else r.x.reshape(-1, self.d_in), None,
                          self.bias is not None) for r in recs]

    def a_inputs_finite(self, recs: list[_Record]) -> list[Tensor]:
        return [r.x for r in recs]

    def a_count(self, recs: list[_Record]) -> int:
        """Rows behind the A statistic (its weight when ranks average their statistics)."""
        return sum(r.x.numel() // self.d_in for r in recs)

    def grad_rows(self, recs: list[_Record], fisher: bool) -> Optional[Tensor]:
        """Output-gradient rows [R, d_out] of the captured calls (sampled or from the loss)."""
        gs = [(r.fgrad if fisher else r.grad) for r in recs]
        gs = [g.reshape(-1, self.d_out) for g in gs if g is not None]
        if not gs:
            return None
        return gs[0] if len(gs) == 1 else torch.cat(gs)

    # gradient in and out -----------------------------------------------------------------
    def has_grad(self) -> bool:
        bias_grad = self.bias is not None and self.bias.grad is not None
        return self.weight.grad is not None or bias_grad

    def grad_matrix(self) -> Tensor:
        """[d_out, d_in(+1)]: the weight gradient with the bias gradient as last column."""
        gw = self.weight.grad if self.weight.grad is not None else torch.zeros_like(self.weight)
        if self.bias is None:
            return gw.reshape(self.d_out, self.d_in)
        gb = self.bias.grad if self.bias.grad is not None else torch.zeros_like(self.bias)
        return torch.cat([gw.reshape(self.d_out, self.d_in), gb.reshape(self.d_out, 1)], 1)

    def param_matrix(self) -> Tensor:
        w = self.weight.detach().reshape(self.d_out, self.d_in)
        if self.bias is None:
            return w
        return torch.cat([w, self.bias.detach().reshape(self.d_out, 1)], 1)

    def split(self, mat: Tensor) -> list[tuple[nn.Parameter, Tensor]]:
        """Inverse of :meth:`grad_matrix`: (param, tensor shaped like param) pairs."""
        out = [(self.weight, mat[:, : self.d_in].reshape(self.weight.shape))]
        if self.bias is not None:
            out.append((self.bias, mat[:, self.d_in].reshape(self.bias.shape)))
        return out


class LinearLayer(KFACLayer):
    """``nn.Linear`` / PyG ``Linear``: A from the input rows (+ ones column), G from ∂L/∂output."""

    def __init__(self, name: str, module: nn.Module, state: CaptureState, kind: str = "linear"):
        super().__init__(name, module, module.weight, getattr(module, "bias", None), state)
        self.kind = kind


class _Adjacency:
    """A layer's normalised adjacency as CSR with rows = target nodes."""

    __slots__ = ("rowptr", "col", "value", "key", "_csr")

    def __init__(self, rowptr: Tensor, col: Tensor, value: Optional[Tensor], key: tuple):
        self.rowptr, self.col, self.value, self.key = rowptr, col, value, key
        self._csr: Optional[Tensor] = None

    def csr(self, n: int, dtype: torch.dtype) -> Tensor:
        """Â as a torch CSR tensor [rows, n] (built once)."""
        if self._csr is None or self._csr.dtype != dtype:
            v = self.value if self.value is not None else torch.ones(
                self.col.numel(), dtype=dtype, device=self.col.device)
            with warnings.catch_warnings():  # "sparse CSR support is in beta"
                warnings.simplefilter("ignore", UserWarning)
                self._csr = torch.sparse_csr_tensor(self.rowptr, self.col, v.to(dtype),
                                                    size=(self.rowptr.numel() - 1, n))
        return self._csr


def _csr_by_target(edge_index: Tensor, edge_weight: Optional[Tensor], num_nodes: int,
                   flow: str) -> tuple[Tensor, Tensor, Optional[Tensor]]:
    """CSR of the message matrix: out_i = Σ_{(j→i)} w_e x_j, so row i = target, col j = source.
    Columns ascend within each row (gcn_norm appends the self-loops last): cuSPARSE, behind
    torch.sparse.mm on CUDA, assumes sorted CSR."""
    src, dst = (edge_index[0], edge_index[1]) if flow == "source_to_target" else (
        edge_index[1], edge_index[0])
    perm = torch.argsort(dst * num_nodes + src, stable=True)  # duplicate edges keep their order
    col = src[perm].contiguous()
    value = None if edge_weight is None else edge_weight[perm].contiguous()
    counts = torch.bincount(dst, minlength=num_nodes)
    rowptr = torch.zeros(num_nodes + 1, dtype=torch.long, device=edge_index.device)
    torch.cumsum(counts, 0, out=rowptr[1:])
    return rowptr, col, value


class GCNLayer(KFACLayer):
    """``GCNConv`` with the aggregated-input factoring (Izadi et al.).

    ``A = mean_i [(ÂH)_i, 1][(ÂH)_i, 1]ᵀ`` over all N nodes, via
    :func:`ngcuda.ops.sparse_factor_update_` on the layer's own ``Â``; ``G`` from ``∂L/∂Z`` at the
    conv output; ``lin.weight`` and ``bias`` (when it requires grad) are one ``[d_out, d_in+1]``
    block.
    """

    kind = "gcn"

    def __init__(self, name: str, module: nn.Module, state: CaptureState):
        super().__init__(name, module, module.lin.weight, module.bias, state)
        self._adj: Optional[_Adjacency] = None

    def _forward_hook(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        if not self._keep(output):
            return
        names = ("x", "edge_index", "edge_weight")
        vals = dict(zip(names, args))
        for k in names:
            if k in kwargs:
                vals[k] = kwargs[k]
        edge_index = vals.get("edge_index")
        if not isinstance(edge_index, Tensor) or edge_index.layout != torch.strided:
            raise TypeError(
                f"ngcuda.KFAC: layer '{self.name}' (GCNConv) got edge_index of type "
                f"{type(edge_index).__name__}; only a dense [2, E] edge_index tensor is supported")
        self._track_output(output, vals["x"], (edge_index, vals.get("edge_weight")))

    def adjacency(self, rec: _Record) -> _Adjacency:
        """The normalised adjacency exactly as the layer used it (cached when it is cached)."""
        m = self.module
        edge_index, edge_weight = rec.extra
        n = rec.x.shape[0]
        cache = getattr(m, "_cached_edge_index", None)
        if m.normalize and m.cached and cache is not None:
            key = ("cache", cache[0], cache[0]._version, n)
        else:
            key = ("input", edge_index, edge_index._version, edge_weight,
                   None if edge_weight is None else edge_weight._version, n)
        if self._adj is not None and len(self._adj.key) == len(key) and all(
                a is b if isinstance(a, Tensor) or isinstance(b, Tensor) else a == b
                for a, b in zip(self._adj.key, key)):
            return self._adj
        if m.normalize:
            if m.cached and cache is not None:
                ei, ew = cache
            else:
                ei, ew = _pyg()["gcn_norm"](edge_index, edge_weight, n, m.improved,
                                            m.add_self_loops, m.flow, rec.x.dtype)
        else:
            ei, ew = edge_index, edge_weight
        rowptr, col, value = _csr_by_target(ei, ew, n, m.flow)
        self._adj = _Adjacency(rowptr, col, value, key)
        return self._adj

    def signature(self, recs: list[_Record]) -> Optional[tuple]:
        base = super().signature(recs)
        if base is None:
            return None
        adj = self.adjacency(recs[0])
        return base + (adj.rowptr, adj.col, adj.value)

    def row_sources(self, recs: list[_Record]) -> list[RowSource]:
        return [RowSource(r.x, self.adjacency(r).csr(r.x.shape[0], r.x.dtype),
                          self.bias is not None) for r in recs]

    def a_count(self, recs: list[_Record]) -> int:
        return sum(r.x.shape[0] for r in recs)

    def a_rows(self, recs: list[_Record]) -> Tensor:
        from ..reference import sparse_aggregate

        xs = []
        for r in recs:
            adj = self.adjacency(r)
            xs.append(sparse_aggregate(adj.rowptr, adj.col, adj.value, r.x))
        x = torch.cat(xs)
        if self.bias is not None:
            x = torch.cat([x, torch.ones(x.shape[0], 1, dtype=x.dtype, device=x.device)], 1)
        return x

    def a_inputs_finite(self, recs: list[_Record]) -> list[Tensor]:
        out = []
        for r in recs:
            out.append(r.x)
            v = self.adjacency(r).value
            if v is not None:
                out.append(v)
        return out


def _is_linear(m: nn.Module) -> bool:
    # a model holding PyG modules has imported PyG already; plain MLPs never import it
    pyg_linear = _pyg().get("Linear") if "torch_geometric" in sys.modules else None
    return isinstance(m, nn.Linear) or (pyg_linear is not None and isinstance(m, pyg_linear))


_CHILD_KINDS: dict[tuple[str, str], str] = {
    ("SAGEConv", "lin_l"): "sage-neighbour",
    ("SAGEConv", "lin_r"): "sage-root",
    ("SAGEConv", "lin"): "sage-project",
    ("GraphConv", "lin_rel"): "graphconv-neighbour",
    ("GraphConv", "lin_root"): "graphconv-root",
}

LayerFactory = Callable[[str, nn.Module, CaptureState], Optional[KFACLayer]]


def discover(model: nn.Module, state: CaptureState, gcn_factoring: str = "aggregated"
             ) -> tuple[list[KFACLayer], set[int], set[int]]:
    """Registers every supported layer of ``model`` whose weight requires grad (a frozen bias is
    left out of its layer, see :class:`KFACLayer`).

    Returns the helpers, the ids of parameters that are deliberately left to the plain update
    without a warning (a GCNConv bias under ``gcn_factoring="input"``), and the ids of trainable
    biases of layers whose weight is frozen: their Fisher block is G alone, which no helper models,
    so they get the plain update too.
    """
    if gcn_factoring not in ("aggregated", "input"):
        raise ValueError(f"gcn_factoring must be 'aggregated' or 'input', got {gcn_factoring!r}")
    modules = dict(model.named_modules())
    claimed: set[int] = set()
    quiet: set[int] = set()
    frozen_weight: set[int] = set()
    layers: list[KFACLayer] = []

    def weight_frozen(weight: Tensor, bias: Optional[Tensor]) -> bool:
        if weight.requires_grad:
            return False
        if bias is not None and bias.requires_grad:
            frozen_weight.add(id(bias))
        return True

    pyg = _pyg() if "torch_geometric" in sys.modules else {}
    gcn_cls = pyg.get("GCNConv", ())
    gin_cls = pyg.get("GIN", ())
    for name, m in modules.items():
        if gcn_cls and isinstance(m, gcn_cls):
            if weight_frozen(m.lin.weight, m.bias):
                claimed.add(id(m.lin))
                continue
            if gcn_factoring == "aggregated":
                layers.append(GCNLayer(name, m, state))
                claimed.add(id(m.lin))
            else:
                layers.append(LinearLayer(f"{name}.lin" if name else "lin", m.lin, state,
                                          kind="gcn-input"))
                claimed.add(id(m.lin))
                if m.bias is not None and m.bias.requires_grad:
                    quiet.add(id(m.bias))
    for name, m in modules.items():
        if id(m) in claimed or not _is_linear(m) or weight_frozen(m.weight, m.bias):
            continue
        kind = "linear"
        parts = name.split(".")
        parent = modules.get(".".join(parts[:-1]))
        if parent is not None:
            kind = _CHILD_KINDS.get((type(parent).__name__, parts[-1]), kind)
        if kind == "linear" and gin_cls:
            for i in range(len(parts) - 1, 0, -1):
                if isinstance(modules.get(".".join(parts[:i])), gin_cls):
                    kind = "gin-mlp"
                    break
        layers.append(LinearLayer(name, m, state, kind=kind))
    return layers, quiet, frozen_weight
