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
                      base_optimizer=torch.optim.Adam(model.parameters(), lr=1e-2, eps=1e-8 / gamma))
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
    opt = ngcuda.KFAC(model, lr=0.1, damping=lambda t: seen.append(t) or 0.1, fisher_type="empirical")
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
