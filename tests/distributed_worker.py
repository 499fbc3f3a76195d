"""One rank of the multi-process tests in test_distributed.py (and, imported, the 1-rank oracle).

Run as ``python tests/distributed_worker.py SCENARIO OUT_DIR`` with the torch.distributed
environment (MASTER_ADDR, MASTER_PORT, RANK, WORLD_SIZE) set; writes ``OUT_DIR/rank<r>.pt``.

Scenarios:
    runs   every configuration of CONFIGS on this rank's share of the data, 5 steps each, and
           2 epochs of the main job's full-batch loop on Cora.
    crash  rank 1 raises at step 2; rank 0 must fail fast with DistributedKFACError.
    stall  rank 1 stops calling step() (sleeps) at step 2; rank 0 must time out.
"""
from __future__ import annotations

import datetime
import os
import sys
import time
import traceback
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn

STEPS = 5

# name -> (model, broadcast, ddp, fisher); split data, uneven on purpose where DDP is not used
# (DDP averages gradients uniformly, so it needs equal shares to equal the 1-rank run).
CONFIGS: dict[str, tuple[str, str, bool, str]] = {
    "mlp-eigenbases": ("mlp", "eigenbases", False, "empirical"),
    "mlp-gradients": ("mlp", "gradients", False, "empirical"),
    "gcn-eigenbases": ("gcn", "eigenbases", False, "empirical"),
    "gcn-gradients": ("gcn", "gradients", False, "empirical"),
    "mlp-ddp": ("mlp-even", "eigenbases", True, "empirical"),
    "one-layer-gradients": ("one-layer", "gradients", False, "empirical"),
    "gcn-true-fisher": ("gcn", "eigenbases", False, "true"),
    "mlp-ddp-true-fisher": ("mlp-even", "gradients", True, "true"),
}


def mlp_data(rank: int, world: int, even: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """x [20, 5] float64 and labels [20] (all of it when world == 1; else this rank's rows)."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(20, 5, dtype=torch.float64, generator=g)
    y = torch.randint(0, 3, (20,), generator=g)
    if world == 1:
        return x, y
    cut = 10 if even else 7  # uneven shares: 7 and 13 examples
    rows = slice(0, cut) if rank == 0 else slice(cut, None)
    return x[rows], y[rows]


def graph_part(part: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One of two small random graphs: x [N, 4], edge_index [2, E], y [N], train mask [N]."""
    n = (6, 9)[part]
    g = torch.Generator().manual_seed(10 + part)
    src, dst = torch.randint(0, n, (2 * n,), generator=g), torch.randint(0, n, (2 * n,), generator=g)
    keep = src != dst
    ei = torch.stack([torch.cat([src[keep], dst[keep]]), torch.cat([dst[keep], src[keep]])])
    x = torch.randn(n, 4, dtype=torch.float64, generator=g)
    y = torch.randint(0, 3, (n,), generator=g)
    mask = torch.zeros(n, dtype=torch.bool)
    mask[torch.randperm(n, generator=g)[: 2 + 2 * part]] = True  # 2 and 4 labelled nodes
    return x, ei, y, mask


def graph_data(rank: int, world: int):
    """This rank's graph, or (world 1) the disjoint union of both: A and G then have no cross
    terms between the parts, so the 2-rank statistics can equal the 1-rank ones exactly."""
    if world > 1:
        return graph_part(rank)
    parts = [graph_part(0), graph_part(1)]
    off = parts[0][0].shape[0]
    x = torch.cat([parts[0][0], parts[1][0]])
    ei = torch.cat([parts[0][1], parts[1][1] + off], 1)
    return x, ei, torch.cat([parts[0][2], parts[1][2]]), torch.cat([parts[0][3], parts[1][3]])


class TinyGCN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        from torch_geometric.nn import GCNConv

        self.conv1 = GCNConv(4, 5)
        self.conv2 = GCNConv(5, 3)

    def forward(self, x: torch.Tensor, edge_index: torch.Tensor) -> torch.Tensor:
        return self.conv2(torch.tanh(self.conv1(x, edge_index)), edge_index)


def build(kind: str) -> nn.Module:
    torch.manual_seed(0)
    if kind == "gcn":
        return TinyGCN().double()
    if kind == "one-layer":
        return nn.Linear(5, 3).double()
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).double()


def run_config(name: str, rank: int, world: int) -> dict[str, Any]:
    """5 K-FAC steps (inverse updates at steps 0, 2, 4); per step the factors, eigenvalues,
    parameters and parameter updates of this rank."""
    import ngcuda
    from ngcuda.optim.distributed import DistributedOptions

    kind, broadcast, ddp, fisher = CONFIGS[name]
    model = build(kind)
    wrapped: nn.Module = model
    if ddp and world > 1:
        wrapped = nn.parallel.DistributedDataParallel(model)
    distributed: Any = DistributedOptions(broadcast=broadcast, timeout=30.0) if world > 1 else False
    opt = ngcuda.KFAC(wrapped, lr=0.1, damping=0.05, momentum=0.9, weight_decay=1e-3,
                      inverse_every=2, kl_clip=1e-2, fisher_type=fisher, distributed=distributed)
    if kind == "gcn":
        x, ei, y, mask = graph_data(rank, world)
        forward = lambda: wrapped(x, ei)  # noqa: E731
    else:
        x, y = mlp_data(rank, world, kind == "mlp-even")
        mask = torch.ones(x.shape[0], dtype=torch.bool)
        forward = lambda: wrapped(x)  # noqa: E731
    steps = []
    for _ in range(STEPS):
        before = [p.detach().clone() for p in model.parameters()]
        opt.zero_grad()
        out = forward()
        opt.set_outputs(out, mask=mask)
        in_flight = opt._pending_factors is not None  # the factor all-reduce during backward
        F.cross_entropy(out[mask], y[mask]).backward()
        opt.step()
        rec: dict[str, Any] = {
            "in_flight": in_flight,
            "params": [p.detach().clone() for p in model.parameters()],
            "updates": [p.detach() - b for p, b in zip(model.parameters(), before)],
            "factors": {}, "eigenvalues": {},
        }
        for i, layer in enumerate(opt._layers):  # by index: DDP prefixes the names
            st = opt.state[layer.weight]
            rec["factors"][i] = (st["A"].clone(), st["G"].clone())
            for key in ("A", "G"):
                if f"lam{key}" in st:  # broadcast="gradients": on the layer's owner only
                    rec["eigenvalues"][(i, key)] = st[f"lam{key}"].clone()
        steps.append(rec)
    return {"steps": steps, "calls": opt._dist.calls if opt._dist is not None else 0}


def run_cora(rank: int, world: int) -> dict[str, Any]:
    """The main job's full-batch loop on shipped Cora, 2 epochs per optimizer: each rank's loss
    covers its share of the 140 training nodes. Histories (rank 0's as reported, every rank's
    parameters)."""
    from ngcuda.data import load_planetoid
    from ngcuda.train import NodeConfig, OptimizerConfig, train_node_classifier

    graph = load_planetoid("cora")
    cfg = NodeConfig(epochs=2, dropout=0.0)
    out = {}
    for name in ("adam", "kfac"):
        out[name] = train_node_classifier(graph, name, 0, cfg, OptimizerConfig(weight_decay=5e-4),
                                          torch.device("cpu"))["history"]
    return out


def _fail_fast(scenario: str, rank: int, world: int) -> dict[str, Any]:
    import ngcuda
    from ngcuda.optim.distributed import DistributedKFACError, DistributedOptions

    model = build("mlp")
    opt = ngcuda.KFAC(model, inverse_every=1, fisher_type="empirical",
                      distributed=DistributedOptions(timeout=3.0))
    x, y = mlp_data(rank, world, True)
    t0 = time.perf_counter()
    try:
        for step in range(STEPS):
            if rank == 1 and step == 2:
                if scenario == "crash":
                    raise RuntimeError("injected failure on rank 1")
                time.sleep(60)  # stall: alive but never calls step() again
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
    except DistributedKFACError as err:
        return {"error": str(err), "type": "DistributedKFACError",
                "seconds": time.perf_counter() - t0}
    return {"error": None, "seconds": time.perf_counter() - t0}


class _Two(nn.Module):
    """Two Linear layers reading one fixed input: constant A factors, one owner each."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(20, 3), nn.Linear(20, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.a(x) + self.b(x)


def _fit(model: nn.Module, opt: Any, x: torch.Tensor, y: torch.Tensor, steps: int,
         outputs: bool = True) -> None:
    """``steps`` full-batch cross-entropy steps, giving K-FAC the logits first unless not
    ``outputs`` (the empirical Fisher then counts nothing)."""
    for _ in range(steps):
        opt.zero_grad()
        out = model(x)
        if outputs:
            opt.set_outputs(out, likelihood="categorical")
        F.cross_entropy(out, y).backward()
        opt.step()


def _resume(rank: int, world: int, out_dir: str) -> dict[str, Any]:
    """broadcast="gradients": 3 steps, rank 0's checkpoint, then both ranks resume from it for 3
    steps. Reports which layers have an eigenbasis on this rank after the resume, and the error
    of loading a single-process low-rank checkpoint into a distributed run."""
    import torch.distributed as dist

    import ngcuda
    from ngcuda.optim.distributed import DistributedOptions

    torch.manual_seed(0)
    x, y = torch.randn(32, 20), torch.randint(0, 3, (32,))

    def run(resume_from: Optional[str]) -> Any:
        torch.manual_seed(1)
        model = _Two()
        opt = ngcuda.KFAC(model, inverse_every=1,
                          distributed=DistributedOptions(broadcast="gradients", timeout=30.0))
        if resume_from is not None:
            opt.load_state_dict(torch.load(resume_from, weights_only=False))
        _fit(model, opt, x, y, 3)
        return model, opt

    path = os.path.join(out_dir, "checkpoint.pt")
    _, opt = run(None)
    if rank == 0:
        torch.save(opt.state_dict(), path)
    dist.barrier()
    model, opt = run(path)
    has_basis = sorted(n for n in ("a", "b") if "QA" in opt.state[getattr(model, n).weight])

    torch.manual_seed(1)
    single = _Two()
    plain = ngcuda.KFAC(single, factor_structure="lowrank:4", distributed=False)
    plain.zero_grad()
    out = single(x)
    plain.set_outputs(out, likelihood="categorical")
    F.cross_entropy(out, y).backward()
    plain.step()
    try:
        opt.load_state_dict(plain.state_dict())
        error = None
    except ValueError as e:
        error = str(e)
    dist.barrier()
    return {"has_basis": has_basis, "lowrank_error": error}


class _Branch(nn.Module):
    """A data-dependent branch: ``b`` runs only when the batch asks for it."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(4, 3), nn.Linear(4, 3)

    def forward(self, x: torch.Tensor, use_b: bool) -> torch.Tensor:
        return self.a(x) + self.b(x) if use_b else self.a(x)


def _edge_cases(rank: int, world: int, out_dir: str) -> dict[str, Any]:
    """Cases where ranks used to disagree, hang or crash; each reports whether every rank ends
    with the same parameters (or the property named)."""
    import torch.distributed as dist

    import ngcuda
    from ngcuda.optim.distributed import DistributedOptions
    from ngcuda.train.optimizers import OptimizerConfig, make_optimizer

    def copies(t: torch.Tensor) -> list[torch.Tensor]:
        flat = t.detach().reshape(-1).double()
        out = [torch.zeros_like(flat) for _ in range(world)]
        dist.all_gather(out, flat)
        return out

    def same(model: nn.Module) -> bool:
        c = copies(torch.cat([p.detach().reshape(-1) for p in model.parameters()]))
        return all(torch.equal(c[0], x) for x in c)

    def options() -> DistributedOptions:
        return DistributedOptions(timeout=30.0)

    res: dict[str, Any] = {}
    # a layer that runs on rank 0 only at step 2
    for mode in ("eigenbases", "gradients"):
        torch.manual_seed(0)
        model = _Branch()
        opt = ngcuda.KFAC(model, inverse_every=1, fisher_type="empirical", kl_clip=None,
                          distributed=DistributedOptions(broadcast=mode, timeout=30.0))
        gen = torch.Generator().manual_seed(rank)
        ok = True
        for step in range(4):
            x, y = torch.randn(8, 4, generator=gen), torch.randint(0, 3, (8,), generator=gen)
            opt.zero_grad()
            F.cross_entropy(model(x, not (step == 2 and rank == 1)), y).backward()
            opt.step()
            ok = ok and same(model)
        res[f"branch-{mode}"] = ok
    # a sparse gradient (an unpreconditioned nn.Embedding(sparse=True))
    torch.manual_seed(0)
    model = nn.ModuleDict({"emb": nn.Embedding(10, 4, sparse=True), "lin": nn.Linear(4, 3)})
    opt = ngcuda.KFAC(model, inverse_every=1, fisher_type="empirical", distributed=options())
    gen = torch.Generator().manual_seed(rank)
    for _ in range(2):
        idx, y = torch.randint(0, 10, (8,), generator=gen), torch.randint(0, 3, (8,), generator=gen)
        opt.zero_grad()
        F.cross_entropy(model["lin"](model["emb"](idx)), y).backward()
        opt.step()
    res["sparse-grad"] = same(model)
    # a constant CSR input: rank 1's mask is empty at step 1, so at step 2 rank 0 recomputes its A
    gen = torch.Generator().manual_seed(rank)
    x = ((torch.rand(10, 6, generator=gen) < 0.4).float() * torch.rand(10, 6, generator=gen))
    x = x.to_sparse_csr()
    y = torch.randint(0, 3, (10,), generator=gen)
    torch.manual_seed(0)
    model = nn.Linear(6, 3)
    opt = ngcuda.KFAC(model, inverse_every=1, factor_decay=0.0, distributed=options())
    for step in range(3):
        mask = torch.full((10,), not (rank == 1 and step == 1))
        opt.zero_grad()
        out = model(x)
        opt.set_outputs(out, likelihood="categorical", mask=mask)
        (F.cross_entropy(out[mask], y[mask]) if mask.any() else out.sum() * 0).backward()
        opt.step()
    res["csr-recompute"] = same(model)
    # resumed from rank 0's checkpoint, the ranks still sample different true-Fisher targets
    data = torch.randn(16, 5, generator=torch.Generator().manual_seed(9))
    labels = torch.randint(0, 3, (16,), generator=torch.Generator().manual_seed(8))
    path = os.path.join(out_dir, "sampling.pt")

    def sampled(resume: bool) -> bool:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3))
        opt = ngcuda.KFAC(model, inverse_every=1, distributed=options())
        if resume:
            opt.load_state_dict(torch.load(path, weights_only=False))
        _fit(model, opt, data, labels, 2)
        if not resume and rank == 0:
            torch.save(opt.state_dict(), path)
        c = copies(opt._generators["cpu"].get_state())
        return all(torch.equal(c[0], s) for s in c)

    res["same-sampling-fresh"] = sampled(False)
    dist.barrier()
    res["same-sampling-resumed"] = sampled(True)
    # a single-process checkpoint whose automatic choice ("full" for a constant input) was still
    # to be confirmed: a distributed run must not choose again (it picked a low rank and crashed)
    big = torch.rand(512, 200, generator=torch.Generator().manual_seed(3))
    target = torch.randint(0, 4, (512,), generator=torch.Generator().manual_seed(4))
    ckpt = os.path.join(out_dir, "provisional.pt")
    if rank == 0:
        torch.manual_seed(0)
        single = nn.Linear(200, 4)
        opt = ngcuda.KFAC(single, inverse_every=1, fisher_type="empirical", distributed=False)
        _fit(single, opt, big, target, 1, outputs=False)
        res["provisional-saved"] = opt.state_dict()["kfac"]["provisional"]
        torch.save(opt.state_dict(), ckpt)
    dist.barrier()
    torch.manual_seed(0)
    model = nn.Linear(200, 4)
    opt = ngcuda.KFAC(model, inverse_every=1, fisher_type="empirical", distributed=options())
    opt.load_state_dict(torch.load(ckpt, weights_only=False))
    _fit(model, opt, big, target, 2, outputs=False)
    res["provisional-structure"] = opt.layers()[0].structure
    res["provisional-same"] = same(model)
    # each rank resumes its own broadcast="gradients" checkpoint (each holds its own layers'
    # eigenbases only), in either mode: the ranks must decompose the same matrices
    x2 = torch.randn(32, 20, generator=torch.Generator().manual_seed(5))
    y2 = torch.randint(0, 3, (32,), generator=torch.Generator().manual_seed(6))
    own = os.path.join(out_dir, f"own{rank}.pt")
    for mode in ("gradients", "eigenbases"):
        for resume in (False, True):
            torch.manual_seed(1)
            model = _Two()
            opt = ngcuda.KFAC(model, inverse_every=10, distributed=DistributedOptions(
                broadcast="gradients" if not resume else mode, timeout=30.0))
            if resume:
                opt.load_state_dict(torch.load(own, weights_only=False))
            _fit(model, opt, x2, y2, 3)
            if not resume and mode == "gradients":
                torch.save(opt.state_dict(), own)
        res[f"own-checkpoint-{mode}"] = same(model)
    # the main job's --dist-timeout reaches K-FAC
    opt = make_optimizer("kfac", nn.Linear(3, 2), OptimizerConfig(dist_timeout=7.0))
    res["timeout"] = opt._dist.options.timeout
    return res


def main(argv: Optional[list[str]] = None) -> int:
    import torch.distributed as dist

    scenario, out_dir = (argv or sys.argv[1:])[:2]
    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=30))
    rank, world = dist.get_rank(), dist.get_world_size()
    if scenario == "runs":
        result: dict[str, Any] = {name: run_config(name, rank, world) for name in CONFIGS}
        result["cora"] = run_cora(rank, world)
    elif scenario == "resume":
        result = _resume(rank, world, out_dir)
    elif scenario == "edge-cases":
        result = _edge_cases(rank, world, out_dir)
    else:
        result = _fail_fast(scenario, rank, world)
    torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    if scenario in ("runs", "resume", "edge-cases"):
        dist.barrier()
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except Exception:
        traceback.print_exc()
        sys.exit(1)
