"""PNG figures: a grid of log-log panels of time or throughput against size (and bar panels).

A panel can carry horizontal ceiling lines (the measured memory bandwidth or matmul rate) and a
guide line of the expected growth (∝ x^p) through a series' last point, so a reader sees at a
glance both how far an op is from the machine's limits and whether it grows as its flop count.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


@dataclass
class Series:
    label: str
    x: Sequence[float]
    y: Sequence[Optional[float]]


@dataclass
class Panel:
    title: str
    xlabel: str
    ylabel: str
    series: list[Series]
    ceilings: list[tuple[float, str]] = field(default_factory=list)
    guide: Optional[tuple[float, str]] = None  # (exponent p, label): a dashed ∝ x^p line
    loglog: bool = True


def _finite(x: Sequence[float], y: Sequence[Optional[float]]) -> tuple[list[float], list[float]]:
    pts = [(a, b) for a, b in zip(x, y) if b is not None and math.isfinite(b) and b > 0]
    return [p[0] for p in pts], [p[1] for p in pts]


def _draw(ax: plt.Axes, panel: Panel) -> None:
    for s in panel.series:
        xs, ys = _finite(s.x, s.y)
        if xs:
            ax.plot(xs, ys, marker="o", markersize=4, label=s.label)
    for value, label in panel.ceilings:
        if value and math.isfinite(value):
            ax.axhline(value, color="gray", linestyle="--", linewidth=1, label=label)
    if panel.guide and panel.series:
        p, label = panel.guide
        xs, ys = _finite(panel.series[0].x, panel.series[0].y)
        if len(xs) >= 2:
            # anchored at the largest size, where the leading term should dominate
            x0, y0 = xs[-1], ys[-1]
            ax.plot([xs[0], x0], [y0 * (xs[0] / x0) ** p, y0], color="black", linestyle=":",
                    linewidth=1, label=label)
    if panel.loglog:
        ax.set_xscale("log")
        ax.set_yscale("log")
    ax.set_title(panel.title, fontsize=10)
    ax.set_xlabel(panel.xlabel)
    ax.set_ylabel(panel.ylabel)
    ax.grid(True, which="both", alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7)


@dataclass
class BarPanel:
    """Grouped bars: one group per workload, one bar per method."""

    title: str
    ylabel: str
    groups: list[str]
    values: dict[str, list[Optional[float]]]  # method -> one value per group
    log: bool = False


def _draw_bars(ax: plt.Axes, panel: BarPanel) -> None:
    k = max(1, len(panel.values))
    width = 0.8 / k
    for i, (label, ys) in enumerate(panel.values.items()):
        xs = [g + (i - (k - 1) / 2) * width for g in range(len(panel.groups))]
        ax.bar(xs, [y if y is not None else 0.0 for y in ys], width, label=label)
    ax.set_xticks(range(len(panel.groups)), panel.groups)
    if panel.log:
        ax.set_yscale("log")
    ax.set_title(panel.title, fontsize=10)
    ax.set_ylabel(panel.ylabel)
    ax.grid(True, axis="y", which="both", alpha=0.3)
    ax.legend(fontsize=7)


def save(path: Path, title: str, panels: list[Panel | BarPanel], ncols: int = 3) -> Path:
    """Draws the panels row by row into ``path`` (a PNG) and returns it."""
    ncols = max(1, min(ncols, len(panels)))
    nrows = -(-len(panels) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(5.0 * ncols, 4.0 * nrows), squeeze=False)
    for ax in axes.flat[len(panels):]:
        ax.set_visible(False)
    for ax, panel in zip(axes.flat, panels):
        if isinstance(panel, BarPanel):
            _draw_bars(ax, panel)
        else:
            _draw(ax, panel)
    fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path

