"""ngcuda.KFAC: exactness against dense float64 K-FAC, training, checkpoints, modes, failures."""
from __future__ import annotations

import copy
import io
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import ngcuda
from ngcuda.optim import KFACWarning

pyg = pytest.importorskip("torch_geometric")
from torch_geometric.nn import GATConv, GCNConv  # noqa: E402
from torch_geometric.nn.conv.gcn_conv import gcn_norm  # noqa: E402

# The CPU batched_eigh kernel may not exist yet; ops then falls back to torch.linalg.eigh.
pytestmark = pytest.mark.filterwarnings("ignore:ngcuda. no compiled:RuntimeWarning")


def dense_kfac_solve(A: torch.Tensor, G: torch.Tensor, g: torch.Tensor, damping: float):
    """(A⊗G + γI)⁻¹ vec(g) with column-major vec, solved densely; returns a [d_out, d_a] matrix."""
    K = torch.kron(A, G) + damping * torch.eye(A.shape[0] * G.shape[0], dtype=A.dtype)
    sol = torch.linalg.solve(K, g.T.reshape(-1))
    return sol.reshape(A.shape[0], G.shape[0]).T


def ones_col(x: torch.Tensor) -> torch.Tensor:
    return torch.cat([x, torch.ones(x.shape[0], 1, dtype=x.dtype)], 1)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def grad_block(lin_w: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    return torch.cat([lin_w.grad, bias.grad[:, None]], 1)


# --------------------------------------------------------------------------- exactness
def test_mlp_preconditioned_gradient_matches_dense_kfac():
    torch.manual_seed(0)
    n, damping = 11, 0.3
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).double()
    ref = copy.deepcopy(model)
    x, y = torch.randn(n, 5, dtype=torch.float64), torch.randint(0, 3, (n,))

    # Dense reference from per-example quantities: ā_i rows, ĝ_i = n ∂L/∂z_i.
    z1 = ref[0](x)
    h = torch.tanh(z1)
    z2 = ref[2](h)
    loss = F.cross_entropy(z2, y)
    dz1, dz2 = torch.autograd.grad(loss, [z1, z2], retain_graph=True)
    loss.backward()
    expected = []
    for a, dz, lin in ((ones_col(x), dz1, ref[0]), (ones_col(h.detach()), dz2, ref[2])):
        A = a.T @ a / n
        G = (n * dz).T @ (n * dz) / n
        expected.append(dense_kfac_solve(A, G, grad_block(lin.weight, lin.bias), damping))

    opt = ngcuda.KFAC(model, damping=damping, kl_clip=None, fisher_type="empirical",
                      base_optimizer=torch.optim.SGD(model.parameters(), lr=0.0))
    assert [(i.kind, i.a_size, i.g_size) for i in opt.layers()] == [("linear", 6, 7),
                                                                     ("linear", 8, 3)]
    F.cross_entropy(model(x), y).backward()
    opt.step()
    for lin, exp in zip((model[0], model[2]), expected):
        assert rel_err(grad_block(lin.weight, lin.bias), exp) <= 1e-8


class TinyGCN(nn.Module):
    def __init__(self, fin: int, hidden: int, out: int, cached: bool = False):
        super().__init__()
        self.conv1 = GCNConv(fin, hidden, cached=cached)
        self.conv2 = GCNConv(hidden, out, cached=cached)

    def forward(self, x, edge_index):
        return self.conv2(torch.relu(self.conv1(x, edge_index)), edge_index)


def small_graph(n: int = 9, e: int = 14, fin: int = 4, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    src, dst = torch.randint(0, n, (e,), generator=g), torch.randint(0, n, (e,), generator=g)
    keep = src != dst
    ei = torch.stack([torch.cat([src[keep], dst[keep]]), torch.cat([dst[keep], src[keep]])])
    ei = torch.cat([ei, ei[:, :2]], 1)  # duplicate edges on purpose
    x = torch.randn(n, fin, dtype=torch.float64, generator=g)
    y = torch.randint(0, 3, (n,), generator=g)
    mask = torch.zeros(n, dtype=torch.bool)
    mask[torch.randperm(n, generator=g)[:4]] = True
    return x, ei, y, mask


def dense_adj(ei: torch.Tensor, n: int) -> torch.Tensor:
    """Â as PyG's gcn_norm builds it, densely: out_i = Σ_j Â_ij x_j for edges j→i."""
    nei, w = gcn_norm(ei, None, n, add_self_loops=True, dtype=torch.float64)
    A = torch.zeros(n, n, dtype=torch.float64)
    A.index_put_((nei[1], nei[0]), w, accumulate=True)
    return A


@pytest.mark.parametrize("cached", [False, True])
def test_gcn_preconditioned_gradient_matches_dense_kfac(cached):
    torch.manual_seed(1)
    x, ei, y, mask = small_graph()
    n_nodes, n, damping = x.shape[0], int(mask.sum()), 0.05
    model = TinyGCN(4, 5, 3, cached=cached).double()
    ref = copy.deepcopy(model)
    adj = dense_adj(ei, n_nodes)

    z1 = ref.conv1(x, ei)
    h = torch.relu(z1)
    z2 = ref.conv2(h, ei)
    loss = F.cross_entropy(z2[mask], y[mask])
    dz1, dz2 = torch.autograd.grad(loss, [z1, z2], retain_graph=True)
    loss.backward()
    expected = []
    for hin, dz, conv in ((x, dz1, ref.conv1), (h.detach(), dz2, ref.conv2)):
        a = ones_col(adj @ hin)
        A = a.T @ a / n_nodes  # over all N nodes
        G = (n * dz).T @ (n * dz) / n  # per-labelled-node gradient covariance
        expected.append(dense_kfac_solve(A, G, grad_block(conv.lin.weight, conv.bias), damping))

    opt = ngcuda.KFAC(model, damping=damping, kl_clip=None, fisher_type="empirical",
                      base_optimizer=torch.optim.SGD(model.parameters(), lr=0.0))
    assert [(i.kind, i.a_size, i.g_size) for i in opt.layers()] == [("gcn", 5, 5), ("gcn", 6, 3)]
    out = model(x, ei)
    opt.set_outputs(out, mask=mask)
    F.cross_entropy(out[mask], y[mask]).backward()
    opt.step()
    for conv, exp in zip((model.conv1, model.conv2), expected):
        assert rel_err(grad_block(conv.lin.weight, conv.bias), exp) <= 1e-8


def test_gcn_input_factor_equals_dense_aggregate():
    x, ei, y, mask = small_graph(n=13, e=30, fin=6, seed=3)
    model = TinyGCN(6, 4, 3).double()
    opt = ngcuda.KFAC(model, fisher_type="empirical")
    out = model(x, ei)
    F.cross_entropy(out[mask], y[mask]).backward()
    opt.step()
    a = ones_col(dense_adj(ei, 13) @ x)
    A = opt.state[model.conv1.lin.weight]["A"]
    assert rel_err(A, a.T @ a / 13) <= 1e-12


def test_gcn_input_factoring_option():
    x, ei, y, mask = small_graph()
    model = TinyGCN(4, 5, 3).double()
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        opt = ngcuda.KFAC(model, fisher_type="empirical", gcn_factoring="input")
    assert not [w for w in rec if issubclass(w.category, KFACWarning)]
    assert [(i.kind, i.a_size) for i in opt.layers()] == [("gcn-input", 4), ("gcn-input", 5)]
    out = model(x, ei)
    F.cross_entropy(out[mask], y[mask]).backward()
    opt.step()
    A = opt.state[model.conv1.lin.weight]["A"]
    assert rel_err(A, x.T @ x / 9) <= 1e-12


# --------------------------------------------------------------------------- Fisher
def test_true_fisher_G_matches_softmax_fisher_and_leaves_grads_untouched():
    torch.manual_seed(2)
    n, d, c = 4000, 3, 4
    model = nn.Sequential(nn.Linear(d, c)).double()
    x, y = torch.randn(n, d, dtype=torch.float64), torch.randint(0, c, (n,))
    opt = ngcuda.KFAC(model, fisher_type="true", kl_clip=None,
                      base_optimizer=torch.optim.SGD(model.parameters(), lr=0.0))
    out = model(x)
    opt.set_outputs(out, likelihood="categorical")
    loss = F.cross_entropy(out, y)
    (expected_grad,) = torch.autograd.grad(loss, [model[0].weight], retain_graph=True)
    loss.backward()
    assert torch.equal(model[0].weight.grad, expected_grad)  # the Fisher backward added nothing
    G = None
    with torch.no_grad():
        p = torch.softmax(out, 1)
        exact = (torch.diag_embed(p) - p[:, :, None] * p[:, None, :]).mean(0)
    opt.step()
    G = opt.state[model[0].weight]["G"]
    assert rel_err(G, exact) < 0.1  # Monte Carlo with one sample per row


@pytest.mark.parametrize("likelihood", ["categorical", "bernoulli", "gaussian"])
def test_sampled_fisher_is_the_exact_weighted_fisher(likelihood):
    """G of one Linear layer from sampled targets against each likelihood's exact Fisher, weighted
    by uneven row weights (a zero among them): Σ_i w_i F_i / Σ_i w_i. Five distinct rows repeated
    20,000 times put the Monte Carlo error near 0.3%, so a target drawn from the wrong
    distribution, a scaling off by a few percent, or ignored weights all fail the 2% bound."""
    torch.manual_seed(0)
    x0 = torch.randn(5, 3, dtype=torch.float64)
    w0 = torch.tensor([0.0, 0.5, 1.0, 2.0, 3.0], dtype=torch.float64)
    model = nn.Linear(3, 4).double()
    nn.init.normal_(model.weight, std=1.5)  # probabilities far from uniform and from 1/2
    opt = ngcuda.KFAC(model, lr=0.0, factor_decay=0.0, kl_clip=None, seed=3)
    out = model(x0.repeat(20000, 1))
    opt.set_outputs(out, likelihood=likelihood, mask=w0.repeat(20000))
    out.sum().backward()  # the sampled targets, not this loss, make the true Fisher
    opt.step()
    with torch.no_grad():
        z = model(x0)
        if likelihood == "categorical":
            p = torch.softmax(z, 1)
            per_row = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
        elif likelihood == "bernoulli":
            s = torch.sigmoid(z)
            per_row = torch.diag_embed(s * (1 - s))
        else:  # unit variance
            per_row = torch.eye(4, dtype=torch.float64).expand(5, 4, 4)
    exact = (w0[:, None, None] * per_row).sum(0) / w0.sum()
    assert rel_err(opt.state[model.weight]["G"], exact) < 0.02


def test_categorical_outputs_must_be_two_dimensional():
    model = nn.Linear(3, 4)
    opt = ngcuda.KFAC(model)
    out = model(torch.randn(2, 5, 3))  # [N, T, C] would be sampled as one categorical per row
    with pytest.raises(ValueError, match=r"\[N, C\].*reshape\(-1, C\)"):
        opt.set_outputs(out, likelihood="categorical")
    opt.set_outputs(out.reshape(-1, 4), likelihood="categorical")
    ngcuda.KFAC(nn.Linear(3, 4), fisher_type="empirical").set_outputs(out)  # only counts there


def test_true_fisher_without_outputs_falls_back_once():
    model = nn.Sequential(nn.Linear(3, 2)).double()
    opt = ngcuda.KFAC(model, fisher_type="true")
    x = torch.randn(5, 3, dtype=torch.float64)
    with pytest.warns(KFACWarning, match="falling back to the empirical Fisher"):
        model(x).sum().backward()
        opt.step()
    with warnings.catch_warnings():
        warnings.simplefilter("error", KFACWarning)
        opt.zero_grad()
        model(x).sum().backward()
        opt.step()


@pytest.mark.parametrize("likelihood", ["gaussian", "bernoulli"])
def test_other_likelihoods_run(likelihood):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    opt = ngcuda.KFAC(model, likelihood=likelihood, lr=0.1)
    x, y = torch.randn(16, 3), torch.rand(16, 2).round()
    for _ in range(3):
        opt.zero_grad()
        out = model(x)
        opt.set_outputs(out)
        (F.mse_loss(out, y) if likelihood == "gaussian"
         else F.binary_cross_entropy_with_logits(out, y)).backward()
        opt.step()
    G = opt.state[model[2].weight]["G"]
    assert torch.isfinite(G).all() and torch.linalg.eigvalsh(G).min() >= -1e-6


# --------------------------------------------------------------------------- EKFAC
def test_ekfac_matches_dense_eigenvalue_corrected_solve():
    torch.manual_seed(4)
    n, damping = 10, 0.1
    model = nn.Sequential(nn.Linear(4, 3)).double()
    x, y = torch.randn(n, 4, dtype=torch.float64), torch.randint(0, 3, (n,))
    opt = ngcuda.KFAC(model, damping=damping, ekfac=True, kl_clip=None, fisher_type="empirical",
                      base_optimizer=torch.optim.SGD(model.parameters(), lr=0.0))
    out = model(x)
    loss = F.cross_entropy(out, y)
    (dz,) = torch.autograd.grad(loss, [out], retain_graph=True)
    loss.backward()
    g = grad_block(model[0].weight, model[0].bias).clone()
    opt.step()
    st = opt.state[model[0].weight]
    a, gh = ones_col(x), n * dz
    QA, QG = st["QA"], st["QG"]
    S = torch.einsum("ri,rj->ij", (gh @ QG) ** 2, (a @ QA) ** 2) / n
    assert rel_err(st["S"], S) <= 1e-10
    Q = torch.kron(QA, QG)
    K = Q @ torch.diag(S.T.reshape(-1) + damping) @ Q.T
    exp = torch.linalg.solve(K, g.T.reshape(-1)).reshape(5, 3).T
    assert rel_err(grad_block(model[0].weight, model[0].bias), exp) <= 1e-8


# --------------------------------------------------------------------------- modes
def test_adam_kfac_with_identity_like_curvature_is_adam():
    torch.manual_seed(5)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    ref = copy.deepcopy(model)
    gamma = 1e8
    opt = ngcuda.KFAC(model, damping=gamma, kl_clip=None, fisher_type="empirical",
                      base_optimizer=torch.optim.Adam(model.parameters(), lr=1e-2,
                                                      eps=1e-8 / gamma))
    ref_opt = torch.optim.Adam(ref.parameters(), lr=1e-2, eps=1e-8)
    x, y = torch.randn(20, 4, dtype=torch.float64), torch.randint(0, 3, (20,))
    for _ in range(5):
        for m, o in ((model, opt), (ref, ref_opt)):
            o.zero_grad()
            F.cross_entropy(m(x), y).backward()
            o.step()
    for p, q in zip(model.parameters(), ref.parameters()):
        assert torch.allclose(p, q, rtol=1e-6, atol=1e-9)
    # and the preconditioner really changed .grad (g/γ): not a no-op
    assert float(model[0].weight.grad.abs().max()) < 1e-6


def test_param_groups_lr_scheduler_and_callable_hyperparameters():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    seen = []
    opt = ngcuda.KFAC(model, lr=0.1, damping=lambda t: seen.append(t) or 0.1,
                      fisher_type="empirical")
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    x, y = torch.randn(8, 3), torch.randint(0, 2, (8,))

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss

    for _ in range(3):
        loss = opt.step(closure)
        sched.step()
    assert isinstance(loss, torch.Tensor)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.1 * 0.5**3)
    assert set(seen) == {0, 1, 2} and opt.steps == 3


def test_adaptive_damping_moves_damping():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 2)).double()
    opt = ngcuda.KFAC(model, lr=1.0, damping=10.0, adaptive_damping=True, kl_clip=None,
                      fisher_type="empirical", lm=ngcuda.optim.LMConfig(interval=1))
    x, y = torch.randn(32, 3, dtype=torch.float64), torch.randint(0, 2, (32,))

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss

    for _ in range(4):
        opt.step(closure)
    # tiny steps under a huge damping are predicted well (ρ≈1): damping shrinks by ω each step
    assert 0.75 < opt.last_rho < 1.5
    assert opt.param_groups[0]["damping"] == pytest.approx(10.0 * (19 / 20) ** 4)


# --------------------------------------------------------------------------- checkpoints
def _gcn_run(model, opt, x, ei, y, mask, steps):
    for _ in range(steps):
        opt.zero_grad()
        out = model(x, ei)
        opt.set_outputs(out, mask=mask)
        F.cross_entropy(out[mask], y[mask]).backward()
        opt.step()


def test_decoupled_weight_decay_shrinks_weights_outside_the_preconditioner():
    x, ei, y, mask = small_graph(n=15, e=30, fin=5, seed=3)
    lr, wd = 0.05, 0.02
    torch.manual_seed(0)
    base = TinyGCN(5, 6, 3).double()
    runs = {}
    for name, kw in (("decoupled", dict(weight_decay=wd, decoupled_weight_decay=True)),
                     ("none", dict(weight_decay=0.0)), ("coupled", dict(weight_decay=wd))):
        model = copy.deepcopy(base)
        opt = ngcuda.KFAC(model, lr=lr, damping=0.05, momentum=0.9, kl_clip=1e-3, inverse_every=1,
                          fisher_type="empirical", **kw)
        _gcn_run(model, opt, x, ei, y, mask, 1)
        runs[name] = (model, opt)
    w0 = base.conv1.lin.weight.detach()
    dec, plain, cpl = (runs[k][0].conv1.lin.weight.detach() for k in ("decoupled", "none", "coupled"))
    # θ₁ = (1 − lr·η) θ₀ − lr·d, with d the (clipped, preconditioned) direction of the undecayed run
    torch.testing.assert_close(dec, plain - lr * wd * w0, rtol=0, atol=1e-14)
    st_dec = runs["decoupled"][1].state[runs["decoupled"][0].conv1.lin.weight]
    st_plain = runs["none"][1].state[runs["none"][0].conv1.lin.weight]
    assert torch.equal(st_dec["momentum_buffer"], st_plain["momentum_buffer"])
    assert (cpl - dec).abs().max() > 1e-6  # the L2 form goes through the preconditioner instead
    g = runs["none"][0].conv1.lin.weight.grad
    assert (plain - (w0 - lr * g)).abs().max() > 1e-6  # the step was preconditioned


def test_decoupled_weight_decay_rejects_a_base_optimizer_and_non_bools():
    model = nn.Sequential(nn.Linear(2, 2))
    with pytest.raises(ValueError, match="base_optimizer"):
        ngcuda.KFAC(model, weight_decay=1e-3, decoupled_weight_decay=True,
                    base_optimizer=torch.optim.Adam(model.parameters()))
    with pytest.raises(TypeError, match="decoupled_weight_decay"):
        ngcuda.KFAC(model, decoupled_weight_decay="yes")


@pytest.mark.parametrize("mode", ["sgd", "adam", "ekfac"])
def test_checkpoint_resume_is_bitwise_identical(mode):
    x, ei, y, mask = small_graph(n=15, e=30, fin=5, seed=7)
    x = x.float()

    def make(seed):
        torch.manual_seed(seed)
        model = TinyGCN(5, 6, 3, cached=True)
        kw = dict(lr=0.05, damping=0.05, momentum=0.9, weight_decay=1e-3, factor_every=2,
                  inverse_every=3, kl_clip=1e-2, seed=11, ekfac=mode == "ekfac")
        if mode == "adam":
            kw["base_optimizer"] = torch.optim.Adam(model.parameters(), lr=0.01)
        return model, ngcuda.KFAC(model, **kw)

    full, full_opt = make(0)
    _gcn_run(full, full_opt, x, ei, y, mask, 20)

    first, first_opt = make(0)
    _gcn_run(first, first_opt, x, ei, y, mask, 10)
    buf = io.BytesIO()
    torch.save({"model": first.state_dict(), "opt": first_opt.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    resumed, resumed_opt = make(123)  # different init, overwritten by the checkpoint
    resumed.load_state_dict(ckpt["model"])
    resumed_opt.load_state_dict(ckpt["opt"])
    st = resumed_opt.state[resumed.conv1.lin.weight]
    assert {"A", "G", "QA", "QG", "lamA", "lamG"} <= set(st) and resumed_opt.steps == 10
    saved_st = first_opt.state[first.conv1.lin.weight]
    if "A_structure" in saved_st:
        assert st["A_structure"] == saved_st["A_structure"] and isinstance(st["A_structure"], str)
    _gcn_run(resumed, resumed_opt, x, ei, y, mask, 10)
    for p, q in zip(full.parameters(), resumed.parameters()):
        assert torch.equal(p, q)
    assert not torch.equal(full.conv1.lin.weight, first.conv1.lin.weight)


def test_checkpoint_sampling_state_is_keyed_by_device_type():
    # A GPU run's checkpoint keys its sampling state by its device ("cuda:1"): it must load on a
    # machine without that device, and never seed the CPU generator.
    x, ei, y, mask = small_graph(n=15, e=30, fin=5, seed=7)
    x = x.float()

    def make():
        torch.manual_seed(0)
        model = TinyGCN(5, 6, 3, cached=True)
        return model, ngcuda.KFAC(model, lr=0.05, damping=0.05, factor_every=1, seed=11)

    model, opt = make()
    _gcn_run(model, opt, x, ei, y, mask, 3)
    sd = opt.state_dict()
    saved = sd["kfac"]["generators"]["cpu"]

    def resumed_cpu_state(generators: dict) -> torch.Tensor:
        m, o = make()
        m.load_state_dict(model.state_dict())
        o.load_state_dict({**sd, "kfac": {**sd["kfac"], "generators": generators}})
        _gcn_run(m, o, x, ei, y, mask, 1)
        assert set(o._generators) == {"cpu"}
        return o._generators["cpu"].get_state()

    from_saved, from_seed = resumed_cpu_state({"cpu": saved}), resumed_cpu_state({})
    assert not torch.equal(from_saved, from_seed)
    assert torch.equal(resumed_cpu_state({"cuda:1": saved}), from_seed)


@pytest.mark.cuda
def test_checkpoint_sampling_state_moves_between_gpus():
    torch.manual_seed(0)
    model = TinyGCN(5, 6, 3, cached=True)
    opt = ngcuda.KFAC(model, seed=11)
    state = torch.Generator(device="cuda").manual_seed(99).get_state()
    opt.load_state_dict({**opt.state_dict(), "kfac": {"step": 0, "generators": {"cuda:7": state.cuda()}}})
    gen = opt._generator(torch.device("cuda", 0))
    assert torch.equal(gen.get_state(), state)  # map_location's device copy and index, both undone


# --------------------------------------------------------------------------- failures
def test_autocast_rows_are_gathered_in_float32():
    # Under torch.autocast the hidden activations and output gradients are bfloat16; the factor
    # ops take float32/float64 only, and the factors stay in the weights' float32.
    def run(autocast: bool):
        torch.manual_seed(0)
        net = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
        opt = ngcuda.KFAC(net, lr=0.1, fisher_type="empirical", kl_clip=None)
        gen = torch.Generator().manual_seed(1)
        x, y = torch.randn(64, 6, generator=gen), torch.randint(0, 3, (64,), generator=gen)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = net(x)
            loss = F.cross_entropy(out, y)
        assert (out.dtype == torch.bfloat16) == autocast
        loss.backward()
        before = [p.detach().clone() for p in net.parameters()]
        opt.step()
        step = torch.cat([(p.detach() - b).flatten() for p, b in zip(net.parameters(), before)])
        return opt, net, step

    opt16, net16, step16 = run(True)
    opt32, net32, step32 = run(False)
    for m16, m32 in ((net16[0], net32[0]), (net16[2], net32[2])):
        for key in ("A", "G"):
            f16, f32 = opt16.state[m16.weight][key], opt32.state[m32.weight][key]
            assert f16.dtype == torch.float32
            assert rel_err(f16, f32) < 3e-2, (key, rel_err(f16, f32))
    # the first layer's input is the float32 data under autocast too: its A is exact
    torch.testing.assert_close(opt16.state[net16[0].weight]["A"], opt32.state[net32[0].weight]["A"])
    assert rel_err(step16, step32) < 0.1


def test_nan_gradient_skips_only_the_affected_layer():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    opt = ngcuda.KFAC(model, lr=0.1, momentum=0.9, fisher_type="empirical", inverse_every=1)
    x, y = torch.randn(8, 3), torch.randint(0, 2, (8,))
    F.cross_entropy(model(x), y).backward()
    opt.step()
    before = [p.detach().clone() for p in model.parameters()]
    state0 = {k: v.clone() for k, v in opt.state[model[0].weight].items() if torch.is_tensor(v)}
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    model[0].weight.grad[0, 0] = float("nan")
    with pytest.warns(KFACWarning, match="non-finite gradient in 0.bias, 0.weight"):
        opt.step()
    after = list(model.parameters())
    assert torch.equal(after[0], before[0]) and torch.equal(after[1], before[1])
    assert not torch.equal(after[2], before[2])
    st = opt.state[model[0].weight]
    assert torch.equal(st["momentum_buffer"], state0["momentum_buffer"])
    assert all(torch.isfinite(v).all() for v in st.values() if torch.is_tensor(v))


def test_nan_activations_leave_factors_unchanged():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 2))
    opt = ngcuda.KFAC(model, fisher_type="empirical")
    x, y = torch.randn(8, 3), torch.randint(0, 2, (8,))
    F.cross_entropy(model(x), y).backward()
    opt.step()
    st = opt.state[model[0].weight]
    A, G = st["A"].clone(), st["G"].clone()
    w = model[0].weight.detach().clone()
    opt.zero_grad()
    x[0, 0] = float("nan")
    with pytest.warns(KFACWarning, match="non-finite"):
        F.cross_entropy(model(x), y).backward()
        opt.step()
    assert torch.equal(st["A"], A) and torch.equal(st["G"], G)
    assert torch.equal(model[0].weight, w)


def test_unsupported_layer_is_listed_once_and_trained_plainly():
    torch.manual_seed(0)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.gat = GATConv(4, 5, heads=1)
            self.out = nn.Linear(5, 3)

        def forward(self, x, ei):
            return self.out(torch.relu(self.gat(x, ei)))

    model = Net()
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        opt = ngcuda.KFAC(model, lr=0.1, fisher_type="empirical")
    msgs = [str(w.message) for w in rec if issubclass(w.category, KFACWarning)]
    assert len(msgs) == 1
    assert "gat.att_src" in msgs[0] and "gat.att_dst" in msgs[0] and "gat.bias" in msgs[0]
    assert {i.name for i in opt.layers()} == {"gat.lin", "out"}  # a Linear inside any conv is exact
    x, ei, y, _ = small_graph()
    x = x.float()
    att = model.gat.att_src.detach().clone()
    F.cross_entropy(model(x, ei), y).backward()
    opt.step()
    assert not torch.equal(model.gat.att_src, att)


def test_layer_whose_hooks_never_fire_warns_and_still_trains():
    class Functional(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 2)

        def forward(self, x):
            return F.linear(x, self.lin.weight, self.lin.bias)  # bypasses the module hooks

    model = Functional()
    opt = ngcuda.KFAC(model, lr=0.1, fisher_type="empirical")
    w = model.lin.weight.detach().clone()
    model(torch.randn(4, 3)).sum().backward()
    with pytest.warns(KFACWarning, match="forward hook never fired"):
        opt.step()
    assert not torch.equal(model.lin.weight, w)
    assert "A" not in opt.state[model.lin.weight]


def test_eigensolver_failure_retries_in_float64_then_keeps_previous_basis(monkeypatch):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 2))
    opt = ngcuda.KFAC(model, fisher_type="empirical", inverse_every=1)
    x, y = torch.randn(8, 3), torch.randint(0, 2, (8,))

    def step():
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()

    real = ngcuda.ops.batched_eigh_with_status
    calls = []

    def not_converged(mats, *a, **k):
        calls.append(mats[0].dtype)
        vals, vecs, status = real(mats, *a, **k)
        return vals, vecs, torch.full_like(status, ngcuda.ops.EighStatus.NOT_CONVERGED)

    monkeypatch.setattr(ngcuda.ops, "batched_eigh_with_status", not_converged)
    monkeypatch.setattr(ngcuda.ops, "batched_eigh", lambda mats, *a, **k: real(mats, *a, **k)[:2])
    step()  # float32 call fails; the float64 retry succeeds
    st = opt.state[model[0].weight]
    assert calls == [torch.float32] and st["QA"].dtype == torch.float32

    def broken(*a, **k):
        raise RuntimeError("solver exploded")

    QA = st["QA"].clone()
    monkeypatch.setattr(ngcuda.ops, "batched_eigh_with_status", broken)
    monkeypatch.setattr(ngcuda.ops, "batched_eigh", broken)
    with pytest.warns(KFACWarning, match="keeping its previous eigenbasis"):
        step()
    assert torch.equal(st["QA"], QA)

    if hasattr(torch, "AcceleratorError"):  # a device fault is raised, not retried or swallowed
        def faulted(*a, **k):
            raise torch.AcceleratorError("CUDA error: an illegal memory access was encountered")

        monkeypatch.setattr(ngcuda.ops, "batched_eigh_with_status", faulted)
        with pytest.raises(torch.AcceleratorError, match="illegal memory access"):
            step()


def test_bad_arguments_name_themselves():
    model = nn.Sequential(nn.Linear(2, 2))
    with pytest.raises(ValueError, match="damping"):
        ngcuda.KFAC(model, damping=-1.0)
    with pytest.raises(ValueError, match="inverse_every"):
        ngcuda.KFAC(model, inverse_every=0)
    with pytest.raises(ValueError, match="fisher_type"):
        ngcuda.KFAC(model, fisher_type="exact")
    with pytest.raises(ValueError, match="likelihood"):
        ngcuda.KFAC(model, likelihood="poisson")
    with pytest.raises(ValueError, match="gcn_factoring"):
        ngcuda.KFAC(model, gcn_factoring="both")


def test_row_weights_give_a_weighted_mean_fisher():
    torch.manual_seed(3)
    x = torch.randn(50, 3, dtype=torch.float64)
    Gs = []
    for weights in (None, torch.full((50,), 2.5, dtype=torch.float64),
                    torch.ones(50, dtype=torch.bool)):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(3, 4)).double()
        nn.init.normal_(model[0].weight)
        opt = ngcuda.KFAC(model, kl_clip=None, seed=5)
        out = model(x)
        opt.set_outputs(out, mask=weights)
        out.sum().backward()
        opt.step()
        Gs.append(opt.state[model[0].weight]["G"])
    assert rel_err(Gs[1], Gs[0]) <= 1e-12 and torch.equal(Gs[2], Gs[0])


def test_node_index_masks_count_repeats_and_take_negative_indices():
    from ngcuda.optim.fisher import example_rows, row_weights

    out = torch.zeros(5, 2)
    idx = torch.tensor([0, 3, 3, -1])  # row 3 twice, row 4 as -1: as out[idx] counts them
    assert row_weights(out, idx).tolist() == [1.0, 0.0, 0.0, 2.0, 1.0]
    ex = example_rows(out, idx)
    assert ex.total == 4.0 and not ex.unit  # weight 2 needs the √w scaling
    assert example_rows(out, torch.tensor([4, 0])).unit
    with pytest.raises(ValueError, match=r"node indices.*\[-5, 5\)"):
        row_weights(out, torch.tensor([0, 5]))
    # the sampled Fisher of the repeated index equals that of the same row weights
    x = torch.randn(6, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    Gs = []
    for mask in (torch.tensor([0, 2, 2, 5]), torch.tensor([1.0, 0, 2, 0, 0, 1], dtype=torch.float64)):
        torch.manual_seed(0)
        model = nn.Linear(3, 4).double()
        opt = ngcuda.KFAC(model, kl_clip=None, seed=5)
        y = model(x)
        opt.set_outputs(y, mask=mask)
        y.sum().backward()
        opt.step()
        Gs.append(opt.state[model.weight]["G"])
    assert rel_err(Gs[0], Gs[1]) <= 1e-12


def test_mask_changed_in_place_is_seen_by_the_next_step():
    """The mask's rows are reused while the same tensor comes back: an in-place change must
    not leave the next step's sampled Fisher on the old rows."""
    x = torch.randn(20, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(4))

    def run(masks):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(3, 4)).double()
        opt = ngcuda.KFAC(model, kl_clip=None, factor_decay=0.0, seed=5)
        for mask in masks():
            opt.zero_grad()
            out = model(x)
            opt.set_outputs(out, mask=mask)
            out[mask.clone()].sum().backward()  # clone: an inference-mode mask cannot index
            opt.step()
        return opt.state[model[0].weight]["G"]

    first = torch.zeros(20, dtype=torch.bool)
    first[:4] = True

    def same_tensor():
        mask = first.clone()
        yield mask
        mask[:4] = False
        mask[10:] = True
        yield mask

    def fresh_tensors():
        yield first.clone()
        yield torch.arange(20) >= 10

    g = run(same_tensor)
    assert torch.equal(g, run(fresh_tensors))
    assert not torch.equal(g, run(lambda: iter([first.clone(), first.clone()])))

    def inference_tensors():  # no version counter: their rows are found afresh every step
        with torch.inference_mode():
            mask = first.clone()
        yield mask
        with torch.inference_mode():
            mask[:4] = False
            mask[10:] = True
        yield mask

    assert torch.equal(g, run(inference_tensors))


def test_layer_called_twice_uses_rows_of_both_calls():
    torch.manual_seed(0)
    lin = nn.Linear(3, 2).double()
    model = nn.Sequential(lin)
    opt = ngcuda.KFAC(model, fisher_type="empirical", kl_clip=None)
    x1, x2 = torch.randn(4, 3, dtype=torch.float64), torch.randn(6, 3, dtype=torch.float64)
    (lin(x1).square().sum() + lin(x2).sum()).backward()
    opt.step()
    a = ones_col(torch.cat([x1, x2]))
    assert rel_err(opt.state[lin.weight]["A"], a.T @ a / 10) <= 1e-12


@pytest.mark.cuda
def test_cuda_training_matches_cpu():
    x, ei, y, mask = small_graph(n=30, e=80, fin=6, seed=9)
    results = []
    for device in ("cpu", "cuda"):
        torch.manual_seed(0)
        model = TinyGCN(6, 8, 3).double().to(device)
        opt = ngcuda.KFAC(model, lr=0.05, momentum=0.9, fisher_type="empirical", inverse_every=2)
        _gcn_run(model, opt, x.to(device), ei.to(device), y.to(device), mask.to(device), 6)
        results.append([p.detach().cpu() for p in model.parameters()])
    for p, q in zip(*results):
        assert torch.allclose(p, q, rtol=1e-6, atol=1e-8)
