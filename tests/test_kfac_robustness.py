"""ngcuda.KFAC robustness: hyperparameter checks, frozen parameters, empty batches, EKFAC scales,
gradient accumulation, base-optimizer weight decay, checkpoints."""
from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import ngcuda
from ngcuda.optim import KFACWarning

pytestmark = pytest.mark.filterwarnings("ignore:ngcuda. no compiled:RuntimeWarning")


def mlp(seed: int = 0, dtype: torch.dtype = torch.float64) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).to(dtype)


def data(n: int = 12, seed: int = 1, dtype: torch.dtype = torch.float64):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 4, generator=g, dtype=dtype), torch.randint(0, 3, (n,), generator=g)


def kfac_step(model: nn.Module, opt: ngcuda.KFAC, x: torch.Tensor, y: torch.Tensor,
              mask: torch.Tensor | None = None) -> None:
    opt.zero_grad()
    out = model(x)
    opt.set_outputs(out, mask=mask)
    sel = out if mask is None else out[mask]
    F.cross_entropy(sel, y if mask is None else y[mask], reduction="sum").div(max(1, len(sel))
                                                                              ).backward()
    opt.step()


def dense_kfac_solve(A: torch.Tensor, G: torch.Tensor, g: torch.Tensor, damping: float):
    """(A⊗G + γI)⁻¹ vec(g), column-major vec, solved densely: a [d_out, d_a] matrix."""
    K = torch.kron(A, G) + damping * torch.eye(A.shape[0] * G.shape[0], dtype=A.dtype)
    return torch.linalg.solve(K, g.T.reshape(-1)).reshape(A.shape[0], G.shape[0]).T


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


# ------------------------------------------------------------------------- 1. damping > 0
def test_zero_damping_is_refused():
    with pytest.raises(ValueError, match="damping"):
        ngcuda.KFAC(mlp(), damping=0.0)


def test_callable_damping_is_checked_at_each_step():
    model = mlp()
    opt = ngcuda.KFAC(model, damping=lambda t: 0.1 if t < 2 else 0.0)
    x, y = data()
    kfac_step(model, opt, x, y)
    kfac_step(model, opt, x, y)
    with pytest.raises(ValueError, match="damping at step 2"):
        kfac_step(model, opt, x, y)


def test_non_finite_preconditioned_update_is_skipped_like_a_non_finite_gradient():
    # Finite float32 gradients of ~1e37 over λ_G·λ_A + γ ~ 1e-6 overflow (NaN weights before).
    model = mlp(dtype=torch.float32)
    opt = ngcuda.KFAC(model, lr=0.1, damping=1e-6, momentum=0.9, kl_clip=None)
    x, y = data(dtype=torch.float32)
    before = [p.detach().clone() for p in model.parameters()]
    opt.zero_grad()
    out = model(x)
    opt.set_outputs(out)
    (F.cross_entropy(out, y) * 1e38).backward()
    assert all(bool(torch.isfinite(p.grad).all()) for p in model.parameters())
    with pytest.warns(KFACWarning, match="non-finite preconditioned update"):
        opt.step()
    for p, q in zip(model.parameters(), before):
        assert torch.equal(p.detach(), q)
        assert "momentum_buffer" not in opt.state[p]
    kfac_step(model, opt, x, y)  # a normal step afterwards trains as usual
    assert all(bool(torch.isfinite(p).all()) for p in model.parameters())
    assert not torch.equal(model[0].weight.detach(), before[0])
