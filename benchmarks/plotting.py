"""Plots of throughput against size, with the measured ceilings as lines, and growth fits."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Optional, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def loglog_slope(xs: Sequence[float], ys: Sequence[float]) -> Optional[float]:
    """Least-squares slope of log y against log x: the exponent p of y ∝ x^p."""
    pts = [(math.log(x), math.log(y)) for x, y in zip(xs, ys) if x > 0 and y > 0]
    if len(pts) < 2:
        return None
    mx = sum(p[0] for p in pts) / len(pts)
    my = sum(p[1] for p in pts) / len(pts)
    sxx = sum((p[0] - mx) ** 2 for p in pts)
    if sxx == 0:
        return None
    return sum((p[0] - mx) * (p[1] - my) for p in pts) / sxx


def growth_and_throughput(path: Path, title: str, panels: list[dict]) -> Path:
    """One row of panels; each panel dict has x, series {label: ys}, xlabel, ylabel, and
    optionally ceiling (value, label) and loglog (bool)."""
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 4.2), squeeze=False)
    for ax, panel in zip(axes[0], panels):
        for label, ys in panel["series"].items():
            ax.plot(panel["x"], ys, marker="o", label=label)
        if panel.get("ceiling"):
            value, label = panel["ceiling"]
            ax.axhline(value, color="gray", linestyle="--", label=label)
        if panel.get("loglog", True):
            ax.set_xscale("log")
            ax.set_yscale("log")
        ax.set_xlabel(panel["xlabel"])
        ax.set_ylabel(panel["ylabel"])
        ax.set_title(panel.get("title", ""))
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
