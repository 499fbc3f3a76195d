"""benchmarks/bench_sparse_x.py in --quick mode: it runs and reports every case. No speed claims."""
from __future__ import annotations

import math

import torch

from benchmarks import bench_sparse_x


def test_sparse_x_quick_runs_every_case():
    data = bench_sparse_x.main(["--quick", "--json", "-", "--no-memory"])
    assert data["complete"] is True
    rows = data["rows"]
    assert {(r["case"], r["runner"]) for r in rows} == {
        (case, runner) for case, runner, _ in bench_sparse_x.CASES}
    for r in rows:
        assert math.isfinite(r["ms"]) and r["ms"] > 0
        if r["runner"] == "ngcuda":
            assert r["speedup_vs_torch"] > 0
    errs = [r["rel_err_f32_vs_f64"] for r in rows if "rel_err_f32_vs_f64" in r]
    assert len(errs) == 2 and max(errs) < 1e-5


def test_synthetic_graph_shapes():
    x, edge_index = bench_sparse_x.synthetic(50, 30, 4, 3)
    assert x.layout == torch.sparse_csr and x.shape == (50, 30)
    assert edge_index.shape[0] == 2 and bool((edge_index[0] != edge_index[1]).all())
