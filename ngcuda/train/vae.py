"""MNIST variational autoencoder: the negative ELBO with the reparameterisation trick, and the curvature
K-FAC gets for it.

Loss per image (Kingma & Welling 2014, one sample ``z = μ + σ ⊙ ε``)::

    −ELBO(x) = −log p(x | z) + KL(q(z|x) ‖ N(0, I))
             = Σ_pixels BCE(logits(z), x) + ½ Σ_latent (μ² + σ² − log σ² − 1)

averaged over the minibatch.

Curvature given to :class:`ngcuda.KFAC` (``fisher_type="true"``) on factor-update steps:

* **Decoder: the true Fisher of the Bernoulli likelihood.** Pixels ``x̃ ~ Bernoulli(σ(logits))`` are
  sampled from the decoder's own predictive distribution and ``−log p(x̃ | z)`` is backpropagated.
  For the decoder the network maps ``z`` to the natural parameters (logits) of an exponential
  family, so this is an unbiased estimate of the Fisher, which equals the generalised Gauss-Newton
  (GGN) matrix there and is positive semi-definite, unlike the Hessian; and it is not the empirical
  Fisher, which Kunstner et al. (2019) show can precondition badly.
* **Encoder: the GGN of the whole negative ELBO at the sampled ε.** The encoder has no predictive
  distribution of its own over observed targets, so "its" true Fisher is not defined; the GGN is the
  natural generalisation (Martens 2020). With ε fixed, ``θ_enc → (μ, log σ²) → z → logits`` is a
  deterministic network, and the ELBO has two convex outer pieces:
  the Bernoulli likelihood of the logits, whose GGN block is estimated by backpropagating the SAME
  sampled pixels ``x̃`` through the decoder and the reparameterised ``z`` into the encoder; and the
  KL term, whose Hessian w.r.t. each row of ``(μ, log σ²)`` is exactly ``diag(1, σ²/2)``. The KL
  block enters through ``set_outputs(..., extra_terms=[(μ, 1), (log σ², σ²/2)])``: Gaussian probes
  ``√h ⊙ ξ`` are backpropagated from the heads in the same pass, adding ``Jᵀ diag(h) J``.
  Why keep the KL block: latent units the decoder ignores get almost no likelihood gradient, so
  without it their heads' ``G`` factors have near-zero eigenvalues and the KL gradient (the only
  force on them) would be scaled by ``1/damping``; with it, the step on ``μ`` is the Newton step
  of ``½μ²`` when the likelihood is flat. ``kl_curvature=False`` drops it (an ablation).
* The two heads read the same hidden layer: each is its own K-FAC block (equal ``A``, own ``G``),
  and the shared layer's ``G`` sees the sum of the gradients that come back through both heads.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..models import VAE
from .loop import minibatch_epochs
from .optimizers import OptimizerConfig, make_optimizer
from .step import optimizer_step

EVAL_SEED = 1234  # the noise ε of every evaluation: the same for every epoch and optimizer


@dataclass
class VAEConfig:
    epochs: int = 10
    batch_size: int = 1000
    latent: int = 20
    kl_curvature: bool = True


def kl_divergence(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(μ, σ²) ‖ N(0, I)) per row: ½ Σ (μ² + σ² − log σ² − 1). mu, logvar [B, L] -> [B]."""
    return 0.5 * (mu.square() + logvar.exp() - logvar - 1.0).sum(1)


def elbo_terms(logits: torch.Tensor, x: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """(reconstruction −log p(x|z) [B], KL [B]) for logits, x [B, 784] and mu, logvar [B, L]."""
    recon = F.binary_cross_entropy_with_logits(logits, x, reduction="none").sum(1)
    return recon, kl_divergence(mu, logvar)


def negative_elbo(logits: torch.Tensor, x: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """The minibatch loss: mean over images of reconstruction + KL (scalar)."""
    recon, kl = elbo_terms(logits, x, mu, logvar)
    return (recon + kl).mean()


def kl_hessian_terms(mu: torch.Tensor, logvar: torch.Tensor) -> list[tuple[torch.Tensor, Any]]:
    """The KL term's per-row Hessian diagonal w.r.t. μ (1) and log σ² (σ²/2), as K-FAC extra terms."""
    return [(mu, 1.0), (logvar, 0.5 * logvar.detach().exp())]


def vae_train_step(model: VAE, optimizer: torch.optim.Optimizer, batch: torch.Tensor,
                   kl_curvature: bool = True) -> float:
    """One minibatch step; returns the negative ELBO before it. An optimizer with `set_outputs`
    (ngcuda.KFAC) gets the decoder logits with the Bernoulli likelihood and the KL curvature first."""
    model.train()

    def forward() -> torch.Tensor:
        logits, mu, logvar = model(batch)
        if hasattr(optimizer, "set_outputs"):
            extra = kl_hessian_terms(mu, logvar) if kl_curvature else []
            optimizer.set_outputs(logits, likelihood="bernoulli", extra_terms=extra)
        return negative_elbo(logits, batch, mu, logvar)

    return optimizer_step(optimizer, forward)


@torch.no_grad()
def vae_errors(model: VAE, x: torch.Tensor, batch_size: int = 2000, seed: int = EVAL_SEED) -> dict[str, float]:
    """Per-image means over x [N, 784] at one z sample per image (noise from `seed`, so repeatable):
    neg_elbo = bce + kl, bce = −log p(x|z), sq_err = ‖σ(logits) − x‖², kl."""
    model.eval()
    gen = torch.Generator().manual_seed(seed)
    sums = {"neg_elbo": 0.0, "bce": 0.0, "sq_err": 0.0, "kl": 0.0}
    for i in range(0, x.shape[0], batch_size):
        xb = x[i : i + batch_size]
        eps = torch.randn(xb.shape[0], model.latent, generator=gen).to(device=x.device, dtype=x.dtype)
        logits, mu, logvar = model(xb, eps)
        recon, kl = elbo_terms(logits, xb, mu, logvar)
        sums["bce"] += float(recon.sum())
        sums["kl"] += float(kl.sum())
        sums["sq_err"] += float((torch.sigmoid(logits) - xb).square().sum())
    sums["neg_elbo"] = sums["bce"] + sums["kl"]
    n = max(x.shape[0], 1)
    return {k: v / n for k, v in sums.items()}


@torch.no_grad()
def vae_images(model: VAE, x: torch.Tensor, samples: int = 30, seed: int = 0
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x [K, 784], reconstructions σ(decode(μ(x))) [K, 784], prior samples σ(decode(z)), z ~ N(0, I)
    [samples, 784]) on the CPU: the pixel means, as images are usually shown."""
    model.eval()
    mu, _ = model.encode(x)
    recon = torch.sigmoid(model.decode(mu))
    z = torch.randn(samples, model.latent, generator=torch.Generator().manual_seed(seed))
    drawn = torch.sigmoid(model.decode(z.to(device=x.device, dtype=x.dtype)))
    return x.cpu(), recon.cpu(), drawn.cpu()


def train_vae(
    x_train: torch.Tensor,
    x_test: torch.Tensor,
    optimizer_name: str,
    seed: int,
    cfg: VAEConfig,
    opt_cfg: OptimizerConfig,
    device: torch.device,
    on_epoch: Callable[[dict[str, float]], None] | None = None,
) -> tuple[dict[str, Any], VAE]:
    """Train the MNIST VAE with one optimizer from the weights, batch order and noise of `seed`.

    Returns ({"optimizer", "seed", "history": [{epoch, train_/test_ + neg_elbo, bce, sq_err, kl,
    seconds}]}, the trained model); metrics are per image over the whole set, seconds is cumulative
    training time (evaluation excluded).
    """
    x_train, x_test = x_train.to(device), x_test.to(device)
    torch.manual_seed(seed)
    model = VAE(latent=cfg.latent).to(device)
    optimizer = make_optimizer(optimizer_name, model, opt_cfg, seed=seed)

    def evaluate() -> dict[str, float]:
        row = {}
        for split, x in (("train", x_train), ("test", x_test)):
            row.update({f"{split}_{k}": v for k, v in vae_errors(model, x).items()})
        return row

    def step(batch: torch.Tensor) -> float:
        return vae_train_step(model, optimizer, batch, cfg.kl_curvature)

    history = minibatch_epochs(x_train, cfg.epochs, cfg.batch_size, seed, step, evaluate, on_epoch)
    return {"optimizer": optimizer_name, "seed": seed, "history": history}, model
