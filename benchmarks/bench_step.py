"""step: a whole optimizer step, ngcuda.KFAC against Adam and a plain-PyTorch K-FAC.

Workloads: a 2-layer GCN on Cora (full batch) and the 784-1000-500-250-30 MNIST autoencoder
(minibatches of 1000 of the shipped images). Variants: ``adam``; ``ngcuda-kfac`` (ngcuda.KFAC,
true Fisher); ``torch-kfac`` (benchmarks/torch_kfac.py: the same algorithm and hyperparameters in
plain PyTorch from ngcuda.reference); ``*-empirical`` on request (--variants).

Every variant trains its own identically seeded model. Steps are timed in blocks of
``inverse_every`` steps, so that each block holds exactly one eigendecomposition and its time
per step is the amortised cost a training run sees. One untimed block per variant comes first
(it holds the first decomposition of every factor); then the blocks of all variants run
round-robin so that machine load drifts hit them alike; the median block gives ms per step.
"""
from __future__ import annotations

import argparse
import warnings
from pathlib import Path
from typing import Any

from .plotting import BarPanel, save
from .report import print_table
from .timing import compare
from .workloads import VARIANTS, WORKLOADS, Workload, optimizer


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--workloads", default="gcn-cora,autoencoder", help=", ".join(WORKLOADS))
    p.add_argument("--variants", default="adam,ngcuda-kfac,ngcuda-kfac-auto,torch-kfac", help=", ".join(VARIANTS))
    p.add_argument("--blocks", type=int, default=None,
                   help="timed blocks of inverse_every steps per variant (default 6 GCN, 3 autoencoder)")


def _names(text: str, allowed: tuple[str, ...] | dict, what: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    bad = [n for n in names if n not in allowed]
    if bad or not names:
        raise SystemExit(f"--{what}: unknown {bad or text!r}; use a comma list of {', '.join(allowed)}")
    return names


def bench_workload(w: Workload, variants: list[str], blocks: int, device: str, quick: bool) -> dict[str, Any]:
    steps = int(w.kfac["inverse_every"])
    models = {v: w.model() for v in variants}
    opts = {v: optimizer(v, models[v], w) for v in variants}

    def block(v: str):
        def run() -> None:
            for _ in range(steps):
                w.step(models[v], opts[v])
        return run

    # --quick skips the untimed block: its one block then includes the first decompositions
    timing = compare({v: block(v) for v in variants}, device, warmup=0 if quick else 1,
                     min_repeats=blocks, max_repeats=blocks)
    rows = []
    adam = timing.get("adam")
    for v in variants:
        t = timing[v].median_s
        # ngcuda-kfac[-empirical] against torch-kfac[-empirical]: the same algorithm
        twin = timing.get(v.replace("ngcuda-", "torch-", 1)) if v.startswith("ngcuda-") else None
        rows.append({"workload": w.name, "variant": v, "ms_per_step": t / steps * 1e3,
                     "ratio_vs_adam": None if adam is None else t / adam.median_s,
                     "speedup_vs_torch_kfac": None if twin is None else twin.median_s / t,
                     "timing_per_block": timing[v].as_dict(), **w.quality(models[v])})
    return {"workload": w.name, "description": w.description, "config": w.config,
            "hyperparameters": {"kfac": w.kfac, "adam": w.adam}, "steps_per_block": steps,
            "timed_blocks": blocks, "untimed_blocks": 0 if quick else 1, "variants": rows}


def run(args: argparse.Namespace, ceil: dict[str, Any]) -> dict[str, Any]:
    workloads = _names(args.workloads, WORKLOADS, "workloads")
    variants = _names(args.variants, VARIANTS, "variants")
    results = []
    with warnings.catch_warnings():
        # ngcuda.KFAC lists parameters it leaves to the plain update; not news in a benchmark
        warnings.simplefilter("ignore")
        for name in workloads:
            w = WORKLOADS[name](args.device, args.quick)
            blocks = args.blocks or (1 if args.quick else (6 if name == "gcn-cora" else 3))
            results.append(bench_workload(w, variants, blocks, args.device, args.quick))
            print(f"  {name}: " + ", ".join(f"{r['variant']} {r['ms_per_step']:.1f} ms"
                                            for r in results[-1]["variants"]), flush=True)
    rows = [r for res in results for r in res["variants"]]
    print_table(rows, ["workload", "variant", "ms_per_step", "ratio_vs_adam", "speedup_vs_torch_kfac",
                       "test_accuracy", "train_bce_per_image"])
    return {"config": {"variants": variants, "workloads": workloads,
                       "timing": "median over blocks of inverse_every steps, round-robin, after one untimed block"},
            "workloads": results}


def plot(section: dict[str, Any], ceil: dict[str, Any], path: Path, device: str) -> Path:
    groups = [w["workload"] for w in section["workloads"]]
    variants = section["config"]["variants"]

    def value(key: str) -> dict[str, list]:
        return {v: [next((r[key] for r in w["variants"] if r["variant"] == v), None)
                    for w in section["workloads"]] for v in variants}

    panels = [BarPanel("time per optimizer step", "ms per step (log)", groups, value("ms_per_step"), log=True),
              BarPanel("time per step relative to Adam", "× Adam's step", groups, value("ratio_vs_adam"))]
    return save(path, f"optimizer step on {device}", panels, ncols=2)
