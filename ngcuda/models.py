"""The models the command line trains: GNNs for node classification and the MNIST deep autoencoder.

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
    if not training or p == 0.0:
        return x
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
    """

    def __init__(self, sizes: tuple[int, ...] = (784, 1000, 500, 250, 30)) -> None:
        super().__init__()
        if len(sizes) < 2:
            raise ValueError(f"sizes needs at least an input and a code size, got {sizes}")
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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.encoder(x))


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
