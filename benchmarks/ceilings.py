"""The machine's own ceilings, measured in the same run: memory bandwidth and matmul rate."""
from __future__ import annotations

import torch

from .common import median_time


def memory_bandwidth_gbs(device: str = "cpu", mib: int = 256) -> float:
    """Copy bandwidth (read + write) of a buffer far larger than the caches, in GB/s."""
    n = mib * (1 << 20) // 4
    src = torch.ones(n, device=device)
    dst = torch.empty_like(src)
    t = median_time(lambda: dst.copy_(src), device, warmup=1, repeat=5)
    return 2 * src.numel() * 4 / t / 1e9


def matmul_gflops(device: str = "cpu", n: int = 2048, dtype: torch.dtype = torch.float32) -> float:
    """Dense square float32 matmul rate in GFLOP/s (TF32 off on CUDA)."""
    if device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    t = median_time(lambda: a @ b, device, warmup=1, repeat=5)
    return 2 * n**3 / t / 1e9


def measure(device: str = "cpu", quick: bool = False) -> dict[str, float]:
    return {
        "memory_bandwidth_gbs": memory_bandwidth_gbs(device, 32 if quick else 256),
        "matmul_gflops": matmul_gflops(device, 512 if quick else 2048),
    }
