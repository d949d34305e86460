"""Rendering: pure functions from tensors to pictures (matplotlib object API, no pyplot)."""

from __future__ import annotations

from xaiwatch.render.filmstrip import filmstrip, stack_vertical, write_gif
from xaiwatch.render.overlay import NORMALIZATIONS, explanation_panel, figure_to_array, normalize_map

__all__ = [
    "NORMALIZATIONS",
    "explanation_panel",
    "figure_to_array",
    "filmstrip",
    "normalize_map",
    "stack_vertical",
    "write_gif",
]
