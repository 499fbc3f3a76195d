"""The machine's own ceilings, measured in the same run: memory bandwidth and matmul rate.

The benchmarks report each op's rate as a fraction of these (its roofline fraction), and the
plots draw them as horizontal lines.
"""
from __future__ import annotations

from typing import Any

import torch

from .timing import compare


def memory_bandwidth_gbs(device: str = "cpu", mib: int = 256) -> float:
    """Copy bandwidth (bytes read + bytes written) of a buffer far larger than the caches, GB/s."""
    n = mib * (1 << 20) // 4
    src = torch.ones(n, device=device)
    dst = torch.empty_like(src)
    t = compare({"copy": lambda: dst.copy_(src)}, device, warmup=1, min_repeats=5)["copy"].median_s
    return 2 * src.numel() * 4 / t / 1e9


def matmul_gflops(device: str = "cpu", n: int = 2048) -> float:
    """Dense square float32 matmul rate in GFLOP/s (2n³ flops per product; TF32 off on CUDA)."""
    a = torch.randn(n, n, device=device)
    b = torch.randn(n, n, device=device)
    out = torch.empty(n, n, device=device)
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False  # the float32 ceiling, not the TF32 one
    try:
        t = compare({"mm": lambda: torch.mm(a, b, out=out)}, device, warmup=1,
                    min_repeats=5)["mm"].median_s
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32  # leave the benchmarked ops' setting alone
    return 2 * n**3 / t / 1e9


def measure(device: str = "cpu", quick: bool = False) -> dict[str, Any]:
    """Both ceilings, with the sizes they were measured at."""
    gpu = torch.device(device).type == "cuda"
    mib = 64 if quick else (1024 if gpu else 256)
    n = (2048 if quick else 8192) if gpu else (1024 if quick else 2048)
    return {
        "memory_bandwidth_gbs": memory_bandwidth_gbs(device, mib),
        "matmul_gflops": matmul_gflops(device, n),
        "measured_with": {"copy_mib": mib, "matmul_n": n, "dtype": "float32"},
    }
