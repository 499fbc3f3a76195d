"""Curves of the runs against epochs and against seconds (PNG). Figures are drawn through
matplotlib's object interface, not pyplot, so the host process's backend (a notebook's) is left alone."""
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
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 3.6 * len(panels)))
    axes = fig.subplots(len(panels), 2, squeeze=False)
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
    return path


def _tile(images: np.ndarray, cols: int, side: int = 28, pad: int = 2) -> np.ndarray:
    """[K, side*side] images in [0, 1] -> one [rows*(side+pad)+pad, cols*(side+pad)+pad] canvas (pad white)."""
    rows = -(-images.shape[0] // cols)
    canvas = np.ones((rows * (side + pad) + pad, cols * (side + pad) + pad), dtype=np.float32)
    for k, img in enumerate(images):
        r, c = divmod(k, cols)
        y, x = pad + r * (side + pad), pad + c * (side + pad)
        canvas[y : y + side, x : x + side] = img.reshape(side, side)
    return canvas


def plot_vae_grid(originals: Any, reconstructions: Any, samples: Any, path: Path, title: str,
                  cols: int = 10) -> Path:
    """Two panels: test images above their reconstructions (pairs of rows), and samples from the prior.
    originals, reconstructions [K, 784], samples [M, 784]: pixel values in [0, 1] (tensors or arrays)."""
    from matplotlib.figure import Figure

    orig, rec, drawn = (np.asarray(a, dtype=np.float32) for a in (originals, reconstructions, samples))
    pairs = []
    for i in range(0, orig.shape[0], cols):  # a row of images, then the row of their reconstructions
        pairs += [orig[i : i + cols], rec[i : i + cols]]
    fig = Figure(figsize=(9, 3.2))
    axes = fig.subplots(1, 2)
    for ax, canvas, label in ((axes[0], _tile(np.concatenate(pairs), cols), "test images / reconstructions"),
                              (axes[1], _tile(drawn, cols), "samples from the prior")):
        ax.imshow(canvas, cmap="gray", vmin=0.0, vmax=1.0, interpolation="nearest")
        ax.set_title(label, fontsize=10)
        ax.axis("off")
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    return path
