"""Wide layers: time of one K-FAC training step per factor structure against an Adam step.

    python -m benchmarks wide [--graphs cora,citeseer,coauthor-cs,coauthor-physics]
                              [--structures auto,full,block:256,lowrank:64,diag] [--quick]
                              [--gcn-factoring aggregated|input] [--adaptive-damping]

Workload: the main job's model (2-layer GCN, 16 hidden, input dropout 0.5, row-normalised features,
sparse CSR features for the npz graphs), full batch, true Fisher (one extra backward on every
factor update), factor_every 1, inverse_every 10. The time is of a whole training step (forward,
loss, backward(s), optimizer step), median over timed steps after warm-up steps (the warm-up
includes the first factor update and eigendecomposition; its time is reported as ``first_s``).
Each (graph, structure) runs in a fresh process: the structure's warm-up first, whose peak
resident memory (``ru_maxrss``) is reported (``extra_mib``: less the Adam-only process's peak on
the same graph), then Adam steps and the structure's steps interleaved one by one in the same
process; ``ratio_vs_adam`` is the ratio of their medians, ``mean_ratio_vs_adam`` of their means
(with ``--adaptive-damping`` only every fifth step re-evaluates the loss, which a median hides, so
read the mean there). Configurations whose
estimated per-step cost is hopeless (``full`` on the Coauthor graphs) are skipped
with their estimate, unless ``--force``.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.environment import environment  # noqa: E402
from benchmarks.report import RESULTS, print_table, write_json  # noqa: E402

GRAPHS = ("cora", "citeseer", "coauthor-cs", "coauthor-physics")
STRUCTURES = ("auto", "full", "block:256", "lowrank:64", "diag")
# Skipped unless --force: estimated at minutes per step on these 2 cores (see `est_step_s`).
HOPELESS = {("coauthor-cs", "full"), ("coauthor-physics", "full")}


def _worker(graph: str, structure: str, data_root: str, warmup: int, steps: int,
            gcn_factoring: str = "aggregated", adaptive_damping: bool = False) -> dict:
    """Runs in a child process: times `steps` training steps; prints one JSON line."""
    import resource
    import time
    import warnings

    import torch
    import torch.nn.functional as F

    warnings.simplefilter("ignore")
    import ngcuda
    from ngcuda.data import load_graph
    from ngcuda.models import GCN
    from ngcuda.train.node import NodeConfig, prepare_features
    from ngcuda.train.step import optimizer_step

    g = load_graph(graph, data_root if graph.startswith("coauthor") else None, None, seed=0)
    x = prepare_features(g, NodeConfig())

    def make(name: str):
        torch.manual_seed(0)
        model = GCN(g.num_features, 16, g.num_classes, 0.5)
        if name == "adam":
            opt = torch.optim.Adam(model.parameters(), lr=0.01, weight_decay=5e-4)
        else:
            opt = ngcuda.KFAC(model, lr=0.1, momentum=0.9, weight_decay=5e-4, factor_every=1,
                              inverse_every=10, factor_structure=name, gcn_factoring=gcn_factoring,
                              adaptive_damping=adaptive_damping)

        def forward() -> torch.Tensor:
            out = model(x, g.edge_index)
            if name != "adam":
                opt.set_outputs(out, mask=g.train_mask)
            return F.cross_entropy(out[g.train_mask], g.y[g.train_mask])

        def step() -> None:  # as the main job's: a closure when K-FAC adapts its damping
            model.train()
            optimizer_step(opt, forward)

        return opt, step

    # the structure alone first: its warm-up (first factor update and eigendecomposition) sets
    # the process's peak memory, read before anything else is built
    opt, step = make(structure)
    t0 = time.perf_counter()
    for _ in range(warmup):
        step()
    first = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    row = {"graph": graph, "structure": structure, "nodes": g.num_nodes,
           "features": g.num_features, "first_s": first, "peak_mib": peak,
           "layers": [str(i) for i in opt.layers()] if structure != "adam" else []}
    if structure != "adam":
        row["damping_after_warmup"] = opt.param_groups[0]["damping"]
        row["rho_after_warmup"] = getattr(opt, "last_rho", None)  # set by a damping adaptation
    # then Adam and the structure step by step, interleaved, so that the load of this shared
    # machine hits both alike; the ratio is of medians taken in the same process
    adam_step = make("adam")[1] if structure != "adam" else None
    if adam_step is not None:
        adam_step()
    times, adam_times = [], []
    for _ in range(steps):
        if adam_step is not None:
            t0 = time.perf_counter()
            adam_step()
            adam_times.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    row["step_ms"] = 1e3 * statistics.median(times)
    row["step_ms_all"] = [1e3 * t for t in times]
    row["step_ms_mean"] = 1e3 * statistics.fmean(times)
    if adam_times:
        row["adam_step_ms"] = 1e3 * statistics.median(adam_times)
        row["ratio_vs_adam"] = row["step_ms"] / row["adam_step_ms"]
        row["mean_ratio_vs_adam"] = row["step_ms_mean"] / (1e3 * statistics.fmean(adam_times))
    return row


def _run_child(graph: str, structure: str, args: argparse.Namespace) -> dict:
    code = (f"import json, sys; sys.path.insert(0, {str(ROOT)!r}); "
            f"from benchmarks.bench_wide import _worker; "
            f"print(json.dumps(_worker({graph!r}, {structure!r}, {str(args.data_root)!r}, "
            f"{args.warmup}, {args.steps}, {args.gcn_factoring!r}, {args.adaptive_damping!r})))")
    env = dict(os.environ)
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=args.timeout, env=env)
    if out.returncode != 0:
        return {"graph": graph, "structure": structure, "error": out.stderr[-800:]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def _estimate(graph: str, structure: str) -> dict:
    """The structure module's cost estimate for the first layer (why a config is skipped)."""
    from ngcuda.optim.structure import LayerShape, parse_structure

    shapes = {"coauthor-cs": LayerShape(6806, 16, 18333, 1_092_079, True, 182_121),
              "coauthor-physics": LayerShape(8416, 16, 34493, 1_137_311, True, 530_417)}
    c = parse_structure(structure).cost(shapes[graph])
    return {"est_work_per_step": c.per_step(1, 10), "est_memory_mib": c.memory_bytes / 2**20,
            "est_step_s": c.per_step(1, 10) / 5e10}


def _plot(rows: list[dict], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    graphs = [g for g in GRAPHS if any(r["graph"] == g for r in rows)]
    names = sorted({r["structure"] for r in rows if "ratio_vs_adam" in r},
                   key=lambda s: (s != "auto", s))
    fig, ax = plt.subplots(1, 2, figsize=(11, 4))
    w = 0.8 / max(1, len(names))
    for i, name in enumerate(names):
        xs, ys, ms = [], [], []
        for j, g in enumerate(graphs):
            r = next((r for r in rows if r["graph"] == g and r["structure"] == name
                      and "ratio_vs_adam" in r), None)
            if r is not None:
                xs.append(j + i * w)
                ys.append(r["ratio_vs_adam"])
                ms.append(r["peak_mib"])
        ax[0].bar(xs, ys, w, label=name)
        ax[1].bar(xs, ms, w, label=name)
    for a, title in zip(ax, ("step time / Adam step", "peak RSS (MiB)")):
        a.set_xticks([j + 0.4 - w / 2 for j in range(len(graphs))], graphs)
        a.set_title(title)
    ax[0].axhline(2.0, color="gray", linestyle="--", label="2x target")
    ax[0].set_yscale("log")
    ax[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _describe(r: dict) -> str:
    """One progress line for a finished configuration."""
    head = f"{r['graph']} {r['structure']}:"
    if "error" in r:
        return f"{head} failed: {r['error'].strip().splitlines()[-1] if r['error'].strip() else '?'}"
    if r.get("skipped"):
        return f"{head} skipped (estimated {r['est_step_s']:.0f} s a step; --force runs it)"
    ratio = f", {r['ratio_vs_adam']:.2f}x Adam's step" if "ratio_vs_adam" in r else ""
    chosen = f" [{'; '.join(r['layers'])}]" if r.get("layers") else ""
    return f"{head} {r['step_ms']:.1f} ms{ratio}, peak {r['peak_mib']:.0f} MiB{chosen}"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(prog="python -m benchmarks wide", description=__doc__.splitlines()[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--graphs", default=",".join(GRAPHS), help="comma-separated graphs")
    ap.add_argument("--structures", default=",".join(STRUCTURES),
                    help="comma-separated factor structures (ngcuda.KFAC's factor_structure); Adam always runs")
    ap.add_argument("--data-root", type=Path, default=ROOT.parent / "shared" / "data" / "npz",
                    help="folder of the gnn-benchmark npz files (Cora and CiteSeer ship with ngcuda)")
    ap.add_argument("--warmup", type=int, default=2,
                    help="untimed steps first; at least 2, because the automatic structure of a layer whose "
                    "input changes (input dropout) is settled at its second factor update")
    ap.add_argument("--steps", type=int, default=8, help="timed steps of each optimizer")
    ap.add_argument("--timeout", type=float, default=900.0, help="seconds allowed to one configuration")
    ap.add_argument("--force", action="store_true", help="also run the hopeless configurations")
    ap.add_argument("--threads", type=int, default=0,
                    help="torch threads in each child (0: torch's default); 1 avoids OpenMP "
                    "spin-waits when the machine is oversubscribed")
    ap.add_argument("--device", default="cpu", choices=("cpu",))
    ap.add_argument("--gcn-factoring", default="aggregated", choices=("aggregated", "input"),
                    help="K-FAC factors of each GCNConv (ngcuda.KFAC's gcn_factoring)")
    ap.add_argument("--adaptive-damping", action="store_true",
                    help="K-FAC adapts its damping (ngcuda.KFAC's adaptive_damping): one more forward "
                    "every 5 steps; use --steps 10 or more and read mean_ratio_vs_adam")
    ap.add_argument("--out", "--json", dest="out", default=str(RESULTS / "cpu-wide.json"),
                    help="JSON path, rewritten after every configuration ('-' writes nothing)")
    ap.add_argument("--quick", action="store_true", help="Cora only, auto and diag, 2 warm-up and 2 timed steps")
    args = ap.parse_args(argv)
    if args.quick:
        args.graphs, args.structures, args.warmup, args.steps = "cora", "auto,diag", 2, 2
    if args.warmup < 2:
        ap.error(f"--warmup {args.warmup}: at least 2 (the automatic structure is settled at a layer's "
                 "second factor update; timing earlier steps would time a provisional choice)")
    if args.steps < 1:
        ap.error(f"--steps {args.steps}: at least 1")
    graphs = [g for g in args.graphs.split(",") if g]
    structures = [s for s in args.structures.split(",") if s]
    result = {"benchmark": "wide", "quick": args.quick, "complete": False, "environment": environment("cpu"),
              "child_threads": args.threads or "torch default", "gcn_factoring": args.gcn_factoring,
              "adaptive_damping": args.adaptive_damping,
              "note": "measured on a shared 2-core machine; see load_average",
              "workload": __doc__.split("Workload:")[1].split("Each (graph")[0].strip(),
              "results": []}
    rows: list[dict] = result["results"]
    total = len(graphs) * (1 + len(structures))

    def record(r: dict) -> None:
        rows.append(r)
        print(f"[{len(rows)}/{total}] {_describe(r)}", flush=True)
        result["load_average_1_5_15"] = os.getloadavg()
        if args.out != "-":  # an interrupted run keeps what it measured
            write_json(args.out, result)

    for graph in graphs:
        base = _run_child(graph, "adam", args)
        record(base)
        for s in structures:
            if (graph, s) in HOPELESS and not args.force:
                record({"graph": graph, "structure": s, "skipped": True, **_estimate(graph, s)})
                continue
            r = _run_child(graph, s, args)
            if "peak_mib" in r and "peak_mib" in base:
                r["extra_mib"] = r["peak_mib"] - base["peak_mib"]
            record(r)
    print_table([r for r in rows if "step_ms" in r],
                ["graph", "structure", "step_ms", "adam_step_ms", "ratio_vs_adam", "mean_ratio_vs_adam",
                 "first_s", "peak_mib"])
    result["complete"] = True
    if args.out != "-":
        path = write_json(args.out, result)
        _plot(rows, path.with_suffix(".png"))
        print(f"wrote {path}")
    return result

if __name__ == "__main__":
    main()
