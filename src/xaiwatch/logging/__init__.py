"""TensorBoard writing: the one place that owns every tag name."""

from __future__ import annotations

from xaiwatch.logging.tensorboard import Tags, XaiWriter

__all__ = ["Tags", "XaiWriter"]
