"""Node classification: full batch (one optimizer step per epoch) or NeighborLoader mini-batches;
evaluated after every epoch; data-parallel over the ranks of an initialised torch.distributed group.

Data parallel (``ngcuda train --distributed`` under torchrun): full batch, every rank runs the whole
graph and takes its share of the training nodes for its loss; mini-batch, every rank samples its
share of the (shuffled, padded) training nodes, so all ranks take the same number of steps.
``ngcuda.KFAC`` averages gradients (weighted by the example counts) and factors itself; the other
optimizers get their gradients averaged by ``DistributedDataParallel``.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

import torch.distributed as dist

from ..data import Graph
from ..models import build_gnn
from .loop import sync
from .optimizers import OptimizerConfig, make_optimizer
from .sampling import rank_share, uncache_gcn
from .step import optimizer_step


@dataclass
class NodeConfig:
    model: str = "gcn"
    hidden: int = 16
    dropout: float = 0.5
    layers: int = 2
    skip: bool = False
    epochs: int = 200
    pseudo_label_gamma: float | None = None
    normalize_features: bool = True
    batch_size: int | None = None  # None: full batch; else seed nodes per NeighborLoader batch
    num_neighbors: tuple[int, ...] = (10, 10)  # sampled neighbours per hop (mini-batch)
    input_dropout: bool = True
    fisher_nodes: str = "loss"  # K-FAC's true-Fisher rows: "loss" (the loss's weights) or "all" nodes


FISHER_NODES = ("loss", "all")


def pseudo_label_weight(epoch: int, epochs: int, gamma: float | None) -> float:
    """λ_t = (t/T)^γ (Izadi et al.); 0 when γ is None."""
    return 0.0 if gamma is None else (epoch / epochs) ** gamma


def node_loss(logits: torch.Tensor, y: torch.Tensor, train_mask: torch.Tensor, lam: float = 0.0,
              pseudo: torch.Tensor | None = None) -> torch.Tensor:
    """Cross-entropy on the training nodes, plus lam × cross-entropy of every other node against its
    pseudo-label: `pseudo` [N] if given, else its own (detached) argmax prediction. logits [N, C], y [N],
    train_mask [N] bool."""
    loss = F.cross_entropy(logits[train_mask], y[train_mask])
    if lam > 0:
        rest = ~train_mask
        if pseudo is None:
            pseudo = logits.detach().argmax(1)
        loss = loss + lam * F.cross_entropy(logits[rest], pseudo[rest])
    return loss


def step_loss(y: torch.Tensor, train_mask: torch.Tensor, lam: float = 0.0
              ) -> Callable[[torch.Tensor], torch.Tensor]:
    """node_loss for one step: the pseudo-labels of its first call are kept for later calls, so a
    re-evaluation after the update (K-FAC's damping adaptation) scores the same targets."""
    pseudo: list[torch.Tensor] = []

    def loss(logits: torch.Tensor) -> torch.Tensor:
        if lam > 0 and not pseudo:
            pseudo.append(logits.detach().argmax(1))
        return node_loss(logits, y, train_mask, lam, pseudo[0] if pseudo else None)

    return loss


def loss_row_weights(train_mask: torch.Tensor, lam: float = 0.0) -> torch.Tensor:
    """[N] weight of each node in the loss, for K-FAC's Fisher: 1 on training nodes, lam elsewhere
    (Izadi et al.: n = |train| + λ_t·|rest|). This is Izadi et al.'s weighting, kept to reproduce
    them. The loss itself (node_loss, also theirs) weighs a training node 1/|train| and another
    node λ_t/|rest|: relative to a training node, the Fisher weighs the others |rest|/|train|
    times more than the loss does (about 18× on Cora)."""
    w = train_mask.to(torch.float32)
    if lam > 0:
        w = w + lam * (~train_mask).to(torch.float32)
    return w


def fisher_row_weights(train_mask: torch.Tensor, lam: float, fisher_nodes: str) -> torch.Tensor:
    """[N] row weights of K-FAC's Fisher. "loss": the loss's own (loss_row_weights). "all": 1 on every
    node, labelled or not; the true Fisher samples its targets from the model, so it needs no label,
    and this averages it over the whole graph (the input distribution of the transductive task)
    rather than over the 20 labelled nodes per class."""
    if fisher_nodes == "all":
        return torch.ones(train_mask.shape, dtype=torch.float32, device=train_mask.device)
    return loss_row_weights(train_mask, lam)


def train_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    x: torch.Tensor,
    edge_index: torch.Tensor,
    loss_fn: Callable[[torch.Tensor], torch.Tensor],
    rows: torch.Tensor | None = None,
) -> float:
    """One full-batch step: forward, loss, backward, optimizer step. Returns the loss before the step.

    An optimizer with `set_outputs` (ngcuda.KFAC) gets the logits, the categorical likelihood and `rows`
    ([N] row weights of the loss) before the backward, so it can take its true-Fisher pass. The forward
    and `loss_fn` run twice on steps where K-FAC adapts its damping (`optimizer_step`), so `loss_fn`
    must score the same targets both times (`step_loss`).
    """
    model.train()

    def forward() -> torch.Tensor:
        logits = model(x, edge_index)
        if hasattr(optimizer, "set_outputs"):
            optimizer.set_outputs(logits, likelihood="categorical", mask=rows)
        return loss_fn(logits)

    return optimizer_step(optimizer, forward)


@torch.no_grad()
def evaluate(model: nn.Module, graph: Graph, x: torch.Tensor) -> dict[str, float]:
    model.eval()
    logits = model(x, graph.edge_index)
    pred = logits.argmax(1)
    out = {}
    for split in ("train", "val", "test"):
        mask = getattr(graph, f"{split}_mask")
        out[f"{split}_acc"] = float((pred[mask] == graph.y[mask]).float().mean()) if mask.any() else float("nan")
    val = graph.val_mask
    out["val_loss"] = float(F.cross_entropy(logits[val], graph.y[val])) if val.any() else float("nan")
    return out


def prepare_features(graph: Graph, cfg: NodeConfig, dense: bool = False) -> torch.Tensor:
    """The model input: row-normalised (PyG NormalizeFeatures, as in GCN and ssp) if cfg.normalize_features.
    Sparse CSR features stay sparse for the GCN models unless `dense`; SAGE and GIN need them dense."""
    x = graph.x
    if x.layout != torch.strided and (dense or cfg.model in ("sage", "gin")):
        x = x.to_dense()
    if not cfg.normalize_features:
        return x
    if x.layout == torch.strided:
        return x / x.sum(1, keepdim=True).clamp_min(1e-12)
    rowptr, col, val = x.crow_indices(), x.col_indices(), x.values()
    counts = rowptr[1:] - rowptr[:-1]
    rowsum = torch.zeros(x.shape[0], dtype=val.dtype, device=val.device).index_add_(
        0, torch.repeat_interleave(torch.arange(x.shape[0], device=val.device), counts), val
    )
    scale = torch.repeat_interleave(1.0 / rowsum.clamp_min(1e-12), counts)
    return torch.sparse_csr_tensor(rowptr, col, val * scale, size=x.shape, check_invariants=False)


def rank_and_world() -> tuple[int, int]:
    """(rank, world size) of the default torch.distributed group, (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _minibatch_epoch(net: nn.Module, optimizer: torch.optim.Optimizer, loader, device: torch.device
                     ) -> float:
    """One pass over the NeighborLoader batches; returns the mean batch loss."""
    losses = []
    for b in loader:
        b = b.to(device)
        bs = b.batch_size
        rows = torch.zeros(b.num_nodes, device=device)
        rows[:bs] = 1.0  # the loss averages over the seed nodes only
        losses.append(train_step(net, optimizer, b.x, b.edge_index,
                                 lambda z, b=b: F.cross_entropy(z[:bs], b.y[:bs]), rows))
    return sum(losses) / max(len(losses), 1)


def _mean_over_ranks(value: float, weight: float, device: torch.device) -> float:
    t = torch.tensor([value * weight, weight], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return float(t[0] / t[1])


def train_node_classifier(
    graph: Graph,
    optimizer_name: str,
    seed: int,
    cfg: NodeConfig,
    opt_cfg: OptimizerConfig,
    device: torch.device,
    on_epoch: Callable[[dict[str, float]], None] | None = None,
) -> dict[str, Any]:
    """Train one model with one optimizer from the initial weights of `seed`.

    Returns {"optimizer", "seed", "history": [{epoch, train_loss, val_loss, train_acc, val_acc, test_acc,
    seconds}]}; seconds is cumulative training time (evaluation excluded).
    """
    rank, world = rank_and_world()
    if world > 1 and cfg.pseudo_label_gamma is not None:
        raise ValueError("pseudo-labels are not supported in data-parallel runs")
    if cfg.batch_size and cfg.pseudo_label_gamma is not None:
        raise ValueError("pseudo-labels need full-batch training (batch_size None): mini-batches train on "
                         "their seed nodes' labels only")
    if cfg.fisher_nodes not in FISHER_NODES:
        raise ValueError(f"fisher_nodes must be one of {FISHER_NODES}, got {cfg.fisher_nodes!r}")
    if cfg.fisher_nodes == "all" and (world > 1 or cfg.batch_size):
        raise ValueError("fisher_nodes='all' needs a full-batch, single-process run")
    graph = graph.to(device)
    # Sparse CSR features stay sparse for the GCN models, K-FAC included: its factor structures
    # take CSR layer inputs (dense Coauthor Physics features would be 1.2 GB). The mini-batch
    # sampler slices node rows, which needs them dense.
    x = prepare_features(graph, cfg, dense=bool(cfg.batch_size))
    torch.manual_seed(seed)
    model = build_gnn(
        cfg.model, graph.num_features, graph.num_classes, cfg.hidden, cfg.dropout, cfg.layers, cfg.skip,
        input_dropout=cfg.input_dropout,
    ).to(device)
    train_ids = graph.train_mask.nonzero().flatten().cpu()
    train_mask = graph.train_mask
    if world > 1:  # full batch: this rank's loss covers its share of the training nodes
        train_mask = torch.zeros_like(graph.train_mask)
        train_mask[rank_share(train_ids, rank, world, pad=False).to(device)] = True
    net = model
    if world > 1 and not optimizer_name.startswith("kfac"):
        net = nn.parallel.DistributedDataParallel(model)  # K-FAC averages its own (weighted by n)
    optimizer = make_optimizer(optimizer_name, model, opt_cfg, seed=seed)
    if cfg.fisher_nodes == "all" and getattr(optimizer, "fisher_type", "true") != "true":
        raise ValueError("fisher_nodes='all' needs the true Fisher: the empirical one has no gradient "
                         "on unlabelled nodes")
    sampler = None
    if cfg.batch_size:
        from torch_geometric.data import Data

        from .sampling import TorchNeighborSampler

        uncache_gcn(model)  # each subgraph has its own normalised adjacency
        sampler = TorchNeighborSampler(Data(x=x.cpu(), edge_index=graph.edge_index.cpu(), y=graph.y.cpu()),
                                       cfg.num_neighbors, seed=seed * 7919 + rank)
    history = []
    seconds = 0.0
    # One row-weight tensor while its values stay the same (no pseudo-labels, or every node):
    # K-FAC caches what it derives from a mask by the mask's identity, which saves syncs on a GPU.
    fisher_rows: tuple[Any, torch.Tensor | None] = (object(), None)
    for epoch in range(1, cfg.epochs + 1):
        lam = pseudo_label_weight(epoch, cfg.epochs, cfg.pseudo_label_gamma)
        rows_key = lam if cfg.fisher_nodes == "loss" else None
        if fisher_rows[0] != rows_key:
            fisher_rows = (rows_key, fisher_row_weights(train_mask, lam, cfg.fisher_nodes))
        sync(device)
        t0 = time.perf_counter()
        if sampler is not None:
            from torch_geometric.loader import NeighborLoader

            loader = NeighborLoader(sampler.data_ref, num_neighbors=list(cfg.num_neighbors),
                                    input_nodes=rank_share(train_ids, rank, world, epoch, seed),
                                    batch_size=cfg.batch_size, neighbor_sampler=sampler)
            loss = _minibatch_epoch(net, optimizer, loader, device)
        else:
            loss = train_step(
                net, optimizer, x, graph.edge_index, step_loss(graph.y, train_mask, lam), fisher_rows[1],
            )
        sync(device)
        seconds += time.perf_counter() - t0
        if world > 1:  # report the loss over all ranks' training nodes, not this rank's share
            loss = _mean_over_ranks(loss, float(train_mask.sum()) if sampler is None else 1.0, device)
        row = {"epoch": epoch, "train_loss": loss, **evaluate(model, graph, x), "seconds": seconds}
        history.append(row)
        if on_epoch is not None:
            on_epoch(row)
    out = {"optimizer": optimizer_name, "seed": seed, "history": history}
    if hasattr(optimizer, "layers"):  # K-FAC: the layers and their (automatically chosen) structures
        out["kfac_layers"] = [str(info) for info in optimizer.layers()]
    return out
