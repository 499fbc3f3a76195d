from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, settings

settings.register_profile(
    "ngcuda", deadline=None, max_examples=25, suppress_health_check=[HealthCheck.too_slow]
)
settings.load_profile("ngcuda")


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
