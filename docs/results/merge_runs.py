"""Merge several `ngcuda train` metrics.json files (e.g. one process per seed, so that a crash loses
only the seed it was running) into one metrics.json/metrics.csv with the summary recomputed over all runs.

    python docs/results/merge_runs.py OUT_DIR runs/X/seed0/metrics.json runs/X/seed1/metrics.json ...

The configs must agree apart from the seeds; the merged config lists every seed.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from ngcuda.train.metrics import SELECTION_TEXT, node_table, summarise_node_runs, write_metrics


def merge(out: str, sources: list[str]) -> dict:
    payloads = [json.loads(Path(s).read_text()) for s in sources]
    first = payloads[0]
    if first["command"] != "train":
        raise SystemExit("merge_runs handles `ngcuda train` runs only")

    def key(p: dict) -> dict:
        return {k: v for k, v in p["config"].items() if k not in ("seeds", "out")}

    for p, s in zip(payloads, sources):
        if key(p) != key(first):
            raise SystemExit(f"{s}: config differs from {sources[0]}")
    runs = [r for p in payloads for r in p["runs"]]
    seeds = sorted({r["seed"] for r in runs})
    select = first["config"]["select"]
    merged = dict(first)
    merged["config"] = first["config"] | {"seeds": seeds, "out": out}
    merged["selection"] = SELECTION_TEXT[select]
    merged["summary"] = summarise_node_runs(runs, select)
    merged["runs"] = runs
    merged["merged_from"] = sources
    write_metrics(Path(out), merged)
    print(node_table(merged["summary"]))
    return merged


if __name__ == "__main__":
    if len(sys.argv) < 3:
        raise SystemExit(__doc__)
    merge(sys.argv[1], sys.argv[2:])
