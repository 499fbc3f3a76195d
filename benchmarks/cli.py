"""The `python -m benchmarks` command: run one benchmark or all, write one JSON and the plots.

    python -m benchmarks factor|eigh|precondition|step|all [--quick] [--device cpu|cuda]
                         [--json PATH|-] [--threads N] [--data-root DIR] [--no-memory]
    python -m benchmarks summary PATH.json     # the README's tables and growth sentences

Every run writes one JSON file (default ``benchmarks/results/<device>-<date>[-<name>][-quick].json``)
holding the machine, the ceilings measured in the same run and one section per benchmark, and one
PNG per benchmark next to it. ``--json -`` writes nothing. ``all`` takes the common options only;
each benchmark's own options (``python -m benchmarks eigh --help``) apply when it runs alone.
"""
from __future__ import annotations

import argparse
import importlib
import time
from pathlib import Path
from types import ModuleType
from typing import Any, Optional, Sequence

import torch

from . import ceilings, schema
from .environment import device_slug, environment, load_average
from .report import RESULTS, write_json

BENCHMARKS = {
    "factor": "benchmarks.bench_factor",
    "eigh": "benchmarks.bench_eigh",
    "precondition": "benchmarks.bench_precondition",
    "step": "benchmarks.bench_step",
}


# Benchmarks with their own options and JSON, outside `all` (they need minutes and --data-root).
STANDALONE = {
    "wide": "benchmarks.bench_wide",
    "sparse-x": "benchmarks.bench_sparse_x",
}


def module(name: str) -> ModuleType:
    return importlib.import_module(BENCHMARKS[name])


def common_parser(name: str, description: Optional[str] = None) -> argparse.ArgumentParser:
    """The options every benchmark (and ``all``) accepts."""
    p = argparse.ArgumentParser(prog=f"python -m benchmarks {name}", description=description,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small sizes: seconds in all (the tests run this)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--json", default=None, metavar="PATH",
                   help="JSON path (default benchmarks/results/<device>-<date>...json); - writes nothing")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--data-root", type=Path, default=None, metavar="DIR",
                   help="folder with the gnn-benchmark npz graphs (e.g. ../shared/data) for `factor`")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory probes")
    return p


def benchmark_parser(name: str) -> argparse.ArgumentParser:
    mod = module(name)
    p = common_parser(name, mod.__doc__)
    mod.add_arguments(p)
    return p


def output_paths(args: argparse.Namespace, names: Sequence[str], all_: bool
                 ) -> tuple[Optional[Path], dict[str, Path]]:
    """The JSON path and one PNG path per benchmark (None and {} for ``--json -``)."""
    if args.json == "-":
        return None, {}
    if args.json:
        path = Path(args.json)
    else:
        stem = f"{device_slug(args.device)}-{time.strftime('%Y-%m-%d')}"
        stem += "" if all_ else f"-{names[0]}"
        path = RESULTS / f"{stem}{'-quick' if args.quick else ''}.json"
    if all_:
        return path, {n: path.with_name(f"{path.stem}-{n}.png") for n in names}
    return path, {names[0]: path.with_suffix(".png")}


def run(names: Sequence[str], per_benchmark: dict[str, argparse.Namespace], args: argparse.Namespace,
        argv: Sequence[str], all_: bool) -> dict[str, Any]:
    """Measures the ceilings, runs each benchmark, then writes the JSON and the plots."""
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available")
    threads = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        return _run(names, per_benchmark, args, argv, all_)
    finally:
        torch.set_num_threads(threads)  # a caller in the same process (the tests) keeps its own


def _run(names: Sequence[str], per_benchmark: dict[str, argparse.Namespace], args: argparse.Namespace,
         argv: Sequence[str], all_: bool) -> dict[str, Any]:
    start = time.perf_counter()
    env = environment(args.device)
    print(f"{env['device']} | {env['cpu_model']} | {env['threads']} threads | torch {env['torch']} "
          f"| commit {env['git_commit']}{' (dirty)' if env['git_dirty'] else ''} | load {env['load_average_start']}")
    load = env["load_average_start"]
    if load and env["logical_cpus"] and load[0] > 0.5 * env["logical_cpus"]:
        print(f"warning: the machine is busy (load {load[0]:.1f} on {env['logical_cpus']} CPUs); "
              "timings will be slower and noisier than on a quiet machine")
    if args.quick:
        print(QUICK_NOTE)
    ceil = ceilings.measure(args.device, quick=args.quick)
    print(f"ceilings: {ceil['memory_bandwidth_gbs']:.1f} GB/s copy, {ceil['matmul_gflops']:.0f} GFLOP/s "
          "float32 matmul")
    sections: dict[str, Any] = {}
    for name in names:
        print(f"\n== {name} ==")
        t0 = time.perf_counter()
        section = module(name).run(per_benchmark[name], ceil)
        section["wall_seconds"] = time.perf_counter() - t0
        sections[name] = section
    env["load_average_end"] = load_average()
    payload = {
        "schema": schema.VERSION,
        "command": "python -m benchmarks " + " ".join(argv),
        "quick": bool(args.quick),
        "environment": env,
        "ceilings": ceil,
        "benchmarks": sections,
        "wall_seconds": time.perf_counter() - start,
    }
    problems = schema.problems(payload)
    if problems:
        print("\nincomplete results:\n  " + "\n  ".join(problems))
    json_path, pngs = output_paths(args, names, all_)
    if json_path is not None:
        write_json(json_path, payload)
        label = f"{env['device']} ({env['cpu_model']}, {env['threads']} thread{'s' if env['threads'] != 1 else ''})"
        for name, png in pngs.items():
            module(name).plot(sections[name], ceil, png, label)
        print(f"\nwrote {json_path} and {', '.join(p.name for p in pngs.values())}")
    print(f"total {payload['wall_seconds']:.0f} s" + (f"; {QUICK_NOTE}" if args.quick else ""))
    return payload


QUICK_NOTE = ("quick run: tiny sizes and few repeats, to check the harness; its ratios and growth fits "
              "are not measurements")


def usage() -> str:
    return ((__doc__ or "") + "\nbenchmarks: " + ", ".join(BENCHMARKS) + ", all; and summary PATH"
            + "\nstandalone (own options, not in all): " + ", ".join(STANDALONE))


def main(argv: Sequence[str]) -> int:
    argv = list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name == "summary":
        from .summary import main as summary_main

        return summary_main(rest)
    if name == "all":
        args = common_parser("all", usage()).parse_args(rest)
        # each benchmark's own options at their defaults, the common ones as given
        per = {n: benchmark_parser(n).parse_args(rest) for n in BENCHMARKS}
        run(list(BENCHMARKS), per, args, argv, all_=True)
        return 0
    if name in STANDALONE:
        importlib.import_module(STANDALONE[name]).main(rest)
        return 0
    if name not in BENCHMARKS:
        print(f"unknown benchmark {name!r}\n")
        print(usage())
        return 2
    args = benchmark_parser(name).parse_args(rest)
    run([name], {name: args}, args, argv, all_=False)
    return 0
