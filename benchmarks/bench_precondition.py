"""precondition: one grouped call over every layer against a per-layer torch loop.

    python -m benchmarks precondition [--quick] [--device cpu|cuda] [--json PATH]

Layer shapes are those of the models the main job trains: a 2-layer GCN on Cora and CiteSeer and
the 784-1000-500-250-30 deep autoencoder. Each layer costs four GEMMs, 2·(d_out²·d_in + d_out·d_in²)
flops in all.
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch

from ngcuda import ops, reference

from .common import RESULTS, environment, median_time, print_table, write_json

MODELS = {
    "gcn-cora": [(16, 1434), (7, 17)],
    "gcn-citeseer": [(16, 3704), (6, 17)],
    "autoencoder": [(1000, 785), (500, 1001), (250, 501), (30, 251), (250, 31), (500, 251),
                    (1000, 501), (784, 1001)],
    "many-small": [(32, 33)] * 64,
}


def layer_inputs(shapes: list[tuple[int, int]], device: str) -> tuple[list[torch.Tensor], ...]:
    gen = torch.Generator().manual_seed(0)
    grads, QA, lamA, QG, lamG = [], [], [], [], []
    for dout, din in shapes:
        grads.append(torch.randn(dout, din, generator=gen))
        QA.append(torch.linalg.qr(torch.randn(din, din, generator=gen))[0])
        QG.append(torch.linalg.qr(torch.randn(dout, dout, generator=gen))[0])
        lamA.append(torch.rand(din, generator=gen))
        lamG.append(torch.rand(dout, generator=gen))
    return tuple([t.to(device) for t in ts] for ts in (grads, QA, lamA, QG, lamG))


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(prog="python -m benchmarks precondition", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--json", default=None, help="JSON path; - for none")
    args = p.parse_args(argv)
    names = ["gcn-cora", "many-small"] if args.quick else list(MODELS)
    rows = []
    for name in names:
        shapes = MODELS[name]
        g, qa, la, qg, lg = layer_inputs(shapes, args.device)
        t_ng = median_time(lambda: ops.precondition(g, qa, la, qg, lg, 0.01), args.device)
        t_loop = median_time(
            lambda: reference.precondition(g, qa, la, qg, lg, 0.01, compute_dtype=None), args.device)
        flops = sum(2 * (o * o * i + o * i * i) for o, i in shapes)
        rows.append({"model": name, "layers": len(shapes), "ngcuda_ms": t_ng * 1e3,
                     "torch_loop_ms": t_loop * 1e3, "speedup": t_loop / t_ng,
                     "gflops": flops / t_ng / 1e9})
    print_table(rows, ["model", "layers", "ngcuda_ms", "torch_loop_ms", "speedup", "gflops"])
    env = environment(args.device)
    payload = {"benchmark": "precondition", "quick": args.quick, "environment": env, "results": rows}
    if args.json != "-":
        dev = env["device"].replace(" ", "-")
        path = Path(args.json) if args.json else RESULTS / f"{dev}-precondition{'-quick' if args.quick else ''}.json"
        write_json(path, payload)
        print(f"\nwrote {path}")
    return payload


if __name__ == "__main__":
    main()
