"""One optimizer step of the training commands: the one place where they touch an optimizer."""
from __future__ import annotations

from typing import Callable

import torch


def _rng_state() -> tuple[torch.Tensor, list[torch.Tensor] | None]:
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
    return torch.get_rng_state(), cuda


def _set_rng_state(state: tuple[torch.Tensor, list[torch.Tensor] | None]) -> None:
    cpu, cuda = state
    torch.set_rng_state(cpu)
    if cuda is not None:
        torch.cuda.set_rng_state_all(cuda)


def optimizer_step(optimizer: torch.optim.Optimizer, forward: Callable[[], torch.Tensor]) -> float:
    """zero_grad, ``loss = forward()`` (which calls ``set_outputs`` itself where it applies), backward,
    step; returns the loss before the step.

    An optimizer that evaluates the loss again after its update (ngcuda.KFAC with
    ``adaptive_damping``: the Levenberg–Marquardt ρ) gets ``forward`` as a closure, and every call
    of it starts from the random state of the first one. Dropout masks and sampled noise then
    repeat, so ρ compares one loss at two points instead of two draws of a noisy loss, and the
    random stream after the step is where one evaluation leaves it (K-FAC's own sampling has its
    own generator). ρ needs only the value of the later calls, so they run without autograd and
    leave the step's gradients in place.
    """
    if not getattr(optimizer, "adaptive_damping", False):
        optimizer.zero_grad(set_to_none=True)
        loss = forward()
        loss.backward()
        optimizer.step()
        return float(loss.detach())
    start = _rng_state()
    calls = 0

    def closure() -> torch.Tensor:
        nonlocal calls
        _set_rng_state(start)
        calls += 1
        if calls > 1:
            with torch.no_grad():
                return forward()
        optimizer.zero_grad(set_to_none=True)
        loss = forward()
        loss.backward()
        return loss

    return float(optimizer.step(closure).detach())
