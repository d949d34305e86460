"""xaiwatch: explain an object detector while it is being fine-tuned.

The Lightning callbacks are imported lazily, so ``import xaiwatch.explain`` (and every layer below the
callbacks) works without PyTorch Lightning.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "ExplainCallback": "xaiwatch.callbacks",
    "ProjectionCallback": "xaiwatch.callbacks",
    "YOLOv8Adapter": "xaiwatch.adapters",
    "DetectorAdapter": "xaiwatch.adapters",
    "ClassTarget": "xaiwatch.targets",
    "BoxTarget": "xaiwatch.targets",
    "MatchedBoxTarget": "xaiwatch.targets",
    "MissedTarget": "xaiwatch.targets",
    "ErrorAnalysisCallback": "xaiwatch.callbacks",
    "DecisionBoundaryCallback": "xaiwatch.callbacks",
    "SaliencyGate": "xaiwatch.callbacks",
    "GatedModelCheckpoint": "xaiwatch.callbacks",
    "get_engine": "xaiwatch.explain",
    "available_methods": "xaiwatch.explain",
    "explaining": "xaiwatch.core",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'xaiwatch' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
