"""Filmstrips and animations: how one explanation evolved over the epochs, without scrubbing a slider."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from xaiwatch.core.errors import ConfigurationError
from xaiwatch.render.overlay import figure_to_array

__all__ = ["filmstrip", "write_gif", "stack_vertical"]


def filmstrip(
    rows: Mapping[str, Sequence[np.ndarray]], steps: Sequence[int], title: str = "", tile: float = 1.3
) -> np.ndarray:
    """A grid of pictures: one row per method, one column per epoch.

    Args:
        rows: method name to one :math:`(h, w, 3)` uint8 picture per step (all rows as long as ``steps``).
        steps: the epoch (step) of each column.
        title: text above the grid.
        tile: size of one tile in inches.

    Returns:
        :math:`(H, W, 3)` uint8 picture.

    Raises:
        ConfigurationError: when a row has another length than ``steps`` or there is nothing to draw.
    """
    if not rows or not steps:
        raise ConfigurationError("A filmstrip needs at least one method and one step.")
    for name, pictures in rows.items():
        if len(pictures) != len(steps):
            raise ConfigurationError(f"Row {name!r} has {len(pictures)} pictures for {len(steps)} steps.")
    n_rows, n_cols = len(rows), len(steps)
    fig = Figure(figsize=(0.9 + tile * n_cols, 0.6 + tile * n_rows), dpi=100)
    axes = np.asarray(fig.subplots(n_rows, n_cols, squeeze=False))
    fig.subplots_adjust(
        left=0.9 / (0.9 + tile * n_cols),
        right=0.995,
        bottom=0.01,
        top=1 - 0.45 / (0.6 + tile * n_rows),
        wspace=0.03,
        hspace=0.03,
    )
    for r, (name, pictures) in enumerate(rows.items()):
        for c, picture in enumerate(pictures):
            ax = axes[r, c]
            ax.imshow(picture)
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(f"epoch {steps[c]}", fontsize=7)
            if c == 0:
                ax.set_ylabel(name, fontsize=7)
    fig.suptitle(title, fontsize=8, y=0.995, va="top")
    return figure_to_array(fig)


def stack_vertical(pictures: Sequence[np.ndarray]) -> np.ndarray:
    """Stack pictures of equal width top to bottom (pads narrower ones with white)."""
    width = max(p.shape[1] for p in pictures)
    padded = [np.pad(p, ((0, 0), (0, width - p.shape[1]), (0, 0)), constant_values=255) for p in pictures]
    return np.concatenate(padded, axis=0)


def write_gif(frames: Sequence[np.ndarray], path: str | Path, duration_ms: int = 700) -> Path:
    """Write an animated GIF (looping) of :math:`(H, W, 3)` uint8 frames; returns its path."""
    from PIL import Image

    if not frames:
        raise ConfigurationError("An animation needs at least one frame.")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    images = [Image.fromarray(f) for f in frames]
    images[0].save(path, save_all=True, append_images=images[1:], duration=duration_ms, loop=0)
    return path
