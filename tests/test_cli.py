"""Command line: argument errors (exit 2), end-to-end runs writing metrics.json/csv/png, reproducibility."""
from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("torch_geometric")

import ngcuda  # noqa: E402
from ngcuda.cli import build_parser, main, parse_seeds  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Every test of this file on one thread (the fixture is in conftest.py)."""


@pytest.mark.parametrize(
    "argv,message",
    [
        ([], "required"),
        (["train", "--dataset", "reddit"], "invalid choice: 'reddit'"),
        (["train", "--optimizers", "adam,lbfgs"], "unknown optimizer 'lbfgs'"),
        (["train", "--optimizers", "adam,adam"], "listed twice"),
        (["train", "--seeds", "0"], "at least 1"),
        (["train", "--seeds", "a,b"], "--seeds takes a count"),
        (["train", "--epochs", "0"], "positive integer"),
        (["train", "--lr", "-1"], "finite number >= 0"),
        (["train", "--factor-decay", "1.5"], r"\[0, 1\]"),
        (["train", "--model", "gcn", "--layers", "4"], "--layers applies to --model deep-gcn"),
        (["train", "--skip"], "--skip applies to --model deep-gcn"),
        (["train", "--dataset", "amazon-photo", "--split", "public"], "only the random split"),
        (["train", "--model", "deep-gcn", "--layers", "1", "--optimizers", "adam"], "at least 2"),
        (["train-ae", "--batch-size", "x"], "positive integer"),
        (["train-ae", "--init", "xavier"], "invalid choice"),
        (["train", "--factor-structure", "lowrank"], "unknown factor structure"),
        (["train", "--factor-structure", "conv1:diag,conv2"], "unknown factor structure"),
        (["train", "--factor-structure", "=diag"], "LAYER=STRUCTURE"),
        (["train", "--gcn-factoring", "both"], "invalid choice"),
        (["train", "--distributed", "--adaptive-damping"], "--adaptive-damping is not supported with --distributed"),
        (["train", "--distributed", "--ekfac"], "--ekfac is not supported with --distributed"),
        (["train", "--fisher-nodes", "some"], "invalid choice"),
        (["train", "--fisher-nodes", "all", "--batch-size", "8"], "full-batch, single-process"),
        (["train", "--fisher-nodes", "all", "--optimizers", "kfac,kfac-adam", "--fisher-type",
          "kfac-adam=empirical"], "kfac-adam use the empirical"),
        (["train", "--dropout", "1"], r"\[0, 1\)"),
        (["train-ae", "--gcn-factoring", "input"], "unrecognized arguments: --gcn-factoring"),
        (["train", "--seeds", "4294967296,"], r"0\.\.4294967295"),
        (["train", "--seeds", "100000"], "at most 10000"),
        (["train", "--pseudo-label-gamma", "3", "--batch-size", "8"], "needs full-batch training"),
        (["train", "--num-neighbors", "5,5"], "mini-batch training only"),
        (["train", "--distributed", "--factor-structure", "conv1=diag"], "full factors only"),
    ],
)
def test_argument_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    import re

    assert re.search(message, capsys.readouterr().err)


def _no_training(*args, **kwargs):
    raise AssertionError("training started although the options were bad")


@pytest.mark.parametrize("argv,message", [
    (["--optimizers", "adam,kfac", "--factor-structure", "conv3=diag"], "unknown layer.*conv3"),
    (["--gcn-factoring", "input", "--factor-structure", "conv1=diag"], r"conv1.*registered: conv1\.lin"),
])
def test_kfac_option_errors_come_before_any_run(tmp_path, monkeypatch, capsys, argv, message):
    import re

    import ngcuda.train

    monkeypatch.setattr(ngcuda.train, "train_node_classifier", _no_training)
    with pytest.raises(SystemExit) as e:
        main(["train", "--epochs", "2", "--out", str(tmp_path / "o"), "--quiet", *argv])
    assert e.value.code == 2 and re.search(message, capsys.readouterr().err)
    assert not (tmp_path / "o").exists()


def test_bad_out_fails_before_training(tmp_path, monkeypatch, capsys):
    import ngcuda.train

    monkeypatch.setattr(ngcuda.train, "train_node_classifier", _no_training)
    monkeypatch.setattr(ngcuda.train, "train_autoencoder", _no_training)
    afile = tmp_path / "afile"
    afile.write_text("x")
    for argv in (["train", "--optimizers", "adam"], ["train-ae", "--optimizers", "adam", "--train-size", "10"],
                 ["train", "--optimizers", "adam", "--out", str(afile / "sub")]):
        out = [] if "--out" in argv else ["--out", str(afile)]
        with pytest.raises(SystemExit) as e:
            main([*argv, *out, "--quiet"])
        assert e.value.code == 2
        assert "afile" in capsys.readouterr().err
    assert afile.read_text() == "x"


def test_default_out_folders_are_never_shared(tmp_path, monkeypatch):
    import argparse

    from ngcuda.cli import _out_dir

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("time.strftime", lambda fmt: "20261203-120000")
    parser = argparse.ArgumentParser()
    first, second = _out_dir(parser, None), _out_dir(parser, None)
    assert first == Path("runs/20261203-120000") and second == Path("runs/20261203-120000-2")
    assert first.is_dir() and second.is_dir()


def test_finished_runs_are_written_when_a_later_one_fails(tmp_path, monkeypatch):
    import ngcuda.train

    def fake(graph, name, seed, cfg, opt_cfg, device, on_epoch=None):
        if name == "sgd":
            raise RuntimeError("out of memory")
        row = {"epoch": 1, "train_loss": 1.0, "val_loss": 1.0, "train_acc": 0.5, "val_acc": 0.5,
               "test_acc": 0.5, "seconds": 0.1}
        on_epoch(row)
        return {"optimizer": name, "seed": seed, "history": [row]}

    monkeypatch.setattr(ngcuda.train, "train_node_classifier", fake)
    out = tmp_path / "o"
    with pytest.raises(RuntimeError, match="out of memory"):
        main(["train", "--optimizers", "adam,sgd", "--epochs", "1", "--out", str(out), "--quiet"])
    payload = json.loads((out / "metrics.json").read_text())
    assert payload["complete"] is False and payload["summary"] is None
    assert [(r["optimizer"], r["seed"]) for r in payload["runs"]] == [("adam", 0)]
    assert len(list(csv.DictReader(open(out / "metrics.csv")))) == 1
    assert sorted(p.name for p in out.iterdir()) == ["metrics.csv", "metrics.json"]  # no temporary files left


def test_metrics_json_is_strict_json_when_a_run_diverges(tmp_path):
    from ngcuda.train import write_metrics

    def strict(text: str):
        def refuse(name):
            raise ValueError(name)

        return json.loads(text, parse_constant=refuse)

    run = {"optimizer": "kfac", "seed": 0, "history": [{"epoch": 1, "train_loss": float("nan"),
                                                        "val_loss": float("inf"), "seconds": 0.1}]}
    json_path, csv_path = write_metrics(tmp_path, {"summary": {"kfac": {"loss": -float("inf")}}, "runs": [run]})
    payload = strict(json_path.read_text())
    assert payload["runs"][0]["history"][0]["train_loss"] is None
    assert payload["runs"][0]["history"][0]["val_loss"] is None and payload["summary"]["kfac"]["loss"] is None
    assert list(csv.DictReader(open(csv_path)))[0]["train_loss"] == "nan"


def test_commands_run_without_torch_geometric(tmp_path):
    code = ("import sys; sys.modules['torch_geometric'] = None\n"
            "from ngcuda.cli import main\n"
            "try:\n    main(['train-ae', '--help'])\nexcept SystemExit as e:\n    assert e.code == 0\n"
            f"sys.exit(main(['train', '--optimizers', 'adam', '--out', {str(tmp_path / 'o')!r}]))\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, proc.stderr
    assert "MNIST autoencoder" in proc.stdout
    assert "need torch_geometric: pip install torch-geometric" in proc.stderr


@pytest.mark.parametrize("damage", ["npz", "idx"])
def test_damaged_data_is_reported(tmp_path, capsys, damage):
    if damage == "npz":
        (tmp_path / "ms_academic_cs.npz").write_bytes(b"PK\x03\x04 cut short")
        argv = ["train", "--dataset", "coauthor-cs", "--optimizers", "adam"]
        name = "ms_academic_cs.npz"
    else:
        for stem in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
                     "t10k-labels-idx1-ubyte"):
            (tmp_path / f"{stem}.gz").write_bytes(b"<html>not found</html>")
        argv = ["train-ae", "--optimizers", "adam"]
        name = "train-images-idx3-ubyte.gz"
    assert main([*argv, "--data-root", str(tmp_path), "--out", str(tmp_path / "o"), "--quiet"]) == 1
    assert name in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_kfac_options_without_kfac_are_noted(tmp_path, capsys):
    assert main(["train", "--optimizers", "adam", "--epochs", "1", "--ekfac", "--damping", "1",
                 "--out", str(tmp_path / "o"), "--quiet"]) == 0
    assert "note: --damping, --ekfac apply to the K-FAC variants only" in capsys.readouterr().err
    assert main(["train", "--optimizers", "adam", "--epochs", "1", "--lr", "0.02",
                 "--out", str(tmp_path / "p"), "--quiet"]) == 0
    assert "note" not in capsys.readouterr().err


def test_values_for_unlisted_optimizers_are_noted(tmp_path, capsys):
    assert main(["train", "--optimizers", "adam", "--epochs", "1", "--lr", "0.02,kfac-sgd=0.1",
                 "--weight-decay", "sgd=0", "--out", str(tmp_path / "o"), "--quiet"]) == 0
    err = capsys.readouterr().err
    assert "note: --lr gives a value for kfac-sgd, not in --optimizers adam" in err
    assert "note: --weight-decay gives a value for sgd" in err
    assert main(["train", "--optimizers", "adam,sgd", "--epochs", "1", "--lr", "adam=0.02,sgd=0.1",
                 "--out", str(tmp_path / "p"), "--quiet"]) == 0
    assert "note" not in capsys.readouterr().err


def test_parse_seeds():
    assert parse_seeds("3") == [0, 1, 2]
    assert parse_seeds("4,1") == [4, 1]
    assert parse_seeds("7,") == [7]


def test_missing_data_is_reported(tmp_path, capsys):
    rc = main(["train", "--dataset", "pubmed", "--optimizers", "adam", "--out", str(tmp_path / "o"), "--quiet"])
    assert rc == 1
    assert "--data-root" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_train_end_to_end(tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["train", "--optimizers", "adam,sgd", "--seeds", "2", "--epochs", "15", "--device", "cpu",
            "--out", str(out), "--quiet"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "test acc" in printed and "adam" in printed and "sgd" in printed
    payload = json.loads((out / "metrics.json").read_text())
    assert payload["dataset"]["nodes"] == 2708 and payload["config"]["seeds"] == [0, 1]
    assert payload["complete"] is True and payload["ngcuda"]["torch"] == torch.__version__
    assert payload["optimizer_settings"] == {"adam": {"lr": 0.01, "weight_decay": 5e-4},
                                             "sgd": {"lr": 0.2, "weight_decay": 5e-4, "momentum": 0.9}}
    assert [(r["optimizer"], r["seed"]) for r in payload["runs"]] == [("adam", 0), ("sgd", 0), ("adam", 1), ("sgd", 1)]
    for run in payload["runs"]:
        hist = run["history"]
        assert [h["epoch"] for h in hist] == list(range(1, 16))
        assert hist[-1]["train_loss"] < hist[0]["train_loss"]
        assert all(b["seconds"] > a["seconds"] for a, b in zip(hist, hist[1:]))
    adam = payload["summary"]["adam"]
    assert adam["seeds"] == 2 and adam["test_acc_mean"] > 0.5  # Cora GCN+Adam passes 50% within 15 epochs
    rows = list(csv.DictReader(open(out / "metrics.csv")))
    assert len(rows) == 4 * 15
    assert set(rows[0]) >= {"optimizer", "seed", "epoch", "train_loss", "val_acc", "test_acc", "seconds"}
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_train_is_reproducible(tmp_path):
    runs = []
    for k in range(2):
        out = tmp_path / f"r{k}"
        assert main(["train", "--optimizers", "adam", "--seeds", "3", "--epochs", "3", "--device", "cpu",
                     "--model", "deep-gcn", "--layers", "3", "--skip", "--pseudo-label-gamma", "1",
                     "--split", "random", "--out", str(out), "--quiet"]) == 0
        payload = json.loads((out / "metrics.json").read_text())
        runs.append([[(h["train_loss"], h["val_acc"]) for h in r["history"]] for r in payload["runs"]])
    assert runs[0] == runs[1]
    assert runs[0][0] != runs[0][1]  # different seeds differ


@pytest.mark.parametrize("init", ["default", "sparse"])
def test_train_ae_end_to_end(tmp_path, capsys, init):
    out = tmp_path / "ae"
    assert main(["train-ae", "--optimizers", "adam", "--epochs", "3", "--train-size", "500", "--init", init,
                 "--batch-size", "100", "--device", "cpu", "--out", str(out), "--quiet"]) == 0
    assert "train CE/image" in capsys.readouterr().out
    payload = json.loads((out / "metrics.json").read_text())
    hist = payload["runs"][0]["history"]
    assert hist[-1]["train_bce"] < hist[0]["train_bce"] and hist[-1]["train_sq_err"] < hist[0]["train_sq_err"]
    assert len(list(csv.DictReader(open(out / "metrics.csv")))) == 3
    assert (out / "curves.png").stat().st_size > 0


def test_train_ae_defaults_are_the_readme_run(tmp_path):
    out = tmp_path / "ae"
    assert main(["train-ae", "--optimizers", "kfac,adam,sgd", "--epochs", "1", "--train-size", "200",
                 "--device", "cpu", "--out", str(out), "--quiet"]) == 0
    payload = json.loads((out / "metrics.json").read_text())
    assert payload["config"]["init"] == "sparse"
    settings = payload["optimizer_settings"]
    assert {k: settings["kfac"][k] for k in ("lr", "damping", "kl_clip", "momentum")} == \
        {"lr": 0.1, "damping": 0.01, "kl_clip": 0.1, "momentum": 0.0}
    assert settings["adam"]["lr"] == 1e-3 and settings["sgd"]["momentum"] == 0.9
    defaults = build_parser().parse_args(["train-ae"])
    assert (defaults.epochs, defaults.init) == (30, "sparse")


@pytest.mark.parametrize("opt", ["kfac", "kfac-adam", "kfac-sgd"])
def test_train_with_kfac(tmp_path, opt):
    out = tmp_path / opt
    assert main(["train", "--optimizers", opt, "--epochs", "10", "--device", "cpu", "--out", str(out), "--quiet"]) == 0
    hist = json.loads((out / "metrics.json").read_text())["runs"][0]["history"]
    assert hist[-1]["train_loss"] < hist[0]["train_loss"]


@pytest.mark.parametrize("spec,expected", [
    ("lowrank:32", ["lowrank:32", "lowrank:32"]),
    ("conv1=diag,conv2=full", ["diag", "full"]),
    ("conv1=block:300", ["block:300", "full"]),  # conv2 unnamed: auto, which picks full
])
def test_train_factor_structure(tmp_path, spec, expected):
    out = tmp_path / "fs"
    assert main(["train", "--optimizers", "kfac", "--epochs", "3", "--device", "cpu", "--out", str(out),
                 "--quiet", "--factor-structure", spec]) == 0
    run = json.loads((out / "metrics.json").read_text())["runs"][0]
    assert [line.split(" A ")[1].split()[1].rstrip(",") for line in run["kfac_layers"]] == expected
    assert run["history"][-1]["train_loss"] < run["history"][0]["train_loss"]


@pytest.mark.parametrize("factoring,expected", [
    (None, ["conv1: gcn, A 1434x1434", "conv2: gcn, A 17x17"]),
    ("aggregated", ["conv1: gcn, A 1434x1434", "conv2: gcn, A 17x17"]),
    ("input", ["conv1.lin: gcn-input, A 1433x1433", "conv2.lin: gcn-input, A 16x16"]),
])
def test_train_gcn_factoring(tmp_path, factoring, expected):
    out = tmp_path / "gf"
    extra = [] if factoring is None else ["--gcn-factoring", factoring]
    assert main(["train", "--optimizers", "kfac", "--epochs", "3", "--device", "cpu", "--out", str(out),
                 "--quiet", *extra]) == 0
    run = json.loads((out / "metrics.json").read_text())["runs"][0]
    assert [" ".join(line.split()[:4]) for line in run["kfac_layers"]] == expected
    assert run["history"][-1]["train_loss"] < run["history"][0]["train_loss"]


def test_python_m_ngcuda_exit_code():
    proc = subprocess.run([sys.executable, "-m", "ngcuda", "train", "--epochs", "-3"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "--epochs" in proc.stderr


# ---------------------------------------------------------------- the pieces behind the commands

def test_node_loss_and_pseudo_labels():
    from ngcuda.train.node import loss_row_weights, node_loss, pseudo_label_weight

    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 3, generator=gen, dtype=torch.float64)
    y = torch.tensor([0, 2, 1, 1, 0, 2])
    train = torch.tensor([True, True, False, False, True, False])
    logp = torch.log_softmax(logits, 1)
    ce_train = -(logp[[0, 1, 4], [0, 2, 0]]).mean()
    pseudo = logits.argmax(1)
    ce_rest = -(logp[[2, 3, 5], pseudo[[2, 3, 5]]]).mean()
    torch.testing.assert_close(node_loss(logits, y, train), ce_train)
    torch.testing.assert_close(node_loss(logits, y, train, 0.25), ce_train + 0.25 * ce_rest)
    assert pseudo_label_weight(50, 200, None) == 0.0
    assert pseudo_label_weight(50, 200, 2.0) == pytest.approx(1 / 16)
    assert loss_row_weights(train).tolist() == [1, 1, 0, 0, 1, 0]
    assert loss_row_weights(train, 0.5).tolist() == [1, 1, 0.5, 0.5, 1, 0.5]
    # the pseudo-label term must not push gradients through the targets
    lg = logits.clone().requires_grad_()
    node_loss(lg, y, train, 1.0).backward()
    assert torch.isfinite(lg.grad).all()


def test_prepare_features_sparse_matches_dense():
    from ngcuda.data import Graph
    from ngcuda.train.node import NodeConfig, prepare_features

    x = torch.tensor([[1.0, 0, 3], [0, 0, 0], [2, 2, 0]])
    g = Graph(x=x, edge_index=torch.empty(2, 0, dtype=torch.long), y=torch.zeros(3, dtype=torch.long),
              train_mask=torch.ones(3, dtype=torch.bool), val_mask=torch.zeros(3, dtype=torch.bool),
              test_mask=torch.zeros(3, dtype=torch.bool), num_classes=1, name="t")
    dense = prepare_features(g, NodeConfig())
    torch.testing.assert_close(dense, torch.tensor([[0.25, 0, 0.75], [0, 0, 0], [0.5, 0.5, 0]]))
    g.x = x.to_sparse_csr()
    torch.testing.assert_close(prepare_features(g, NodeConfig()).to_dense(), dense)
    assert prepare_features(g, NodeConfig(model="sage")).layout == torch.strided
    assert prepare_features(g, NodeConfig(), dense=True).layout == torch.strided
    assert prepare_features(g, NodeConfig(model="deep-gcn")).layout == torch.sparse_csr
    torch.testing.assert_close(prepare_features(g, NodeConfig(normalize_features=False)).to_dense(), x)


def test_best_epoch_and_summary():
    from ngcuda.train.metrics import best_epoch, mean_std, summarise_node_runs

    hist = [
        {"epoch": 1, "val_acc": 0.5, "val_loss": 1.0, "test_acc": 0.4, "train_loss": 2.0, "seconds": 1.0},
        {"epoch": 2, "val_acc": 0.7, "val_loss": 0.9, "test_acc": 0.6, "train_loss": 1.0, "seconds": 2.0},
        {"epoch": 3, "val_acc": 0.7, "val_loss": 0.8, "test_acc": 0.65, "train_loss": 0.5, "seconds": 3.0},
        {"epoch": 4, "val_acc": 0.6, "val_loss": 0.7, "test_acc": 0.9, "train_loss": 0.4, "seconds": 4.0},
    ]
    assert best_epoch(hist)["epoch"] == 3  # tie on val_acc: lower val_loss wins
    assert mean_std([1.0]) == (1.0, 0.0)
    m, s = mean_std([1.0, 3.0])
    assert m == 2.0 and s == pytest.approx(2 ** 0.5)
    runs = [{"optimizer": "a", "seed": 0, "history": hist}, {"optimizer": "a", "seed": 1, "history": hist[:2]}]
    summ = summarise_node_runs(runs)["a"]
    assert summ["test_acc_mean"] == pytest.approx((0.65 + 0.6) / 2)
    assert summ["seconds_per_epoch"] == pytest.approx(1.0)


def test_ae_losses():
    from ngcuda.train.autoencoder import ae_loss, reconstruction_errors

    gen = torch.Generator().manual_seed(0)
    x = torch.rand(5, 784, generator=gen, dtype=torch.float64)
    z = torch.randn(5, 784, generator=gen, dtype=torch.float64)
    p = torch.sigmoid(z)
    ref = -(x * torch.log(p) + (1 - x) * torch.log(1 - p)).sum() / 5
    torch.testing.assert_close(ae_loss(z, x), ref)

    class Fixed(torch.nn.Module):
        def forward(self, inp):
            return z[: inp.shape[0]]

    ce, se = reconstruction_errors(Fixed(), x, batch_size=5)
    assert ce == pytest.approx(float(ref)) and se == pytest.approx(float((p - x).square().sum() / 5))


def test_make_optimizer():
    from ngcuda.train.optimizers import OptimizerConfig, make_optimizer

    model = torch.nn.Linear(3, 2)
    adam = make_optimizer("adam", model, OptimizerConfig(weight_decay=1e-3))
    assert isinstance(adam, torch.optim.Adam) and adam.defaults["lr"] == 0.01
    assert adam.defaults["weight_decay"] == 1e-3
    sgd = make_optimizer("sgd", model, OptimizerConfig(lr=0.3, task="ae"))
    assert isinstance(sgd, torch.optim.SGD) and sgd.defaults["lr"] == 0.3 and sgd.defaults["momentum"] == 0.9
    with pytest.raises(ValueError, match="unknown optimizer"):
        make_optimizer("lbfgs", model, OptimizerConfig())
    assert isinstance(make_optimizer("kfac-adam", model, OptimizerConfig()), ngcuda.KFAC)


def test_best_epoch_by_validation_loss():
    from ngcuda.train.metrics import best_epoch, first_best_val_acc_epoch, summarise_node_runs

    hist = [
        {"epoch": 1, "val_acc": 0.7, "val_loss": 0.9, "test_acc": 0.6, "train_loss": 1.0, "seconds": 1.0},
        {"epoch": 2, "val_acc": 0.6, "val_loss": 0.7, "test_acc": 0.5, "train_loss": 0.5, "seconds": 2.0},
        {"epoch": 3, "val_acc": 0.65, "val_loss": 0.7, "test_acc": 0.55, "train_loss": 0.4, "seconds": 3.0},
        {"epoch": 4, "val_acc": 0.7, "val_loss": 0.8, "test_acc": 0.9, "train_loss": 0.3, "seconds": 4.0},
    ]
    assert best_epoch(hist, "val-acc")["epoch"] == 4  # tie on val_acc: lower val_loss
    assert best_epoch(hist, "val-loss")["epoch"] == 3  # tie on val_loss: higher val_acc
    assert first_best_val_acc_epoch(hist) == 1
    with pytest.raises(ValueError, match="unknown selection"):
        best_epoch(hist, "test-acc")
    s = summarise_node_runs([{"optimizer": "a", "seed": 0, "history": hist}], "val-loss")["a"]
    assert s["test_acc_mean"] == pytest.approx(0.55) and s["best_epoch_mean"] == 3
    assert s["first_best_val_acc_epoch_mean"] == 1


def test_ae_epochs_to_reference():
    from ngcuda.train.metrics import summarise_ae_runs

    def run(name, seed, errs):
        return {"optimizer": name, "seed": seed, "history": [
            {"epoch": i + 1, "train_bce": e, "train_sq_err": e / 10, "test_sq_err": 0.0, "seconds": 2.0 * (i + 1)}
            for i, e in enumerate(errs)]}

    runs = [run("kfac", 0, [50, 30, 20, 10]), run("adam", 0, [60, 50, 40, 30]),
            run("kfac", 1, [50, 45, 44, 43]), run("adam", 1, [60, 50, 45, 40])]
    s = summarise_ae_runs(runs)
    assert s["kfac"]["epochs_to_adam_final_train_bce"] is None  # seed 1 never reaches 40
    assert s["kfac"]["seeds_reaching_adam_final_train_bce"] == 1
    assert s["adam"]["epochs_to_adam_final_train_bce"] == 4
    s = summarise_ae_runs(runs[:2])
    assert s["kfac"]["epochs_to_adam_final_train_bce"] == 2 and s["kfac"]["seconds_to_adam_final_train_bce"] == 4.0
    assert s["kfac"]["epochs_to_adam_final_train_sq_err"] == 2
    assert "epochs_to_adam_final_train_bce" not in summarise_ae_runs(runs[:1])["kfac"]


def test_train_options_reach_the_model_and_optimizer(tmp_path, monkeypatch):
    # --no-input-dropout, --select, --fisher-type, --kl-clip 0 and --threads get where they belong.
    import ngcuda.train.node as node
    import ngcuda.train.optimizers as optimizers

    seen = {}
    real_build, real_make = node.build_gnn, node.make_optimizer

    def build(*a, **k):
        model = real_build(*a, **k)
        seen["model"] = model
        return model

    def make(name, model, cfg, seed=None):
        seen["opt_cfg"] = cfg
        return real_make(name, model, cfg, seed=seed)

    monkeypatch.setattr(node, "build_gnn", build)
    monkeypatch.setattr(node, "make_optimizer", make)
    out = tmp_path / "o"
    n = torch.get_num_threads()
    try:
        assert main(["train", "--optimizers", "kfac-adam", "--epochs", "3",
                     "--device", "cpu", "--no-input-dropout", "--select", "val-loss", "--fisher-type", "empirical",
                     "--kl-clip", "0", "--threads", "1", "--out", str(out), "--quiet"]) == 0
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(n)
    assert seen["model"].input_dropout is False
    assert seen["opt_cfg"].fisher_type == "empirical" and seen["opt_cfg"].kl_clip == 0.0
    payload = json.loads((out / "metrics.json").read_text())
    assert payload["config"]["input_dropout"] is False and payload["config"]["select"] == "val-loss"
    assert payload["selection"].startswith("test accuracy at the epoch of lowest validation loss")
    opt = optimizers.make_optimizer("kfac", torch.nn.Linear(3, 2),
                                    optimizers.OptimizerConfig(fisher_type="empirical", kl_clip=0.0))
    assert opt.fisher_type == "empirical" and opt.param_groups[0]["kl_clip"] == 0.0
    with pytest.raises(SystemExit):
        main(["train", "--fisher-type", "exact"])


def test_per_optimizer_hyperparameters(tmp_path):
    from ngcuda.train.optimizers import OptimizerConfig, make_optimizer, parse_per_optimizer

    assert parse_per_optimizer("0.05", float) == 0.05
    assert parse_per_optimizer("kfac=0.05,kfac-sgd=0.1", float) == {"kfac": 0.05, "kfac-sgd": 0.1}
    assert parse_per_optimizer("0.01, KFAC=0.05", float) == {"*": 0.01, "kfac": 0.05}
    with pytest.raises(ValueError, match="unknown optimizer 'lbfgs'"):
        parse_per_optimizer("lbfgs=1", float)
    with pytest.raises(ValueError, match="given twice"):
        parse_per_optimizer("kfac=1,kfac=2", float)
    cfg = OptimizerConfig(lr={"kfac": 0.05}, weight_decay={"*": 5e-4, "sgd": 0.0}, momentum={"sgd": 0.5},
                          damping={"kfac-adam": 1.0})
    assert cfg.lr_for("kfac") == 0.05 and cfg.lr_for("adam") == 0.01  # the default for the others
    assert cfg.for_optimizer("sgd").weight_decay == 0.0 and cfg.for_optimizer("adam").weight_decay == 5e-4
    assert cfg.for_optimizer("sgd").momentum == 0.5 and cfg.for_optimizer("kfac").momentum == 0.9
    assert cfg.for_optimizer("kfac").damping is None and cfg.for_optimizer("kfac-adam").damping == 1.0
    sgd = make_optimizer("sgd", torch.nn.Linear(3, 2), cfg)
    assert sgd.defaults["momentum"] == 0.5 and sgd.defaults["weight_decay"] == 0.0
    opt = make_optimizer("kfac-adam", torch.nn.Linear(3, 2), cfg)
    assert opt.param_groups[0]["damping"] == 1.0
    with pytest.raises(SystemExit):
        main(["train", "--lr", "kfac=-1"])
    with pytest.raises(SystemExit):
        main(["train", "--fisher-type", "kfac=exact"])
    out = tmp_path / "o"
    assert main(["train", "--optimizers", "adam,sgd", "--epochs", "2", "--device", "cpu", "--lr", "0.01,sgd=0.3",
                 "--weight-decay", "sgd=0", "--out", str(out), "--quiet"]) == 0
    config = json.loads((out / "metrics.json").read_text())["config"]
    assert config["lr"] == {"*": 0.01, "sgd": 0.3} and config["weight_decay"] == {"sgd": 0.0}
