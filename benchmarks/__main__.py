"""`python -m benchmarks <name> [options]`: run one benchmark, or `all`."""
from __future__ import annotations

import importlib
import sys

BENCHMARKS = {
    "factor": "benchmarks.bench_factor",
    "precondition": "benchmarks.bench_precondition",
    "eigh": "benchmarks.bench_eigh",
    "step": "benchmarks.bench_step",
    "wide": "benchmarks.bench_wide",
    "sparse-x": "benchmarks.bench_sparse_x",
}


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in (*BENCHMARKS, "all"):
        print(__doc__)
        print("benchmarks:", ", ".join(BENCHMARKS), "or all (each takes --quick, --device, --json)")
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    names = list(BENCHMARKS) if argv[0] == "all" else [argv[0]]
    for name in names:
        print(f"== {name} ==")
        importlib.import_module(BENCHMARKS[name]).main(argv[1:])
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
