"""Lightning callbacks (the only package, with ``models`` and ``data``, that imports pytorch_lightning)."""

from __future__ import annotations

from xaiwatch.callbacks.explain import ExplainCallback

__all__ = ["ExplainCallback"]
