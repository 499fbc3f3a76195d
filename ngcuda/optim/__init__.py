"""The K-FAC optimizer and its pieces (layer helpers, Fisher types, damping)."""
from __future__ import annotations

from .damping import LMConfig
from .distributed import DistributedKFACError, DistributedOptions
from .kfac import KFAC, EighOptions, KFACWarning
from .layers import LayerInfo

__all__ = ["KFAC", "EighOptions", "KFACWarning", "LMConfig", "LayerInfo", "DistributedOptions",
           "DistributedKFACError"]
