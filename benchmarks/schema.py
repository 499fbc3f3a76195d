"""What a complete results file holds; the run prints any gap and the tests assert there is none.

Nothing here is about speed: only that every number a reader (or the README) relies on is there,
finite and of the right sign.
"""
from __future__ import annotations

import math
from typing import Any, Iterable

VERSION = "ngcuda-bench/1"

TOP = ("schema", "command", "quick", "environment", "ceilings", "benchmarks", "wall_seconds")
ENVIRONMENT = ("device", "cpu_model", "logical_cpus", "threads", "last_level_cache_bytes", "torch", "cuda",
               "ngcuda_build", "git_commit", "git_dirty", "time", "load_average_start", "load_average_end")
CEILINGS = ("memory_bandwidth_gbs", "matmul_gflops")

# Positive finite numbers every row of a table must carry.
FACTOR_DENSE = ("ngcuda_ms", "torch_ms", "speedup_vs_torch", "rows_per_s", "gflops", "gb_per_s",
                "frac_matmul_peak", "frac_bandwidth")
FACTOR_SPARSE = ("N", "d", "nnz", "ngcuda_ms", "sparse_mm_ms", "scatter_add_ms", "speedup_vs_sparse_mm",
                 "speedup_vs_scatter_add", "rows_per_s", "gflops", "gb_per_s")
EIGH_ROW = ("n", "batch", "torch_stacked_ms", "torch_looped_ms", "ngcuda_cold_ms", "ngcuda_warm_ms",
            "speedup_cold_vs_stacked", "speedup_cold_vs_looped", "speedup_warm_vs_stacked", "speedup_warm_vs_looped")
EIGH_METHOD = ("ms", "ms_per_matrix", "nominal_gflops", "residual", "orthogonality", "eigenvalue_rel_err")
PRECONDITION = ("layers", "ngcuda_ms", "torch_loop_ms", "speedup_vs_torch_loop", "gflops", "frac_matmul_peak")
STEP = ("ms_per_step", "ratio_vs_adam")
GROWTH = ("expected_exponent", "exponent_all")


def _positive(row: dict[str, Any], keys: Iterable[str], where: str) -> list[str]:
    out = []
    for k in keys:
        v = row.get(k)
        if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v) or v <= 0:
            out.append(f"{where}: {k} = {v!r}")
    return out


def _rows(section: dict[str, Any], key: str, where: str) -> tuple[list[dict], list[str]]:
    rows = section.get(key)
    if not isinstance(rows, list) or not rows:
        return [], [f"{where}.{key}: missing or empty"]
    return rows, []


def _growth(section: dict[str, Any], names: Iterable[str], where: str) -> list[str]:
    fits = section.get("growth", {})
    out = []
    for name in names:
        fit = fits.get(name)
        if not isinstance(fit, dict):
            out.append(f"{where}.growth.{name}: missing")
            continue
        out += [f"{where}.growth.{name}.{k}: missing" for k in GROWTH if fit.get(k) is None]
    return out


def factor(s: dict[str, Any]) -> list[str]:
    out: list[str] = []
    for key in ("dense_by_N", "dense_by_d", "sparse_random"):
        rows, err = _rows(s, key, "factor")
        out += err
        fields = FACTOR_DENSE if key.startswith("dense") else FACTOR_SPARSE
        for i, r in enumerate(rows):
            out += _positive(r, fields, f"factor.{key}[{i}]")
    real, err = _rows(s, "sparse_real", "factor")
    out += err
    graphs = {r.get("graph") for r in real}
    out += [f"factor.sparse_real: no row for {g}" for g in ("cora", "citeseer") if g not in graphs]
    for r in real:
        if "skipped" not in r:
            out += _positive(r, FACTOR_SPARSE, f"factor.sparse_real[{r.get('graph')}]")
    return out + _growth(s, ("dense_time_vs_N", "dense_time_vs_d", "sparse_time_vs_N"), "factor")


def eigh(s: dict[str, Any]) -> list[str]:
    out: list[str] = []
    for key in ("by_n", "by_batch"):
        rows, err = _rows(s, key, "eigh")
        out += err
        for r in rows:
            where = f"eigh.{key}[n={r.get('n')},batch={r.get('batch')}]"
            out += _positive(r, EIGH_ROW, where)
            for m in ("torch_stacked", "torch_looped", "ngcuda_cold", "ngcuda_warm"):
                out += _positive(r.get("methods", {}).get(m, {}), EIGH_METHOD, f"{where}.{m}")
    return out + _growth(s, ("torch_stacked", "torch_looped", "ngcuda_cold", "ngcuda_warm"), "eigh")


def precondition(s: dict[str, Any]) -> list[str]:
    out: list[str] = []
    for key in ("models", "sweep"):
        rows, err = _rows(s, key, "precondition")
        out += err
        for r in rows:
            out += _positive(r, PRECONDITION, f"precondition.{key}[{r.get('model')}]")
    return out + _growth(s, ("time_vs_d",), "precondition")


def step(s: dict[str, Any]) -> list[str]:
    out: list[str] = []
    workloads, err = _rows(s, "workloads", "step")
    out += err
    for w in workloads:
        rows, err = _rows(w, "variants", f"step[{w.get('workload')}]")
        out += err
        has_adam = any(r.get("variant") == "adam" for r in rows)
        for r in rows:
            out += _positive(r, STEP if has_adam else STEP[:1], f"step[{w.get('workload')}].{r.get('variant')}")
    return out


SECTIONS = {"factor": factor, "eigh": eigh, "precondition": precondition, "step": step}


def problems(payload: dict[str, Any]) -> list[str]:
    """Every missing or non-positive number of a results payload (empty when complete)."""
    out = [f"top: {k} missing" for k in TOP if k not in payload]
    env = payload.get("environment", {})
    out += [f"environment: {k} missing" for k in ENVIRONMENT if k not in env]
    if "git_commit" in env and not env["git_commit"]:
        out.append("environment: git_commit unknown (outside a checkout, set NGCUDA_GIT_COMMIT)")
    out += _positive(payload.get("ceilings", {}), CEILINGS, "ceilings")
    benchmarks = payload.get("benchmarks", {})
    if not benchmarks:
        out.append("benchmarks: none")
    for name, section in benchmarks.items():
        check = SECTIONS.get(name)
        out += [f"benchmarks: unknown section {name}"] if check is None else check(section)
    return out
