"""`python -m benchmarks <name> [options]`: see benchmarks/cli.py."""
from __future__ import annotations

import sys

from .cli import BENCHMARKS, main  # noqa: F401  (BENCHMARKS: the names, for callers)

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
