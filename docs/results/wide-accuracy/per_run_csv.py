"""One row per run (graph, optimizer, seed) from merged `ngcuda train` metrics.json files: the epoch
selected by best validation accuracy, its validation and test accuracy, ms/epoch and K-FAC's layer structures.

    python docs/results/wide-accuracy/per_run_csv.py OUT.csv runs/acc/merged/*/metrics.json
"""
import csv
import json
import sys

from ngcuda.train.metrics import best_epoch

rows = []
for path in sys.argv[2:]:
    p = json.load(open(path))
    for r in p["runs"]:
        b = best_epoch(r["history"], p["config"]["select"])
        last = r["history"][-1]
        rows.append({
            "graph": p["config"]["dataset"], "split": p["config"]["split"], "optimizer": r["optimizer"],
            "seed": r["seed"], "epochs": last["epoch"], "selected_epoch": b["epoch"],
            "val_acc": round(100 * b["val_acc"], 2), "test_acc": round(100 * b["test_acc"], 2),
            "ms_per_epoch": round(1000 * last["seconds"] / last["epoch"], 1),
            "kfac_layers": "; ".join(r.get("kfac_layers") or []),
        })
with open(sys.argv[1], "w", newline="") as f:
    w = csv.DictWriter(f, fieldnames=list(rows[0]))
    w.writeheader()
    w.writerows(rows)
print(f"{len(rows)} runs -> {sys.argv[1]}")
