"""precondition: one grouped call over every layer against a per-layer torch loop.

Layer shapes: those of the models the main job trains (a 2-layer GCN on Cora and on CiteSeer, the
784-1000-500-250-30 deep autoencoder, and 64 small layers), then a sweep of 8 square layers of
growing width d, which shows throughput against size. The loop is ngcuda.reference.precondition in
the inputs' own dtype: Q_G[(Q_Gᵀ g Q_A) / (λ_G λ_Aᵀ + γ)]Q_Aᵀ, four GEMMs per layer. Work: 2·(d_out²·d_in
+ d_out·d_in²) flops per layer (its four GEMMs), so time grows as d³ for square layers.
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch

from ngcuda import ops, reference

from .growth import describe, growth
from .plotting import BarPanel, Panel, Series, save
from .report import print_table
from .roofline import rates, speedups
from .timing import compare, copies_to_exceed_cache, nbytes, options, rotation, staggered

DAMPING = 0.01
MODELS = {
    "gcn-cora": [(16, 1434), (7, 17)],
    "gcn-citeseer": [(16, 3704), (6, 17)],
    "autoencoder": [(1000, 785), (500, 1001), (250, 501), (30, 251), (250, 31), (500, 251),
                    (1000, 501), (784, 1001)],
    "many-small": [(32, 33)] * 64,
}
SWEEP_LAYERS = 8


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--widths", type=int, nargs="+", default=None, help="d of the square-layer sweep")


def layer_inputs(shapes: list[tuple[int, int]], device: str) -> dict[str, list[torch.Tensor]]:
    """Gradients, orthogonal eigenbases and positive eigenvalues for layers [d_out, d_in]."""
    gen = torch.Generator().manual_seed(0)
    out: dict[str, list[torch.Tensor]] = {k: [] for k in ("g", "QA", "lamA", "QG", "lamG")}
    for dout, din in shapes:
        out["g"].append(torch.randn(dout, din, generator=gen))
        out["QA"].append(torch.linalg.qr(torch.randn(din, din, generator=gen))[0])
        out["QG"].append(torch.linalg.qr(torch.randn(dout, dout, generator=gen))[0])
        out["lamA"].append(torch.rand(din, generator=gen))
        out["lamG"].append(torch.rand(dout, generator=gen))
    return {k: [t.to(device) for t in v] for k, v in out.items()}


def bench(name: str, shapes: list[tuple[int, int]], args: argparse.Namespace, ceil: dict[str, Any]
          ) -> dict[str, Any]:
    first = layer_inputs(shapes, args.device)
    copies = copies_to_exceed_cache(nbytes(first), args.device)
    sets = rotation(first, copies)
    fns = staggered({
        "ngcuda": lambda s: ops.precondition(s["g"], s["QA"], s["lamA"], s["QG"], s["lamG"], DAMPING),
        "torch_loop": lambda s: reference.precondition(s["g"], s["QA"], s["lamA"], s["QG"], s["lamG"],
                                                        DAMPING, compute_dtype=None),
    }, sets)
    flops = float(sum(2 * (o * o * i + o * i * i) for o, i in shapes))
    slow = flops / (ceil["matmul_gflops"] * 1e9) > 1.0
    timing = compare(fns, args.device, **options(args.quick, slow))
    ms = {k: t.median_s * 1e3 for k, t in timing.items()}
    row: dict[str, Any] = {"model": name, "layers": len(shapes), "copies": copies,
                           "working_set_bytes": copies * nbytes(first)}
    row.update({f"{k}_ms": v for k, v in ms.items()})
    row.update(speedups(ms))
    row.update(rates(timing["ngcuda"].median_s, flops, nbytes(first), ceil))
    row.update(rates(timing["torch_loop"].median_s, flops, nbytes(first), ceil, prefix="torch_loop_"))
    row["timings"] = {k: t.as_dict() for k, t in timing.items()}
    return row


def run(args: argparse.Namespace, ceil: dict[str, Any]) -> dict[str, Any]:
    names = ["gcn-cora", "many-small"] if args.quick else list(MODELS)
    widths = args.widths or ([16, 32, 64] if args.quick else [32, 64, 128, 256, 512, 1024])
    models = [bench(n, MODELS[n], args, ceil) for n in names]
    sweep = []
    for d in widths:
        row = bench(f"{SWEEP_LAYERS}x{d}", [(d, d + 1)] * SWEEP_LAYERS, args, ceil)
        row["d"] = d
        sweep.append(row)
    cols = ["model", "layers", "ngcuda_ms", "torch_loop_ms", "speedup_vs_torch_loop", "gflops",
            "torch_loop_gflops", "frac_matmul_peak"]
    print_table(models + sweep, cols)
    ds = [r["d"] for r in sweep]
    fit = growth(ds, [r["ngcuda_ms"] for r in sweep], 3.0, "d", 256 if max(ds) > 256 else None)
    print(f"growth, {SWEEP_LAYERS} square layers: {describe(fit)}")
    return {
        "config": {"models": names, "widths": widths, "sweep_layers": SWEEP_LAYERS, "damping": DAMPING,
                   "dtype": "float32", "flops": "2*(d_out^2*d_in + d_out*d_in^2) per layer",
                   "bytes": "inputs and eigenbases once"},
        "models": models,
        "sweep": sweep,
        "growth": {"time_vs_d": fit},
    }


def plot(section: dict[str, Any], ceil: dict[str, Any], path: Path, device: str) -> Path:
    sweep, fit = section["sweep"], section["growth"]["time_vs_d"]
    ds = [r["d"] for r in sweep]
    slope = "" if fit["exponent_large"] is None else f" (fit: ^{fit['exponent_large']:.2f})"
    layers = section["config"]["sweep_layers"]
    panels = [
        Panel(f"{layers} square layers: time vs d", "d", "ms per call",
              [Series("ngcuda grouped" + slope, ds, [r["ngcuda_ms"] for r in sweep]),
               Series("torch per-layer loop", ds, [r["torch_loop_ms"] for r in sweep])], guide=(3.0, "∝ d³")),
        Panel(f"{layers} square layers: throughput vs d", "d", "GFLOP/s (4 GEMMs per layer)",
              [Series("ngcuda grouped", ds, [r["gflops"] for r in sweep]),
               Series("torch per-layer loop", ds, [r["torch_loop_gflops"] for r in sweep])],
              ceilings=[(ceil["matmul_gflops"], "measured fp32 matmul")]),
        BarPanel("the models' layer shapes: time per call", "ms per call (log)",
                 [r["model"] for r in section["models"]],
                 {"ngcuda grouped": [r["ngcuda_ms"] for r in section["models"]],
                  "torch per-layer loop": [r["torch_loop_ms"] for r in section["models"]]}, log=True),
    ]
    return save(path, f"precondition on {device}", panels, ncols=3)
