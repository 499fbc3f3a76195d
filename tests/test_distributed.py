"""Distributed K-FAC (ngcuda.optim.distributed): 2 gloo processes on the CPU against 1 process.

The 2-process runs are subprocesses of tests/distributed_worker.py with a hard wall-clock limit,
so that a hang fails the test instead of the suite.
"""
from __future__ import annotations

import datetime
import itertools
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

import ngcuda
from ngcuda.optim.distributed import (DistributedKFACError, DistributedOptions, eigh_cost,
                                      greedy_assign)

pytest.importorskip("torch_geometric")
sys.path.insert(0, str(Path(__file__).parent))
import distributed_worker as worker  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

ROOT = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).with_name("distributed_worker.py")
HARD_LIMIT = 150.0  # seconds for a whole 2-process launch (a few seconds each on a quiet CPU)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(scenario: str, out: Path, wait_for: tuple[int, ...] = (0, 1)) -> list[dict]:
    """Runs 2 ranks of the worker; waits (bounded) for the ranks in ``wait_for``, kills the rest.
    Returns each waited rank's result."""
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), WORLD_SIZE="2",
               PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
               OMP_NUM_THREADS="1")
    procs = []
    for r in range(2):
        log = open(out / f"log{r}.txt", "w")
        procs.append(subprocess.Popen([sys.executable, str(WORKER), scenario, str(out)],
                                      env=dict(env, RANK=str(r)), stdout=log,
                                      stderr=subprocess.STDOUT, cwd=ROOT))
    deadline = time.monotonic() + HARD_LIMIT
    try:
        for r in wait_for:
            try:
                procs[r].wait(timeout=max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pytest.fail(f"rank {r} of '{scenario}' hung for {HARD_LIMIT}s:\n"
                            + (out / f"log{r}.txt").read_text()[-3000:])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    results = []
    for r in wait_for:
        path = out / f"rank{r}.pt"
        assert path.exists(), f"rank {r} wrote no result:\n{(out / f'log{r}.txt').read_text()[-3000:]}"
        results.append(torch.load(path, weights_only=False))
    return results


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Every configuration of the worker on 2 ranks (one launch for all of them)."""
    return launch("runs", tmp_path_factory.mktemp("dist-runs"))


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max())


# --------------------------------------------------------------------------- 2 ranks == 1 rank
@pytest.mark.parametrize("name", [n for n, c in worker.CONFIGS.items() if c[3] == "empirical"])
def test_two_ranks_on_split_data_equal_one_rank_on_all(runs, name):
    """Factors, eigenvalues and parameter updates to 1e-6 over 5 steps (inverse updates at
    steps 0, 2, 4), with uneven shares (7 / 13 examples, 2 / 4 labelled nodes)."""
    ref = worker.run_config(name, 0, 1)
    assert ref["calls"] == 0
    for step, want in enumerate(ref["steps"]):
        for rank, res in enumerate(runs):
            got = res[name]["steps"][step]
            for i, (a, g) in want["factors"].items():
                assert _max_diff(got["factors"][i][0], a) <= 1e-6, (step, rank, i, "A")
                assert _max_diff(got["factors"][i][1], g) <= 1e-6, (step, rank, i, "G")
            for key, lam in got["eigenvalues"].items():
                assert _max_diff(lam, want["eigenvalues"][key]) <= 1e-6, (step, rank, key)
            for u, w in zip(got["updates"], want["updates"]):
                assert _max_diff(u, w) <= 1e-6, (step, rank)
    # every eigendecomposition happened somewhere
    for step, want in enumerate(ref["steps"]):
        held = set().union(*(res[name]["steps"][step]["eigenvalues"] for res in runs))
        assert held == set(want["eigenvalues"])


@pytest.mark.parametrize("name", list(worker.CONFIGS))
def test_every_rank_holds_identical_parameters_after_each_step(runs, name):
    for step in range(worker.STEPS):
        p0, p1 = (res[name]["steps"][step]["params"] for res in runs)
        assert all(torch.equal(a, b) for a, b in zip(p0, p1)), (name, step)
        f0, f1 = (res[name]["steps"][step]["factors"] for res in runs)
        assert all(torch.equal(f0[i][k], f1[i][k]) for i in f0 for k in (0, 1)), (name, step)


def test_broadcast_modes_place_eigenbases_as_documented(runs):
    # eigenbases: every rank holds every eigenbasis; gradients: each layer's on its owner only
    for rank in (0, 1):
        assert len(runs[rank]["mlp-eigenbases"]["steps"][-1]["eigenvalues"]) == 4
    owners = greedy_assign([eigh_cost(6) + eigh_cost(7), eigh_cost(8) + eigh_cost(3)], 2)
    for rank in (0, 1):
        held = {i for i, _ in runs[rank]["mlp-gradients"]["steps"][-1]["eigenvalues"]}
        assert held == {i for i, o in enumerate(owners) if o == rank}
    # collectives per run: eigenbases 3 per step (gradients, factor weights, factors) + one
    # broadcast per rank on each of the 3 inverse updates; gradients: 3 + 2 broadcasts per step
    assert runs[0]["mlp-eigenbases"]["calls"] == 3 * 5 + 2 * 3
    assert runs[0]["mlp-gradients"]["calls"] == 3 * 5 + 2 * 5


def test_no_hang_when_a_rank_owns_no_layer(runs):
    """One layer, broadcast="gradients": rank 1 never decomposes or preconditions anything."""
    assert greedy_assign([eigh_cost(6) + eigh_cost(3)], 2) == [0]
    steps1 = runs[1]["one-layer-gradients"]["steps"]
    assert all(not s["eigenvalues"] for s in steps1)
    assert all(s["eigenvalues"] for s in runs[0]["one-layer-gradients"]["steps"])


@pytest.mark.parametrize("name", ["gcn-true-fisher", "mlp-ddp-true-fisher"])
def test_true_fisher_ranks_sample_independently_but_agree(runs, name):
    """Ranks draw their own targets (seed + rank), so the 1-rank run is matched in expectation
    only; the ranks still hold identical factors and parameters (checked above), which moved.
    With DDP the sampled-target backward leaves DDP's gradient reduction alone."""
    first = runs[0][name]["steps"][0]["updates"]
    assert any(float(u.abs().max()) > 0 for u in first)
    # true Fisher: the factor all-reduce is launched by set_outputs, before the user's backward
    assert all(s["in_flight"] for res in runs for s in res[name]["steps"])
    assert not any(s["in_flight"] for s in runs[0]["mlp-eigenbases"]["steps"])  # empirical


def test_main_job_full_batch_two_ranks_match_one_rank_on_cora(runs):
    """ngcuda.train's loop, each rank's loss on its 70 of the 140 training nodes: with Adam (DDP)
    the 2-rank run reports the same losses as 1 rank; K-FAC ranks agree with each other."""
    ref = worker.run_cora(0, 1)["adam"]
    for want, got in zip(ref, runs[0]["cora"]["adam"]):
        assert abs(got["train_loss"] - want["train_loss"]) <= 1e-5
        assert abs(got["val_loss"] - want["val_loss"]) <= 1e-5
    for name in ("adam", "kfac"):
        h0, h1 = (res["cora"][name] for res in runs)
        assert [r["val_loss"] for r in h0] == [r["val_loss"] for r in h1]
        assert [r["train_loss"] for r in h0] == [r["train_loss"] for r in h1]


# ------------------------------------------------------------------------------ fail fast
@pytest.mark.parametrize("scenario", ["crash", "stall"])
def test_a_failing_rank_makes_the_other_fail_fast(tmp_path, scenario):
    """crash: rank 1 raises and exits; stall: rank 1 stays alive but stops stepping. Rank 0
    raises DistributedKFACError within its 3 s collective timeout (plus the steps before)."""
    (res,) = launch(scenario, tmp_path, wait_for=(0,))
    assert res["type"] == "DistributedKFACError"
    assert "rank 0/2" in res["error"] and "step 2" in res["error"]
    assert res["seconds"] < 20.0


# ------------------------------------------------------------------------------- resume
def test_resuming_a_gradients_broadcast_checkpoint_rebuilds_every_basis(tmp_path):
    """A checkpoint of rank 0 marks the layer rank 1 owns as "held elsewhere"; resumed on both
    ranks, that owner must decompose it again (it was left to the plain step for good), and a
    single-process low-rank checkpoint is refused with a clear error."""
    res = launch("resume", tmp_path)
    assert sorted(set(res[0]["has_basis"]) | set(res[1]["has_basis"])) == ["a", "b"]
    for r in res:
        assert "a (lowrank:4)" in r["lowrank_error"] and "'full' only" in r["lowrank_error"]


def test_ranks_agree_where_they_used_to_split_hang_or_crash(tmp_path):
    """A layer run by one rank only (a data-dependent branch: it hung with broadcast="gradients"
    and split the replicas with "eigenbases"), a sparse gradient (crashed), a constant CSR input
    whose A one rank must recompute (crashed), a resume from rank 0's checkpoint (every rank then
    sampled the same true-Fisher targets), a single-process checkpoint with an automatic choice
    still open (chosen again as low rank: crashed), each rank resuming its own broadcast="gradients"
    checkpoint (different bases per rank: the decompositions hung), and --dist-timeout (not passed
    to K-FAC)."""
    res = launch("edge-cases", tmp_path)
    assert res[0]["provisional-saved"] == [""]  # the checkpoint does hold a choice still open
    for r in res:
        assert r["branch-eigenbases"] and r["branch-gradients"]
        assert r["sparse-grad"] and r["csr-recompute"]
        assert not r["same-sampling-fresh"] and not r["same-sampling-resumed"]
        assert r["provisional-structure"] == "full" and r["provisional-same"]
        assert r["timeout"] == 7.0
        assert r["own-checkpoint-gradients"] and r["own-checkpoint-eigenbases"]


# --------------------------------------------------------------------------- assignment
def test_greedy_assign_is_deterministic_and_balanced():
    g = torch.Generator().manual_seed(0)
    for trial in range(30):
        k = int(torch.randint(1, 9, (1,), generator=g))
        world = int(torch.randint(1, 5, (1,), generator=g))
        costs = [eigh_cost(int(n)) for n in torch.randint(1, 64, (k,), generator=g)]
        owners = greedy_assign(costs, world)
        assert owners == greedy_assign(list(costs), world)
        assert all(0 <= o < world for o in owners)
        load = max(sum(c for c, o in zip(costs, owners) if o == r) for r in range(world))
        best = min(max(sum(c for c, o in zip(costs, a) if o == r) for r in range(world))
                   for a in itertools.product(range(world), repeat=k))
        assert load <= 4 / 3 * best + 1e-9  # Graham's LPT bound
    assert greedy_assign([8.0, 8.0, 1.0], 4) == [0, 1, 2]  # rank 3 gets no work
    assert greedy_assign([], 3) == []


def test_options_are_checked():
    with pytest.raises(ValueError, match="broadcast"):
        DistributedOptions(broadcast="shards")
    with pytest.raises(ValueError, match="timeout"):
        DistributedOptions(timeout=0)


def test_distributed_true_needs_an_initialised_group():
    assert not dist.is_initialized()
    model = torch.nn.Linear(3, 2)
    with pytest.raises(ValueError, match="init_process_group"):
        ngcuda.KFAC(model, distributed=True)
    assert ngcuda.KFAC(model)._dist is None  # auto: off without a group


def test_world_size_one_makes_no_collective_calls(tmp_path, monkeypatch):
    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1,
                            timeout=datetime.timedelta(seconds=10))
    try:
        def forbidden(*args, **kwargs):
            raise AssertionError("collective call in a world-size-1 run")

        for fn in ("all_reduce", "broadcast", "all_gather", "reduce_scatter", "barrier"):
            monkeypatch.setattr(dist, fn, forbidden)
        torch.manual_seed(0)
        model = worker.build("mlp")
        x, y = worker.mlp_data(0, 1, False)
        for distributed in (None, True, DistributedOptions(broadcast="gradients")):
            opt = ngcuda.KFAC(model, inverse_every=1, distributed=distributed)
            assert opt._dist is None
            for _ in range(2):
                opt.zero_grad()
                out = model(x)
                opt.set_outputs(out)
                torch.nn.functional.cross_entropy(out, y).backward()
                opt.step()
    finally:
        monkeypatch.undo()
        dist.destroy_process_group()


def test_error_type_is_a_runtime_error():
    assert issubclass(DistributedKFACError, RuntimeError)


# ------------------------------------------------------------------------------------ CLI
def test_cli_torchrun_two_processes_minibatch_on_cora(tmp_path):
    """`torchrun --nproc_per_node 2 -m ngcuda train --distributed --batch-size 35`: each rank
    samples NeighborLoader batches from its half of the training nodes; rank 0 writes metrics."""
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "ngcuda", "train", "--distributed", "--dist-timeout", "60", "--epochs", "2",
           "--batch-size", "35", "--num-neighbors", "5,5", "--optimizers", "kfac,adam",
           "--out", str(out), "--quiet"]
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=HARD_LIMIT)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    import json

    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and metrics["config"]["batch_size"] == 35
    assert [r["optimizer"] for r in metrics["runs"]] == ["kfac", "adam"]
    for run in metrics["runs"]:
        assert [h["epoch"] for h in run["history"]] == [1, 2]
        assert all(0.0 < h["train_loss"] < 10.0 for h in run["history"])


def test_cli_distributed_outside_torchrun_is_a_clear_error(capsys, monkeypatch):
    from ngcuda.cli import main

    for var in ("RANK", "WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(SystemExit) as e:
        main(["train", "--distributed", "--epochs", "1"])
    assert e.value.code == 2
    assert "run under torchrun" in capsys.readouterr().err
