"""Shrink an `ngcuda train` / `ngcuda train-ae` metrics.json to the summary.json committed under docs/results/.

    python docs/results/summarise_run.py runs/X/metrics.json docs/results/NAME/summary.json

Keeps everything but the per-epoch histories, and adds for node classification, per optimizer over seeds:
- the test accuracy under BOTH selection rules (best validation accuracy, lowest validation loss),
- epochs: the first epoch at which a run reaches its highest validation accuracy, and the first epoch
  at which it reaches 99 % of it (less sensitive to one lucky late epoch), each with its ratio to Adam's.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from ngcuda.train.metrics import best_epoch, first_best_val_acc_epoch, mean_std


def node_extras(runs: list[dict]) -> dict:
    out = {}
    for name in dict.fromkeys(r["optimizer"] for r in runs):
        hs = [r["history"] for r in runs if r["optimizer"] == name]
        row = {}
        for sel in ("val-acc", "val-loss"):
            b = [best_epoch(h, sel) for h in hs]
            m, s = mean_std([x["test_acc"] for x in b])
            row[f"test_acc@{sel}"] = [round(100 * m, 2), round(100 * s, 2)]
            row[f"epoch@{sel}"] = round(mean_std([x["epoch"] for x in b])[0], 1)
        row["first_max_val_acc_epoch"] = round(mean_std([first_best_val_acc_epoch(h) for h in hs])[0], 1)
        e99 = []
        for h in hs:
            top = max(r["val_acc"] for r in h)
            e99.append(next(r["epoch"] for r in h if r["val_acc"] >= 0.99 * top))
        row["epoch_99pct_max_val_acc"] = round(mean_std(e99)[0], 1)
        row["max_val_acc"] = round(100 * mean_std([max(r["val_acc"] for r in h) for h in hs])[0], 2)
        out[name] = row
    if "adam" in out:
        for name, row in out.items():
            for k in ("first_max_val_acc_epoch", "epoch_99pct_max_val_acc"):
                row[f"{k}_vs_adam"] = round(row[k] / out["adam"][k], 3)
    return out


def main(src: str, dst: str) -> None:
    payload = json.loads(Path(src).read_text())
    runs = payload.pop("runs")
    if payload["command"] == "train":
        payload["both_selections_and_epochs"] = node_extras(runs)
    Path(dst).parent.mkdir(parents=True, exist_ok=True)
    Path(dst).write_text(json.dumps(payload, indent=1) + "\n")
    if payload["command"] == "train":
        for name, row in payload["both_selections_and_epochs"].items():
            print(name, row)


if __name__ == "__main__":
    if len(sys.argv) != 3:
        raise SystemExit(__doc__)
    main(sys.argv[1], sys.argv[2])
