"""Rates of an op from its work and its time, and their fractions of the measured ceilings."""
from __future__ import annotations

from typing import Any, Optional


def rates(seconds: float, flops: float, bytes_moved: float, ceilings: dict[str, Any],
          rows: Optional[int] = None, prefix: str = "") -> dict[str, float]:
    """GFLOP/s, GB/s (and rows/s) of a call, and their fractions of the matmul and bandwidth
    ceilings: how close the op came to each of the two roofs that can bound it."""
    gflops = flops / seconds / 1e9
    gbs = bytes_moved / seconds / 1e9
    out = {
        f"{prefix}gflops": gflops,
        f"{prefix}gb_per_s": gbs,
        f"{prefix}frac_matmul_peak": gflops / ceilings["matmul_gflops"],
        f"{prefix}frac_bandwidth": gbs / ceilings["memory_bandwidth_gbs"],
    }
    if rows is not None:
        out[f"{prefix}rows_per_s"] = rows / seconds
    return out


def speedups(ms: dict[str, float], ours: str = "ngcuda") -> dict[str, float]:
    """``speedup_vs_<baseline>`` = baseline time / our time (> 1: ngcuda is faster)."""
    return {f"speedup_vs_{name}": t / ms[ours] for name, t in ms.items() if name != ours}
