"""ngcuda.KFAC robustness: hyperparameter checks, frozen parameters, empty batches, EKFAC scales,
gradient accumulation, base-optimizer weight decay, checkpoints."""
from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import ngcuda
from ngcuda.optim import KFACWarning

pytestmark = pytest.mark.filterwarnings("ignore:ngcuda. no compiled:RuntimeWarning")


def mlp(seed: int = 0, dtype: torch.dtype = torch.float64) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).to(dtype)


def data(n: int = 12, seed: int = 1, dtype: torch.dtype = torch.float64):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 4, generator=g, dtype=dtype), torch.randint(0, 3, (n,), generator=g)


def kfac_step(model: nn.Module, opt: ngcuda.KFAC, x: torch.Tensor, y: torch.Tensor,
              mask: torch.Tensor | None = None) -> None:
    opt.zero_grad()
    out = model(x)
    opt.set_outputs(out, mask=mask)
    sel = out if mask is None else out[mask]
    F.cross_entropy(sel, y if mask is None else y[mask], reduction="sum").div(max(1, len(sel))
                                                                              ).backward()
    opt.step()


def dense_kfac_solve(A: torch.Tensor, G: torch.Tensor, g: torch.Tensor, damping: float):
    """(A⊗G + γI)⁻¹ vec(g), column-major vec, solved densely: a [d_out, d_a] matrix."""
    K = torch.kron(A, G) + damping * torch.eye(A.shape[0] * G.shape[0], dtype=A.dtype)
    return torch.linalg.solve(K, g.T.reshape(-1)).reshape(A.shape[0], G.shape[0]).T


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


# ------------------------------------------------------------------------- 1. damping > 0
def test_zero_damping_is_refused():
    with pytest.raises(ValueError, match="damping"):
        ngcuda.KFAC(mlp(), damping=0.0)


def test_callable_damping_is_checked_at_each_step():
    model = mlp()
    opt = ngcuda.KFAC(model, damping=lambda t: 0.1 if t < 2 else 0.0)
    x, y = data()
    kfac_step(model, opt, x, y)
    kfac_step(model, opt, x, y)
    with pytest.raises(ValueError, match="damping at step 2"):
        kfac_step(model, opt, x, y)


def test_non_finite_preconditioned_update_is_skipped_like_a_non_finite_gradient():
    # Finite float32 gradients of ~1e37 over λ_G·λ_A + γ ~ 1e-6 overflow (NaN weights before).
    model = mlp(dtype=torch.float32)
    opt = ngcuda.KFAC(model, lr=0.1, damping=1e-6, momentum=0.9, kl_clip=None)
    x, y = data(dtype=torch.float32)
    before = [p.detach().clone() for p in model.parameters()]
    opt.zero_grad()
    out = model(x)
    opt.set_outputs(out)
    (F.cross_entropy(out, y) * 1e38).backward()
    assert all(bool(torch.isfinite(p.grad).all()) for p in model.parameters())
    with pytest.warns(KFACWarning, match="non-finite preconditioned update"):
        opt.step()
    for p, q in zip(model.parameters(), before):
        assert torch.equal(p.detach(), q)
        assert "momentum_buffer" not in opt.state[p]
    kfac_step(model, opt, x, y)  # a normal step afterwards trains as usual
    assert all(bool(torch.isfinite(p).all()) for p in model.parameters())
    assert not torch.equal(model[0].weight.detach(), before[0])


# ------------------------------------------------------------------------- 2. frozen bias
class AddConstant(nn.Module):
    def __init__(self, c: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("c", c.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.c


def _lm_run(model: nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int = 3) -> ngcuda.KFAC:
    opt = ngcuda.KFAC(model, lr=0.5, damping=0.1, weight_decay=0.1, kl_clip=None,
                      adaptive_damping=True, lm=ngcuda.optim.LMConfig(interval=1))

    def closure():
        opt.zero_grad()
        out = model(x)
        opt.set_outputs(out)
        loss = F.cross_entropy(out, y)
        loss.backward()
        return loss

    for _ in range(steps):
        opt.step(closure)
    return opt


def test_frozen_linear_bias_is_a_constant_not_a_preconditioned_column():
    x, y = data()
    frozen = mlp()
    frozen[2].bias.requires_grad_(False)
    with torch.no_grad():
        frozen[2].bias.copy_(torch.tensor([0.5, -1.0, 2.0]))
    # the same function: a bias-free Linear followed by the same constant
    ref = nn.Sequential(frozen[0], frozen[1], nn.Linear(5, 3, bias=False),
                        AddConstant(frozen[2].bias))
    ref = copy.deepcopy(ref)
    with torch.no_grad():
        ref[2].weight.copy_(frozen[2].weight)
    ref.double()
    opt = _lm_run(frozen, x, y)
    ref_opt = _lm_run(ref, x, y)
    assert [i.a_size for i in opt.layers()] == [5, 5]
    assert torch.equal(frozen[2].bias, torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64))
    assert opt.param_groups[0]["damping"] == pytest.approx(ref_opt.param_groups[0]["damping"])
    for p, q in ((frozen[0].weight, ref[0].weight), (frozen[0].bias, ref[0].bias),
                 (frozen[2].weight, ref[2].weight)):
        assert torch.allclose(p, q, rtol=1e-10, atol=1e-12)


def test_frozen_gcn_bias_is_a_constant():
    pytest.importorskip("torch_geometric")
    from torch_geometric.nn import GCNConv

    torch.manual_seed(3)
    n = 8
    x = torch.randn(n, 4, dtype=torch.float64)
    ei = torch.randint(0, n, (2, 20))
    y = torch.randint(0, 3, (n,))
    conv = GCNConv(4, 3).double()
    with torch.no_grad():
        conv.bias.copy_(torch.tensor([0.3, -0.2, 1.0]))
    conv.bias.requires_grad_(False)
    ref = GCNConv(4, 3, bias=False).double()
    with torch.no_grad():
        ref.lin.weight.copy_(conv.lin.weight)
    const = conv.bias.detach().clone()

    def run(module, add):
        opt = ngcuda.KFAC(module, lr=0.5, damping=0.1, weight_decay=0.1, kl_clip=None)
        for _ in range(2):
            opt.zero_grad()
            out = module(x, ei) + add
            opt.set_outputs(out)
            F.cross_entropy(out, y).backward()
            opt.step()
        return opt

    opt = run(conv, 0.0)
    run(ref, const)
    assert [i.a_size for i in opt.layers()] == [4]
    assert torch.allclose(conv.lin.weight, ref.lin.weight, rtol=1e-10, atol=1e-12)


def test_frozen_weight_leaves_its_bias_to_the_plain_update():
    x, y = data()
    model = mlp()
    model[2].weight.requires_grad_(False)
    with pytest.warns(KFACWarning, match=r"2\.bias \(its layer's weight is frozen\)"):
        opt = ngcuda.KFAC(model, lr=0.5, weight_decay=0.1, kl_clip=None)
    assert [i.name for i in opt.layers()] == ["0"]
    b0, w0 = model[2].bias.detach().clone(), model[2].weight.detach().clone()
    opt.zero_grad()
    out = model(x)
    opt.set_outputs(out)
    F.cross_entropy(out, y).backward()
    expected = b0 - 0.5 * (model[2].bias.grad + 0.1 * b0)
    opt.step()
    assert torch.allclose(model[2].bias, expected, rtol=1e-12)
    assert torch.equal(model[2].weight, w0)


# ------------------------------------------------------------------------- 3. empty batches
def _factors(opt: ngcuda.KFAC, model: nn.Module) -> list[torch.Tensor]:
    return [opt.state[m.weight][k].clone() for m in (model[0], model[2]) for k in ("A", "G")]


@pytest.mark.parametrize("fisher_type", ["true", "empirical"])
def test_all_false_mask_adds_no_statistics_and_still_steps(fisher_type):
    model = mlp()
    opt = ngcuda.KFAC(model, lr=0.1, weight_decay=0.1, fisher_type=fisher_type, inverse_every=1)
    x, y = data()
    none = torch.zeros(len(x), dtype=torch.bool)
    w0 = model[0].weight.detach().clone()
    kfac_step(model, opt, x, y, mask=none)  # no factors yet: the plain (decay-only) update
    assert "A" not in opt.state[model[0].weight]
    assert torch.allclose(model[0].weight, w0 * (1 - 0.1 * 0.1), rtol=1e-12)
    kfac_step(model, opt, x, y)
    before, w1 = _factors(opt, model), model[0].weight.detach().clone()
    kfac_step(model, opt, x, y, mask=none)  # preconditioned with the existing factors
    for a, b in zip(_factors(opt, model), before):
        assert torch.equal(a, b)
    assert not torch.equal(model[0].weight, w1)
    assert all(bool(torch.isfinite(p).all()) for p in model.parameters())


@pytest.mark.parametrize("fisher_type", ["true", "empirical"])
def test_empty_batch_adds_no_statistics(fisher_type):
    model = mlp()
    opt = ngcuda.KFAC(model, lr=0.1, fisher_type=fisher_type)
    x, y = data()
    kfac_step(model, opt, x, y)
    before = _factors(opt, model)
    for set_outputs in (True, False):
        opt.zero_grad()
        out = model(x[:0])
        if set_outputs:
            opt.set_outputs(out)
        F.cross_entropy(out, y[:0], reduction="sum").backward()
        opt.step()
    for a, b in zip(_factors(opt, model), before):
        assert torch.equal(a, b)


@pytest.mark.parametrize("likelihood", ["categorical", "gaussian", "bernoulli"])
def test_sampled_nll_of_no_rows_is_zero(likelihood):
    from ngcuda.optim.fisher import sampled_nll

    out = torch.randn(5, 3, requires_grad=True)
    loss = sampled_nll(out, likelihood, torch.zeros(5, dtype=torch.bool), torch.Generator())
    assert float(loss.detach()) == 0.0


# ------------------------------------------------------------------------- 4. EKFAC scales
def _block(lin: nn.Linear, what: str) -> torch.Tensor:
    w, b = (lin.weight.grad, lin.bias.grad) if what == "grad" else (lin.weight, lin.bias)
    return torch.cat([w, b[:, None]], 1).detach().clone()


def test_ekfac_scales_of_an_older_basis_are_not_used_with_a_new_one():
    # factor_every=2, inverse_every=5: the scales are re-estimated at step 4, the eigenbasis
    # changes at step 5 (without new rows): step 5 must fall back to the K-FAC eigenvalues.
    model = mlp()
    lr, damping = 0.1, 0.3
    opt = ngcuda.KFAC(model, lr=lr, damping=damping, ekfac=True, factor_every=2, inverse_every=5,
                      kl_clip=None, fisher_type="empirical")
    x, y = data()
    for _ in range(5):
        kfac_step(model, opt, x, y)
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    lins = (model[0], model[2])
    grads, params = [_block(m, "grad") for m in lins], [_block(m, "param") for m in lins]
    st = [opt.state[m.weight] for m in lins]
    assert st[0]["S_step"] == 4
    opt.step()
    for m, s, g, p in zip(lins, st, grads, params):
        assert s["basis_step"] == 5
        expected = dense_kfac_solve(s["A"], s["G"], g, damping)
        assert rel_err((p - _block(m, "param")) / lr, expected) <= 1e-8
    kfac_step(model, opt, x, y)  # new rows at step 6: scales in the new basis again
    assert st[0]["S_step"] == 6 and st[0]["basis_step"] == 5


# ------------------------------------------------------------------------- 5. accumulation
def _accumulate(model: nn.Module, opt: ngcuda.KFAC, x: torch.Tensor, y: torch.Tensor, k: int,
                set_outputs: bool) -> list[torch.Tensor]:
    """k forward/backward passes of loss/k (the full batch's mean gradient), then one step;
    returns the output logits of each micro-batch."""
    opt.zero_grad()
    outs = []
    for xb, yb in zip(x.chunk(k), y.chunk(k)):
        out = model(xb)
        if set_outputs:
            opt.set_outputs(out)
        (F.cross_entropy(out, yb) / k).backward()
        outs.append(out.detach())
    opt.step()
    return outs


@pytest.mark.parametrize("set_outputs", [True, False])
def test_accumulated_micro_batches_give_the_full_batch_empirical_factors(set_outputs):
    x, y = data(n=16)
    full, acc = mlp(), mlp()
    kw = dict(lr=0.1, fisher_type="empirical", kl_clip=None, inverse_every=1)
    full_opt, acc_opt = ngcuda.KFAC(full, **kw), ngcuda.KFAC(acc, **kw)
    for _ in range(2):
        _accumulate(full, full_opt, x, y, 1, set_outputs)
        _accumulate(acc, acc_opt, x, y, 4, set_outputs)
    for m, n in ((full[0], acc[0]), (full[2], acc[2])):
        for key in ("A", "G"):
            torch.testing.assert_close(acc_opt.state[n.weight][key], full_opt.state[m.weight][key],
                                       rtol=1e-8, atol=0)
    for p, q in zip(full.parameters(), acc.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-8, atol=1e-12)


def test_accumulated_micro_batches_give_the_true_fisher_over_all_their_rows():
    x, y = data(n=16)
    model = mlp()
    opt = ngcuda.KFAC(model, lr=0.1, seed=5)
    outs = _accumulate(model, opt, x, y, 4, set_outputs=True)
    gen = torch.Generator().manual_seed(5)  # replay the sampled targets
    rows = []
    for z in outs:
        target = torch.multinomial(torch.softmax(z.float(), 1), 1, generator=gen).flatten()
        rows.append(torch.softmax(z, 1) - F.one_hot(target, 3).double())
    g = torch.cat(rows)
    torch.testing.assert_close(opt.state[model[2].weight]["G"], g.T @ g / 16, rtol=1e-8, atol=0)


# ------------------------------------------------------------------------- 6. base optimizer
class Scaled(nn.Module):
    """An MLP times a learnt scale: the scale belongs to no supported layer (plain update)."""

    def __init__(self) -> None:
        super().__init__()
        self.net = mlp()
        self.scale = nn.Parameter(torch.tensor([1.5], dtype=torch.float64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x) * self.scale


@pytest.mark.parametrize("base", [None, "sgd"])
def test_weight_decay_is_an_l2_penalty_on_every_parameter_with_or_without_base(base):
    x, y = data()
    model = Scaled()
    lr, wd = 0.1, 0.2
    base_opt = None if base is None else torch.optim.SGD(model.parameters(), lr=lr)
    with pytest.warns(KFACWarning, match="scale"):
        opt = ngcuda.KFAC(model, lr=lr, weight_decay=wd, kl_clip=None, base_optimizer=base_opt)
    s0 = model.scale.detach().clone()
    opt.zero_grad()
    out = model(x)
    opt.set_outputs(out)
    F.cross_entropy(out, y).backward()
    expected = s0 - lr * (model.scale.grad + wd * s0)
    opt.step()
    torch.testing.assert_close(model.scale.detach(), expected, rtol=1e-12, atol=0)


# ------------------------------------------------------------------------- 7. checkpoints
def test_state_dict_right_after_loading_keeps_the_sampling_state():
    x, y = data()

    def make() -> tuple[nn.Module, ngcuda.KFAC]:
        model = mlp()
        return model, ngcuda.KFAC(model, lr=0.1, momentum=0.9, inverse_every=2, seed=3)

    full, full_opt = make()
    for _ in range(6):
        kfac_step(full, full_opt, x, y)

    first, first_opt = make()
    for _ in range(3):
        kfac_step(first, first_opt, x, y)
    saved = first_opt.state_dict()
    hop, hop_opt = make()
    hop_opt.load_state_dict(saved)
    resaved = hop_opt.state_dict()  # before any step samples
    assert set(resaved["kfac"]["generators"]) == {"cpu"}
    assert torch.equal(resaved["kfac"]["generators"]["cpu"], saved["kfac"]["generators"]["cpu"])

    resumed, resumed_opt = make()
    resumed.load_state_dict(first.state_dict())
    resumed_opt.load_state_dict(resaved)
    for _ in range(3):
        kfac_step(resumed, resumed_opt, x, y)
    for p, q in zip(full.parameters(), resumed.parameters()):
        assert torch.equal(p, q)


# ------------------------------------------------------------------------- 8. validation
@pytest.mark.parametrize("kwargs, match", [
    (dict(kl_clip=-1e-3), "kl_clip"),
    (dict(factor_decay=True), "factor_decay"),
    (dict(lr=True), "lr"),
    (dict(factor_every=True), "factor_every"),
])
def test_bad_hyperparameters_are_refused_at_construction(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ngcuda.KFAC(mlp(), **kwargs)


@pytest.mark.parametrize("kwargs, match", [
    (dict(interval=0), "interval"),
    (dict(interval=2.5), "interval"),
    (dict(omega=1.0), "omega"),
    (dict(omega=1.5), "omega"),
    (dict(omega=0.0), "omega"),
    (dict(min_damping=0.0), "min_damping"),
    (dict(min_damping=1.0, max_damping=0.5), "max_damping"),
])
def test_bad_lm_settings_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ngcuda.optim.LMConfig(**kwargs)


@pytest.mark.parametrize("name, bad", [
    ("lr", -0.1), ("lr", float("nan")), ("momentum", -1.0), ("weight_decay", float("inf")),
    ("kl_clip", -1e-3), ("factor_decay", 1.5), ("factor_every", 0), ("inverse_every", 0),
])
def test_callable_hyperparameters_are_checked_at_each_step(name, bad):
    model = mlp()
    x, y = data()
    with pytest.raises(ValueError, match=f"{name} at step 0"):
        kfac_step(model, ngcuda.KFAC(model, **{name: lambda t: bad}), x, y)


# ------------------------------------------------------------------------- 10. loading
def _trained(model: nn.Module, **kw) -> ngcuda.KFAC:
    opt = ngcuda.KFAC(model, lr=0.1, momentum=0.9, **kw)
    x, y = data(dtype=next(model.parameters()).dtype)
    for _ in range(2):
        kfac_step(model, opt, x, y)
    return opt


@pytest.mark.parametrize("structure", ["full", "diag", "lowrank:2", "block:2"])
def test_loading_factors_of_other_layer_sizes_names_the_layer(structure):
    saved = _trained(mlp(), factor_structure=structure).state_dict()
    torch.manual_seed(0)
    wider = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    opt = _trained(wider, factor_structure=structure)
    before = opt.state_dict()
    with pytest.raises(ValueError, match="layer '0'.*G has size"):
        opt.load_state_dict(saved)
    after = opt.state_dict()  # left as it was
    assert after["kfac"]["step"] == before["kfac"]["step"]
    for i, st in before["state"].items():
        for k, v in st.items():
            if isinstance(v, torch.Tensor):
                assert torch.equal(after["state"][i][k], v)
    kfac_step(wider, opt, *data())


def test_loading_factors_of_other_input_sizes_names_the_layer():
    saved = _trained(mlp()).state_dict()
    torch.manual_seed(0)
    other = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3, bias=False),
                          nn.Linear(3, 3, bias=False)).double()  # 4 parameters, as saved
    opt = ngcuda.KFAC(other)
    with pytest.raises(ValueError, match="layer '2'.*A has size 6"):
        opt.load_state_dict(saved)


def test_loading_a_state_of_differently_named_layers_is_refused():
    from collections import OrderedDict

    saved = _trained(mlp()).state_dict()
    torch.manual_seed(0)
    renamed = nn.Sequential(OrderedDict(inp=nn.Linear(4, 5), act=nn.Tanh(),
                                        out=nn.Linear(5, 3))).double()
    with pytest.raises(ValueError, match="saved for layer.*0, 2.*registered: inp, out"):
        ngcuda.KFAC(renamed).load_state_dict(saved)


# ------------------------------------------------------------------------- tied weights, hooks
class Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 4)
        self.b.weight = self.a.weight
        self.out = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.b(torch.tanh(self.a(x)))))


def test_tied_weights_are_left_to_the_plain_update():
    model = Tied().double()
    with pytest.warns(KFACWarning, match="a, b share parameters"):
        opt = ngcuda.KFAC(model, lr=0.1, kl_clip=None)
    assert [i.name for i in opt.layers()] == ["out"]
    x, y = data()
    w0 = model.a.weight.detach().clone()
    opt.zero_grad()
    out = model(x)
    opt.set_outputs(out)
    F.cross_entropy(out, y).backward()
    expected = w0 - 0.1 * model.a.weight.grad
    opt.step()
    torch.testing.assert_close(model.a.weight.detach(), expected, rtol=1e-12, atol=0)
    assert "A" not in opt.state[model.a.weight]


def test_a_module_used_twice_is_one_layer_not_tied_weights():
    lin = nn.Linear(4, 4)
    model = nn.Sequential(lin, nn.Tanh(), lin)
    with warnings.catch_warnings():
        warnings.simplefilter("error", KFACWarning)
        opt = ngcuda.KFAC(model)
    assert [i.name for i in opt.layers()] == ["0"]


def test_deleting_the_optimizer_removes_its_hooks():
    import gc
    import weakref

    model = mlp()
    opt = ngcuda.KFAC(model)
    layers = opt._layers
    ref = weakref.ref(opt)
    del opt
    gc.collect()
    assert ref() is None
    for _ in range(3):
        model(data()[0]).sum()
    assert all(not layer.records for layer in layers)
    assert not model[0]._forward_hooks and not model[2]._forward_hooks


def test_auto_is_accepted_in_any_case_as_the_other_structure_names():
    model = mlp()
    for spec in ("Auto", " AUTO ", {"0": "Auto", "2": "FULL"}):
        opt = ngcuda.KFAC(model, factor_structure=spec)
        assert opt._structures[id(opt._layers[0])] is None  # auto: chosen at the first update


def test_a_provisional_automatic_choice_survives_a_checkpoint():
    """A GCN with input dropout: the first update charges Cora's input as constant (full), the
    second one re-chooses (low rank); a run resumed between the two must re-choose too."""
    pytest.importorskip("torch_geometric")
    from ngcuda.data import load_planetoid
    from ngcuda.models import GCN

    graph = load_planetoid("cora")
    x = graph.x / graph.x.sum(1, keepdim=True).clamp(min=1)

    def fresh():
        torch.manual_seed(0)
        model = GCN(graph.num_features, 16, graph.num_classes, input_dropout=True)
        return model, ngcuda.KFAC(model, inverse_every=1)

    def step(model, opt):
        opt.zero_grad()
        out = model(x, graph.edge_index)
        opt.set_outputs(out, mask=graph.train_mask)
        F.cross_entropy(out[graph.train_mask], graph.y[graph.train_mask]).backward()
        opt.step()

    model, opt = fresh()
    step(model, opt)
    first = opt.layers()[0].structure
    saved = copy.deepcopy(opt.state_dict())
    step(model, opt)
    assert opt.layers()[0].structure != first, "this test needs a provisional first choice"
    model2, opt2 = fresh()
    model2.load_state_dict(model.state_dict())
    opt2.load_state_dict(saved)
    step(model2, opt2)
    assert opt2.layers()[0].structure == opt.layers()[0].structure
