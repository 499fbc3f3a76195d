"""Layer registration of ngcuda.KFAC on PyG convs: kinds, factor sizes, and factors against dense."""
from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import ngcuda
from ngcuda.optim import KFACWarning

pytest.importorskip("torch_geometric")
from torch_geometric.nn import GCNConv, GINConv, GraphConv, SAGEConv  # noqa: E402
from torch_geometric.nn import Linear as PygLinear  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:ngcuda. no compiled:RuntimeWarning")


def graph(n=10, e=24, fin=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    src, dst = torch.randint(0, n, (e,), generator=g), torch.randint(0, n, (e,), generator=g)
    keep = src != dst
    ei = torch.stack([src[keep], dst[keep]])  # directed on purpose: the flow direction matters
    x = torch.randn(n, fin, dtype=torch.float64, generator=g)
    y = torch.randint(0, 3, (n,), generator=g)
    return x, ei, y


def dense_messages(ei, n):
    """M[i, j] = number of edges j→i (rows = targets)."""
    M = torch.zeros(n, n, dtype=torch.float64)
    M.index_put_((ei[1], ei[0]), torch.ones(ei.shape[1], dtype=torch.float64), accumulate=True)
    return M


def ones_col(x):
    return torch.cat([x, torch.ones(x.shape[0], 1, dtype=x.dtype)], 1)


def no_kfac_warnings(make):
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        out = make()
    assert not [w for w in rec if issubclass(w.category, KFACWarning)]
    return out


def one_step(model, opt, x, ei, y):
    out = model(x, ei)
    F.cross_entropy(out, y).backward()
    opt.step()


def test_sage_mean_aggregated_factor():
    x, ei, y = graph()
    model = nn.ModuleDict({"conv": SAGEConv(4, 3, aggr="mean")}).double()
    fwd = lambda x, ei: model["conv"](x, ei)  # noqa: E731
    model.forward = fwd
    opt = no_kfac_warnings(lambda: ngcuda.KFAC(model, fisher_type="empirical"))
    assert [(i.name, i.kind, i.a_size, i.g_size) for i in opt.layers()] == [
        ("conv.lin_l", "sage-neighbour", 5, 3), ("conv.lin_r", "sage-root", 4, 3)]
    one_step(model, opt, x, ei, y)
    M = dense_messages(ei, 10)
    mean = M / M.sum(1, keepdim=True).clamp(min=1)  # row-normalised adjacency
    a = ones_col(mean @ x)
    A = opt.state[model["conv"].lin_l.weight]["A"]
    assert torch.allclose(A, a.T @ a / 10, rtol=1e-12, atol=1e-14)
    A_r = opt.state[model["conv"].lin_r.weight]["A"]
    assert torch.allclose(A_r, x.T @ x / 10, rtol=1e-12, atol=1e-14)


def test_graphconv_sum_aggregated_factor():
    x, ei, y = graph(seed=1)
    conv = GraphConv(4, 3).double()
    model = nn.Sequential()
    model.add_module("conv", conv)
    model.forward = lambda x, ei: conv(x, ei)
    opt = no_kfac_warnings(lambda: ngcuda.KFAC(model, fisher_type="empirical"))
    assert [(i.kind, i.a_size) for i in opt.layers()] == [("graphconv-neighbour", 5),
                                                         ("graphconv-root", 4)]
    one_step(model, opt, x, ei, y)
    a = ones_col(dense_messages(ei, 10) @ x)
    assert torch.allclose(opt.state[conv.lin_rel.weight]["A"], a.T @ a / 10, rtol=1e-12)


def test_gin_mlp_linears_are_registered():
    x, ei, y = graph(seed=2)
    mlp = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), PygLinear(8, 3))
    conv = GINConv(mlp).double()
    model = nn.Sequential()
    model.add_module("gin", conv)
    model.forward = lambda x, ei: conv(x, ei)
    opt = no_kfac_warnings(lambda: ngcuda.KFAC(model, fisher_type="empirical"))
    assert [(i.name, i.kind, i.a_size, i.g_size) for i in opt.layers()] == [
        ("gin.nn.0", "gin-mlp", 5, 8), ("gin.nn.2", "gin-mlp", 9, 3)]
    one_step(model, opt, x, ei, y)
    agg = x + dense_messages(ei, 10) @ x  # (1 + eps) x + Σ_j x_j with eps = 0
    a = ones_col(agg)
    assert torch.allclose(opt.state[mlp[0].weight]["A"], a.T @ a / 10, rtol=1e-12)


def test_gcn_respects_layer_flags_and_edge_weights():
    """normalize / add_self_loops / improved and edge weights reach the factor as in the layer."""
    x, ei, y = graph(seed=3)
    w = torch.rand(ei.shape[1], dtype=torch.float64) + 0.5
    for kwargs in (dict(improved=True), dict(add_self_loops=False), dict(normalize=False)):
        conv = GCNConv(4, 3, **kwargs).double()
        model = nn.Sequential()
        model.add_module("conv", conv)
        model.forward = lambda x, ei, conv=conv: conv(x, ei, w)
        opt = ngcuda.KFAC(model, fisher_type="empirical")
        one_step(model, opt, x, ei, y)
        # the layer's own aggregation, read back through a linear probe: Â x = conv(x) with W = I
        probe = GCNConv(4, 4, bias=False, **kwargs).double()
        probe.lin.weight.data = torch.eye(4, dtype=torch.float64)
        with torch.no_grad():
            a = ones_col(probe(x, ei, w))
        assert torch.allclose(opt.state[conv.lin.weight]["A"], a.T @ a / 10, rtol=1e-12), kwargs


def test_layers_listing_is_printable():
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    opt = ngcuda.KFAC(model)
    assert str(opt.layers()[0]) == "0: linear, A 4x4 auto, G 4x4"
    assert opt.layers()[1].params == ("2.weight", "2.bias")


@pytest.mark.parametrize("flow", ["source_to_target", "target_to_source"])
def test_gcn_adjacency_csr_is_sorted_and_exact(flow):
    from ngcuda.optim.layers import _csr_by_target

    gen = torch.Generator().manual_seed(3)
    n = 9
    ei = torch.randint(0, n, (2, 40), generator=gen)
    ei = torch.cat([ei, ei[:, :5], torch.arange(n).repeat(2, 1)], 1)  # duplicates, self-loops last
    w = torch.rand(ei.shape[1], generator=gen, dtype=torch.float64)
    rowptr, col, value = _csr_by_target(ei, w, n, flow)
    for r in range(n):  # cuSPARSE's CSR: ascending columns within a row
        c = col[rowptr[r]:rowptr[r + 1]]
        assert bool((c[1:] >= c[:-1]).all()), (r, c)
    src, dst = (ei[0], ei[1]) if flow == "source_to_target" else (ei[1], ei[0])
    dense = torch.zeros(n, n, dtype=torch.float64).index_put_((dst, src), w, accumulate=True)
    ours = torch.sparse_csr_tensor(rowptr, col, value, (n, n)).to_dense()
    torch.testing.assert_close(ours, dense, rtol=1e-12, atol=0)
