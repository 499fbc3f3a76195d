"""The models the command line trains: GNNs for node classification, the MNIST deep autoencoder and
the MNIST variational autoencoder.

Every model returns logits (no softmax / sigmoid), so the loss is `F.cross_entropy` for the GNNs and
`F.binary_cross_entropy_with_logits` for the autoencoder: both are the natural-parameter negative
log-likelihoods for which the Fisher equals the generalised Gauss-Newton matrix.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _pyg():
    try:
        from torch_geometric import nn as gnn
    except ImportError as e:  # pragma: no cover - torch_geometric is a test dependency
        raise ImportError("ngcuda's GNN models need torch_geometric: pip install torch-geometric") from e
    return gnn


def input_dropout(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """Dropout on the input features x [N, F], dense or sparse CSR.

    The same distribution as F.dropout, but random numbers are drawn for the nonzero entries only (as in
    Kipf & Welling's sparse dropout): bag-of-words features are ~1% dense, and drawing N×F Bernoulli
    samples would dominate a full-batch GCN step.
    """
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"input dropout probability must be in [0, 1], got {p}")
    if not training or p == 0.0:
        return x
    if p == 1.0:  # every entry dropped, as F.dropout (the rescaling below would be 0/0)
        if x.layout == torch.sparse_csr:
            return torch.sparse_csr_tensor(x.crow_indices(), x.col_indices(), torch.zeros_like(x.values()),
                                           size=x.shape, check_invariants=False)
        return torch.zeros_like(x)
    if x.layout == torch.sparse_csr:
        keep = (torch.rand(x.values().shape, device=x.device) >= p).to(x.dtype) / (1.0 - p)
        return torch.sparse_csr_tensor(
            x.crow_indices(), x.col_indices(), x.values() * keep, size=x.shape, check_invariants=False
        )
    if x.requires_grad or x.layout != torch.strided:
        return F.dropout(x, p, training)
    nz = x != 0
    vals = x[nz]
    keep = (torch.rand(vals.shape, device=x.device) >= p).to(x.dtype) / (1.0 - p)
    out = torch.zeros_like(x)
    out[nz] = vals * keep
    return out


class _CSRMatmul(torch.autograd.Function):
    """``x @ wᵀ`` for a constant sparse CSR ``x`` [N, d] and a dense weight ``w`` [out, d].

    torch's own backward of a CSR matmul transposes ``x`` into a new CSR tensor every step (a
    sort over all non-zeros: ~0.6 s of a 1.3 s Adam step on Coauthor CS, 2 cores). Here the
    weight gradient ``(xᵀ ∂L/∂y)ᵀ`` is one sparse-transposed product instead.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        from .optim.rows import spmm

        ctx.save_for_backward(w)
        ctx.x = x
        return spmm(x, w.detach().T.contiguous())

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        from .optim.rows import spmm

        return None, spmm(ctx.x, grad.contiguous(), transpose=True).T.to(grad.dtype)


class _CSRInputLinear(nn.Module):
    """Mixin body of :func:`csr_friendly`: CSR inputs go through :class:`_CSRMatmul`."""

    _csr_base: type = nn.Module  # the Linear class it was made from, set by csr_friendly

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.layout == torch.sparse_csr and not x.requires_grad:
            out = _CSRMatmul.apply(x, self.weight)
            return out if self.bias is None else out + self.bias
        return super().forward(x)

    def __reduce_ex__(self, protocol: int):
        # The class is made at run time, so pickle (torch.save(model)) cannot find it by name:
        # pickle the plain Linear it was made from, and make it CSR-friendly again on load.
        plain = object.__new__(self._csr_base)
        plain.__dict__.update(self.__dict__)
        return csr_friendly, (plain,)


_CSR_CLASSES: dict[type, type] = {}


def csr_friendly(lin: nn.Module) -> nn.Module:
    """Makes a Linear (torch or PyG) take a sparse CSR input with a cheap backward, in place:
    same parameters, same state-dict keys, same hooks; dense inputs are unchanged."""
    cls = type(lin)
    if issubclass(cls, _CSRInputLinear):
        return lin
    new = _CSR_CLASSES.get(cls)
    if new is None:
        new = type(f"CSR{cls.__name__}", (_CSRInputLinear, cls), {"_csr_base": cls})
        _CSR_CLASSES[cls] = new
    lin.__class__ = new
    return lin


class GCN(nn.Module):
    """Kipf & Welling's 2-layer GCN: [input dropout ->] GCNConv -> ReLU -> dropout -> GCNConv.

    forward(x [N, in], edge_index [2, E]) -> logits [N, out]. x may be dense or sparse CSR.
    ``input_dropout=False`` keeps the raw features fixed, which lets K-FAC reuse the first
    layer's input factor instead of recomputing it every step.
    """

    def __init__(self, in_channels: int, hidden: int = 16, out_channels: int = 2, dropout: float = 0.5,
                 input_dropout: bool = True) -> None:
        super().__init__()
        gnn = _pyg()
        self.dropout = dropout
        self.input_dropout = input_dropout
        self.conv1 = gnn.GCNConv(in_channels, hidden, cached=True)
        self.conv2 = gnn.GCNConv(hidden, out_channels, cached=True)
        csr_friendly(self.conv1.lin)

    def forward(self, x: torch.Tensor, edge_index: torch.Tensor) -> torch.Tensor:
        if self.input_dropout:
            x = input_dropout(x, self.dropout, self.training)
        x = F.relu(self.conv1(x, edge_index))
        x = F.dropout(x, self.dropout, self.training)
        return self.conv2(x, edge_index)


class SAGE(nn.Module):
    """2-layer GraphSAGE with mean aggregation. forward(x [N, in] dense, edge_index) -> logits [N, out]."""

    def __init__(self, in_channels: int, hidden: int = 16, out_channels: int = 2, dropout: float = 0.5,
                 input_dropout: bool = True) -> None:
        super().__init__()
        gnn = _pyg()
        self.dropout = dropout
        self.input_dropout = input_dropout
        self.conv1 = gnn.SAGEConv(in_channels, hidden, aggr="mean")
        self.conv2 = gnn.SAGEConv(hidden, out_channels, aggr="mean")

    def forward(self, x: torch.Tensor, edge_index: torch.Tensor) -> torch.Tensor:
        if self.input_dropout:
            x = input_dropout(x, self.dropout, self.training)
        x = F.relu(self.conv1(x, edge_index))
        x = F.dropout(x, self.dropout, self.training)
        return self.conv2(x, edge_index)


class GIN(nn.Module):
    """2-layer GIN; each GINConv applies an MLP Linear -> ReLU -> Linear to (1 + eps) x_i + sum_j x_j.

    forward(x [N, in] dense, edge_index) -> logits [N, out].
    """

    def __init__(self, in_channels: int, hidden: int = 16, out_channels: int = 2, dropout: float = 0.5,
                 input_dropout: bool = True) -> None:
        super().__init__()
        gnn = _pyg()
        self.dropout = dropout
        self.input_dropout = input_dropout
        self.conv1 = gnn.GINConv(
            nn.Sequential(nn.Linear(in_channels, hidden), nn.ReLU(), nn.Linear(hidden, hidden)), train_eps=False
        )
        self.conv2 = gnn.GINConv(
            nn.Sequential(nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, out_channels)), train_eps=False
        )

    def forward(self, x: torch.Tensor, edge_index: torch.Tensor) -> torch.Tensor:
        if self.input_dropout:
            x = input_dropout(x, self.dropout, self.training)
        x = F.relu(self.conv1(x, edge_index))
        x = F.dropout(x, self.dropout, self.training)
        return self.conv2(x, edge_index)


class DeepGCN(nn.Module):
    """GCN of `layers` GCNConv layers (in -> hidden -> ... -> hidden -> out), ReLU and dropout between them.

    skip: add a residual connection h <- h + relu(conv(h)) around every hidden -> hidden layer, the setting
    where Xu et al. (2021) predict fast convergence, and where K-FAC should gain the least.
    forward(x [N, in], edge_index) -> logits [N, out].
    """

    def __init__(
        self,
        in_channels: int,
        hidden: int = 16,
        out_channels: int = 2,
        layers: int = 8,
        skip: bool = False,
        dropout: float = 0.5,
        input_dropout: bool = True,
    ) -> None:
        super().__init__()
        if layers < 2:
            raise ValueError(f"layers must be at least 2, got {layers}")
        gnn = _pyg()
        self.dropout = dropout
        self.input_dropout = input_dropout
        self.skip = skip
        dims = [in_channels] + [hidden] * (layers - 1) + [out_channels]
        self.convs = nn.ModuleList(gnn.GCNConv(a, b, cached=True) for a, b in zip(dims[:-1], dims[1:]))
        csr_friendly(self.convs[0].lin)

    def forward(self, x: torch.Tensor, edge_index: torch.Tensor) -> torch.Tensor:
        if self.input_dropout:
            x = input_dropout(x, self.dropout, self.training)
        x = F.relu(self.convs[0](x, edge_index))
        for conv in self.convs[1:-1]:
            h = F.relu(conv(F.dropout(x, self.dropout, self.training), edge_index))
            x = x + h if self.skip else h
        x = F.dropout(x, self.dropout, self.training)
        return self.convs[-1](x, edge_index)


class Autoencoder(nn.Module):
    """The MNIST deep autoencoder of Hinton & Salakhutdinov (2006), the K-FAC benchmark of Martens & Grosse (2015):
    784-1000-500-250-30-250-500-1000-784, logistic sigmoid units, a linear 30-unit code layer.

    forward(x [B, 784] in [0, 1]) -> reconstruction logits [B, 784] (Bernoulli cross-entropy via
    `F.binary_cross_entropy_with_logits`; `torch.sigmoid` gives pixel means).

    init: "default" (torch's uniform fan-in init) or "sparse", the sparse initialisation of Martens
    (2010) used by Martens & Grosse (2015) for this network: each unit gets 15 incoming weights drawn
    from N(0, 1) (all of them when it has fewer inputs), the other weights and every bias 0. Large
    sparse weights keep the sigmoid units apart, so training does not settle first on the plateau
    where every unit is near 0.5 and the output is the mean image.
    """

    SPARSE_FAN_IN = 15

    def __init__(self, sizes: tuple[int, ...] = (784, 1000, 500, 250, 30), init: str = "default") -> None:
        super().__init__()
        if len(sizes) < 2:
            raise ValueError(f"sizes needs at least an input and a code size, got {sizes}")
        if init not in ("default", "sparse"):
            raise ValueError(f"init must be 'default' or 'sparse', got {init!r}")
        enc = []
        for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
            enc.append(nn.Linear(a, b))
            if i < len(sizes) - 2:
                enc.append(nn.Sigmoid())
        rev = sizes[::-1]
        dec = []
        for i, (a, b) in enumerate(zip(rev[:-1], rev[1:])):
            dec.append(nn.Linear(a, b))
            if i < len(rev) - 2:
                dec.append(nn.Sigmoid())
        self.encoder = nn.Sequential(*enc)
        self.decoder = nn.Sequential(*dec)
        if init == "sparse":
            self._sparse_init()

    @torch.no_grad()
    def _sparse_init(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Linear):
                k = min(self.SPARSE_FAN_IN, m.in_features)
                # k distinct inputs per unit: the k smallest of i.i.d. uniform keys per row
                cols = torch.rand(m.out_features, m.in_features).argsort(dim=1)[:, :k]
                m.weight.zero_().scatter_(1, cols, torch.randn(m.out_features, k))
                m.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.encoder(x))


class VAE(nn.Module):
    """Variational autoencoder for MNIST (Kingma & Welling 2014) with a Bernoulli decoder.

    Encoder: MLP ``784-512-256`` (ReLU) whose last hidden layer feeds two linear heads, ``μ`` and
    ``log σ²`` [B, latent]. Decoder: the mirror ``latent-256-512-784`` (ReLU), giving Bernoulli
    logits. ``forward(x [B, 784], eps=None) -> (logits [B, 784], mu [B, latent], logvar [B, latent])``
    with ``z = μ + exp(½ log σ²) ⊙ ε`` (reparameterisation); ``eps`` [B, latent] defaults to fresh
    ``N(0, I)`` noise from the global generator.
    """

    def __init__(self, latent: int = 20, hidden: tuple[int, ...] = (512, 256), pixels: int = 784) -> None:
        super().__init__()
        if latent < 1 or not hidden:
            raise ValueError(f"latent must be >= 1 and hidden non-empty, got {latent}, {hidden}")
        self.latent = latent
        enc: list[nn.Module] = []
        for a, b in zip((pixels,) + hidden[:-1], hidden):
            enc += [nn.Linear(a, b), nn.ReLU()]
        self.encoder = nn.Sequential(*enc)
        # Two heads on one hidden layer: K-FAC gives each its own block (same A, own G); the shared
        # layer's output gradient is the sum of both heads' (autograd adds them before its hook).
        self.mu = nn.Linear(hidden[-1], latent)
        self.logvar = nn.Linear(hidden[-1], latent)
        dec: list[nn.Module] = []
        rev = hidden[::-1]
        for a, b in zip((latent,) + rev[:-1], rev):
            dec += [nn.Linear(a, b), nn.ReLU()]
        dec.append(nn.Linear(rev[-1], pixels))
        self.decoder = nn.Sequential(*dec)

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [B, 784] -> (mu, logvar), each [B, latent]."""
        h = self.encoder(x)
        return self.mu(h), self.logvar(h)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """z [B, latent] -> Bernoulli logits [B, 784]."""
        return self.decoder(z)

    def forward(self, x: torch.Tensor, eps: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        mu, logvar = self.encode(x)
        if eps is None:
            eps = torch.randn_like(mu)
        z = mu + torch.exp(0.5 * logvar) * eps
        return self.decode(z), mu, logvar


GNN_MODELS = ("gcn", "sage", "gin", "deep-gcn")


def build_gnn(
    name: str,
    in_channels: int,
    out_channels: int,
    hidden: int = 16,
    dropout: float = 0.5,
    layers: int = 2,
    skip: bool = False,
    input_dropout: bool = True,
) -> nn.Module:
    """A GNN by name (one of GNN_MODELS). `layers` and `skip` apply to "deep-gcn" only;
    `input_dropout=False` drops dropout on the raw input features (every model)."""
    if name == "gcn":
        return GCN(in_channels, hidden, out_channels, dropout, input_dropout=input_dropout)
    if name == "sage":
        return SAGE(in_channels, hidden, out_channels, dropout, input_dropout=input_dropout)
    if name == "gin":
        return GIN(in_channels, hidden, out_channels, dropout, input_dropout=input_dropout)
    if name == "deep-gcn":
        return DeepGCN(in_channels, hidden, out_channels, layers=layers, skip=skip, dropout=dropout,
                       input_dropout=input_dropout)
    raise ValueError(f"unknown model {name!r}: use one of {', '.join(GNN_MODELS)}")
