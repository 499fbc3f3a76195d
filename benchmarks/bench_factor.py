"""factor_update_ and sparse_factor_update_ against the plain-torch expressions they replace.

    python -m benchmarks factor [--quick] [--device cpu|cuda] [--json PATH]

Dense: ngcuda's factor_update_ vs ``cat([x, 1])`` + ``factor.mul_(decay).addmm_(x̄ᵀ, x̄)``.
Sparse: sparse_factor_update_ vs ``torch.sparse.mm(Â, X)`` followed by the same addmm, and vs a
``index_add_``-based aggregation, on a graph of Cora's size (2,708 nodes, 13,264 CSR entries with
self-loops, 1,433 binary features at Cora's 1.27 % density) unless a real graph is given.
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch

from ngcuda import ops

from . import ceilings
from .common import RESULTS, environment, median_time, peak_rss_in_child, print_table, write_json
from .plotting import growth_and_throughput, loglog_slope

DECAY = 0.95


def torch_factor_update_(factor: torch.Tensor, x: torch.Tensor) -> None:
    xb = torch.cat([x, torch.ones(x.shape[0], 1, dtype=x.dtype, device=x.device)], 1)
    factor.mul_(DECAY).addmm_(xb.T, xb, alpha=(1 - DECAY) / x.shape[0])


def random_graph(n: int, nnz_per_row: float, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A CSR (rowptr, col, value) with self-loops and GCN-like symmetric-normalised values."""
    gen = torch.Generator().manual_seed(seed)
    deg = torch.poisson(torch.full((n,), nnz_per_row - 1), generator=gen).long() + 1
    rowptr = torch.zeros(n + 1, dtype=torch.long)
    rowptr[1:] = deg.cumsum(0)
    col = torch.randint(0, n, (int(rowptr[-1]),), generator=gen)
    col[rowptr[:-1]] = torch.arange(n)
    row = torch.repeat_interleave(torch.arange(n), deg)
    value = (deg[row].float() * deg[col].float()).rsqrt()
    return rowptr, col, value


def dense_rows(sizes: list[tuple[int, int]], device: str) -> list[dict[str, Any]]:
    rows = []
    for n, d in sizes:
        gen = torch.Generator().manual_seed(n + d)
        x = torch.randn(n, d, generator=gen).to(device)
        f_ng = torch.eye(d + 1, device=device)
        f_th = torch.eye(d + 1, device=device)
        t_ng = median_time(lambda: ops.factor_update_(f_ng, x, DECAY, True), device)
        t_th = median_time(lambda: torch_factor_update_(f_th, x), device)
        flops = n * (d + 1) * (d + 1)  # one triangle's multiply-adds, ×2 flops
        rows.append({
            "op": "factor_update_", "N": n, "d": d, "ngcuda_ms": t_ng * 1e3, "torch_ms": t_th * 1e3,
            "speedup": t_th / t_ng, "rows_per_s": n / t_ng, "gflops": 2 * flops / t_ng / 1e9,
            "gb_per_s": x.numel() * x.element_size() / t_ng / 1e9,
        })
    return rows


def sparse_rows(n: int, d: int, nnz_per_row: float, density: float, device: str,
                memory: bool) -> list[dict[str, Any]]:
    rowptr, col, value = random_graph(n, nnz_per_row)
    gen = torch.Generator().manual_seed(1)
    x = (torch.rand(n, d, generator=gen) < density).float()
    rowptr, col, value, x = (t.to(device) for t in (rowptr, col, value, x))
    a_csr = torch.sparse_csr_tensor(rowptr, col, value, (n, n), check_invariants=False)
    row = torch.repeat_interleave(torch.arange(n, device=device), rowptr[1:] - rowptr[:-1])
    f_ng = torch.eye(d + 1, device=device)
    f_th = torch.eye(d + 1, device=device)

    def via_sparse_mm() -> None:
        torch_factor_update_(f_th, torch.sparse.mm(a_csr, x))

    def via_index_add() -> None:
        agg = torch.zeros_like(x).index_add_(0, row, x[col] * value[:, None])
        torch_factor_update_(f_th, agg)

    t_ng = median_time(lambda: ops.sparse_factor_update_(f_ng, rowptr, col, value, x, DECAY, True), device)
    t_mm = median_time(via_sparse_mm, device)
    t_ia = median_time(via_index_add, device)
    result = {
        "op": "sparse_factor_update_", "N": n, "d": d, "nnz": int(col.numel()),
        "ngcuda_ms": t_ng * 1e3, "sparse_mm_ms": t_mm * 1e3, "index_add_ms": t_ia * 1e3,
        "speedup_vs_sparse_mm": t_mm / t_ng, "speedup_vs_index_add": t_ia / t_ng,
    }
    if memory and device == "cpu":
        setup = (
            "import torch\nfrom ngcuda import ops\nfrom benchmarks.bench_factor import random_graph, torch_factor_update_\n"
            f"rowptr, col, value = random_graph({n}, {nnz_per_row})\n"
            f"x = (torch.rand({n}, {d}, generator=torch.Generator().manual_seed(1)) < {density}).float()\n"
            f"f = torch.eye({d + 1})\na = torch.sparse_csr_tensor(rowptr, col, value, ({n}, {n}), check_invariants=False)\n"
        )
        result["ngcuda_peak_mib"] = peak_rss_in_child(
            setup + "# measure\nops.sparse_factor_update_(f, rowptr, col, value, x, 0.95, True)\n")
        result["sparse_mm_peak_mib"] = peak_rss_in_child(
            setup + "# measure\ntorch_factor_update_(f, torch.sparse.mm(a, x))\n")
    return [result]


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(prog="python -m benchmarks factor", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small sizes, seconds in all")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--json", default=None, help="JSON path (default benchmarks/results/<device>-factor.json); - for none")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory probes")
    args = p.parse_args(argv)
    if args.quick:
        n_sweep, d_fixed = [500, 1000, 2000], 32
        d_sweep, n_fixed = [16, 32, 64], 1000
        sparse_cfg = dict(n=500, d=64, nnz_per_row=4.9, density=0.05)
    else:
        n_sweep, d_fixed = [2_000, 8_000, 32_000, 128_000], 128
        d_sweep, n_fixed = [16, 64, 256, 1024], 8_000
        sparse_cfg = dict(n=2708, d=1433, nnz_per_row=4.9, density=0.0127)
    ceil = ceilings.measure(args.device, quick=args.quick)
    by_n = dense_rows([(n, d_fixed) for n in n_sweep], args.device)
    by_d = dense_rows([(n_fixed, d) for d in d_sweep], args.device)
    print(f"ceilings: {ceil['memory_bandwidth_gbs']:.1f} GB/s copy, {ceil['matmul_gflops']:.0f} GFLOP/s matmul")
    print_table(by_n + by_d, ["op", "N", "d", "ngcuda_ms", "torch_ms", "speedup", "gflops", "gb_per_s"])
    growth = {
        "time_vs_N_exponent": loglog_slope([r["N"] for r in by_n], [r["ngcuda_ms"] for r in by_n]),
        "time_vs_d_exponent": loglog_slope([r["d"] for r in by_d], [r["ngcuda_ms"] for r in by_d]),
        "expected": "O(N·d²): exponent 1 in N, 2 in d (small d is bound by reading x, not by flops)",
    }
    print(f"growth: time ∝ N^{growth['time_vs_N_exponent']:.2f} (d={d_fixed}), "
          f"d^{growth['time_vs_d_exponent']:.2f} (N={n_fixed})")
    srows = sparse_rows(**sparse_cfg, device=args.device, memory=not args.no_memory)
    print()
    print_table(srows, ["op", "N", "d", "nnz", "ngcuda_ms", "sparse_mm_ms", "index_add_ms",
                        "speedup_vs_sparse_mm", "ngcuda_peak_mib", "sparse_mm_peak_mib"])
    env = environment(args.device)
    payload = {"benchmark": "factor", "quick": args.quick, "environment": env, "ceilings": ceil,
               "dense_by_N": by_n, "dense_by_d": by_d, "growth": growth, "sparse": srows}
    if args.json != "-":
        dev = env["device"].replace(" ", "-")
        path = Path(args.json) if args.json else RESULTS / f"{dev}-factor{'-quick' if args.quick else ''}.json"
        write_json(path, payload)
        plot = growth_and_throughput(path.with_suffix(".png"), f"factor_update_ on {env['device']}", [
            {"x": n_sweep, "xlabel": f"N rows (d={d_fixed})", "ylabel": "ms",
             "series": {"ngcuda": [r["ngcuda_ms"] for r in by_n], "torch": [r["torch_ms"] for r in by_n]},
             "title": "time vs N"},
            {"x": d_sweep, "xlabel": f"d (N={n_fixed})", "ylabel": "ms",
             "series": {"ngcuda": [r["ngcuda_ms"] for r in by_d], "torch": [r["torch_ms"] for r in by_d]},
             "title": "time vs d"},
            {"x": d_sweep, "xlabel": f"d (N={n_fixed})", "ylabel": "GFLOP/s (one triangle)",
             "series": {"ngcuda": [r["gflops"] for r in by_d]},
             "ceiling": (ceil["matmul_gflops"], "measured matmul peak"), "title": "throughput"},
        ])
        print(f"\nwrote {path} and {plot}")
    return payload


if __name__ == "__main__":
    main()
