"""The benchmark harness in --quick mode: it runs, and its JSON is valid and complete.

Nothing here asserts anything about speed."""
from __future__ import annotations

import json
import math

import pytest

from benchmarks import __main__ as bench_main
from benchmarks import bench_factor, bench_precondition


def _finite_positive(v) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v) and v > 0


def test_factor_quick_json(tmp_path):
    out = tmp_path / "factor.json"
    bench_factor.main(["--quick", "--json", str(out), "--no-memory"])
    data = json.loads(out.read_text())
    assert data["benchmark"] == "factor" and data["quick"] is True
    env = data["environment"]
    for key in ("device", "cpu_model", "threads", "torch", "git_commit", "ngcuda_build"):
        assert key in env
    assert _finite_positive(data["ceilings"]["matmul_gflops"])
    rows = data["dense_by_N"] + data["dense_by_d"]
    assert len(rows) == 6
    for r in rows:
        for key in ("ngcuda_ms", "torch_ms", "speedup", "gflops", "rows_per_s", "gb_per_s"):
            assert _finite_positive(r[key]), (key, r)
    (s,) = data["sparse"]
    for key in ("ngcuda_ms", "sparse_mm_ms", "index_add_ms", "speedup_vs_sparse_mm"):
        assert _finite_positive(s[key])
    assert out.with_suffix(".png").stat().st_size > 1000


def test_precondition_quick_json(tmp_path):
    out = tmp_path / "pre.json"
    bench_precondition.main(["--quick", "--json", str(out)])
    data = json.loads(out.read_text())
    assert {r["model"] for r in data["results"]} == {"gcn-cora", "many-small"}
    assert all(_finite_positive(r["speedup"]) for r in data["results"])


def test_wide_quick_json(tmp_path):
    from benchmarks import bench_wide

    out = tmp_path / "wide.json"
    bench_wide.main(["--quick", "--json", str(out)])
    data = json.loads(out.read_text())
    assert data["benchmark"] == "wide" and data["quick"] is True
    rows = {r["structure"]: r for r in data["results"]}
    assert set(rows) == {"adam", "auto", "diag"}
    for name, r in rows.items():
        assert _finite_positive(r["step_ms"]) and _finite_positive(r["peak_mib"]), r
    assert _finite_positive(rows["auto"]["ratio_vs_adam"])
    assert any("diag" in line for line in rows["diag"]["layers"])
    assert out.with_suffix(".png").stat().st_size > 1000


def test_unknown_benchmark_is_an_error(capsys):
    assert bench_main.main(["nope"]) == 2
    assert "benchmarks:" in capsys.readouterr().out


@pytest.mark.parametrize("argv", [["--device", "tpu"], ["--bogus"]])
def test_bad_arguments_exit_2(argv):
    with pytest.raises(SystemExit) as e:
        bench_factor.main(argv)
    assert e.value.code == 2
