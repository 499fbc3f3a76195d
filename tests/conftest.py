from __future__ import annotations

import os

import pytest
import torch
from hypothesis import HealthCheck, settings

settings.register_profile(
    "ngcuda", deadline=None, max_examples=25, suppress_health_check=[HealthCheck.too_slow]
)
settings.load_profile("ngcuda")

# The CPU batched_eigh refines warm starts only where that pays: float32 28 ≤ n ≤ 192 and float64
# 28 ≤ n ≤ 96 with AVX-512, nowhere without it. The tests take the refinement on every CPU, for
# 28 ≤ n ≤ 192 in both dtypes (read once, at the first batched_eigh call; subprocesses inherit it).
# test_batched_eigh.py::test_warm_range_follows_the_cpu checks the default.
os.environ.setdefault("NGCUDA_EIGH_WARM_MAX_N", "192")


@pytest.fixture
def one_thread():
    """One torch thread: on a shared 2-core CI box OpenMP threads of tiny steps only spin-wait, and
    oversubscribed multi-threaded LAPACK crawls (10x)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def cuda_ready() -> bool:
    import ngcuda

    return torch.cuda.is_available() and "cuda" in ngcuda.build_info()["backends"]


def pytest_collection_modifyitems(config, items):
    if cuda_ready():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device and ngcuda's CUDA kernels")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


DEVICES = [pytest.param("cpu"), pytest.param("cuda", marks=pytest.mark.cuda)]
