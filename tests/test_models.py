"""Models: output shapes, layer structure, sparse input, input dropout."""
from __future__ import annotations

import pytest
import torch
from torch import nn

pytest.importorskip("torch_geometric")

from ngcuda.models import GCN, GIN, SAGE, Autoencoder, DeepGCN, build_gnn, input_dropout  # noqa: E402


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Every test of this file on one thread (the fixture is in conftest.py)."""


def tiny_graph(n: int = 13, f: int = 5, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(n, f, generator=gen)
    x[x < 0.5] = 0
    src = torch.randint(0, n, (30,), generator=gen)
    dst = torch.randint(0, n, (30,), generator=gen)
    ei = torch.cat([torch.stack([src, dst]), torch.stack([dst, src])], 1)
    return x, ei


@pytest.mark.parametrize("name", ["gcn", "sage", "gin", "deep-gcn"])
@pytest.mark.parametrize("n", [1, 13])
def test_gnn_forward_shapes(name, n):
    x, ei = tiny_graph(n)
    if n == 1:
        ei = torch.empty(2, 0, dtype=torch.long)
    torch.manual_seed(0)
    model = build_gnn(name, 5, 3, hidden=7, layers=4)
    out = model(x, ei)
    assert out.shape == (n, 3) and out.dtype == torch.float32 and torch.isfinite(out).all()
    out.sum().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_gnn_structure():
    assert [type(m).__name__ for m in (GCN(5, 4, 3), SAGE(5, 4, 3), GIN(5, 4, 3))] == ["GCN", "SAGE", "GIN"]
    gcn = GCN(5, 16, 3)
    assert gcn.conv1.cached and gcn.conv2.cached
    assert (gcn.conv1.in_channels, gcn.conv1.out_channels, gcn.conv2.out_channels) == (5, 16, 3)
    assert SAGE(5, 4, 3).conv1.aggr == "mean"
    gin_linears = [m for m in GIN(5, 4, 3).modules() if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in gin_linears] == [(5, 4), (4, 4), (4, 4), (4, 3)]
    deep = DeepGCN(5, 8, 3, layers=6)
    assert [(c.in_channels, c.out_channels) for c in deep.convs] == [(5, 8)] + [(8, 8)] * 4 + [(8, 3)]
    with pytest.raises(ValueError, match="layers"):
        DeepGCN(5, 8, 3, layers=1)
    with pytest.raises(ValueError, match="unknown model"):
        build_gnn("gat", 5, 3)


def test_deep_gcn_skip_is_residual():
    x, ei = tiny_graph()
    torch.manual_seed(0)
    plain = DeepGCN(5, 8, 3, layers=3, skip=False).eval()
    skip = DeepGCN(5, 8, 3, layers=3, skip=True).eval()
    skip.load_state_dict(plain.state_dict())
    h0 = torch.relu(plain.convs[0](x, ei))
    h1 = torch.relu(plain.convs[1](h0, ei))
    torch.testing.assert_close(plain(x, ei), plain.convs[2](h1, ei))
    torch.testing.assert_close(skip(x, ei), skip.convs[2](h0 + h1, ei))


def test_gcn_sparse_input_matches_dense():
    x, ei = tiny_graph()
    torch.manual_seed(0)
    dense = GCN(5, 4, 3).eval()
    sparse = GCN(5, 4, 3).eval()
    sparse.load_state_dict(dense.state_dict())
    torch.testing.assert_close(sparse(x.to_sparse_csr(), ei), dense(x, ei))


@pytest.mark.parametrize("layout", ["dense", "csr"])
def test_input_dropout(layout):
    torch.manual_seed(0)
    x = torch.rand(200, 300)
    x[x < 0.6] = 0
    xi = x.to_sparse_csr() if layout == "csr" else x
    assert input_dropout(xi, 0.5, training=False) is xi
    out = input_dropout(xi, 0.5, training=True)
    out = out.to_dense() if layout == "csr" else out
    nz = x != 0
    assert (out[~nz] == 0).all()
    kept = out[nz] != 0
    torch.testing.assert_close(out[nz][kept], 2 * x[nz][kept])
    rate = 1 - kept.float().mean().item()
    assert abs(rate - 0.5) < 0.03  # ~24k Bernoulli draws: 5 sigma is 0.016


def test_autoencoder_structure_and_shapes():
    ae = Autoencoder()
    linears = [m for m in ae.modules() if isinstance(m, nn.Linear)]
    sizes = [784, 1000, 500, 250, 30, 250, 500, 1000, 784]
    assert [(m.in_features, m.out_features) for m in linears] == list(zip(sizes[:-1], sizes[1:]))
    # Sigmoid after every layer except the 30-unit code layer and the output (logits).
    kinds = [type(m).__name__ for m in list(ae.encoder) + list(ae.decoder)]
    assert kinds == ["Linear", "Sigmoid"] * 3 + ["Linear"] + ["Linear", "Sigmoid"] * 3 + ["Linear"]
    x = torch.rand(3, 784)
    out = ae(x)
    assert out.shape == (3, 784)
    code = ae.encoder(x)
    assert code.shape == (3, 30) and (code.min() < 0 or code.max() > 1)  # linear, not squashed
    small = Autoencoder((6, 4, 2))
    assert small(torch.rand(1, 6)).shape == (1, 6)


def test_autoencoder_sparse_init():
    torch.manual_seed(0)
    ae = Autoencoder((40, 20, 8, 4), init="sparse")
    for m in ae.modules():
        if isinstance(m, nn.Linear):
            per_row = (m.weight != 0).sum(1)
            assert per_row.tolist() == [min(15, m.in_features)] * m.out_features
            assert not m.bias.any()
            kept = m.weight[m.weight != 0]
            assert 0.5 < kept.std().item() < 1.5  # N(0, 1), not torch's ~1/sqrt(fan_in) scale
    with pytest.raises(ValueError, match="init must be"):
        Autoencoder((4, 2), init="xavier")


@pytest.mark.parametrize("name", ["gcn", "sage", "gin", "deep-gcn"])
def test_input_dropout_off_leaves_the_features_alone(name):
    # Izadi et al.'s GCN has no dropout on the raw features: with it off, the first layer sees x itself
    # in training mode (only the hidden dropout differs between two forward passes).
    x, ei = tiny_graph()
    torch.manual_seed(0)
    model = build_gnn(name, 5, 3, hidden=7, layers=3, input_dropout=False).train()
    assert model.input_dropout is False
    first = model.conv1 if hasattr(model, "conv1") else model.convs[0]
    seen = []
    first.register_forward_pre_hook(lambda mod, args: seen.append(args[0]))
    model(x, ei)
    assert seen[0] is x
    on = build_gnn(name, 5, 3, hidden=7, layers=3).train()
    assert on.input_dropout is True
    first = on.conv1 if hasattr(on, "conv1") else on.convs[0]
    seen.clear()
    first.register_forward_pre_hook(lambda mod, args: seen.append(args[0]))
    on(x, ei)
    assert not torch.equal(seen[0], x)


@pytest.mark.parametrize("layout", ["dense", "csr"])
def test_input_dropout_of_everything_and_bad_probabilities(layout):
    x = torch.rand(6, 5) + 0.1
    xin = x.to_sparse_csr() if layout == "csr" else x
    out = input_dropout(xin, 1.0, training=True)
    dense = out.to_dense() if layout == "csr" else out
    assert torch.equal(dense, torch.zeros_like(x))  # as F.dropout(p=1): zeros, not 0/0
    for p in (-0.5, 1.5):
        with pytest.raises(ValueError, match=r"must be in \[0, 1\]"):
            input_dropout(xin, p, training=True)


@pytest.mark.parametrize("name", ["gcn", "deep-gcn"])
def test_models_with_csr_friendly_layers_pickle(name):
    """torch.save(model): the CSR-friendly Linear classes are made at run time."""
    import io

    torch.manual_seed(0)
    model = build_gnn(name, 10, 3, 8, 0.5, 3, False).eval()
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False).eval()
    x, ei = torch.rand(5, 10), torch.tensor([[0, 1, 2, 3], [1, 2, 3, 4]])
    assert torch.equal(loaded(x, ei), model(x, ei))
    assert torch.equal(loaded(x.to_sparse_csr(), ei), model(x.to_sparse_csr(), ei))
    assert type(loaded.modules().__next__()) is type(model)
    lin = [m for m in loaded.modules() if type(m).__name__.startswith("CSR")]
    assert lin and all(type(m) is type(n) for m, n in zip(
        lin, [m for m in model.modules() if type(m).__name__.startswith("CSR")]))
