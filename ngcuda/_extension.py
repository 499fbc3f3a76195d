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

_OPS = ("factor_update_", "sparse_factor_update_", "block_factor_update_",
        "sparse_block_factor_update_", "batched_eigh", "precondition")
_DISPATCH_KEY = {"cpu": "CPU", "cuda": "CUDA", "meta": "Meta"}
# A sparse CSR argument dispatches to the SparseCsr<Backend> key instead of <Backend>.
_LAYOUT_PREFIX = {False: "", True: "SparseCsr"}


def _registered_kernels() -> dict[str, frozenset[tuple[str, bool]]]:
    # Read once at import: the registrations never change afterwards, and a plain dict lookup
    # keeps the ops' Python front traceable by torch.compile.
    if _C is None:
        return {op: frozenset() for op in _OPS}
    return {
        op: frozenset(
            (dev, sparse) for dev, key in _DISPATCH_KEY.items()
            for sparse, prefix in _LAYOUT_PREFIX.items()
            if torch._C._dispatch_has_kernel_for_dispatch_key(f"ngcuda::{op}", prefix + key)
        )
        for op in _OPS
    }


_KERNELS = _registered_kernels()


def has_kernel(op: str, device: torch.device, sparse_csr: bool = False) -> bool:
    """Whether ``torch.ops.ngcuda.<op>`` has a compiled kernel for ``device`` (for a sparse CSR
    ``x`` when ``sparse_csr``)."""
    return (device.type, sparse_csr) in _KERNELS[op]


def build_info() -> dict[str, Any]:
    """Which backends were compiled, for which CUDA architectures, and against which torch.

    Returns a dict with ``backends`` (e.g. ``["cpu", "cuda"]``), ``cuda_archs``,
    ``cuda_version``, ``torch_version`` (at build time), ``torch_runtime``, ``cpu_kernels`` (the
    CPU vector kernels picked for this machine) and ``eigh_warm_n`` (per dtype, the ``(min, max)``
    sizes whose warm starts the CPU ``batched_eigh`` refines here, or None: without AVX-512 the
    refinement does not beat the cold solver, so warm starts go unused).
    """
    if _C is None:
        return {"backends": [], "cuda_archs": "", "torch_version": None,
                "torch_runtime": torch.__version__, "error": str(_IMPORT_ERROR)}
    info = dict(_C.build_info())
    info["torch_runtime"] = torch.__version__
    return info
