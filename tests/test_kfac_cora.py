"""ngcuda.KFAC trains a 2-layer GCN on Cora (public split) to >= 80% test accuracy on the CPU.

Cora is the copy that ships with the package (``ngcuda.data.load_planetoid``).
"""
from __future__ import annotations

import time

import pytest
import torch
import torch.nn.functional as F

import ngcuda
from ngcuda.models import GCN
from ngcuda.data import load_planetoid

pyg = pytest.importorskip("torch_geometric")

pytestmark = pytest.mark.filterwarnings("ignore:ngcuda. no compiled:RuntimeWarning")


def load_cora():
    return load_planetoid("cora")



def train_cora(data, epochs: int = 100, fisher_rows: str = "train", hidden: int = 16,
               adam: dict | None = None, seed: int = 0, **kw):
    torch.manual_seed(seed)
    x = data.x / data.x.sum(1, keepdim=True).clamp(min=1)  # row-normalised features
    model = GCN(x.shape[1], hidden, data.num_classes, input_dropout=False)
    if adam is not None:
        kw["base_optimizer"] = torch.optim.Adam(model.parameters(), **adam)
    opt = ngcuda.KFAC(model, **kw)
    for _ in range(epochs):
        model.train()
        opt.zero_grad()
        out = model(x, data.edge_index)
        opt.set_outputs(out, mask=data.train_mask if fisher_rows == "train" else None)
        F.cross_entropy(out[data.train_mask], data.y[data.train_mask]).backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        pred = model(x, data.edge_index).argmax(1)
    return float((pred[data.test_mask] == data.y[data.test_mask]).float().mean())


def test_cora_gcn_reaches_80_percent_in_100_epochs(one_thread):
    data = load_cora()
    assert data.x.shape == (2708, 1433) and int(data.train_mask.sum()) == 140
    t0 = time.perf_counter()
    acc = train_cora(data, epochs=100, hidden=64, lr=0.02, damping=0.01, momentum=0.9,
                     weight_decay=5e-4, inverse_every=10, kl_clip=1e-2)
    print(f"Cora GCN K-FAC: test acc {acc:.4f} in {time.perf_counter() - t0:.1f}s")
    assert acc >= 0.80
