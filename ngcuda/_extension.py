"""Loads the compiled kernels and answers which device has them."""
from __future__ import annotations

import warnings
from typing import Any

import torch

try:
    from . import _C  # noqa: F401  (registers torch.ops.ngcuda)

    _IMPORT_ERROR: Exception | None = None
except ImportError as err:  # a source checkout that was never built
    _C = None
    _IMPORT_ERROR = err
    warnings.warn(
        f"ngcuda: the compiled extension is missing ({err}); every op runs the plain-PyTorch "
        "path. Install with `pip install --no-build-isolation .` to build it.",
        RuntimeWarning,
        stacklevel=2,
    )

_DISPATCH_KEY = {"cpu": "CPU", "cuda": "CUDA", "meta": "Meta"}


def has_kernel(op: str, device: torch.device) -> bool:
    """Whether ``torch.ops.ngcuda.<op>`` has a compiled kernel for ``device``."""
    if _C is None:
        return False
    key = _DISPATCH_KEY.get(device.type)
    if key is None:
        return False
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"ngcuda::{op}", key)


def build_info() -> dict[str, Any]:
    """Which backends were compiled, for which CUDA architectures, and against which torch.

    Returns a dict with ``backends`` (e.g. ``["cpu", "cuda"]``), ``cuda_archs``,
    ``cuda_version``, ``torch_version`` (at build time) and ``torch_runtime``.
    """
    if _C is None:
        return {"backends": [], "cuda_archs": "", "torch_version": None,
                "torch_runtime": torch.__version__, "error": str(_IMPORT_ERROR)}
    info = dict(_C.build_info())
    info["torch_runtime"] = torch.__version__
    return info
