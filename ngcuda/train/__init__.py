"""Training loops, metrics and plots behind `ngcuda train` and `ngcuda train-ae`."""
from __future__ import annotations

from .autoencoder import AEConfig, ae_loss, ae_train_step, train_autoencoder
from .metrics import summarise_ae_runs, summarise_node_runs, write_metrics
from .node import NodeConfig, loss_row_weights, node_loss, pseudo_label_weight, train_node_classifier, train_step
from .optimizers import OPTIMIZERS, OptimizerConfig, kfac_available, make_optimizer, parse_optimizers
from .plot import plot_runs

__all__ = [
    "AEConfig",
    "NodeConfig",
    "OPTIMIZERS",
    "OptimizerConfig",
    "ae_loss",
    "ae_train_step",
    "kfac_available",
    "loss_row_weights",
    "make_optimizer",
    "node_loss",
    "parse_optimizers",
    "plot_runs",
    "pseudo_label_weight",
    "summarise_ae_runs",
    "summarise_node_runs",
    "train_autoencoder",
    "train_node_classifier",
    "train_step",
    "write_metrics",
]
