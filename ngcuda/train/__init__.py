"""Training loops, metrics and plots behind `ngcuda train`, `ngcuda train-ae` and `ngcuda train-vae`."""
from __future__ import annotations

from .autoencoder import AEConfig, ae_loss, ae_train_step, train_autoencoder
from .metrics import summarise_ae_runs, summarise_node_runs, summarise_vae_runs, write_metrics
from .node import NodeConfig, loss_row_weights, node_loss, pseudo_label_weight, train_node_classifier, train_step
from .optimizers import OPTIMIZERS, OptimizerConfig, make_optimizer, parse_optimizers
from .plot import plot_runs, plot_vae_grid
from .vae import VAEConfig, negative_elbo, train_vae, vae_train_step

__all__ = [
    "AEConfig",
    "NodeConfig",
    "VAEConfig",
    "OPTIMIZERS",
    "OptimizerConfig",
    "ae_loss",
    "ae_train_step",
    "loss_row_weights",
    "make_optimizer",
    "negative_elbo",
    "node_loss",
    "parse_optimizers",
    "plot_runs",
    "plot_vae_grid",
    "pseudo_label_weight",
    "summarise_ae_runs",
    "summarise_node_runs",
    "summarise_vae_runs",
    "train_autoencoder",
    "train_node_classifier",
    "train_step",
    "train_vae",
    "vae_train_step",
    "write_metrics",
]
