"""The minibatch epoch loop shared by the MNIST commands (train-ae, train-vae)."""
from __future__ import annotations

import time
from typing import Callable

import torch


def sync(device: torch.device) -> None:
    """Waits for queued GPU work, so that wall-clock timings cover it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def minibatch_epochs(
    x_train: torch.Tensor,
    epochs: int,
    batch_size: int,
    seed: int,
    step: Callable[[torch.Tensor], object],
    evaluate: Callable[[], dict[str, float]],
    on_epoch: Callable[[dict[str, float]], None] | None = None,
) -> list[dict[str, float]]:
    """Runs `epochs` passes of `step(batch)` over shuffled minibatches of x_train [N, ...].

    The order comes from a generator seeded with `seed` (the same for every optimizer of a seed).
    After each epoch `evaluate()` gives the metrics; returns the rows {epoch, **metrics, seconds},
    seconds being cumulative training time (evaluation excluded).
    """
    gen = torch.Generator().manual_seed(seed)
    device = x_train.device
    history = []
    seconds = 0.0
    for epoch in range(1, epochs + 1):
        order = torch.randperm(x_train.shape[0], generator=gen).to(device)
        sync(device)
        t0 = time.perf_counter()
        for i in range(0, x_train.shape[0], batch_size):
            step(x_train[order[i : i + batch_size]])
        sync(device)
        seconds += time.perf_counter() - t0
        row = {"epoch": epoch, **evaluate(), "seconds": seconds}
        history.append(row)
        if on_epoch is not None:
            on_epoch(row)
    return history
