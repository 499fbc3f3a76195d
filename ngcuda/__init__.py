"""ngcuda: K-FAC natural-gradient optimisation for graph neural networks."""
from __future__ import annotations

from . import ops
from ._extension import build_info
from .optim import KFAC

__version__ = "0.1.0"

__all__ = ["ops", "build_info", "KFAC", "__version__"]
