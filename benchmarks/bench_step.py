"""Time of one K-FAC training epoch vs one Adam epoch: 2-layer GCN on Cora, same run, same device.

    python benchmarks/bench_step.py [--epochs 60] [--hidden 16] [--device cpu] [--out FILE]

Every variant trains its own freshly initialised model for ``--warmup`` epochs (not timed, includes
the first eigendecomposition of the 1434x1434 input factor), then ``--epochs`` timed epochs. The
variants are timed in interleaved blocks so that machine load drifts hit all of them alike. The
ratio K-FAC / Adam is printed and written as JSON with the machine description.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import ngcuda  # noqa: E402
from ngcuda.models import GCN  # noqa: E402


def load_cora():
    from ngcuda.data import load_planetoid

    return load_planetoid("cora")



def make_variant(name: str, data, hidden: int, device: torch.device):
    torch.manual_seed(0)
    model = GCN(data.x.shape[1], hidden, data.num_classes, input_dropout=False).to(device)
    if name == "adam":
        opt = torch.optim.Adam(model.parameters(), lr=0.01, weight_decay=5e-4)
        fisher = None
    else:
        fisher = "true" if name.endswith("true") else "empirical"
        kw = dict(lr=0.02, damping=0.01, momentum=0.9, weight_decay=5e-4, factor_every=1,
                  inverse_every=10, kl_clip=1e-2, fisher_type=fisher, ekfac="ekfac" in name)
        if name.startswith("adam-kfac"):
            kw["base_optimizer"] = torch.optim.Adam(model.parameters(), lr=0.01, weight_decay=5e-4)
        opt = ngcuda.KFAC(model, **kw)

    def epoch():
        model.train()
        opt.zero_grad()
        out = model(data.x, data.edge_index)
        if fisher == "true":
            opt.set_outputs(out, mask=data.train_mask)
        F.cross_entropy(out[data.train_mask], data.y[data.train_mask]).backward()
        opt.step()

    def accuracy() -> float:
        model.eval()
        with torch.no_grad():
            pred = model(data.x, data.edge_index).argmax(1)
        return float((pred[data.test_mask] == data.y[data.test_mask]).float().mean())

    return epoch, accuracy


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m benchmarks step", description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=60)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--blocks", type=int, default=6)
    ap.add_argument("--hidden", type=int, default=16)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch default)")
    ap.add_argument("--variants", default="adam,kfac-true,kfac-empirical,adam-kfac-true,ekfac-true",
                    help="adam | kfac-true | kfac-empirical | adam-kfac-true | ekfac-true")
    ap.add_argument("--out", "--json", dest="out",
                    default=str(ROOT / "benchmarks" / "results" / "cpu-step.json"))
    ap.add_argument("--quick", action="store_true", help="a few epochs of adam and kfac-true")
    args = ap.parse_args(argv)
    if args.quick:
        args.epochs, args.warmup, args.blocks, args.variants = 4, 1, 2, "adam,kfac-true"
    warnings.simplefilter("ignore")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)

    data = load_cora()
    x = data.x / data.x.sum(1, keepdim=True).clamp(min=1)
    data.x = x
    for k in ("x", "edge_index", "y", "train_mask", "test_mask"):
        setattr(data, k, getattr(data, k).to(device))
    names = args.variants.split(",")
    runs = {}
    for name in names:
        epoch, acc = make_variant(name, data, args.hidden, device)
        t0 = time.perf_counter()
        for _ in range(args.warmup):
            epoch()
        _sync(device)
        runs[name] = dict(epoch=epoch, acc=acc, warmup_s=time.perf_counter() - t0, times=[])
    per_block = max(1, args.epochs // args.blocks)
    for _ in range(args.blocks):
        for name in names:
            r = runs[name]
            _sync(device)
            t0 = time.perf_counter()
            for _ in range(per_block):
                r["epoch"]()
            _sync(device)
            r["times"].append((time.perf_counter() - t0) / per_block)
    base = statistics.median(runs["adam"]["times"]) if "adam" in runs else None
    result = {
        "benchmark": "bench_step: GCN on Cora, time per training epoch",
        "machine": {"platform": platform.platform(), "processor": platform.processor(),
                    "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                    "device": str(device), "torch": torch.__version__,
                    "ngcuda_backends": ngcuda.build_info().get("backends"),
                    "eigh_kernel": ngcuda._extension.has_kernel("batched_eigh", device)},
        "config": {"hidden": args.hidden, "timed_epochs": per_block * args.blocks,
                   "warmup_epochs": args.warmup, "inverse_every": 10, "factor_every": 1},
        "variants": {},
    }
    print(f"{'variant':<18}{'ms/epoch':>10}{'ratio':>8}{'warmup s':>10}{'test acc':>10}")
    for name in names:
        r = runs[name]
        med = statistics.median(r["times"])
        ratio = med / base if base else None
        acc = r["acc"]()
        result["variants"][name] = {"ms_per_epoch_median": med * 1e3,
                                    "ms_per_epoch_blocks": [t * 1e3 for t in r["times"]],
                                    "ratio_vs_adam": ratio, "warmup_s": r["warmup_s"],
                                    "test_acc_after_run": acc}
        print(f"{name:<18}{med * 1e3:>10.2f}{(ratio or float('nan')):>8.2f}"
              f"{r['warmup_s']:>10.2f}{acc:>10.3f}")
    if args.out != "-":
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2))
        print(f"wrote {out}")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


if __name__ == "__main__":
    main()
