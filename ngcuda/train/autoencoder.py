"""MNIST deep-autoencoder training: minibatches over a shuffled index, evaluated on the full sets every epoch."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..models import Autoencoder
from .loop import minibatch_epochs
from .optimizers import OptimizerConfig, make_optimizer
from .step import optimizer_step


@dataclass
class AEConfig:
    """Martens & Grosse's benchmark: their sparse init, under which K-FAC leaves the mean-image
    plateau in a few epochs (with torch's default init every optimizer tried stalls on it)."""

    epochs: int = 30
    batch_size: int = 1000
    init: str = "sparse"  # the Autoencoder's weight init: "sparse" (Martens 2010) or "default"


def ae_loss(logits: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Bernoulli cross-entropy summed over pixels, averaged over images. logits, x: [B, 784]."""
    return F.binary_cross_entropy_with_logits(logits, x, reduction="sum") / x.shape[0]


def ae_train_step(
    model: nn.Module, optimizer: torch.optim.Optimizer, batch: torch.Tensor
) -> float:
    """One minibatch step; returns the loss before it. An optimizer with `set_outputs` (ngcuda.KFAC)
    gets the logits and the Bernoulli likelihood first."""
    model.train()

    def forward() -> torch.Tensor:
        logits = model(batch)
        if hasattr(optimizer, "set_outputs"):
            optimizer.set_outputs(logits, likelihood="bernoulli")
        return ae_loss(logits, batch)

    return optimizer_step(optimizer, forward)


@torch.no_grad()
def reconstruction_errors(model: nn.Module, x: torch.Tensor, batch_size: int = 2000) -> tuple[float, float]:
    """(Bernoulli cross-entropy per image, squared error per image) of model on x [N, 784]."""
    model.eval()
    ce = se = 0.0
    for i in range(0, x.shape[0], batch_size):
        xb = x[i : i + batch_size]
        logits = model(xb)
        ce += float(F.binary_cross_entropy_with_logits(logits, xb, reduction="sum"))
        se += float((torch.sigmoid(logits) - xb).square().sum())
    n = max(x.shape[0], 1)
    return ce / n, se / n


def train_autoencoder(
    x_train: torch.Tensor,
    x_test: torch.Tensor,
    optimizer_name: str,
    seed: int,
    cfg: AEConfig,
    opt_cfg: OptimizerConfig,
    device: torch.device,
    on_epoch: Callable[[dict[str, float]], None] | None = None,
) -> dict[str, Any]:
    """Train the 784-1000-500-250-30 autoencoder with one optimizer from the weights and batch order of `seed`.

    Returns {"optimizer", "seed", "history": [{epoch, train_bce, train_sq_err, test_bce, test_sq_err,
    seconds}]}; errors are per image over the whole set, seconds is cumulative training time.
    """
    x_train, x_test = x_train.to(device), x_test.to(device)
    torch.manual_seed(seed)
    model = Autoencoder(init=cfg.init).to(device)
    optimizer = make_optimizer(optimizer_name, model, opt_cfg, seed=seed)

    def evaluate() -> dict[str, float]:
        train_ce, train_se = reconstruction_errors(model, x_train)
        test_ce, test_se = reconstruction_errors(model, x_test)
        return {"train_bce": train_ce, "train_sq_err": train_se, "test_bce": test_ce, "test_sq_err": test_se}

    history = minibatch_epochs(x_train, cfg.epochs, cfg.batch_size, seed,
                               lambda batch: ae_train_step(model, optimizer, batch), evaluate, on_epoch)
    return {"optimizer": optimizer_name, "seed": seed, "history": history}
