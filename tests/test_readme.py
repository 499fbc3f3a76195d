"""The README's Python examples run as written (on shipped Cora, with fewer epochs), so the docs
cannot drift from the API."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("torch_geometric")

import ngcuda  # noqa: E402
from ngcuda.data import load_planetoid  # noqa: E402
from ngcuda.models import GCN  # noqa: E402

README = Path(__file__).resolve().parents[1] / "README.md"


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def namespace() -> dict:
    torch.manual_seed(0)
    graph = load_planetoid("cora")
    data = graph.to_pyg()
    model = GCN(graph.num_features, 16, graph.num_classes)
    return {"torch": torch, "F": F, "ngcuda": ngcuda, "model": model, "data": data}


def test_the_readme_has_the_examples_this_file_runs():
    blocks = python_blocks()
    assert len(blocks) == 4
    assert "ngcuda.KFAC(model" in blocks[0] and "opt.step()" in blocks[1]
    assert "factor_structure" in blocks[2] and "init_process_group" in blocks[3]


@pytest.mark.parametrize("index", [0, 1, 2])
def test_readme_example_runs(index, capsys):
    code = python_blocks()[index].replace("range(200)", "range(3)")
    ns = namespace()
    before = [p.detach().clone() for p in ns["model"].parameters()]
    exec(compile(code, f"README.md python block {index}", "exec"), ns)
    opt = ns["opt"]
    assert isinstance(opt, ngcuda.KFAC)
    if index == 1:  # the training loop moved the weights, and printed the registered layers
        assert opt.steps == 3
        assert any(not torch.equal(b, p) for b, p in zip(before, ns["model"].parameters()))
        assert "conv1" in capsys.readouterr().out
    if index == 2:
        assert "conv1" in capsys.readouterr().out


def test_readme_distributed_example_runs_in_one_process(monkeypatch):
    import socket

    import torch.distributed as dist

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(port))
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    ns = namespace()
    try:
        exec(compile(python_blocks()[3], "README.md python block 3", "exec"), ns)
        assert isinstance(ns["opt"], ngcuda.KFAC)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
