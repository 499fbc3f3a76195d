"""The training problems of the step benchmark, and the optimizers compared on them.

Each workload builds a freshly seeded model and performs one training step with any of the
optimizers; ngcuda.KFAC and the plain-PyTorch baseline get the same hyperparameters.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

import ngcuda

from .torch_kfac import TorchKFAC

# ngcuda-kfac uses full factors, like the plain-PyTorch twin; ngcuda-kfac-auto is the product
# default (factor_structure="auto": low rank for wide inputs).
VARIANTS = ("adam", "ngcuda-kfac", "ngcuda-kfac-auto", "torch-kfac", "ngcuda-kfac-empirical",
            "torch-kfac-empirical")


@dataclass
class Workload:
    name: str
    description: str
    model: Callable[[], nn.Module]
    step: Callable[[nn.Module, Any], None]  # one training step of the model with the optimizer
    quality: Callable[[nn.Module], dict[str, float]]  # a sanity number after the timed steps
    kfac: dict[str, Any] = field(default_factory=dict)  # K-FAC hyperparameters, both K-FACs
    adam: dict[str, Any] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)


def optimizer(variant: str, model: nn.Module, w: Workload) -> Any:
    """The optimizer ``variant`` (one of VARIANTS) over ``model`` with the workload's settings."""
    if variant == "adam":
        return torch.optim.Adam(model.parameters(), **w.adam)
    kw = dict(w.kfac, fisher_type="empirical" if variant.endswith("-empirical") else "true")
    if variant.startswith("ngcuda-"):
        structure = "auto" if variant.endswith("-auto") else "full"
        return ngcuda.KFAC(model, factor_structure=structure, **kw)
    return TorchKFAC(model, **kw)


def gcn_cora(device: str, quick: bool) -> Workload:
    """2-layer GCN (16 hidden, dropout 0.5) on Cora, full batch, 140 labelled nodes."""
    from ngcuda.data import load_planetoid
    from ngcuda.models import GCN

    data = load_planetoid("cora")
    x = (data.x / data.x.sum(1, keepdim=True).clamp(min=1)).to(device)  # row-normalised, as GCN
    edge_index, y, train, test = (t.to(device) for t in (data.edge_index, data.y, data.train_mask, data.test_mask))

    def model() -> nn.Module:
        torch.manual_seed(0)
        return GCN(x.shape[1], 16, data.num_classes, input_dropout=False).to(device)

    def step(m: nn.Module, opt: Any) -> None:
        m.train()
        opt.zero_grad()
        out = m(x, edge_index)
        if hasattr(opt, "set_outputs"):
            opt.set_outputs(out, mask=train)
        F.cross_entropy(out[train], y[train]).backward()
        opt.step()

    @torch.no_grad()
    def quality(m: nn.Module) -> dict[str, float]:
        m.eval()
        pred = m(x, edge_index).argmax(1)
        return {"test_accuracy": float((pred[test] == y[test]).float().mean())}

    return Workload(
        "gcn-cora", "GCN 1433-16-7 on Cora (2708 nodes), full batch", model, step, quality,
        kfac=dict(lr=0.02, damping=0.01, momentum=0.9, weight_decay=5e-4, factor_decay=0.95,
                  inverse_every=10, kl_clip=1e-2, likelihood="categorical"),
        adam=dict(lr=0.01, weight_decay=5e-4),
        config={"nodes": int(x.shape[0]), "features": int(x.shape[1]), "hidden": 16, "labelled": int(train.sum())},
    )


def autoencoder(device: str, quick: bool) -> Workload:
    """The 784-1000-500-250-30 MNIST autoencoder on minibatches of the shipped images.

    --quick keeps the 784-pixel input and output but narrows the hidden layers and the batch.
    """
    from ngcuda.data import load_mnist
    from ngcuda.models import Autoencoder

    images, _ = load_mnist()
    images = images.reshape(images.shape[0], -1).float()
    sizes = (784, 64, 32, 8) if quick else (784, 1000, 500, 250, 30)
    batch = 100 if quick else 1000
    n_batches = 8000 // batch
    batches = [images[i * batch:(i + 1) * batch].to(device) for i in range(n_batches)]
    # every optimizer walks through the same minibatches in the same order
    cursors: dict[int, Any] = {}

    def model() -> nn.Module:
        torch.manual_seed(0)
        return Autoencoder(sizes).to(device)

    def step(m: nn.Module, opt: Any) -> None:
        it = cursors.setdefault(id(m), itertools.cycle(batches))
        xb = next(it)
        m.train()
        opt.zero_grad()
        logits = m(xb)
        if hasattr(opt, "set_outputs"):
            opt.set_outputs(logits, likelihood="bernoulli")
        (F.binary_cross_entropy_with_logits(logits, xb, reduction="sum") / xb.shape[0]).backward()
        opt.step()

    @torch.no_grad()
    def quality(m: nn.Module) -> dict[str, float]:
        m.eval()
        xb = batches[0]
        bce = F.binary_cross_entropy_with_logits(m(xb), xb, reduction="sum")
        return {"train_bce_per_image": float(bce) / xb.shape[0]}

    return Workload(
        "autoencoder", f"autoencoder {'-'.join(map(str, sizes))} (mirrored), batch {batch} of MNIST",
        model, step, quality,
        kfac=dict(lr=0.1, damping=0.01, momentum=0.9, weight_decay=0.0, factor_decay=0.95,
                  inverse_every=10, kl_clip=1e-3, likelihood="bernoulli"),
        adam=dict(lr=1e-3),
        config={"sizes": list(sizes), "batch": batch, "minibatches_cycled": n_batches},
    )


WORKLOADS = {"gcn-cora": gcn_cora, "autoencoder": autoencoder}
