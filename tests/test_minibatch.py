"""Mini-batch GNN training: the plain-torch neighbour sampler behind PyG's NeighborLoader, and
K-FAC whose GCN factors come from each sampled subgraph's own adjacency (shipped Cora)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

pyg = pytest.importorskip("torch_geometric")
from torch_geometric.data import Data  # noqa: E402
from torch_geometric.nn.conv.gcn_conv import gcn_norm  # noqa: E402

import ngcuda  # noqa: E402
from ngcuda.data import load_planetoid  # noqa: E402
from ngcuda.models import GCN  # noqa: E402
from ngcuda.train.sampling import neighbor_loader, rank_share, uncache_gcn  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.fixture(scope="module")
def cora():
    g = load_planetoid("cora")
    x = g.x.to_dense() if g.x.layout != torch.strided else g.x
    x = x / x.sum(1, keepdim=True).clamp(min=1)
    return g, Data(x=x, edge_index=g.edge_index, y=g.y)


@pytest.fixture
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_sampler_draws_real_edges_at_most_k_per_node_seeds_first(cora):
    g, data = cora
    seeds = g.train_mask.nonzero().flatten()
    edges = set(map(tuple, g.edge_index.T.tolist()))
    batches = list(neighbor_loader(data, seeds, [4, 3], batch_size=50, seed=1))
    assert [b.batch_size for b in batches] == [50, 50, 40]
    for b, ids in zip(batches, seeds.split(50)):
        assert torch.equal(b.n_id[: b.batch_size], ids)
        glob = b.n_id[b.edge_index]
        assert all((s, d) in edges for s, d in glob.T.tolist())
        indeg = torch.bincount(b.edge_index[1], minlength=b.num_nodes)
        full = torch.bincount(g.edge_index[1], minlength=g.num_nodes)[b.n_id]
        hop1 = b.n_id.numel()  # every seed gets min(4, degree) in-edges, hop-1 nodes min(3, degree)
        assert torch.equal(indeg[: b.batch_size], full[: b.batch_size].clamp(max=4))
        assert int(indeg[b.batch_size:hop1].max()) <= 4
    again = list(neighbor_loader(data, seeds, [4, 3], batch_size=50, seed=1))
    assert all(torch.equal(a.edge_index, b.edge_index) for a, b in zip(batches, again))


def test_all_neighbours_gives_the_k_hop_in_edges(cora):
    g, data = cora
    seeds = torch.tensor([0, 5, 9])
    (b,) = neighbor_loader(data, seeds, [-1], batch_size=3)
    want = {(s, d) for s, d in g.edge_index.T.tolist() if d in (0, 5, 9)}
    assert set(map(tuple, b.n_id[b.edge_index].T.tolist())) == want


def test_rank_shares_cover_the_ids_with_equal_counts():
    ids = torch.arange(11)
    shares = [rank_share(ids, r, 3, epoch=2, seed=0) for r in range(3)]
    assert {len(s) for s in shares} == {4}  # padded: every rank takes the same number of batches
    assert set(torch.cat(shares).tolist()) == set(range(11))
    assert torch.equal(rank_share(ids, 1, 3, epoch=2), shares[1])  # shared shuffle, deterministic
    assert sorted(torch.cat([rank_share(ids, r, 2, pad=False) for r in range(2)]).tolist()) == list(range(11))


def test_kfac_gcn_input_factor_is_the_subgraphs_own(cora):
    """factor_decay 0: after one batch, conv1's A is mean [Â_s X_s, 1][Â_s X_s, 1]ᵀ over the
    subgraph's nodes, with Â_s the GCN normalisation of the sampled subgraph."""
    g, data = cora
    torch.manual_seed(0)
    model = uncache_gcn(GCN(data.num_features, 8, 7, input_dropout=False).double())
    opt = ngcuda.KFAC(model, factor_decay=0.0, lr=0.05, factor_structure="full")
    (b,) = list(neighbor_loader(data, g.train_mask.nonzero().flatten()[:20], [5, 5], batch_size=20))
    x = b.x.double()
    out = model(x, b.edge_index)
    opt.set_outputs(out, mask=torch.arange(b.batch_size))
    F.cross_entropy(out[: b.batch_size], b.y[: b.batch_size]).backward()
    opt.step()
    n = b.num_nodes
    ei, w = gcn_norm(b.edge_index, None, n, add_self_loops=True, dtype=torch.float64)
    adj = torch.zeros(n, n, dtype=torch.float64).index_put_((ei[1], ei[0]), w, accumulate=True)
    a = torch.cat([adj @ x, torch.ones(n, 1, dtype=torch.float64)], 1)
    A = opt.state[model.conv1.lin.weight]["A"]
    assert torch.allclose(A, a.T @ a / n, atol=1e-10)


def test_kfac_minibatch_training_on_cora_learns(cora, one_thread):
    g, data = cora
    torch.manual_seed(0)
    model = uncache_gcn(GCN(data.num_features, 16, 7, dropout=0.0, input_dropout=False))
    # Adam-KFAC: standalone K-FAC's KL clip makes its first few dozen steps slow (full batch too)
    opt = ngcuda.KFAC(model, inverse_every=5,
                      base_optimizer=torch.optim.Adam(model.parameters(), lr=0.01))
    seeds = g.train_mask.nonzero().flatten()

    def val_acc() -> float:
        model.eval()
        with torch.no_grad():
            pred = model(data.x, data.edge_index).argmax(1)
        model.train()
        return float((pred[g.val_mask] == g.y[g.val_mask]).float().mean())

    before = val_acc()
    for epoch in range(4):
        for b in neighbor_loader(data, rank_share(seeds, 0, 1, epoch), [10, 10], batch_size=35,
                                 seed=epoch):
            opt.zero_grad()
            out = model(b.x, b.edge_index)
            opt.set_outputs(out, mask=torch.arange(b.batch_size))
            F.cross_entropy(out[: b.batch_size], b.y[: b.batch_size]).backward()
            opt.step()
    after = val_acc()
    print(f"mini-batch K-FAC on Cora: val acc {before:.3f} -> {after:.3f} in {opt.steps} steps")
    assert opt.steps == 16
    assert after >= 0.5 and after >= before + 0.3  # 0.64 here; Adam alone: 0.63


def test_pseudo_labels_with_mini_batches_are_refused(cora):
    from ngcuda.train import NodeConfig, OptimizerConfig, train_node_classifier

    g, _ = cora
    cfg = NodeConfig(epochs=1, batch_size=35, pseudo_label_gamma=3.0)
    with pytest.raises(ValueError, match="pseudo-labels need full-batch training"):
        train_node_classifier(g, "adam", 0, cfg, OptimizerConfig(), torch.device("cpu"))
