"""The per-epoch scatter plot of a 2-D feature-space projection (matplotlib object API, no pyplot)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from matplotlib.figure import Figure

from xaiwatch.core.errors import ShapeError
from xaiwatch.render.layout import FONT, picture_title
from xaiwatch.render.overlay import _PALETTE, figure_to_array

__all__ = ["projection_scatter", "MARKERS"]

#: marker per point outcome: ground truth (found / missed by the detector), predictions (true / false positive)
MARKERS = {"GT detected": "o", "GT missed": "s", "TP": "^", "FP": "x"}
_IMAGE_MARKER = "o"


def projection_scatter(
    coords: np.ndarray,
    labels: Sequence[int],
    outcomes: Sequence[str],
    names: Sequence[str] | None = None,
    title: str = "",
    limits: tuple[float, float, float, float] | None = None,
    size: tuple[float, float] = (10.0, 7.0),
    dpi: int = 100,
    *,
    epoch: int | None = None,
    step: int | None = None,
) -> np.ndarray:
    """Scatter of projected points, coloured by class, one marker per outcome (see :data:`MARKERS`).

    Args:
        coords: :math:`(N, 2)` projected points.
        labels: class of each point (``-1``: no class, drawn grey).
        outcomes: ``"GT detected"``, ``"GT missed"``, ``"TP"``, ``"FP"``; any other value (images) is a circle.
        names: class names for the legend.
        title: figure title (after epoch and step).
        limits: ``(xmin, xmax, ymin, ymax)``; fixed limits keep aligned epochs comparable frame to frame.
        size: figure size in inches.
        dpi: resolution.
        epoch, step: the title's standard parts.

    Returns:
        :math:`(H, W, 3)` uint8 picture.

    Raises:
        ShapeError: if ``coords`` is not :math:`(N, 2)` or the lengths differ.
    """
    coords = np.asarray(coords, dtype=float).reshape(-1, 2) if np.size(coords) else np.zeros((0, 2))
    labels = [int(c) for c in labels]
    if len(labels) != len(coords) or len(outcomes) != len(coords):
        raise ShapeError("coords, labels, outcomes", (len(coords), len(labels), len(outcomes)), ["N", "N", "N"])
    fig = Figure(figsize=size, dpi=dpi)
    ax = fig.add_subplot(1, 1, 1)
    for c in sorted(set(labels)):
        color = "#8e8e93" if c < 0 else _PALETTE[c % len(_PALETTE)]
        name = "no object" if c < 0 else (names[c] if names is not None and c < len(names) else str(c))
        for outcome in sorted({o for o, lab in zip(outcomes, labels) if lab == c}):
            rows = [i for i, (o, lab) in enumerate(zip(outcomes, labels)) if lab == c and o == outcome]
            paint = {"facecolors": "none", "edgecolors": color} if outcome == "GT missed" else {"c": [color]}
            ax.scatter(
                coords[rows, 0],
                coords[rows, 1],
                s=40,
                marker=MARKERS.get(outcome, _IMAGE_MARKER),
                linewidths=0.9,
                alpha=0.85,
                **paint,
                label=f"{name} {outcome}" if outcome in MARKERS else name,
            )
    if limits is not None:
        ax.set_xlim(limits[0], limits[1])
        ax.set_ylim(limits[2], limits[3])
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(picture_title(title, epoch=epoch, step=step), fontsize=FONT["axes"])
    if len(coords):
        ax.legend(fontsize=FONT["tick"], loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False)
    fig.tight_layout()
    return figure_to_array(fig)
