"""The benchmark harness: `all --quick` runs, its JSON is valid and complete, its plots exist; the
helpers it relies on (growth fits, cache rotation, the plain-PyTorch K-FAC baseline) are right.

Nothing here asserts anything about speed."""
from __future__ import annotations

import copy
import json
import math

import pytest
import torch
import torch.nn.functional as F

from benchmarks import cli, schema
from benchmarks.growth import growth, loglog_slope
from benchmarks.timing import compare, copies_to_exceed_cache


def _strict_json(path):
    def reject(token):
        raise ValueError(f"non-finite number {token} in {path}")

    return json.loads(path.read_text(), parse_constant=reject)


@pytest.fixture(scope="module")
def quick_all(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "all.json"
    # one thread: a machine shared with other jobs then slows the run least
    cli.main(["all", "--quick", "--threads", "1", "--no-memory", "--json", str(out)])
    return out, _strict_json(out)


def test_all_quick_json_is_complete(quick_all):
    path, data = quick_all
    assert schema.problems(data) == []
    assert data["schema"] == schema.VERSION and data["quick"] is True
    assert set(data["benchmarks"]) == {"factor", "eigh", "precondition", "step"}
    env = data["environment"]
    assert env["threads"] == 1 and env["device"] == "cpu" and env["torch"] == torch.__version__
    assert torch.get_num_threads() != 1 or env["threads"] == 1  # the run restored the caller's threads


def test_all_quick_plots(quick_all):
    path, _ = quick_all
    for name in ("factor", "eigh", "precondition", "step"):
        png = path.with_name(f"{path.stem}-{name}.png")
        assert png.stat().st_size > 1000, png


def test_all_quick_contents(quick_all):
    _, data = quick_all
    factor = data["benchmarks"]["factor"]
    assert {r["graph"] for r in factor["sparse_real"]} >= {"cora", "citeseer"}
    assert factor["baselines"]["torch_scatter"] in ("installed", "not installed (optional)")
    for fit in factor["growth"].values():
        assert fit["expected_exponent"] in (1.0, 2.0) and math.isfinite(fit["exponent_all"])
    eigh = data["benchmarks"]["eigh"]
    assert all(fit["expected_exponent"] == 3.0 for fit in eigh["growth"].values())
    step = data["benchmarks"]["step"]
    assert [w["workload"] for w in step["workloads"]] == ["gcn-cora", "autoencoder"]
    for w in step["workloads"]:
        assert [r["variant"] for r in w["variants"]] == ["adam", "ngcuda-kfac", "ngcuda-kfac-auto", "torch-kfac"]
        assert w["hyperparameters"]["kfac"]["inverse_every"] == w["steps_per_block"]


def test_single_benchmark_writes_json_and_png(tmp_path):
    out = tmp_path / "pre.json"
    assert cli.main(["precondition", "--quick", "--json", str(out)]) == 0
    data = _strict_json(out)
    assert list(data["benchmarks"]) == ["precondition"] and schema.problems(data) == []
    assert {r["model"] for r in data["benchmarks"]["precondition"]["models"]} == {"gcn-cora", "many-small"}
    assert out.with_suffix(".png").stat().st_size > 1000


def test_json_dash_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(cli, "RESULTS", tmp_path)
    assert cli.main(["precondition", "--quick", "--json", "-", "--widths", "8"]) == 0
    assert list(tmp_path.iterdir()) == []


def test_schema_reports_gaps():
    assert "benchmarks: none" in schema.problems({})
    bad = {"benchmarks": {"precondition": {"models": [{"model": "m", "ngcuda_ms": float("nan")}]}}}
    assert any("ngcuda_ms" in p for p in schema.problems(bad))
    assert any("git_commit unknown" in p for p in schema.problems({"environment": {"git_commit": None}}))


def test_commit_outside_a_checkout_comes_from_the_environment(tmp_path, monkeypatch):
    """The device machine gets a copy of the tree without .git: the commit is passed in."""
    from benchmarks import environment

    monkeypatch.setattr(environment, "ROOT", tmp_path)
    monkeypatch.delenv("NGCUDA_GIT_COMMIT", raising=False)
    assert environment.git_commit() == (None, None)
    monkeypatch.setenv("NGCUDA_GIT_COMMIT", "abc1234")
    assert environment.git_commit() == ("abc1234", None)


def test_wide_quick_json(tmp_path, capsys):
    from benchmarks import bench_wide

    def _finite_positive(v) -> bool:
        return isinstance(v, (int, float)) and math.isfinite(v) and v > 0

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
    # timed after the automatic choice settled: input dropout makes Cora's input layer low-rank at
    # its second factor update (the first, provisional, choice treats the input as constant: full)
    assert "lowrank:16" in rows["auto"]["layers"][0], rows["auto"]["layers"]
    assert data["complete"] is True
    assert out.with_suffix(".png").stat().st_size > 1000
    assert capsys.readouterr().out.count("] cora ") == 3  # one progress line per configuration


def test_wide_refuses_a_warmup_that_would_time_a_provisional_choice(tmp_path, capsys):
    from benchmarks import bench_wide

    with pytest.raises(SystemExit):
        bench_wide.main(["--warmup", "1", "--json", str(tmp_path / "w.json")])
    assert "second factor update" in capsys.readouterr().err
    assert not (tmp_path / "w.json").exists()


def test_wide_worker_adapts_damping_when_asked():
    from benchmarks import bench_wide

    rows = {flag: bench_wide._worker("cora", "diag", "", 5, 2, "aggregated", flag) for flag in (False, True)}
    assert rows[False]["damping_after_warmup"] == 0.01  # ngcuda.KFAC's default, untouched
    assert rows[False]["rho_after_warmup"] is None
    assert math.isfinite(rows[True]["rho_after_warmup"])  # the closure reached the ρ rule
    for r in rows.values():
        assert math.isfinite(r["mean_ratio_vs_adam"]) and r["step_ms_mean"] > 0


def test_unknown_benchmark_is_an_error(capsys):
    assert cli.main(["nope"]) == 2
    assert "benchmarks:" in capsys.readouterr().out
    assert cli.main([]) == 2


@pytest.mark.parametrize("argv", [["factor", "--device", "tpu"], ["factor", "--bogus"],
                                  ["all", "--sizes", "16"]])
def test_bad_arguments_exit_2(argv):
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    assert e.value.code == 2


def test_growth_fits():
    xs = [10, 20, 40, 80]
    assert loglog_slope(xs, [3 * x**2 for x in xs]) == pytest.approx(2.0)
    # overhead-bound small sizes, cubic large ones: the large-size exponent is the cubic one
    g = growth([16, 32, 64, 128, 256], [1.0, 1.1, 1.3, 8.0, 64.0], 3.0, "n", large_from=128)
    assert g["exponent_large"] == pytest.approx(3.0) and g["follows_expected"] is True
    assert g["exponent_all"] < 2.5


def test_rotation_exceeds_cache_within_caps():
    assert copies_to_exceed_cache(1 << 40, "cpu") == 1  # bigger than any cache: no copies
    small = copies_to_exceed_cache(1 << 20, "cpu", max_copies=8)
    assert 1 <= small <= 8
    assert copies_to_exceed_cache(1 << 20, "cpu", max_bytes=3 << 20) <= 3


def test_compare_round_robin_counts():
    calls = {"a": 0, "b": 0}

    def bump(k):
        def fn():
            calls[k] += 1
        return fn

    timing = compare({"a": bump("a"), "b": bump("b")}, "cpu", warmup=1, min_repeats=4, max_repeats=4)
    assert calls == {"a": 5, "b": 5} and timing["a"].samples == 4


def _train(opt_cls, model, steps, batch_fn, **kw):
    opt = opt_cls(model, lr=0.02, damping=0.01, momentum=0.9, weight_decay=5e-4, inverse_every=2,
                  kl_clip=1e-2, **kw)
    for _ in range(steps):
        opt.zero_grad()
        batch_fn(model, opt)
        opt.step()
    return [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("fisher", ["empirical", "true"])
def test_torch_kfac_matches_ngcuda_on_gcn(fisher):
    """The baseline runs the same algorithm: on a GCN (no dropout, so both see the same steps)
    the two optimizers end at the same parameters up to float32 rounding."""
    pytest.importorskip("torch_geometric")
    import ngcuda
    from benchmarks.torch_kfac import TorchKFAC
    from ngcuda.data import load_planetoid

    data = load_planetoid("cora")
    x = data.x / data.x.sum(1, keepdim=True).clamp(min=1)

    def batch(model, opt):
        out = model(x, data.edge_index)
        opt.set_outputs(out, mask=data.train_mask)
        F.cross_entropy(out[data.train_mask], data.y[data.train_mask]).backward()

    ours = _train(ngcuda.KFAC, _seeded_gcn(x.shape[1], data.num_classes), 5, batch, fisher_type=fisher,
                  factor_structure="full")
    theirs = _train(TorchKFAC, _seeded_gcn(x.shape[1], data.num_classes), 5, batch, fisher_type=fisher)
    for a, b in zip(ours, theirs):
        assert (a - b).abs().max() <= 1e-4 * a.abs().max()


def _seeded_gcn(features: int, classes: int):
    from ngcuda.models import GCN

    torch.manual_seed(0)
    return GCN(features, 16, classes, dropout=0.0, input_dropout=False)


def test_torch_kfac_matches_ngcuda_on_mlp():
    import ngcuda
    from benchmarks.torch_kfac import TorchKFAC
    from ngcuda.models import Autoencoder

    xb = torch.rand(64, 784, generator=torch.Generator().manual_seed(0))

    def batch(model, opt):
        logits = model(xb)
        opt.set_outputs(logits, likelihood="bernoulli")
        (F.binary_cross_entropy_with_logits(logits, xb, reduction="sum") / xb.shape[0]).backward()

    torch.manual_seed(0)
    model = Autoencoder((784, 32, 16, 4))
    twin = copy.deepcopy(model)
    ours = _train(ngcuda.KFAC, model, 2, batch, fisher_type="empirical", likelihood="bernoulli",
                  factor_structure="full")
    theirs = _train(TorchKFAC, twin, 2, batch, fisher_type="empirical", likelihood="bernoulli")
    for a, b in zip(ours, theirs):
        # a 784×784 output factor of rank 64 makes the damped inverse amplify rounding
        assert (a - b).abs().max() <= 1e-3 * a.abs().max()


def test_ngcuda_bench_forwards_to_the_benchmarks(capsys):
    from ngcuda.cli import main as ngcuda_main

    assert ngcuda_main(["bench", "nope"]) == 2
    assert "benchmarks:" in capsys.readouterr().out
    assert ngcuda_main(["bench", "--help"]) == 0


def test_summary_of_a_results_file(quick_all, capsys):
    from benchmarks.summary import main as summary_main

    path, _ = quick_all
    assert summary_main([str(path)]) == 0
    out = capsys.readouterr().out
    assert "| `factor_update_`" in out and "O(N·d²)" in out and "O(n³)" in out
    assert "**A quick run**" in out  # quick numbers are labelled as such
