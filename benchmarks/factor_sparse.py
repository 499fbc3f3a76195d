"""The sparse half of the factor benchmark: sparse_factor_update_ against forming ÂX densely.

One row per graph: the time of each method (median, round-robin), ngcuda's rates and roofline
fractions, speed-ups against each baseline and, for the real graphs, the peak memory of one call.
Feature matrices and factors rotate through copies that exceed the last-level cache; the CSR is
shared (it is a few percent of the features' bytes on every graph here).
"""
from __future__ import annotations

import argparse
from typing import Any, Callable, Optional

import torch

from ngcuda import ops

from . import baselines as bl
from .graphs import FROM_ROOT, SHIPPED, BenchGraph, bench_graph, random_graph, read_real
from .memory import peak_cuda_mib, peak_rss_in_child
from .roofline import rates, speedups
from .timing import compare, copies_to_exceed_cache, options, rotation, staggered


def methods() -> list[str]:
    """ngcuda and the baselines present on this machine (torch_scatter only when installed)."""
    return ["ngcuda", "sparse_mm", "scatter_add"] + (["torch_scatter"] if bl.torch_scatter_available() else [])


def baseline_status() -> dict[str, str]:
    return {
        "sparse_mm": "torch.sparse.mm(Â_csr, x) then cat+addmm_",
        "scatter_add": "zeros.scatter_add_(0, row, x[col]*value) then cat+addmm_",
        "torch_scatter": "installed" if bl.torch_scatter_available() else "not installed (optional)",
    }


def work(n: int, d: int, nnz: int) -> tuple[float, float]:
    """(flops, minimum bytes) of one call: aggregation + Gram; x once, CSR, factor in and out."""
    dim = d + 1
    flops = 2.0 * nnz * d + 2.0 * n * dim * dim
    bytes_moved = 4.0 * n * d + 12.0 * nnz + 8.0 * (n + 1) + 8.0 * dim * dim
    return flops, bytes_moved


def method_fns(g: BenchGraph) -> dict[str, Callable[[dict], Any]]:
    """Each method as a function of one rotated input set {"x": x, "f": {method: factor}}."""
    a_csr = bl.csr_tensor(g.rowptr, g.col, g.value, g.nodes)
    row = bl.edge_rows(g.rowptr)
    fns: dict[str, Callable[[dict], Any]] = {
        "ngcuda": lambda s: ops.sparse_factor_update_(s["f"]["ngcuda"], g.rowptr, g.col, g.value,
                                                      s["x"], bl.DECAY, True),
        "sparse_mm": lambda s: bl.dense_factor_update_(s["f"]["sparse_mm"], bl.aggregate_sparse_mm(a_csr, s["x"])),
        "scatter_add": lambda s: bl.dense_factor_update_(
            s["f"]["scatter_add"], bl.aggregate_scatter_add(row, g.col, g.value, s["x"])),
    }
    ts = bl.aggregate_torch_scatter()
    if ts is not None:
        fns["torch_scatter"] = lambda s: bl.dense_factor_update_(
            s["f"]["torch_scatter"], ts(row, g.col, g.value, s["x"]))
    return fns


def child_memory(setup: str) -> dict[str, float]:
    """Peak extra RSS of one ngcuda call and one sparse.mm baseline call, each in a fresh process."""
    head = ("import torch\nfrom ngcuda import ops\nfrom benchmarks import baselines as bl\n"
            "from benchmarks.graphs import bench_graph, random_graph, read_real\n" + setup +
            "\nf = torch.eye(g.features + 1)\na = bl.csr_tensor(g.rowptr, g.col, g.value, g.nodes)\n")
    return {
        "ngcuda_peak_mib": peak_rss_in_child(
            head + "# measure\nops.sparse_factor_update_(f, g.rowptr, g.col, g.value, g.x, bl.DECAY, True)\n"),
        "sparse_mm_peak_mib": peak_rss_in_child(
            head + "# measure\nbl.dense_factor_update_(f, bl.aggregate_sparse_mm(a, g.x))\n"),
    }


def sparse_row(g: BenchGraph, device: str, ceil: dict[str, Any], quick: bool,
               memory_setup: Optional[str]) -> dict[str, Any]:
    g = g.to(device)
    fns = method_fns(g)
    dim = g.features + 1

    def make() -> dict:
        return {"x": g.x, "f": {m: torch.eye(dim, device=device) for m in fns}}

    set_bytes = 4 * (g.x.numel() + len(fns) * dim * dim)
    copies = copies_to_exceed_cache(set_bytes, device)
    sets = rotation(make(), copies)
    flops, bytes_moved = work(g.nodes, g.features, g.nnz)
    slow = flops / (ceil["matmul_gflops"] * 1e9) > 1.0
    timing = compare(staggered(fns, sets), device, **options(quick, slow))
    ms = {k: t.median_s * 1e3 for k, t in timing.items()}
    row: dict[str, Any] = {"graph": g.name, "N": g.nodes, "d": g.features, "nnz": g.nnz,
                           "copies": copies, "working_set_bytes": copies * set_bytes}
    row.update({f"{k}_ms": v for k, v in ms.items()})
    row.update(speedups(ms))
    row.update(rates(timing["ngcuda"].median_s, flops, bytes_moved, ceil, rows=g.nodes))
    row["timings"] = {k: t.as_dict() for k, t in timing.items()}
    print(f"  {g.name}: {row['speedup_vs_sparse_mm']:.2f}x sparse.mm, {row['speedup_vs_scatter_add']:.2f}x "
          "scatter_add_", flush=True)
    if memory_setup is not None:
        if torch.device(device).type == "cuda":
            s = sets[0]
            row["ngcuda_peak_mib"] = peak_cuda_mib(lambda: fns["ngcuda"](s), device)
            row["sparse_mm_peak_mib"] = peak_cuda_mib(lambda: fns["sparse_mm"](s), device)
        else:
            row.update(child_memory(memory_setup))
    return row


def real_rows(args: argparse.Namespace, ceil: dict[str, Any], max_features: Optional[int],
              max_call_seconds: float) -> list[dict[str, Any]]:
    """One row per real graph; graphs that are absent or too slow are listed with the reason."""
    names = list(SHIPPED) + (list(FROM_ROOT) if args.data_root else [])
    rows = []
    for name in names:
        try:
            raw = read_real(name, args.data_root)
        except FileNotFoundError as e:
            rows.append({"graph": name, "skipped": f"not found: {e}"})
            continue
        d = min(raw.num_features, max_features or raw.num_features)
        nnz = raw.num_edges + raw.num_nodes
        estimate = work(raw.num_nodes, d, nnz)[0] / (ceil["matmul_gflops"] * 1e9)
        if estimate > max_call_seconds:
            rows.append({"graph": name, "N": raw.num_nodes, "d": d, "nnz": nnz,
                         "skipped": f"one call ≈ {estimate:.0f} s at the matmul ceiling "
                                    f"(> --max-call-seconds {max_call_seconds:g})",
                         "estimated_call_seconds": estimate})
            continue
        g = bench_graph(raw, max_features)
        setup = None
        if not (args.quick or args.no_memory):
            root = None if args.data_root is None else str(args.data_root)
            setup = f"g = bench_graph(read_real({name!r}, {root!r}), {max_features!r})"
        rows.append(sparse_row(g, args.device, ceil, args.quick, setup))
    return rows


def random_rows(args: argparse.Namespace, ceil: dict[str, Any], ns: list[int], d: int) -> list[dict[str, Any]]:
    """Random graphs of growing N (Cora's mean degree) at a fixed feature width."""
    return [sparse_row(random_graph(n, d), args.device, ceil, args.quick, None) for n in ns]
