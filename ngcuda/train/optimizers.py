"""Optimizers by name, for the command line's side-by-side comparisons."""
from __future__ import annotations

import inspect
from dataclasses import dataclass, replace
from typing import Any, Callable

import torch
from torch import nn

OPTIMIZERS = ("adam", "sgd", "kfac", "kfac-adam", "kfac-sgd")

# Learning rates used when --lr is not given. GNN: Adam 0.01 (Kipf & Welling); plain SGD with momentum
# 0.9 barely moves a GCN on row-normalised features at 0.01 (Cora: loss 1.94 after 200 epochs), 0.2 learns.
# The K-FAC variants follow ssp (Izadi et al.): inner Adam/SGD at 0.01. Autoencoder: Adam's usual 1e-3;
# SGD needs a small step because the loss sums 784 pixels per image. VAE: Adam and Adam-KFAC 3e-3, the best of
# {1e-3, 3e-3, 1e-2} on held-out training images (docs/autoencoders.md).
DEFAULT_LR = {
    "gnn": {"adam": 0.01, "sgd": 0.2, "kfac": 0.1, "kfac-adam": 0.01, "kfac-sgd": 0.01},
    "ae": {"adam": 1e-3, "sgd": 1e-3, "kfac": 0.1, "kfac-adam": 1e-3, "kfac-sgd": 1e-3},
    "vae": {"adam": 3e-3, "sgd": 1e-4, "kfac": 0.1, "kfac-adam": 3e-3, "kfac-sgd": 1e-4},
}

# K-FAC settings per task where ngcuda.KFAC's defaults (and momentum 0.9) do not fit. VAE, tuned on held-out
# training images (docs/autoencoders.md): the ELBO sums 784 pixels per image, so a GCN's KL trust region of 1e-3 keeps the
# steps ~30x too short; with it at 0.1, heavy-ball momentum makes the clipped steps overshoot, momentum 0 is steady.
# The autoencoder's loss sums the same 784 pixels; this setting, with the sparse init, is the README's run.
KFAC_DEFAULTS: dict[str, dict[str, float]] = {
    "ae": {"damping": 1e-2, "kl_clip": 0.1, "momentum": 0.0},
    "vae": {"damping": 1e-2, "kl_clip": 0.1, "momentum": 0.0},
}


# The options only the K-FAC variants take: values passed to ngcuda.KFAC when set, and switches.
KFAC_OPTIONS = ("damping", "factor_decay", "factor_every", "inverse_every", "kl_clip", "fisher_type",
                "factor_structure", "gcn_factoring")
KFAC_SWITCHES = ("adaptive_damping", "ekfac")

PER_OPTIMIZER_FIELDS = ("lr", "momentum", "weight_decay", "damping", "factor_decay", "factor_every",
                        "inverse_every", "kl_clip", "fisher_type")


@dataclass
class OptimizerConfig:
    """Hyperparameters shared by every optimizer. None means: DEFAULT_LR[task][name] (lr); KFAC_DEFAULTS[task]
    then the optimizer's own default (K-FAC options); KFAC_DEFAULTS[task] for kfac, else 0.9 (momentum).
    Any field of PER_OPTIMIZER_FIELDS may instead be a dict {optimizer name or "*": value} (see
    `parse_per_optimizer`); `for_optimizer` resolves it."""

    lr: float | None = None
    momentum: float | None = None
    weight_decay: float = 0.0
    damping: float | None = None
    factor_decay: float | None = None
    factor_every: int | None = None
    inverse_every: int | None = None
    kl_clip: float | None = None
    factor_structure: str | None = None
    fisher_type: str | None = None
    gcn_factoring: str | None = None
    adaptive_damping: bool = False
    ekfac: bool = False
    task: str = "gnn"
    dist_timeout: float | None = None  # seconds K-FAC waits for a collective (--dist-timeout); None: its default

    def for_optimizer(self, name: str) -> "OptimizerConfig":
        """A copy with every per-optimizer dict replaced by the value for `name` (else its "*" entry, else
        None, i.e. the default) and momentum resolved (KFAC_DEFAULTS[task] for kfac, else 0.9)."""
        values = {}
        for f in PER_OPTIMIZER_FIELDS:
            v = getattr(self, f)
            if isinstance(v, dict):
                v = v.get(name, v.get("*"))
                if v is None and f == "weight_decay":
                    v = OptimizerConfig.__dataclass_fields__[f].default
            values[f] = v
        if values["momentum"] is None:
            task_default = KFAC_DEFAULTS.get(self.task, {}).get("momentum") if name == "kfac" else None
            values["momentum"] = 0.9 if task_default is None else task_default
        return replace(self, **values)

    def kfac_option(self, key: str) -> Any:
        """A K-FAC option of a resolved config: the configured value, else the task's KFAC_DEFAULTS entry,
        else None (ngcuda.KFAC's own default)."""
        value = getattr(self, key)
        return value if value is not None else KFAC_DEFAULTS.get(self.task, {}).get(key)

    def lr_for(self, name: str) -> float:
        lr = self.for_optimizer(name).lr
        return lr if lr is not None else DEFAULT_LR[self.task][name]


def parse_per_optimizer(text: str, convert: Callable[[str], Any]) -> Any:
    """'0.05' -> 0.05 (every optimizer); 'kfac=0.05,kfac-sgd=0.1' -> {'kfac': 0.05, 'kfac-sgd': 0.1} (the
    others keep their default); '0.01,kfac=0.05' -> {'*': 0.01, 'kfac': 0.05}. ValueError on a bad entry."""
    parts = [p.strip() for p in text.split(",") if p.strip()]
    if not parts:
        raise ValueError("empty value")
    if len(parts) == 1 and "=" not in parts[0]:
        return convert(parts[0])
    out: dict[str, Any] = {}
    for part in parts:
        name, eq, value = part.partition("=")
        name = name.strip().lower() if eq else "*"
        value = value if eq else part
        if name != "*" and name not in OPTIMIZERS:
            raise ValueError(f"unknown optimizer {name!r} in {text!r}: use {', '.join(OPTIMIZERS)}")
        if name in out:
            raise ValueError(f"{'a default' if name == '*' else repr(name)} given twice in {text!r}")
        out[name] = convert(value.strip())
    return out


def parse_optimizers(text: str) -> list[str]:
    """'kfac,adam' -> ['kfac', 'adam']; ValueError naming the unknown entry otherwise."""
    names = [n.strip().lower() for n in text.split(",") if n.strip()]
    if not names:
        raise ValueError("no optimizer given")
    for n in names:
        if n not in OPTIMIZERS:
            raise ValueError(f"unknown optimizer {n!r}: use a comma list of {', '.join(OPTIMIZERS)}")
    if len(set(names)) != len(names):
        raise ValueError(f"optimizer listed twice in {text!r}")
    return names


def make_optimizer(
    name: str, model: nn.Module, cfg: OptimizerConfig, seed: int | None = None
) -> torch.optim.Optimizer:
    """The optimizer `name` (one of OPTIMIZERS) over `model`'s parameters.

    kfac:      ngcuda.KFAC with its own momentum and weight decay.
    kfac-adam: ngcuda.KFAC preconditioning the gradient for an inner Adam (lr, weight_decay).
    kfac-sgd:  the same with SGD (lr, momentum).
    K-FAC options left None take KFAC_DEFAULTS[cfg.task], else are not passed, so ngcuda.KFAC's defaults
    apply; adaptive_damping and ekfac apply to every K-FAC variant; `seed` seeds K-FAC's sampling of
    true-Fisher targets (when ngcuda.KFAC takes a seed).
    """
    if name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}: use one of {', '.join(OPTIMIZERS)}")
    cfg = cfg.for_optimizer(name)
    lr = cfg.lr_for(name)
    if name == "adam":
        return torch.optim.Adam(model.parameters(), lr=lr, weight_decay=cfg.weight_decay)
    if name == "sgd":
        return torch.optim.SGD(model.parameters(), lr=lr, momentum=cfg.momentum,
                               weight_decay=cfg.weight_decay)
    import ngcuda

    kfac_opts = {k: cfg.kfac_option(k) for k in KFAC_OPTIONS if cfg.kfac_option(k) is not None}
    kfac_opts.update({k: True for k in KFAC_SWITCHES if getattr(cfg, k)})
    if seed is not None and "seed" in inspect.signature(ngcuda.KFAC).parameters:
        kfac_opts["seed"] = seed
    if cfg.dist_timeout is not None and torch.distributed.is_available() \
            and torch.distributed.is_initialized():
        from ..optim.distributed import DistributedOptions

        kfac_opts["distributed"] = DistributedOptions(timeout=cfg.dist_timeout)
    if name == "kfac":
        return ngcuda.KFAC(model, lr=lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, **kfac_opts)
    if name == "kfac-adam":
        base = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=cfg.weight_decay)
    else:
        base = torch.optim.SGD(model.parameters(), lr=lr, momentum=cfg.momentum,
                               weight_decay=cfg.weight_decay)
    return ngcuda.KFAC(model, base_optimizer=base, **kfac_opts)
