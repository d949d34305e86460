"""Lightning callbacks (the only package, with ``models`` and ``data``, that imports pytorch_lightning)."""

from __future__ import annotations

from xaiwatch.callbacks.explain import ExplainCallback
from xaiwatch.callbacks.presets import load_callbacks
from xaiwatch.callbacks.projection import ProjectionCallback

__all__ = ["ExplainCallback", "ProjectionCallback", "load_callbacks"]
