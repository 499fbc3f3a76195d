"""factor: factor_update_ and sparse_factor_update_ against the torch expressions they replace.

Dense: ngcuda's ``factor_update_`` vs ``cat([x, 1])`` + ``factor.mul_(decay).addmm_(x̄ᵀ, x̄)``, over
N at fixed d and over d at fixed N: time, rows/s, GB/s and GFLOP/s, with fitted growth exponents
(O(N·d²) predicts 1 in N and 2 in d).

Sparse: ``sparse_factor_update_`` (which never forms ÂX) vs forming ÂX with ``torch.sparse.mm``,
with an edge-wise ``scatter_add_``, and with torch_scatter when it is installed, each followed by
the same ``addmm_``; on the real graphs (Cora and CiteSeer ship with ngcuda; the gnn-benchmark npz
graphs are read from --data-root) and on random graphs of growing N.

Work counts: 2·N·D² flops (D = d + 1; the full Gram as a GEMM counts it, although ngcuda computes
one triangle) plus 2·nnz·d for the aggregation; bytes = x read once, the CSR, the factor read and
written. A graph whose estimated call time at the measured matmul rate exceeds --max-call-seconds
is skipped and listed with its estimate.
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch

from ngcuda import ops

from . import factor_sparse
from .baselines import DECAY, dense_factor_update_
from .growth import describe, growth
from .plotting import Panel, Series, save
from .report import print_table
from .roofline import rates, speedups
from .timing import compare, copies_to_exceed_cache, options, rotation, staggered


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--n-sweep", type=int, nargs="+", default=None, help="rows N of the dense sweep")
    p.add_argument("--d-fixed", type=int, default=None, help="d of the N sweep (default 128)")
    p.add_argument("--d-sweep", type=int, nargs="+", default=None, help="widths d of the dense sweep")
    p.add_argument("--n-fixed", type=int, default=None, help="N of the d sweep (default 8000)")
    p.add_argument("--graph-n", type=int, nargs="+", default=None, help="nodes of the random graphs")
    p.add_argument("--graph-d", type=int, default=None, help="feature width of the random graphs")
    p.add_argument("--max-call-seconds", type=float, default=10.0,
                   help="skip a real graph whose one call would take longer at the matmul ceiling")


def sizes(args: argparse.Namespace) -> dict[str, Any]:
    quick = args.quick
    return {
        "n_sweep": args.n_sweep or ([500, 1000, 2000, 4000] if quick else [1000, 4000, 16000, 64000, 256000]),
        "d_fixed": args.d_fixed or (32 if quick else 128),
        "d_sweep": args.d_sweep or ([8, 16, 32, 64] if quick else [16, 32, 64, 128, 256, 512, 1024]),
        "n_fixed": args.n_fixed or (1000 if quick else 8000),
        "graph_n": args.graph_n or ([1000, 4000] if quick else [5000, 20000, 80000, 320000]),
        "graph_d": args.graph_d or (32 if quick else 128),
        # --quick keeps the real-graph path but cuts the features, so a call takes milliseconds
        "max_features": 64 if quick else None,
    }


def dense_row(n: int, d: int, device: str, ceil: dict[str, Any], quick: bool) -> dict[str, Any]:
    dim = d + 1

    def make() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        gen = torch.Generator().manual_seed(n + d)
        x = torch.randn(n, d, generator=gen).to(device)
        return x, torch.eye(dim, device=device), torch.eye(dim, device=device)

    set_bytes = 4 * (n * d + 2 * dim * dim)
    copies = copies_to_exceed_cache(set_bytes, device)
    sets = rotation(make(), copies)
    fns = staggered({
        "ngcuda": lambda s: ops.factor_update_(s[1], s[0], DECAY, True),
        "torch": lambda s: dense_factor_update_(s[2], s[0]),
    }, sets)
    flops = 2.0 * n * dim * dim
    slow = flops / (ceil["matmul_gflops"] * 1e9) > 1.0
    timing = compare(fns, device, **options(quick, slow))
    ms = {k: t.median_s * 1e3 for k, t in timing.items()}
    bytes_moved = 4.0 * (n * d + 2 * dim * dim)
    row: dict[str, Any] = {"N": n, "d": d, "copies": copies, "working_set_bytes": copies * set_bytes}
    row.update({f"{k}_ms": v for k, v in ms.items()})
    row.update(speedups(ms))
    row.update(rates(timing["ngcuda"].median_s, flops, bytes_moved, ceil, rows=n))
    row.update(rates(timing["torch"].median_s, flops, bytes_moved, ceil, rows=n, prefix="torch_"))
    row["timings"] = {k: t.as_dict() for k, t in timing.items()}
    return row


def run(args: argparse.Namespace, ceil: dict[str, Any]) -> dict[str, Any]:
    cfg = sizes(args)
    dev = args.device
    by_n = [dense_row(n, cfg["d_fixed"], dev, ceil, args.quick) for n in cfg["n_sweep"]]
    by_d = [dense_row(cfg["n_fixed"], d, dev, ceil, args.quick) for d in cfg["d_sweep"]]
    print_table(by_n + by_d, ["N", "d", "ngcuda_ms", "torch_ms", "speedup_vs_torch", "rows_per_s",
                              "gflops", "gb_per_s", "frac_matmul_peak", "frac_bandwidth"])
    real = factor_sparse.real_rows(args, ceil, cfg["max_features"], args.max_call_seconds)
    rand = factor_sparse.random_rows(args, ceil, cfg["graph_n"], cfg["graph_d"])
    print()
    measured = [r for r in real + rand if "skipped" not in r]
    cols = ["graph", "N", "d", "nnz"] + [f"{m}_ms" for m in factor_sparse.methods()] + \
           [f"speedup_vs_{m}" for m in factor_sparse.methods() if m != "ngcuda"] + ["gflops"]
    if any("ngcuda_peak_mib" in r for r in measured):
        cols += ["ngcuda_peak_mib", "sparse_mm_peak_mib"]
    print_table(measured, cols)
    for r in real:
        if "skipped" in r:
            print(f"skipped {r['graph']}: {r['skipped']}")
    fits = {
        "dense_time_vs_N": growth([r["N"] for r in by_n], [r["ngcuda_ms"] for r in by_n], 1.0, "N"),
        "dense_time_vs_d": growth([r["d"] for r in by_d], [r["ngcuda_ms"] for r in by_d], 2.0, "d"),
        "sparse_time_vs_N": growth([r["N"] for r in rand], [r["ngcuda_ms"] for r in rand], 1.0, "N"),
    }
    print(f"\ngrowth, dense at d={cfg['d_fixed']}: {describe(fits['dense_time_vs_N'])}")
    print(f"growth, dense at N={cfg['n_fixed']}: {describe(fits['dense_time_vs_d'])}")
    print(f"growth, sparse at d={cfg['graph_d']}: {describe(fits['sparse_time_vs_N'])}")
    return {
        "config": {**cfg, "decay": DECAY, "dtype": "float32",
                   "flops": "2*N*(d+1)^2 (+ 2*nnz*d sparse)",
                   "bytes": "x once + CSR + factor read and written"},
        "baselines": factor_sparse.baseline_status(),
        "dense_by_N": by_n,
        "dense_by_d": by_d,
        "sparse_real": real,
        "sparse_random": rand,
        "growth": fits,
    }


def plot(section: dict[str, Any], ceil: dict[str, Any], path: Path, device: str) -> Path:
    by_n, by_d, rand = section["dense_by_N"], section["dense_by_d"], section["sparse_random"]
    cfg = section["config"]
    fits = section["growth"]

    def col(rows: list[dict], key: str) -> list:
        return [r.get(key) for r in rows]

    def slope(key: str) -> str:
        v = fits[key]["exponent_large"]
        return "" if v is None else f" (fit: ^{v:.2f})"

    ns, ds, gn = col(by_n, "N"), col(by_d, "d"), col(rand, "N")
    methods = [m for m in factor_sparse.methods() if any(f"{m}_ms" in r for r in rand)]
    panels = [
        Panel(f"dense: time vs N at d={cfg['d_fixed']}", "N rows", "ms per call",
              [Series("ngcuda" + slope("dense_time_vs_N"), ns, col(by_n, "ngcuda_ms")),
               Series("torch cat+addmm", ns, col(by_n, "torch_ms"))], guide=(1.0, "∝ N")),
        Panel(f"dense: time vs d at N={cfg['n_fixed']}", "d", "ms per call",
              [Series("ngcuda" + slope("dense_time_vs_d"), ds, col(by_d, "ngcuda_ms")),
               Series("torch cat+addmm", ds, col(by_d, "torch_ms"))], guide=(2.0, "∝ d²")),
        Panel(f"sparse: time vs N, random graphs, d={cfg['graph_d']}", "N nodes", "ms per call",
              [Series(m + (slope("sparse_time_vs_N") if m == "ngcuda" else ""), gn, col(rand, f"{m}_ms"))
               for m in methods], guide=(1.0, "∝ N")),
        Panel(f"dense: GFLOP/s vs d at N={cfg['n_fixed']}", "d", "GFLOP/s (2·N·D²)",
              [Series("ngcuda", ds, col(by_d, "gflops")), Series("torch", ds, col(by_d, "torch_gflops"))],
              ceilings=[(ceil["matmul_gflops"], "measured fp32 matmul")]),
        Panel(f"dense: GB/s vs d at N={cfg['n_fixed']}", "d", "GB/s (x + factor)",
              [Series("ngcuda", ds, col(by_d, "gb_per_s")), Series("torch", ds, col(by_d, "torch_gb_per_s"))],
              ceilings=[(ceil["memory_bandwidth_gbs"], "measured copy bandwidth")]),
        Panel(f"dense: rows/s vs N at d={cfg['d_fixed']}", "N rows", "rows/s",
              [Series("ngcuda", ns, col(by_n, "rows_per_s")), Series("torch", ns, col(by_n, "torch_rows_per_s"))]),
    ]
    return save(path, f"factor updates on {device}", panels)
