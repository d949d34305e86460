"""Core types, the explaining context and errors."""

from __future__ import annotations

from xaiwatch.core.context import eval_state, explaining, fork_rng, grad_enabled, hooks_restored, reset_caches
from xaiwatch.core.errors import (
    ConfigurationError,
    DatasetFormatError,
    MissingDependencyError,
    ShapeError,
    UnsupportedModelError,
    XaiwatchError,
    check_shape,
)
from xaiwatch.core.types import Detections, ProbeSet, RawOutput

__all__ = [
    "ConfigurationError",
    "DatasetFormatError",
    "Detections",
    "MissingDependencyError",
    "ProbeSet",
    "RawOutput",
    "ShapeError",
    "UnsupportedModelError",
    "XaiwatchError",
    "check_shape",
    "eval_state",
    "explaining",
    "fork_rng",
    "grad_enabled",
    "hooks_restored",
    "reset_caches",
]
