"""Distributed K-FAC overhead: a K-FAC step on P processes against 1, GCN on Cora, full batch.

    torchrun --nproc_per_node 1 benchmarks/bench_distributed.py [--input-dropout] [--out FILE]
    torchrun --nproc_per_node 2 benchmarks/bench_distributed.py [--input-dropout] [--out FILE]

Each rank trains the 2-layer GCN (16 hidden) on the whole graph with its share of the 140 training
nodes in the loss (ngcuda train --distributed), true Fisher, factors every step, eigendecompositions
every 10 steps; one thread per process. Rank 0 prints the median and mean step time over
``--steps`` timed steps (after ``--warmup``) and the elements communicated per step, and appends a
JSON line to ``--out``. ``--input-dropout`` makes the 1434x1434 input factor change every step, so
it is all-reduced every step; without it the input is constant and that factor is never sent.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import ngcuda  # noqa: E402
from ngcuda.data import load_planetoid  # noqa: E402
from ngcuda.models import GCN  # noqa: E402
from ngcuda.train.sampling import rank_share  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--input-dropout", action="store_true")
    p.add_argument("--broadcast", choices=("eigenbases", "gradients"), default="eigenbases")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=120))
    rank, world = dist.get_rank(), dist.get_world_size()

    g = load_planetoid("cora")
    x = g.x.to_dense() if g.x.layout != torch.strided else g.x
    x = x / x.sum(1, keepdim=True).clamp(min=1)
    mask = torch.zeros(g.num_nodes, dtype=torch.bool)
    mask[rank_share(g.train_mask.nonzero().flatten(), rank, world, pad=False)] = True
    torch.manual_seed(0)
    model = GCN(x.shape[1], 16, g.num_classes, input_dropout=args.input_dropout)
    opt = ngcuda.KFAC(model, lr=0.02, damping=0.01, momentum=0.9, weight_decay=5e-4,
                      inverse_every=10, kl_clip=1e-2,
                      distributed=ngcuda.optim.DistributedOptions(broadcast=args.broadcast))
    times = []
    for step in range(args.warmup + args.steps):
        if step == args.warmup and opt._dist is not None:
            opt._dist.elements = opt._dist.calls = 0
        t0 = time.perf_counter()
        opt.zero_grad()
        out = model(x, g.edge_index)
        opt.set_outputs(out, mask=mask)
        F.cross_entropy(out[mask], g.y[mask]).backward()
        opt.step()
        times.append(time.perf_counter() - t0)
    timed = times[args.warmup:]
    # step time of the slowest rank is what a data-parallel run pays
    med = torch.tensor([statistics.median(timed), statistics.fmean(timed)], dtype=torch.float64)
    if world > 1:
        dist.all_reduce(med, op=dist.ReduceOp.MAX)
    row = {
        "world": world, "input_dropout": args.input_dropout, "broadcast": args.broadcast,
        "median_ms": 1e3 * float(med[0]), "mean_ms": 1e3 * float(med[1]),
        "elements_per_step": (opt._dist.elements / args.steps) if opt._dist else 0.0,
        "calls_per_step": (opt._dist.calls / args.steps) if opt._dist else 0.0,
        "steps": args.steps, "threads_per_process": 1, "cpu": platform.processor() or platform.machine(),
        "load_avg_1min": os.getloadavg()[0], "torch": torch.__version__,
    }
    if rank == 0:
        print(json.dumps(row))
        if args.out is not None:
            with open(args.out, "a") as f:
                f.write(json.dumps(row) + "\n")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
