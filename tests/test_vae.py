"""The MNIST VAE: the loss against a hand-computed example, K-FAC's curvature for it, an end-to-end run."""
from __future__ import annotations

import csv
import json
import math

import pytest
import torch
from torch import nn

import ngcuda
from ngcuda.cli import main
from ngcuda.models import VAE
from ngcuda.optim.fisher import probe_term
from ngcuda.train.metrics import summarise_vae_runs, vae_table
from ngcuda.train.vae import elbo_terms, kl_divergence, negative_elbo, vae_errors, vae_train_step

pytestmark = [pytest.mark.filterwarnings("ignore:ngcuda. no compiled:RuntimeWarning"),
              pytest.mark.usefixtures("one_thread")]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


# ------------------------------------------------------------------------------------------ loss
def test_negative_elbo_matches_hand_computed_example():
    # image 1: x = (1, 0), p = σ(ln 3) = 3/4 for both pixels, μ = (1, 0), σ² = (1, 2)
    #   −log p(x|z) = −ln(3/4) − ln(1/4) = ln(16/3);  KL = ½[(1 + 1 − 0 − 1) + (0 + 2 − ln 2 − 1)] = 1 − ½ ln 2
    # image 2: x = (0, 0), p = 1/2, μ = 0, σ² = 1:  −log p = 2 ln 2;  KL = 0
    x = torch.tensor([[1.0, 0.0], [0.0, 0.0]], dtype=torch.float64)
    logits = torch.tensor([[math.log(3), math.log(3)], [0.0, 0.0]], dtype=torch.float64)
    mu = torch.tensor([[1.0, 0.0], [0.0, 0.0]], dtype=torch.float64)
    logvar = torch.tensor([[0.0, math.log(2)], [0.0, 0.0]], dtype=torch.float64)
    recon, kl = elbo_terms(logits, x, mu, logvar)
    torch.testing.assert_close(recon, torch.tensor([math.log(16 / 3), 2 * math.log(2)], dtype=torch.float64))
    torch.testing.assert_close(kl, torch.tensor([1 - 0.5 * math.log(2), 0.0], dtype=torch.float64))
    expected = (math.log(16 / 3) + 1 - 0.5 * math.log(2) + 2 * math.log(2)) / 2
    assert float(negative_elbo(logits, x, mu, logvar)) == pytest.approx(expected, rel=1e-12)


def test_loss_matches_torch_distributions():
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(5, 784, generator=gen, dtype=torch.float64).round()
    logits = torch.randn(5, 784, generator=gen, dtype=torch.float64)
    mu, logvar = torch.randn(2, 5, 7, generator=gen, dtype=torch.float64)
    D = torch.distributions
    ref_recon = -D.Bernoulli(logits=logits).log_prob(x).sum(1)
    ref_kl = D.kl_divergence(D.Normal(mu, (0.5 * logvar).exp()), D.Normal(0.0, 1.0)).sum(1)
    torch.testing.assert_close(kl_divergence(mu, logvar), ref_kl)
    torch.testing.assert_close(negative_elbo(logits, x, mu, logvar), (ref_recon + ref_kl).mean())


def test_model_shapes_and_reparameterisation():
    torch.manual_seed(0)
    model = VAE(latent=5)
    assert [type(m).__name__ for m in model.encoder] == ["Linear", "ReLU", "Linear", "ReLU"]
    assert (model.encoder[0].in_features, model.encoder[2].out_features, model.decoder[-1].out_features) == (
        784, 256, 784)
    x = torch.rand(3, 784)
    eps = torch.randn(3, 5)
    logits, mu, logvar = model(x, eps)
    assert logits.shape == (3, 784) and mu.shape == logvar.shape == (3, 5)
    torch.testing.assert_close(logits, model.decode(mu + (0.5 * logvar).exp() * eps))


def test_evaluation_is_repeatable_and_consistent():
    torch.manual_seed(0)
    model = VAE(latent=4, hidden=(16,), pixels=12)
    x = torch.rand(7, 12).round()
    a, b = vae_errors(model, x, batch_size=3), vae_errors(model, x, batch_size=3)
    assert a == b
    assert a["neg_elbo"] == pytest.approx(a["bce"] + a["kl"])
    assert a["kl"] > 0 and a["sq_err"] > 0


# ------------------------------------------------------------------------------ K-FAC curvature
def test_extra_terms_add_their_hessian_to_G_and_leave_grads_untouched():
    torch.manual_seed(1)
    n = 20000
    model = nn.Sequential(nn.Linear(3, 4)).double()
    x = torch.randn(n, 3, dtype=torch.float64)
    h = torch.tensor([0.5, 1.0, 2.0, 4.0], dtype=torch.float64)
    opt = ngcuda.KFAC(model, kl_clip=None, base_optimizer=torch.optim.SGD(model.parameters(), lr=0.0))
    out = model(x)
    # Gaussian likelihood on out (unit Fisher) plus an extra term ½ Σ h_j out_j²: G ≈ I + diag(h)
    opt.set_outputs(out, likelihood="gaussian", extra_terms=[(out, h)])
    loss = 0.5 * (out.square() * h).sum(1).mean()
    (expected,) = torch.autograd.grad(loss, [model[0].weight], retain_graph=True)
    loss.backward()
    assert torch.equal(model[0].weight.grad, expected)
    opt.step()
    G = opt.state[model[0].weight]["G"]
    assert rel_err(G, torch.eye(4, dtype=torch.float64) + torch.diag(h)) < 0.05


def test_probe_term_checks_its_arguments():
    t = torch.zeros(3, 2, requires_grad=True)
    w = torch.ones(3)
    with pytest.raises(ValueError, match="finite and >= 0"):
        probe_term(t, -1.0, w, None)
    with pytest.raises(ValueError, match="3 rows"):
        probe_term(torch.zeros(4, 2), 1.0, w, None)


@pytest.mark.parametrize("kl_curvature", [True, False])
def test_vae_encoder_fisher_holds_the_kl_curvature(kl_curvature):
    """With a decoder that ignores z, no likelihood gradient reaches the encoder: the heads' G must be
    exactly the KL Hessian (μ: I, log σ²: diag(σ²/2)) with the KL curvature, and zero without it."""
    torch.manual_seed(0)
    model = VAE(latent=3, hidden=(8,), pixels=10).double()
    nn.init.zeros_(model.decoder[0].weight)
    opt = ngcuda.KFAC(model, kl_clip=None, seed=3, base_optimizer=torch.optim.SGD(model.parameters(), lr=0.0))
    x = torch.rand(8000, 10, dtype=torch.float64).round()
    with torch.no_grad():
        _, logvar = model.encode(x)
    vae_train_step(model, opt, x, kl_curvature=kl_curvature)
    G_mu, G_lv = (opt.state[m.weight]["G"] for m in (model.mu, model.logvar))
    if kl_curvature:
        assert rel_err(G_mu, torch.eye(3, dtype=torch.float64)) < 0.06
        assert rel_err(G_lv, torch.diag(0.5 * logvar.exp().mean(0))) < 0.06
        # both heads share one input: equal A; the shared layer gets a G from both
        torch.testing.assert_close(opt.state[model.mu.weight]["A"], opt.state[model.logvar.weight]["A"])
        assert float(opt.state[model.encoder[0].weight]["G"].trace()) > 0
    else:
        assert float(G_mu.abs().max()) == 0.0 and float(G_lv.abs().max()) == 0.0
    # the decoder's last layer always has the Bernoulli Fisher: diag(E[p(1−p)]) in expectation
    assert float(opt.state[model.decoder[-1].weight]["G"].trace()) > 0


# ------------------------------------------------------------------------------------ summaries
def test_vae_summary_budget_and_epochs_to_reference():
    def run(name, bces, secs):
        hist = [{"epoch": i + 1, "seconds": s, **{f"{p}_{k}": b for p in ("train", "test")
                                                 for k in ("neg_elbo", "bce", "sq_err", "kl")}}
                for i, (b, s) in enumerate(zip(bces, secs))]
        return {"optimizer": name, "seed": 0, "history": hist}

    runs = [run("adam", [200, 150, 120, 100], [1, 2, 3, 4]), run("kfac", [130, 95, 90, 80], [3, 6, 9, 12])]
    s = summarise_vae_runs(runs)
    assert s["adam"]["budget_seconds"] == 4
    assert s["kfac"]["epochs_to_reference"] == {"epoch": 2, "seconds": 6}
    assert s["adam"]["epochs_to_reference"]["epoch"] == 4
    assert s["kfac"]["at_budget"]["epoch"] == 1 and s["kfac"]["at_budget"]["test_bce"] == 130
    assert summarise_vae_runs(runs, budget_seconds=0.5)["adam"]["at_budget"] is None
    # the printed table says what its '-' cells mean
    table = vae_table(summarise_vae_runs(runs, budget_seconds=0.5))
    assert "'-': none was" in table and "adam's final test CE" in table
    assert "adam, the reference, was not among" in vae_table(summarise_vae_runs(runs[1:]))


# ----------------------------------------------------------------------------------- end to end
def test_train_vae_end_to_end(tmp_path, capsys):
    out = tmp_path / "vae"
    # 4 epochs of 4 steps (K-FAC: train -ELBO 300 -> 204); with 3 of 3 its last epoch was only ~1 below its first
    assert main(["train-vae", "--optimizers", "kfac,adam", "--epochs", "4", "--train-size", "400",
                 "--batch-size", "100", "--latent", "4", "--device", "cpu", "--out", str(out), "--quiet"]) == 0
    assert "test -ELBO" in capsys.readouterr().out
    payload = json.loads((out / "metrics.json").read_text())
    assert [r["optimizer"] for r in payload["runs"]] == ["kfac", "adam"]
    for r in payload["runs"]:
        hist = r["history"]
        assert hist[-1]["train_neg_elbo"] < hist[0]["train_neg_elbo"]
        assert hist[-1]["test_neg_elbo"] < hist[0]["test_neg_elbo"]
        assert hist[-1]["test_neg_elbo"] == pytest.approx(hist[-1]["test_bce"] + hist[-1]["test_kl"])
    rows = list(csv.DictReader(open(out / "metrics.csv")))
    assert len(rows) == 8 and {"test_neg_elbo", "test_sq_err", "test_kl", "seconds"} <= set(rows[0])
    for name in ("curves.png", "grid-kfac.png", "grid-adam.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_train_vae_argument_and_data_errors(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["train-vae", "--latent", "0"])
    assert e.value.code == 2 and "positive integer" in capsys.readouterr().err
    assert main(["train-vae", "--data-root", str(tmp_path), "--optimizers", "adam", "--quiet",
                 "--out", str(tmp_path / "o")]) == 1
    assert "ngcuda train-vae: error" in capsys.readouterr().err and not (tmp_path / "o").exists()


def test_vae_kfac_defaults_and_overrides():
    from ngcuda.train.optimizers import KFAC_DEFAULTS, OptimizerConfig, make_optimizer

    model = VAE(latent=2, hidden=(4,), pixels=6)
    kfac = make_optimizer("kfac", model, OptimizerConfig(task="vae"))
    group = kfac.param_groups[0]
    assert (group["momentum"], group["damping"], group["kl_clip"]) == (
        KFAC_DEFAULTS["vae"]["momentum"], KFAC_DEFAULTS["vae"]["damping"], KFAC_DEFAULTS["vae"]["kl_clip"])
    mine = make_optimizer("kfac", model, OptimizerConfig(task="vae", momentum=0.5, kl_clip=1e-3))
    assert (mine.param_groups[0]["momentum"], mine.param_groups[0]["kl_clip"]) == (0.5, 1e-3)
    gnn = make_optimizer("kfac", model, OptimizerConfig(task="gnn"))  # a task without KFAC_DEFAULTS
    assert gnn.param_groups[0]["momentum"] == 0.9 and gnn.param_groups[0]["kl_clip"] == 1e-3
    # a per-optimizer list that does not name kfac leaves kfac at the task's default, sgd at 0.9
    cfg = OptimizerConfig(task="vae", momentum={"kfac-sgd": 0.5})
    assert [cfg.for_optimizer(n).momentum for n in ("kfac", "kfac-sgd", "sgd")] == [0.0, 0.5, 0.9]
    assert OptimizerConfig(task="vae", kl_clip={"kfac": 0.0}).for_optimizer("kfac").kfac_option("kl_clip") == 0.0
    assert OptimizerConfig(task="vae").for_optimizer("kfac-adam").kfac_option("kl_clip") == 0.1
