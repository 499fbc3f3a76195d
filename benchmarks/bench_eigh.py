"""eigh: batched_eigh against torch.linalg.eigh (looped and batched), cold and warm-started.

Workload: a batch of K-FAC-like factors A_old = XᵀX/m (X [m=2n, n] Gaussian with column scales
decaying 1 → 10^-1.5, so the spectrum spans decades like an activation covariance). Warm start:
the factor drifts by a PSD step, A_new = A_old + drift·‖A_old‖_F·P/‖P‖_F with P = HHᵀ, and prev =
the float32 eigenvectors of A_old, as a K-FAC optimizer holds them.

Sizes n from 16 to 2048; the batch shrinks as n grows, batch = max_batch·(128/n)^1.5 clamped to
[1, max_batch], so a full run stays within minutes while every size is still a batch of factors.
A second sweep varies the batch count at one n. Accuracy, per method, worst over the batch and
evaluated in float64: residual ‖AQ−QΛ‖_F/‖A‖_F, orthogonality ‖QᵀQ−I‖_F, and eigenvalue error
max|λ−λ_ref|/max|λ_ref| against float64 eigvalsh.

Methods, on the same matrices, timed round-robin:
  torch_stacked  torch.linalg.eigh on a pre-stacked [B, n, n] tensor (torch's best case)
  torch_looped   torch.linalg.eigh on each matrix
  ngcuda_cold    ops.batched_eigh(list)
  ngcuda_warm    ops.batched_eigh(list, prev)

Throughput is quoted at a nominal 9n³ flops per decomposition (tridiagonal reduction, its
back-transformation and the QR iteration on the vectors; Golub & Van Loan), so it can be read
against the matmul ceiling. With AVX-512 kernels the CPU kernel refines float32 warm starts for
28 ≤ n ≤ 192 (float64: 28 ≤ n ≤ 96) and solves other sizes cold, where that measured faster;
without AVX-512 it solves every size cold (ngcuda.build_info()["eigh_warm_n"]; NGCUDA_EIGH_WARM_MIN_N /
NGCUDA_EIGH_WARM_MAX_N move the range). It also solves cold the starts off by more than 3e-3·‖A‖_F (about a
4e-3 drift here; NGCUDA_EIGH_WARM_MAX_START_OFF); a warm start it hands to the cold solver is
reported as EighStatus.WARM_FALLBACK. Cold, float32 n ≤ 96 and float64 n ≤ 256 go to its own Householder + QL
solver (NGCUDA_EIGH_TRIDIAGONAL_MAX_N moves the limit), larger ones to LAPACK.
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch

from ngcuda import ops
from ngcuda.ops import EighStatus

from .growth import describe, growth
from .plotting import Panel, Series, save
from .report import print_table
from .timing import compare, copies_to_exceed_cache, nbytes, options, rotation, staggered

METHODS = ("torch_stacked", "torch_looped", "ngcuda_cold", "ngcuda_warm")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--sizes", type=int, nargs="+", default=None, help="matrix sizes n")
    p.add_argument("--max-batch", type=int, default=None, help="batch at n ≤ 128 (default 64)")
    p.add_argument("--batch-sweep", type=int, nargs="+", default=None, help="batch counts of the sweep")
    p.add_argument("--batch-sweep-n", type=int, default=None, help="n of the batch sweep (default 64)")
    p.add_argument("--drift", type=float, default=1e-3, help="relative size of the PSD step")
    p.add_argument("--dtype", choices=["float32", "float64"], default="float32")


def batch_for(n: int, max_batch: int) -> int:
    return int(min(max_batch, max(1, round(max_batch * (128 / n) ** 1.5))))


def kfac_factor(n: int, gen: torch.Generator) -> torch.Tensor:
    """[n, n] float64 PSD covariance of m = 2n samples with column scales decaying 1 → 10^-1.5."""
    scales = torch.logspace(0.0, -1.5, n, dtype=torch.float64)
    x = torch.randn(2 * n, n, dtype=torch.float64, generator=gen) * scales
    return x.T @ x / (2 * n)


def drifted(a: torch.Tensor, drift: float, gen: torch.Generator) -> torch.Tensor:
    """A + drift·‖A‖_F·P/‖P‖_F with P = HHᵀ PSD: a slow K-FAC moving-average step."""
    h = torch.randn(a.shape[0], a.shape[0], dtype=torch.float64, generator=gen)
    p = h @ h.T
    return a + drift * a.norm() * p / p.norm()


def accuracy(mats: list[torch.Tensor], values: list[torch.Tensor], vectors: list[torch.Tensor],
             ref: list[torch.Tensor]) -> dict[str, float]:
    """Worst residual, orthogonality and eigenvalue error over the batch, in float64 on the CPU."""
    res = orth = eig = 0.0
    for a, lam, q, r in zip(mats, values, vectors, ref):
        lam, q = lam.double().cpu(), q.double().cpu()
        res = max(res, ((a @ q - q * lam).norm() / a.norm()).item())
        orth = max(orth, (q.T @ q - torch.eye(q.shape[0], dtype=torch.float64)).norm().item())
        eig = max(eig, ((lam - r).abs().max() / r.abs().max()).item())
    return {"residual": res, "orthogonality": orth, "eigenvalue_rel_err": eig}


def bench_size(n: int, batch: int, args: argparse.Namespace, ceil: dict[str, Any]) -> dict[str, Any]:
    device, dtype = args.device, getattr(torch, args.dtype)
    gen = torch.Generator().manual_seed(n * 1000 + batch)
    old64 = [kfac_factor(n, gen) for _ in range(batch)]
    new64 = [drifted(a, args.drift, gen) for a in old64]

    new = [a.to(device, dtype) for a in new64]
    prev = [torch.linalg.eigh(a.to(device, dtype))[1] for a in old64]
    first = {"new": new, "prev": prev, "stacked": torch.stack(new)}
    copies = copies_to_exceed_cache(nbytes(first), device, max_copies=16)
    sets = rotation(first, copies)
    fns = {
        "torch_stacked": lambda s: torch.linalg.eigh(s["stacked"]),
        "torch_looped": lambda s: [torch.linalg.eigh(a) for a in s["new"]],
        "ngcuda_cold": lambda s: ops.batched_eigh(s["new"]),
        "ngcuda_warm": lambda s: ops.batched_eigh(s["new"], s["prev"]),
    }
    nominal = 9.0 * n**3 * batch
    slow = nominal / (ceil["matmul_gflops"] * 1e9) > 0.1
    timing = compare(staggered(fns, sets), device, **options(args.quick, slow))

    ref = [torch.linalg.eigvalsh(a) for a in new64]
    lam_s, q_s = torch.linalg.eigh(first["stacked"])
    looped = [torch.linalg.eigh(a) for a in first["new"]]
    outputs = {
        "torch_stacked": (list(lam_s), list(q_s)),
        "torch_looped": ([v for v, _ in looped], [q for _, q in looped]),
        "ngcuda_cold": ops.batched_eigh(first["new"]),
        "ngcuda_warm": ops.batched_eigh(first["new"], first["prev"]),
    }
    _, _, status = ops.batched_eigh_with_status(first["new"], first["prev"])
    row: dict[str, Any] = {"n": n, "batch": batch, "copies": len(sets),
                           "working_set_bytes": len(sets) * nbytes(first), "methods": {}}
    for name in METHODS:
        t = timing[name].median_s
        row["methods"][name] = {
            "ms": t * 1e3, "ms_per_matrix": t * 1e3 / batch,
            "nominal_gflops": nominal / t / 1e9, "frac_matmul_peak": nominal / t / 1e9 / ceil["matmul_gflops"],
            **accuracy(new64, *outputs[name], ref), "timing": timing[name].as_dict(),
        }
        row[f"{name}_ms"] = t * 1e3
    for ours in ("ngcuda_cold", "ngcuda_warm"):
        for base in ("torch_stacked", "torch_looped"):
            row[f"speedup_{ours.split('_')[1]}_vs_{base.split('_')[1]}"] = row[f"{base}_ms"] / row[f"{ours}_ms"]
    # WARM_FALLBACK is a success solved cold; only the other non-OK codes are failures
    row["warm_not_converged"] = int((~EighStatus.succeeded(status)).sum())
    row["warm_fallback"] = int((status == int(EighStatus.WARM_FALLBACK)).sum())
    return row


def print_rows(rows: list[dict[str, Any]]) -> None:
    flat = []
    for r in rows:
        for name, m in r["methods"].items():
            flat.append({"n": r["n"], "batch": r["batch"], "method": name, "ms": m["ms"],
                         "ms/matrix": m["ms_per_matrix"],
                         "vs_stacked": r["torch_stacked_ms"] / m["ms"], "vs_looped": r["torch_looped_ms"] / m["ms"],
                         "residual": m["residual"], "orthog": m["orthogonality"], "eig_err": m["eigenvalue_rel_err"]})
    print_table(flat, ["n", "batch", "method", "ms", "ms/matrix", "vs_stacked", "vs_looped", "residual",
                       "orthog", "eig_err"])


def _progress(row: dict[str, Any]) -> dict[str, Any]:
    """One line per size as it finishes (a full run spends minutes here), then the row."""
    print(f"  n={row['n']} batch={row['batch']}: cold {row['speedup_cold_vs_stacked']:.2f}x, "
          f"warm {row['speedup_warm_vs_stacked']:.2f}x torch stacked", flush=True)
    return row


def run(args: argparse.Namespace, ceil: dict[str, Any]) -> dict[str, Any]:
    sizes = args.sizes or ([16, 64, 128] if args.quick else [16, 32, 64, 128, 256, 512, 1024, 2048])
    max_batch = args.max_batch or (16 if args.quick else 64)
    sweep_n = args.batch_sweep_n or (32 if args.quick else 64)
    sweep = args.batch_sweep or ([1, 4, 16] if args.quick else [1, 4, 16, 64, 256])
    by_n = [_progress(bench_size(n, batch_for(n, max_batch), args, ceil)) for n in sizes]
    print_rows(by_n)
    by_batch = [_progress(bench_size(sweep_n, b, args, ceil)) for b in sweep]
    print(f"\nbatch sweep at n = {sweep_n}")
    print_table(by_batch, ["batch", "torch_stacked_ms", "torch_looped_ms", "ngcuda_cold_ms", "ngcuda_warm_ms",
                           "speedup_cold_vs_stacked", "speedup_warm_vs_stacked"])
    ns = [r["n"] for r in by_n]
    large_from = 256 if max(ns) > 256 else None
    fits = {name: growth(ns, [r["methods"][name]["ms_per_matrix"] for r in by_n], 3.0, "n", large_from)
            for name in METHODS}
    for name in ("ngcuda_cold", "torch_stacked"):
        print(f"growth per matrix, {name}: {describe(fits[name])}")
    return {
        "config": {"sizes": sizes, "max_batch": max_batch, "batch_rule": "max_batch*(128/n)^1.5 in [1, max_batch]",
                   "batch_sweep_n": sweep_n, "batch_sweep": sweep, "drift": args.drift, "dtype": args.dtype,
                   "nominal_flops": "9 n^3 per matrix"},
        "by_n": by_n,
        "by_batch": by_batch,
        "growth": fits,
    }


def plot(section: dict[str, Any], ceil: dict[str, Any], path: Path, device: str) -> Path:
    by_n, by_batch, fits = section["by_n"], section["by_batch"], section["growth"]
    ns, bs = [r["n"] for r in by_n], [r["batch"] for r in by_batch]

    def per(rows: list[dict], method: str, key: str) -> list:
        return [r["methods"][method][key] for r in rows]

    def label(m: str) -> str:
        v = fits[m]["exponent_large"]
        return m if v is None else f"{m} (fit: ^{v:.2f})"

    panels = [
        Panel("time per matrix vs n", "n", "ms per matrix",
              [Series(label(m), ns, per(by_n, m, "ms_per_matrix")) for m in METHODS], guide=(3.0, "∝ n³")),
        Panel("throughput vs n (9n³ flops per matrix)", "n", "nominal GFLOP/s",
              [Series(m, ns, per(by_n, m, "nominal_gflops")) for m in METHODS],
              ceilings=[(ceil["matmul_gflops"], "measured fp32 matmul")]),
        Panel("accuracy vs n (worst over the batch)", "n", "float64-evaluated error",
              [Series(f"{m} {k}", ns, per(by_n, m, key)) for m in ("torch_stacked", "ngcuda_cold", "ngcuda_warm")
               for k, key in (("resid", "residual"), ("orth", "orthogonality"))]),
        Panel(f"time per matrix vs batch at n={section['config']['batch_sweep_n']}", "batch count",
              "ms per matrix", [Series(m, bs, per(by_batch, m, "ms_per_matrix")) for m in METHODS]),
    ]
    return save(path, f"batched_eigh on {device}", panels, ncols=2)
