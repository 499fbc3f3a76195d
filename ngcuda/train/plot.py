"""Curves of the runs against epochs and against seconds (PNG, matplotlib Agg)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np


def _mean_curve(runs: list[dict[str, Any]], key: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(epochs, mean cumulative seconds, mean of `key`) over seeds, truncated to the shortest run."""
    n = min(len(r["history"]) for r in runs)
    epochs = np.array([h["epoch"] for h in runs[0]["history"][:n]])
    secs = np.mean([[h["seconds"] for h in r["history"][:n]] for r in runs], axis=0)
    vals = np.mean([[h[key] for h in r["history"][:n]] for r in runs], axis=0)
    return epochs, secs, vals


def plot_runs(runs: list[dict[str, Any]], path: Path, panels: list[tuple[str, str, bool]], title: str) -> Path:
    """One row per panel (key, label, log-scale), curves per optimizer (mean over seeds), against epochs
    (left) and seconds (right)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(panels), 2, figsize=(11, 3.6 * len(panels)), squeeze=False)
    names = list(dict.fromkeys(r["optimizer"] for r in runs))
    for row, (key, label, log) in enumerate(panels):
        for name in names:
            epochs, secs, vals = _mean_curve([r for r in runs if r["optimizer"] == name], key)
            axes[row, 0].plot(epochs, vals, label=name)
            axes[row, 1].plot(secs, vals, label=name)
        for col, xlabel in enumerate(("epoch", "seconds (training only)")):
            ax = axes[row, col]
            ax.set_xlabel(xlabel)
            ax.set_ylabel(label)
            if log:
                ax.set_yscale("log")
            ax.grid(alpha=0.3)
            ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
