"""CPU microbenchmark of ngcuda's batched_eigh against torch.linalg.eigh, measured in one run.

Workload: a batch of K-FAC-like factors A_old = XᵀX/m (X [m=2n, n] Gaussian with decaying column
scales, so the spectrum spans a few decades like an activation covariance). Warm start: the
factor drifts by a PSD step, A_new = A_old + drift·‖A_old‖_F·P/‖P‖_F with P = HHᵀ (H [n, n]
Gaussian), relative size drift = 1e-3 by default (--drift, one or more), and prev = eigenvectors of
A_old, as a K-FAC optimizer would hold them. Accuracy columns are the worst over the batch,
evaluated in float64: residual ‖AQ−QΛ‖_F/‖A‖_F, orthogonality ‖QᵀQ−I‖_F, and eigenvalue error
max|λ−λ_ref|/max|λ_ref| against float64 eigvalsh.

Timings are wall-clock medians; on a machine shared with other jobs, MKL's threaded syevd (torch)
suffers more from a descheduled thread than ngcuda's dynamic per-matrix scheduling, so compare
runs at --threads 1 too (per-core efficiency) before reading a ratio as a speed-up.

Methods, all on the same list and timed round-robin so machine noise hits them alike:
  torch stacked  torch.linalg.eigh on a pre-stacked [B, n, n] tensor (torch's best case)
  torch looped   torch.linalg.eigh on each matrix
  ngcuda cold    ops.batched_eigh(list)
  ngcuda warm    ops.batched_eigh(list, prev)

The CPU kernel refines warm starts for 10 ≤ n ≤ 96 and solves other sizes cold (where that was
measured faster); "warm fallbacks" counts the matrices it handed to the cold solver instead
(status WARM_FALLBACK). NGCUDA_EIGH_WARM_MIN_N / NGCUDA_EIGH_WARM_MAX_N move that range.

Usage: python benchmarks/bench_eigh.py [--quick] [--json PATH] [--sizes 16 64 256] [--batch 64]
       [--drift 1e-3 [1e-2 ...]] [--dtype float32] [--threads N]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from typing import Callable

import torch

from ngcuda import ops


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def load_average() -> str:
    """The 1-minute load average (other jobs on the machine skew every timing)."""
    try:
        return f"{os.getloadavg()[0]:.2f}"
    except OSError:
        return "unknown"


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


def accuracy(mats: list[torch.Tensor], values: list[torch.Tensor], vectors: list[torch.Tensor]
             ) -> tuple[float, float]:
    """Worst ‖AQ−QΛ‖_F/‖A‖_F and worst ‖QᵀQ−I‖_F over the batch, evaluated in float64."""
    res, orth = 0.0, 0.0
    for a, lam, q in zip(mats, values, vectors):
        a, lam, q = a.double(), lam.double(), q.double()
        res = max(res, ((a @ q - q * lam).norm() / a.norm()).item())
        orth = max(orth, (q.T @ q - torch.eye(q.shape[0], dtype=torch.float64)).norm().item())
    return res, orth


def time_round_robin(fns: dict[str, Callable[[], object]], repeats: int, warmup: int
                     ) -> dict[str, float]:
    """Median seconds per call of each function; one call of each per round."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    samples: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            samples[name].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in samples.items()}


def bench_size(n: int, batch: int, drift: float, dtype: torch.dtype, repeats: int, warmup: int,
               seed: int) -> dict:
    gen = torch.Generator().manual_seed(seed + n)
    old64 = [kfac_factor(n, gen) for _ in range(batch)]
    new64 = [drifted(a, drift, gen) for a in old64]
    old = [a.to(dtype) for a in old64]
    new = [a.to(dtype) for a in new64]
    prev = [torch.linalg.eigh(a)[1] for a in old]
    stacked = torch.stack(new)

    fns = {
        "torch_stacked": lambda: torch.linalg.eigh(stacked),
        "torch_looped": lambda: [torch.linalg.eigh(a) for a in new],
        "ngcuda_cold": lambda: ops.batched_eigh(new),
        "ngcuda_warm": lambda: ops.batched_eigh(new, prev),
    }
    seconds = time_round_robin(fns, repeats, warmup)

    lam_s, q_s = torch.linalg.eigh(stacked)
    outputs = {
        "torch_stacked": (list(lam_s), list(q_s)),
        "torch_looped": tuple(map(list, zip(*[torch.linalg.eigh(a) for a in new]))),
        "ngcuda_cold": ops.batched_eigh(new),
        "ngcuda_warm": ops.batched_eigh(new, prev),
    }
    ref = [torch.linalg.eigvalsh(a) for a in new64]
    methods = {}
    for name, (lam, q) in outputs.items():
        res, orth = accuracy(new64, lam, q)
        eig_err = max(((l.double() - r).abs().max() / r.abs().max()).item()
                      for l, r in zip(lam, ref))
        methods[name] = {"ms": seconds[name] * 1e3, "residual": res, "orthogonality": orth,
                         "eigenvalue_rel_err": eig_err}
    _, _, status = ops.batched_eigh_with_status(new, prev)
    status = status.tolist()
    base_s, base_l = seconds["torch_stacked"], seconds["torch_looped"]
    return {
        "n": n,
        "batch": batch,
        "dtype": str(dtype).replace("torch.", ""),
        "drift": drift,
        "methods": methods,
        "speedup_cold_vs_stacked": base_s / seconds["ngcuda_cold"],
        "speedup_cold_vs_looped": base_l / seconds["ngcuda_cold"],
        "speedup_warm_vs_stacked": base_s / seconds["ngcuda_warm"],
        "speedup_warm_vs_looped": base_l / seconds["ngcuda_warm"],
        "warm_fallbacks": sum(code == ops.EighStatus.WARM_FALLBACK for code in status),
        "warm_failed": sum(code not in (ops.EighStatus.OK, ops.EighStatus.WARM_FALLBACK)
                           for code in status),
    }


def print_table(results: list[dict]) -> None:
    head = (f"{'n':>5} {'drift':>7} {'method':<14} {'ms':>9} {'vs stacked':>10} {'vs looped':>10} "
            f"{'residual':>9} {'orthog':>9} {'eig rel':>9}")
    print(head)
    print("-" * len(head))
    for r in results:
        t_s = r["methods"]["torch_stacked"]["ms"]
        t_l = r["methods"]["torch_looped"]["ms"]
        for name, m in r["methods"].items():
            print(f"{r['n']:>5} {r['drift']:>7.0e} {name:<14} {m['ms']:>9.3f} {t_s / m['ms']:>9.2f}x "
                  f"{t_l / m['ms']:>9.2f}x {m['residual']:>9.1e} {m['orthogonality']:>9.1e} "
                  f"{m['eigenvalue_rel_err']:>9.1e}")
        if r["warm_fallbacks"] or r["warm_failed"]:
            print(f"      warm start: {r['warm_fallbacks']} of {r['batch']} solved cold instead, "
                  f"{r['warm_failed']} failed")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks eigh", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats (smoke run)")
    parser.add_argument("--json", type=str, default=None, help="write the results here")
    parser.add_argument("--sizes", type=int, nargs="+", default=[16, 64, 256])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--drift", type=float, nargs="+", default=[1e-3],
                        help="relative Frobenius size of the PSD step between factors (one or more)")
    parser.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch.set_num_threads for every method (default: torch's own)")
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    repeats, warmup = (3, 1) if args.quick else (9, 2)
    dtype = getattr(torch, args.dtype)

    info = {
        "device": "cpu",
        "cpu_model": cpu_model(),
        "threads": torch.get_num_threads(),
        "torch_version": torch.__version__,
        "dtype": args.dtype,
        "batch": args.batch,
        "drifts": args.drift,
        "repeats": repeats,
        "warm_range": [int(os.environ.get("NGCUDA_EIGH_WARM_MIN_N", 10)),
                       int(os.environ.get("NGCUDA_EIGH_WARM_MAX_N", 96))],
        "timing": "median of round-robin repeats after warm-up",
        "load_average_1min": load_average(),
    }
    print(f"batched_eigh vs torch.linalg.eigh | {info['cpu_model']} | {info['threads']} threads | "
          f"torch {info['torch_version']} | {args.dtype} | batch {args.batch} | load {load_average()}")
    results = [bench_size(n, args.batch, drift, dtype, repeats, warmup, args.seed)
               for n in args.sizes for drift in args.drift]
    print_table(results)
    if args.json and args.json != "-":
        with open(args.json, "w") as f:
            json.dump({**info, "results": results}, f, indent=2)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
