"""The training commands' optimizer step: a closure for K-FAC's damping adaptation that repeats the
step's dropout masks and pseudo-labels, and the --adaptive-damping / --ekfac flags."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

pytest.importorskip("torch_geometric")

import ngcuda  # noqa: E402
from ngcuda.cli import main  # noqa: E402
from ngcuda.models import build_gnn  # noqa: E402
from ngcuda.train.node import node_loss, step_loss, train_step  # noqa: E402
from ngcuda.train.step import optimizer_step  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


class TwiceEvaluating(torch.optim.SGD):
    """Evaluates the closure twice, as K-FAC does on a damping-adaptation step, without moving."""

    adaptive_damping = True

    def __init__(self, params) -> None:
        super().__init__(params, lr=0.0)
        self.losses: list[float] = []

    def step(self, closure=None):
        loss = closure()
        self.losses.append(float(loss.detach()))
        self.losses.append(float(closure().detach()))
        return loss


def _dropout_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 32), nn.ReLU(), nn.Dropout(0.5), nn.Linear(32, 3))


def test_reevaluation_repeats_the_dropout_mask_and_leaves_the_stream_where_one_pass_does():
    net = _dropout_net()
    x, y = torch.randn(64, 6, dtype=torch.float32), torch.randint(0, 3, (64,))
    forward = lambda: F.cross_entropy(net(x), y)  # noqa: E731

    torch.manual_seed(7)
    plain = optimizer_step(torch.optim.SGD(net.parameters(), lr=0.0), forward)
    next_plain = torch.rand(4)

    opt = TwiceEvaluating(net.parameters())
    torch.manual_seed(7)
    loss = optimizer_step(opt, forward)
    next_twice = torch.rand(4)
    assert loss == plain and opt.losses == [plain, plain]
    torch.testing.assert_close(next_twice, next_plain, rtol=0, atol=0)
    # the check has teeth: two draws of the dropout mask give two different losses
    assert float(forward().detach()) != float(forward().detach())


def test_step_loss_keeps_the_first_calls_pseudo_labels():
    gen = torch.Generator().manual_seed(1)
    first = torch.randn(10, 4, generator=gen, dtype=torch.float64)
    second = torch.randn(10, 4, generator=gen, dtype=torch.float64)
    assert not torch.equal(first.argmax(1), second.argmax(1))
    y = torch.randint(0, 4, (10,), generator=gen)
    train = torch.zeros(10, dtype=torch.bool)
    train[:3] = True
    loss = step_loss(y, train, 0.5)
    torch.testing.assert_close(loss(first), node_loss(first, y, train, 0.5))
    kept = node_loss(second, y, train, 0.5, pseudo=first.argmax(1))
    torch.testing.assert_close(loss(second), kept)
    assert not torch.allclose(kept, node_loss(second, y, train, 0.5))
    # without pseudo-labels there is nothing to keep
    torch.testing.assert_close(step_loss(y, train)(second), node_loss(second, y, train))


def test_damping_adaptation_under_dropout_sees_a_trustworthy_model():
    # Tiny steps under a large damping: the quadratic model predicts the loss change (ρ ≈ 1) only
    # if both evaluations use the same dropout mask; with fresh masks ρ is noise.
    n, f, c = 40, 12, 3
    gen = torch.Generator().manual_seed(3)
    x = torch.rand(n, f, generator=gen).round()
    ei = torch.randint(0, n, (2, 160), generator=gen)
    y = torch.randint(0, c, (n,), generator=gen)
    mask = torch.zeros(n, dtype=torch.bool)
    mask[:20] = True
    torch.manual_seed(0)
    model = build_gnn("gcn", f, c, hidden=8, dropout=0.5)
    opt = ngcuda.KFAC(model, lr=0.05, damping=10.0, kl_clip=None, fisher_type="empirical",
                      adaptive_damping=True, lm=ngcuda.optim.LMConfig(interval=1))
    rhos = []
    for _ in range(4):
        train_step(model, opt, x, ei, step_loss(y, mask, 0.3), mask.float())
        rhos.append(opt.last_rho)
    assert all(0.75 < r < 1.25 for r in rhos), rhos
    assert opt.param_groups[0]["damping"] == pytest.approx(10.0 * (19 / 20) ** 4)


@pytest.mark.parametrize("command", ["train", "train-ae", "train-vae"])
def test_adaptive_damping_and_ekfac_flags_reach_kfac(tmp_path, monkeypatch, command):
    import ngcuda.train.autoencoder as autoencoder
    import ngcuda.train.node as node
    import ngcuda.train.vae as vae

    module = {"train": node, "train-ae": autoencoder, "train-vae": vae}[command]
    made = []
    real_make = module.make_optimizer

    def make(name, model, cfg, seed=None):
        made.append(real_make(name, model, cfg, seed=seed))
        return made[-1]

    monkeypatch.setattr(module, "make_optimizer", make)
    out = tmp_path / command
    extra = [] if command == "train" else ["--train-size", "300", "--batch-size", "100"]
    epochs = "10" if command == "train" else "4"
    assert main([command, "--optimizers", "kfac,kfac-adam,adam", "--epochs", epochs, "--device", "cpu",
                 "--adaptive-damping", "--ekfac", "--out", str(out), "--quiet", *extra]) == 0
    kfacs = [o for o in made if isinstance(o, ngcuda.KFAC)]
    assert len(kfacs) == 2 and all(o.adaptive_damping and o.ekfac for o in kfacs)
    assert all(hasattr(o, "last_rho") for o in kfacs)  # the closure reached step()
    loss = {"train": "train_loss", "train-ae": "train_bce", "train-vae": "train_neg_elbo"}[command]
    for run in json.loads((out / "metrics.json").read_text())["runs"]:
        assert run["history"][-1][loss] < run["history"][0][loss], run["optimizer"]


def test_fisher_row_weights():
    from ngcuda.train.node import fisher_row_weights, loss_row_weights

    train = torch.tensor([True, False, True, False, False])
    torch.testing.assert_close(fisher_row_weights(train, 0.25, "loss"), loss_row_weights(train, 0.25))
    torch.testing.assert_close(fisher_row_weights(train, 0.25, "loss"),
                               torch.tensor([1.0, 0.25, 1.0, 0.25, 0.25]))
    torch.testing.assert_close(fisher_row_weights(train, 0.25, "all"), torch.ones(5))
    torch.testing.assert_close(fisher_row_weights(train, 0.0, "all"), torch.ones(5))


@pytest.mark.parametrize("fisher_nodes", ["loss", "all"])
def test_fisher_nodes_reach_kfac_set_outputs(tmp_path, monkeypatch, fisher_nodes):
    import ngcuda.train.node as node

    masks: list[torch.Tensor] = []
    real_set_outputs = ngcuda.KFAC.set_outputs

    def set_outputs(self, outputs, *args, mask=None, **kwargs):
        masks.append(mask.clone())
        return real_set_outputs(self, outputs, *args, mask=mask, **kwargs)

    monkeypatch.setattr(ngcuda.KFAC, "set_outputs", set_outputs)
    out = tmp_path / fisher_nodes
    assert main(["train", "--optimizers", "kfac,adam", "--epochs", "4", "--device", "cpu", "--quiet",
                 "--pseudo-label-gamma", "1", "--fisher-nodes", fisher_nodes, "--out", str(out)]) == 0
    from ngcuda.data import load_graph

    graph = load_graph("cora", None, "public")
    n, train = graph.num_nodes, graph.train_mask
    assert len(masks) == 4 and all(m.shape == (n,) for m in masks)
    for epoch, m in enumerate(masks, start=1):
        expected = torch.ones(n) if fisher_nodes == "all" else node.loss_row_weights(train, epoch / 4)
        torch.testing.assert_close(m, expected)
    assert [r["optimizer"] for r in json.loads((out / "metrics.json").read_text())["runs"]] == ["kfac", "adam"]


def test_fisher_nodes_all_changes_the_output_factor_and_rejects_the_empirical_fisher():
    import ngcuda.train.node as node
    from ngcuda.data import load_graph
    from ngcuda.train import NodeConfig, OptimizerConfig, train_node_classifier

    graph = load_graph("cora", None, "public")
    opt = OptimizerConfig(task="gnn", factor_structure="full")
    factors = {}
    real_make = node.make_optimizer
    for nodes in ("loss", "all"):
        made = []
        node.make_optimizer = lambda *a, **k: made.append(real_make(*a, **k)) or made[-1]
        try:
            train_node_classifier(graph, "kfac", 0, NodeConfig(epochs=1, fisher_nodes=nodes), opt,
                                  torch.device("cpu"))
        finally:
            node.make_optimizer = real_make
        factors[nodes] = [st["G"].clone() for st in made[0].state.values() if "G" in st]
    assert len(factors["loss"]) == 2
    # with 140 labelled of 2708 nodes, averaging over all of them moves G far beyond rounding
    assert all(rel := [float((a - b).norm() / a.norm()) for a, b in zip(factors["loss"], factors["all"])]), rel
    assert min(rel) > 1e-2, rel
    with pytest.raises(ValueError, match="true Fisher"):
        train_node_classifier(graph, "kfac-adam", 0, NodeConfig(epochs=1, fisher_nodes="all"),
                              OptimizerConfig(task="gnn", fisher_type="empirical"), torch.device("cpu"))
    with pytest.raises(ValueError, match="fisher_nodes must be one of"):
        train_node_classifier(graph, "kfac", 0, NodeConfig(epochs=1, fisher_nodes="some"), opt,
                              torch.device("cpu"))
