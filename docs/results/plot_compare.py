"""Overlay the mean curves of several `ngcuda train` runs in one small PNG.

    python docs/results/plot_compare.py OUT.png TITLE LABEL=runs/a/metrics.json LABEL2=runs/b/metrics.json

Each metrics.json contributes one line per optimizer (labelled "LABEL optimizer", or just "optimizer"
for the LABEL -), the mean over its seeds of the training loss and of the validation accuracy,
against epochs.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def main(out: str, title: str, specs: list[str]) -> None:
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    styles = ["-", "--", ":", "-."]
    for k, spec in enumerate(specs):
        label, path = spec.split("=", 1)
        payload = json.loads(Path(path).read_text())
        names = list(dict.fromkeys(r["optimizer"] for r in payload["runs"]))
        for j, name in enumerate(names):
            mine = [r["history"] for r in payload["runs"] if r["optimizer"] == name]
            n = min(len(h) for h in mine)
            ep = np.arange(1, n + 1)
            for ax, key in zip(axes, ("train_loss", "val_acc")):
                ax.plot(ep, np.mean([[r[key] for r in h[:n]] for h in mine], 0), styles[k % 4],
                        color=f"C{j}", label=name if label == "-" else f"{label} {name}")
    axes[0].set_yscale("log")
    for ax, lab in zip(axes, ("training loss", "validation accuracy")):
        ax.set_xlabel("epoch")
        ax.set_ylabel(lab)
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(out, dpi=80)


if __name__ == "__main__":
    if len(sys.argv) < 4:
        raise SystemExit(__doc__)
    main(sys.argv[1], sys.argv[2], sys.argv[3:])
