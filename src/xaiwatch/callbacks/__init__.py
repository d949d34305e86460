"""Lightning callbacks (the only package, with ``models`` and ``data``, that imports pytorch_lightning)."""

from __future__ import annotations

from xaiwatch.callbacks.base import ProbeCallback, RunContext, ShareRecord
from xaiwatch.callbacks.boundary import DecisionBoundaryCallback
from xaiwatch.callbacks.budget import TimeBudget
from xaiwatch.callbacks.error_analysis import ErrorAnalysisCallback
from xaiwatch.callbacks.explain import ExplainCallback
from xaiwatch.callbacks.gate import GatedModelCheckpoint, SaliencyGate
from xaiwatch.callbacks.presets import load_callbacks
from xaiwatch.callbacks.projection import ProjectionCallback

__all__ = [
    "DecisionBoundaryCallback",
    "ErrorAnalysisCallback",
    "ExplainCallback",
    "GatedModelCheckpoint",
    "SaliencyGate",
    "ProbeCallback",
    "ProjectionCallback",
    "RunContext",
    "ShareRecord",
    "TimeBudget",
    "load_callbacks",
]
