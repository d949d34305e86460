"""Explanation engines, usable without Lightning: ``get_engine(name, adapter).attribute(images, targets)``."""

from __future__ import annotations

from xaiwatch.explain.base import Engine, available_methods, engine_class, get_engine, register
from xaiwatch.explain.gradients import GradCamEngine, SaliencyEngine

__all__ = [
    "Engine",
    "GradCamEngine",
    "SaliencyEngine",
    "available_methods",
    "engine_class",
    "get_engine",
    "register",
]
