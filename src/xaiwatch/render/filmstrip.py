"""Filmstrips and animations: how one explanation evolved over the epochs, without scrubbing a slider."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from xaiwatch.core.errors import ConfigurationError
from xaiwatch.render.layout import FONT
from xaiwatch.render.overlay import figure_to_array

__all__ = ["filmstrip", "filmstrip_figure", "write_gif", "stack_vertical"]

_LEFT = 1.3  # inches for the method names
_HEAD = 0.45  # inches above each block of tiles (epoch numbers)
_FOOT = 0.35  # inches under each tile (the score)
_TITLE = 0.5  # inches for the title


def _score_text(score: float | str | None) -> str:
    if score is None:
        return ""
    if isinstance(score, str):
        return score
    return "n/a" if score != score else f"score {float(score):.2f}"


def _filmstrip_arg_validation(rows, steps, scores, max_columns) -> None:
    if not rows or not steps:
        raise ConfigurationError("A filmstrip needs at least one method and one step.")
    for name, pictures in rows.items():
        if len(pictures) != len(steps):
            raise ConfigurationError(f"Row {name!r} has {len(pictures)} pictures for {len(steps)} steps.")
    if scores is not None and len(scores) != len(steps):
        raise ConfigurationError(f"`scores` has {len(scores)} values for {len(steps)} steps; give one per step.")
    if int(max_columns) < 1:
        raise ConfigurationError(f"`max_columns` must be >= 1, got {max_columns}.")


def filmstrip_figure(
    rows: Mapping[str, Sequence[np.ndarray]],
    steps: Sequence[int],
    title: str = "",
    tile: float = 2.4,
    scores: Sequence[float | str | None] | None = None,
    max_columns: int = 6,
    dpi: int = 100,
) -> Figure:
    """The Figure of :func:`filmstrip`."""
    _filmstrip_arg_validation(rows, steps, scores, max_columns)
    n_methods, n_steps = len(rows), len(steps)
    blocks = math.ceil(n_steps / max_columns)
    cols = min(n_steps, max_columns)
    foot = _FOOT if scores is not None else 0.08
    block_h = _HEAD + n_methods * (tile + foot)
    width, height = _LEFT + cols * (tile + 0.1) + 0.1, _TITLE + blocks * block_h
    fig = Figure(figsize=(width, height), dpi=dpi)
    FigureCanvasAgg(fig)
    names = list(rows)
    for k in range(n_steps):
        block, col = divmod(k, max_columns)
        for r, name in enumerate(names):
            left = _LEFT + col * (tile + 0.1)
            top = _TITLE + block * block_h + _HEAD + r * (tile + foot)
            ax = fig.add_axes((left / width, 1 - (top + tile) / height, tile / width, tile / height))
            ax.imshow(rows[name][k], interpolation="antialiased")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(f"epoch {steps[k]}", fontsize=FONT["axes"], pad=4)
            if scores is not None:
                ax.set_xlabel(_score_text(scores[k]), fontsize=FONT["axes"], labelpad=3)
            if col == 0:
                fig.text(
                    (_LEFT - 0.1) / width,
                    1 - (top + tile / 2) / height,
                    name,
                    ha="right",
                    va="center",
                    fontsize=FONT["axes"],
                    wrap=True,
                )
    fig.suptitle(title, fontsize=FONT["title"], y=1 - 0.08 / height, va="top")
    return fig


def filmstrip(
    rows: Mapping[str, Sequence[np.ndarray]],
    steps: Sequence[int],
    title: str = "",
    tile: float = 2.4,
    scores: Sequence[float | str | None] | None = None,
    max_columns: int = 6,
    dpi: int = 100,
) -> np.ndarray:
    """A grid of pictures: one column per epoch, one row per method, wrapping into blocks of ``max_columns`` epochs.

    Args:
        rows: method name to one :math:`(h, w, 3)` uint8 picture per step (all rows as long as ``steps``).
        steps: the epoch (step) of each column, written above it.
        title: text above the grid.
        tile: size of one tile in inches (240 pixels at 100 dpi).
        scores: the tracked object's score at each step, the only text under each tile (a string is shown as is).
        max_columns: epochs per row of tiles; more epochs wrap into further rows.
        dpi: resolution.

    Returns:
        :math:`(H, W, 3)` uint8 picture.

    Raises:
        ConfigurationError: when a row or ``scores`` has another length than ``steps`` or there is nothing to draw.

    Example:
        >>> tiles = [np.zeros((8, 8, 3), np.uint8)] * 3
        >>> filmstrip({"saliency": tiles}, [0, 1, 2], scores=[0.1, 0.5, 0.9]).shape[1] > 3 * 240
        True
    """
    return figure_to_array(filmstrip_figure(rows, steps, title, tile, scores, max_columns, dpi))


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
    # each frame's 256-colour palette by fast octree (PIL's default, median cut, took 4x longer on our panels)
    images = [Image.fromarray(f).quantize(256, method=Image.Quantize.FASTOCTREE) for f in frames]
    images[0].save(path, save_all=True, append_images=images[1:], duration=duration_ms, loop=0)
    return path
