from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, settings

settings.register_profile(
    "ngcuda", deadline=None, max_examples=25, suppress_health_check=[HealthCheck.too_slow]
)
settings.load_profile("ngcuda")


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
