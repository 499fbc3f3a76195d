"""Factor updates with sparse CSR features (issue #10, wide layers) against torch.sparse.mm.

    python -m benchmarks sparse-x --data-root DIR [--graphs coauthor-cs,coauthor-physics]
                                  [--block 1024] [--quick] [--json PATH] [--no-memory]

For each graph: the full input factor (D = d + 1) and its block-diagonal form (blocks of
``--block`` columns) of x̄ᵀx̄ (``factor_update_``, ``block_factor_update_``) and of (ÂX̄)ᵀ(ÂX̄) with the
GCN-normalised Â with self-loops (``sparse_factor_update_``, ``sparse_block_factor_update_``), x kept
sparse CSR throughout. The torch baseline never densifies x either: ``torch.sparse.mm(xᵀ, x)``
(CSR × CSR) densified to D×D, plus the bias row and the blend; for ÂX it first forms
``torch.sparse.mm(Â, x)`` (sparse). The block baseline is the full baseline, sliced. Baselines are
timed once (they take tens of seconds), ngcuda as the median of 3 after a warm-up. Peak memory is
the extra resident memory of one call in a fresh process. Without --data-root (or with --quick) a
synthetic bag-of-words graph is used.
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

import torch

from ngcuda import ops

from .environment import environment
from .memory import peak_rss_in_child
from .report import RESULTS, print_table, write_json
from .timing import compare

DECAY = 0.95


def gcn_adjacency(edge_index: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """CSR (rowptr, col, value) of D^-1/2 (A + I) D^-1/2 for a [2, E] edge_index."""
    loops = torch.arange(n)
    row = torch.cat([edge_index[1], loops])
    col = torch.cat([edge_index[0], loops])
    deg = torch.bincount(row, minlength=n).float()
    value = deg[row].rsqrt() * deg[col].rsqrt()
    order = torch.argsort(row * n + col)
    row, col, value = row[order], col[order], value[order]
    rowptr = torch.zeros(n + 1, dtype=torch.long)
    rowptr[1:] = torch.cumsum(torch.bincount(row, minlength=n), 0)
    return rowptr, col, value


def synthetic(n: int, d: int, words: float, degree: float, seed: int = 0):
    """A bag-of-words CSR x [n, d] (≈ `words` ones per row) and a random symmetric edge_index."""
    gen = torch.Generator().manual_seed(seed)
    per_row = torch.poisson(torch.full((n,), float(words)), generator=gen).long().clamp(max=d)
    crow = torch.zeros(n + 1, dtype=torch.long)
    crow[1:] = per_row.cumsum(0)
    col = torch.cat([torch.randperm(d, generator=gen)[:k].sort().values for k in per_row.tolist()])
    x = torch.sparse_csr_tensor(crow, col, torch.ones(col.numel()), (n, d))
    src = torch.randint(0, n, (int(n * degree / 2),), generator=gen)
    dst = torch.randint(0, n, (src.numel(),), generator=gen)
    keep = src != dst
    edge_index = torch.cat([torch.stack([src[keep], dst[keep]]), torch.stack([dst[keep], src[keep]])], 1)
    return x, torch.unique(edge_index, dim=1)


def load(name: str, root: str | None, quick: bool):
    if name == "synthetic":
        return synthetic(500, 400, 10, 5) if quick else synthetic(18333, 6805, 60, 9)
    from ngcuda.data import load_npz

    g = load_npz(name, root=root, sparse=True)
    return g.x, g.edge_index


def torch_gram(x: torch.Tensor) -> torch.Tensor:
    """x̄ᵀx̄ [D, D] through torch.sparse.mm on the CSR x."""
    n, d = x.shape
    s = torch.empty(d + 1, d + 1)
    s[:d, :d] = torch.sparse.mm(x.t().to_sparse_csr(), x).to_dense()
    colsum = torch.sparse.sum(x.to_sparse_coo(), 0).to_dense()
    s[:d, d] = colsum
    s[d, :d] = colsum
    s[d, d] = n
    return s


def torch_blocks_(blocks: list[torch.Tensor], x: torch.Tensor) -> None:
    s, start = torch_gram(x), 0
    for b in blocks:
        k = b.shape[0]
        b.mul_(DECAY).add_(s[start:start + k, start:start + k], alpha=(1 - DECAY) / x.shape[0])
        start += k


def block_sizes(D: int, block: int) -> list[int]:
    return [block] * (D // block) + ([D % block] if D % block else [])


SETUP = """
import torch
from ngcuda import ops
from benchmarks import bench_sparse_x as B
x, edge_index = B.load({name!r}, {root!r}, {quick!r})
n, d = x.shape
rowptr, col, value = B.gcn_adjacency(edge_index, n)
a = torch.sparse_csr_tensor(rowptr, col, value, (n, n))
full = [torch.eye(d + 1)]
blocks = [torch.eye(k) for k in B.block_sizes(d + 1, {block})]
"""

# (case, runner, statement); the statements run with the names of SETUP.
CASES = [
    ("full", "ngcuda", "ops.factor_update_(full[0], x, 0.95, True)"),
    ("full", "torch", "B.torch_blocks_(full, x)"),
    ("block", "ngcuda", "ops.block_factor_update_(blocks, x, 0.95, True)"),
    ("block", "torch", "B.torch_blocks_(blocks, x)"),
    ("agg-full", "ngcuda", "ops.sparse_factor_update_(full[0], rowptr, col, value, x, 0.95, True)"),
    ("agg-full", "torch", "B.torch_blocks_(full, torch.sparse.mm(a, x))"),
    ("agg-block", "ngcuda",
     "ops.sparse_block_factor_update_(blocks, rowptr, col, value, x, 0.95, True)"),
    ("agg-block", "torch", "B.torch_blocks_(blocks, torch.sparse.mm(a, x))"),
]


def accuracy(x: torch.Tensor, rowptr, col, value) -> dict[str, float]:
    """Relative error of the float32 ops against the same ops in float64 (tested against the
    float64 reference on small inputs)."""
    out = {}
    d = x.shape[1]
    for name, call in [
        ("full", lambda f, xs: ops.factor_update_(f, xs, 0.0, True)),
        ("agg-full", lambda f, xs: ops.sparse_factor_update_(f, rowptr, col, value, xs, 0.0, True)),
    ]:
        f32, f64 = torch.zeros(d + 1, d + 1), torch.zeros(d + 1, d + 1, dtype=torch.float64)
        call(f32, x)
        call(f64, x.to(torch.float64))
        out[name] = float((f32.double() - f64).norm() / f64.norm())
    return out


def run_graph(name: str, root: str | None, block: int, quick: bool, memory: bool) -> list[dict[str, Any]]:
    ns: dict[str, Any] = {}
    exec(SETUP.format(name=name, root=root, quick=quick, block=block), ns)
    x = ns["x"]
    crow = x.crow_indices()
    pairs = float(((crow[1:] - crow[:-1]).double() ** 2).sum() / 2)
    base = {"graph": name, "N": x.shape[0], "d": x.shape[1], "nnz": x.values().numel(),
            "x_pairs": pairs, "block": block, "edges": int(ns["col"].numel())}
    rows = []
    for case, runner, stmt in CASES:
        code = compile(stmt, case, "exec")
        fn = lambda: exec(code, ns)  # noqa: E731
        t = compare({"f": fn}, "cpu", warmup=1, min_repeats=3, max_repeats=3)["f"].median_s if runner == "ngcuda" else \
            compare({"f": fn}, "cpu", warmup=0, min_repeats=1, max_repeats=1)["f"].median_s
        # The machine may be shared: the 1-minute load average says how much.
        row = {**base, "case": case, "runner": runner, "ms": t * 1e3, "load_1min": os.getloadavg()[0]}
        if memory:
            row["peak_mib"] = peak_rss_in_child(
                SETUP.format(name=name, root=root, quick=quick, block=block) + "# measure\n" + stmt + "\n")
        print_table([row], ["graph", "case", "runner", "ms", "peak_mib", "load_1min"])
        rows.append(row)
    err = accuracy(x, ns["rowptr"], ns["col"], ns["value"])
    for r in rows:
        if r["runner"] == "ngcuda" and r["case"] in err:
            r["rel_err_f32_vs_f64"] = err[r["case"]]
    return rows


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(prog="python -m benchmarks sparse-x", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-root", default=None, help="folder with the gnn-benchmark npz files")
    p.add_argument("--graphs", default=None,
                   help="comma-separated (default coauthor-cs,coauthor-physics with --data-root, "
                        "else synthetic)")
    p.add_argument("--block", type=int, default=1024, help="block size of the block-diagonal cases")
    p.add_argument("--quick", action="store_true", help="a small synthetic graph, seconds in all")
    p.add_argument("--json", default=None, help="JSON path (default benchmarks/results/cpu-sparse-x.json); - for none")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory probes")
    args = p.parse_args(argv)
    if args.graphs:
        graphs = args.graphs.split(",")
    elif args.data_root and not args.quick:
        graphs = ["coauthor-cs", "coauthor-physics"]
    else:
        graphs = ["synthetic"]
    path = None if args.json == "-" else (
        Path(args.json) if args.json else RESULTS / f"cpu-sparse-x{'-quick' if args.quick else ''}.json")
    rows: list[dict] = []
    payload = {"benchmark": "sparse-x", "quick": args.quick, "complete": False, "environment": environment("cpu"),
               "rows": rows}
    for name in graphs:
        graph_rows = run_graph(name, args.data_root, args.block, args.quick, not args.no_memory)
        by_key = {(r["case"], r["runner"]): r for r in graph_rows}
        for r in graph_rows:
            other = by_key.get((r["case"], "torch"))
            if r["runner"] == "ngcuda" and other:
                r["speedup_vs_torch"] = other["ms"] / r["ms"]
        rows += graph_rows
        if path is not None:  # an interrupted run keeps the graphs it finished
            write_json(path, payload)
    print()
    print_table([r for r in rows if r["runner"] == "ngcuda"],
                ["graph", "case", "ms", "speedup_vs_torch", "peak_mib", "rel_err_f32_vs_f64",
                 "load_1min"])
    payload["complete"] = True
    if path is not None:
        write_json(path, payload)
        print(f"\nwrote {path}")
    return payload


if __name__ == "__main__":
    main()
