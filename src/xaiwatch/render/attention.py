"""Attention pictures: a grid of heads with the head average, and deformable sampling points as dots."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from xaiwatch.core.errors import ConfigurationError, check_shape
from xaiwatch.render.overlay import _image_hwc, figure_to_array, normalize_map

__all__ = ["attention_heads_grid", "deformable_points_panel"]

_LEVEL_COLORS = ["#ff3b30", "#ffcc00", "#34c759", "#5ac8fa", "#af52de"]


def _box(ax, box: Sequence[float] | torch.Tensor | None, color: str = "white") -> None:
    if box is None:
        return
    x1, y1, x2, y2 = [float(v) for v in box]
    ax.add_patch(Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, edgecolor=color, linewidth=1.5))


def attention_heads_grid(
    image: torch.Tensor,
    heads: torch.Tensor,
    *,
    box: Sequence[float] | torch.Tensor | None = None,
    title: str = "",
    columns: int = 4,
    shared_scale: bool = True,
    cmap: str = "jet",
    dpi: int = 100,
) -> np.ndarray:
    """Each head's map over the image, then the head average: 8 heads make a 2 x 4 grid plus the average.

    Args:
        image: :math:`(3, H, W)` image in ``[0, 1]``.
        heads: :math:`(n, H, W)` per-head maps (an engine's ``heads(image, [target])[0]``).
        box: the explained box ``xyxy`` (drawn white in every cell).
        title: text above the grid.
        columns: cells per row for the heads (the average gets a column of its own at the right).
        shared_scale: one colour scale for all heads (their magnitudes compare); otherwise each cell is scaled to
            its own maximum.
        cmap: colormap.
        dpi: resolution; each cell is about 1.3 inch.

    Returns:
        :math:`(H', W', 3)` uint8 picture.

    Raises:
        ShapeError: if ``heads`` is not 3-D.
        ConfigurationError: if ``columns`` < 1.

    Example:
        >>> pic = attention_heads_grid(torch.rand(3, 32, 32), torch.rand(8, 32, 32))
        >>> pic.dtype, pic.ndim
        (dtype('uint8'), 3)
    """
    check_shape(heads, ["n", "H", "W"], "heads")
    if int(columns) < 1:
        raise ConfigurationError(f"`columns` must be >= 1, got {columns}.")
    n = heads.shape[0]
    cols = min(int(columns), n)
    rows = math.ceil(n / cols)
    img = _image_hwc(image)
    h, w = img.shape[:2]
    fig = Figure(figsize=(1.3 * (cols + 1), 1.3 * rows + 0.35), dpi=dpi)
    grid = fig.add_gridspec(rows, cols + 1, left=0.01, right=0.99, bottom=0.01, top=1 - 0.35 / (1.3 * rows + 0.35))
    scale = float(heads.abs().max()) or 1.0
    mean = heads.mean(dim=0)
    cells = [(heads[i], f"head {i}", grid[i // cols, i % cols]) for i in range(n)]
    cells.append((mean, "head average", grid[:, cols]))
    for m, label, spec in cells:
        ax = fig.add_subplot(spec)
        ax.imshow(img, extent=(0, w, h, 0))
        heat = normalize_map(m, "fixed", scale) if shared_scale and label != "head average" else normalize_map(m)
        ax.imshow(heat, cmap=cmap, vmin=0, vmax=1, alpha=0.5, extent=(0, w, h, 0))
        _box(ax, box)
        ax.set_xlim(0, w)
        ax.set_ylim(h, 0)
        ax.axis("off")
        ax.set_title(label, fontsize=6, pad=1.5)
    fig.suptitle(title, fontsize=8)
    return figure_to_array(fig)


def deformable_points_panel(
    image: torch.Tensor,
    xy: torch.Tensor,
    weights: torch.Tensor,
    levels: torch.Tensor,
    *,
    saliency: torch.Tensor | None = None,
    box: Sequence[float] | torch.Tensor | None = None,
    title: str = "",
    level_names: Sequence[str] | None = None,
    dpi: int = 100,
) -> np.ndarray:
    """RT-DETR's deformable sampling points of one query as dots (area = attention, colour = level), beside its map.

    Args:
        image: :math:`(3, H, W)` image in ``[0, 1]``.
        xy: :math:`(..., N, 2)` points in pixels (e.g. ``DeformablePoints.xy``: layers, heads, level-points).
        weights: :math:`(..., N)` their attention.
        levels: :math:`(N,)` the level of each point.
        saliency: the query's map :math:`(1, H, W)` (drawn as a heat map in a second panel when given).
        box: the query's box ``xyxy``.
        title: text above the panels.
        level_names: legend labels (default ``"P3"``, ``"P4"``, …).
        dpi: resolution.

    Returns:
        :math:`(H', W', 3)` uint8 picture.

    Example:
        >>> pic = deformable_points_panel(torch.rand(3, 32, 32), torch.rand(2, 12, 2) * 32, torch.rand(2, 12),
        ...                               torch.arange(12) // 4)
        >>> pic.shape[2]
        3
    """
    if xy.shape[-1] != 2 or xy.shape[:-1] != weights.shape or weights.shape[-1] != levels.shape[-1]:
        raise ConfigurationError(
            f"`xy` must be (..., N, 2) with `weights` (..., N) and `levels` (N,), got {tuple(xy.shape)}, "
            f"{tuple(weights.shape)}, {tuple(levels.shape)}."
        )
    img = _image_hwc(image)
    h, w = img.shape[:2]
    panels = 2 if saliency is not None else 1
    fig = Figure(figsize=(2.9 * panels, 3.1), dpi=dpi)
    axes = np.atleast_1d(fig.subplots(1, panels))
    fig.subplots_adjust(left=0.01, right=0.99, bottom=0.01, top=0.84, wspace=0.03)
    pts = xy.detach().float().cpu().reshape(-1, xy.shape[-2], 2)
    wts = weights.detach().float().cpu().reshape(-1, weights.shape[-1])
    lv = levels.detach().cpu().long()
    size = 120.0 / max(float(wts.max()), 1e-12)
    ax = axes[0]
    ax.imshow(img, extent=(0, w, h, 0))
    for level in sorted(set(lv.tolist())):
        sel = lv == level
        name = level_names[level] if level_names else f"P{level + 3}"
        p, s = pts[:, sel].reshape(-1, 2).numpy(), (wts[:, sel].reshape(-1) * size).numpy()
        ax.scatter(p[:, 0], p[:, 1], s=s, c=_LEVEL_COLORS[level % len(_LEVEL_COLORS)], alpha=0.6, label=name,
                   edgecolors="none")  # fmt: skip
    ax.legend(fontsize=5, loc="lower right", markerscale=0.5)
    _box(ax, box)
    ax.set_title("sampling points (area = weight)", fontsize=7)
    if saliency is not None:
        axes[1].imshow(img, extent=(0, w, h, 0))
        axes[1].imshow(normalize_map(saliency), cmap="jet", vmin=0, vmax=1, alpha=0.5, extent=(0, w, h, 0))
        _box(axes[1], box)
        axes[1].set_title("deformable attention", fontsize=7)
    for a in axes:
        a.set_xlim(0, w)
        a.set_ylim(h, 0)
        a.axis("off")
    fig.suptitle(title, fontsize=8)
    return figure_to_array(fig)
