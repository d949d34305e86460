"""Explanation engines, usable without Lightning: ``get_engine(name, adapter).attribute(images, targets)``."""

from __future__ import annotations

from xaiwatch.explain.attention import AttentionEngine, AttentionRolloutEngine, DeformableAttentionEngine
from xaiwatch.explain.base import Engine, available_methods, engine_class, get_engine, register
from xaiwatch.explain.gradients import GradCamEngine, SaliencyEngine

__all__ = [
    "AttentionEngine",
    "AttentionRolloutEngine",
    "DeformableAttentionEngine",
    "Engine",
    "GradCamEngine",
    "SaliencyEngine",
    "available_methods",
    "engine_class",
    "get_engine",
    "register",
]
