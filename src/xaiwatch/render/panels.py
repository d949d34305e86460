"""Feature-map grids and per-box decision panels: matplotlib's object API on an Agg canvas, never pyplot."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from matplotlib.figure import Figure

from xaiwatch.core.errors import ConfigurationError, check_shape
from xaiwatch.render.overlay import figure_to_array, normalize_map

__all__ = ["feature_grid", "box_decision_panel", "decision_margin", "crop_box"]

_HIGHLIGHT = "#ff3b30"
_OTHER = "#8e8e93"


def decision_margin(class_scores: torch.Tensor | Sequence[float]) -> tuple[int, int | None, float]:
    """The predicted class, the runner-up and by how much the first wins.

    Args:
        class_scores: :math:`(C,)` class scores of one box.

    Returns:
        ``(top, runner_up, margin)``: the index of the highest score, the index of the second highest
        (``None`` for a single class) and ``score[top] - score[runner_up]`` (``score[top]`` for a single class).
        Ties go to the lower index.

    Raises:
        ConfigurationError: if there is no score.
    """
    s = torch.as_tensor(class_scores).detach().float().flatten().cpu()
    if s.numel() == 0:
        raise ConfigurationError("`class_scores` is empty.")
    order = sorted(range(s.numel()), key=lambda i: (-float(s[i]), i))
    top = order[0]
    if len(order) == 1:
        return top, None, float(s[top])
    return top, order[1], float(s[top] - s[order[1]])


def crop_box(box: torch.Tensor | Sequence[float], size: Sequence[int]) -> tuple[int, int, int, int]:
    """Integer pixel window ``x1, y1, x2, y2`` (end exclusive) covering ``box``, inside an image of ``size``.

    Args:
        box: ``x1, y1, x2, y2`` in pixels.
        size: ``(H, W)``.

    Returns:
        ``floor(x1), floor(y1), ceil(x2), ceil(y2)`` clipped to the image, at least one pixel wide and high.
    """
    h, w = int(size[0]), int(size[1])
    x1, y1, x2, y2 = (float(v) for v in torch.as_tensor(box).flatten().tolist())
    c1 = min(max(math.floor(x1), 0), w - 1)
    r1 = min(max(math.floor(y1), 0), h - 1)
    return c1, r1, max(min(math.ceil(x2), w), c1 + 1), max(min(math.ceil(y2), h), r1 + 1)


def feature_grid(
    values: torch.Tensor, indices: torch.Tensor | Sequence[int], title: str = "", dpi: int = 100
) -> np.ndarray:
    """A grid of channel maps, each labelled with its channel index and scaled to its own range.

    Args:
        values: :math:`(k, h, w)` channel maps (one image's output of
            :meth:`~xaiwatch.explain.feature_maps.FeatureMapsEngine.channels`).
        indices: :math:`(k,)` channel indices.
        title: text above the grid.
        dpi: resolution; each cell is about 1.1 inch.

    Returns:
        :math:`(H', W', 3)` uint8 picture.

    Raises:
        ShapeError: if ``values`` is not 3-D.
        ConfigurationError: if ``indices`` does not have one entry per map.
    """
    check_shape(values, ["k", "h", "w"], "values")
    idx = [int(i) for i in torch.as_tensor(indices).flatten().tolist()]
    k = values.shape[0]
    if len(idx) != k:
        raise ConfigurationError(f"`indices` must have one entry per map ({k}), got {len(idx)}.")
    cols = max(1, math.ceil(math.sqrt(k)))
    rows = max(1, math.ceil(k / cols))
    fig = Figure(figsize=(1.1 * cols, 1.1 * rows + 0.35), dpi=dpi)
    axes = np.atleast_1d(fig.subplots(rows, cols, squeeze=False)).ravel()
    fig.subplots_adjust(
        left=0.01, right=0.99, bottom=0.01, top=1 - 0.35 / (1.1 * rows + 0.35), wspace=0.05, hspace=0.25
    )
    maps = values.detach().float().cpu().numpy()
    for j, ax in enumerate(axes):
        ax.axis("off")
        if j >= k:
            continue
        m = maps[j]
        lo, hi = float(m.min()), float(m.max())
        ax.imshow((m - lo) / (hi - lo) if hi > lo else np.zeros_like(m), cmap="viridis", vmin=0, vmax=1)
        ax.set_title(f"ch {idx[j]}", fontsize=6, pad=1.5)
    fig.suptitle(title, fontsize=8)
    return figure_to_array(fig)


def _score_bars(ax, scores: torch.Tensor, names: Sequence[str] | None, decision: tuple) -> None:
    top, runner_up, margin = decision
    c = scores.numel()
    labels = [names[i] if names and i < len(names) else str(i) for i in range(c)]
    ys = np.arange(c)
    ax.barh(ys, scores.numpy(), color=[_HIGHLIGHT if i == top else _OTHER for i in range(c)], height=0.7)
    ax.set_yticks(ys, labels, fontsize=6)
    ax.invert_yaxis()
    ax.set_xlim(0, max(1.0, float(scores.max()) * 1.05))
    ax.tick_params(axis="x", labelsize=6)
    over = "" if runner_up is None else f" over {labels[runner_up]}"
    ax.set_title(f"{labels[top]} {float(scores[top]):.2f}: margin {margin:.3f}{over}", fontsize=7)


def box_decision_panel(
    image: torch.Tensor,
    saliency: torch.Tensor,
    box: torch.Tensor | Sequence[float],
    class_scores: torch.Tensor | Sequence[float],
    names: Sequence[str] | None = None,
    title: str = "",
    *,
    normalize: str = "per_map",
    scale: float | None = None,
    cmap: str = "jet",
    dpi: int = 100,
) -> np.ndarray:
    """Decision analysis of one box: the crop, its map over the crop, and the class scores with the margin.

    The map is normalised over the whole image (see :func:`~xaiwatch.render.overlay.normalize_map`) before it
    is cropped, so a crop that holds little of the evidence looks dim. The bar of the predicted class is
    highlighted and the title of the bar chart gives the margin to the runner-up (:func:`decision_margin`).

    Args:
        image: :math:`(3, H, W)` image in ``[0, 1]``.
        saliency: :math:`(1, H, W)` or :math:`(H, W)` map of this box.
        box: ``x1, y1, x2, y2`` in pixels.
        class_scores: :math:`(C,)` class scores of the box.
        names: class names.
        title: text above the panels.
        normalize, scale: see :func:`~xaiwatch.render.overlay.normalize_map`.
        cmap: colormap of unsigned maps (``"signed"`` uses a diverging one).
        dpi: resolution; the figure is about 6.4 x 2.4 inches.

    Returns:
        :math:`(H', W', 3)` uint8 picture.

    Raises:
        ShapeError: if ``image`` is not :math:`(3, H, W)`.
        ConfigurationError: for empty ``class_scores`` or a bad ``normalize``.
    """
    check_shape(image, [3, "H", "W"], "image")
    scores = torch.as_tensor(class_scores).detach().float().flatten().cpu()
    decision = decision_margin(scores)
    heat = normalize_map(saliency, normalize, scale)
    c1, r1, c2, r2 = crop_box(box, image.shape[-2:])
    crop = image.detach().float().clamp(0, 1)[:, r1:r2, c1:c2].permute(1, 2, 0).cpu().numpy()
    fig = Figure(figsize=(6.4, 2.4), dpi=dpi)
    axes = fig.subplots(1, 3, gridspec_kw={"width_ratios": [1, 1, 1.3]})
    fig.subplots_adjust(left=0.01, right=0.98, bottom=0.12, top=0.80, wspace=0.35)
    for ax in axes[:2]:
        ax.imshow(crop, interpolation="nearest")
        ax.axis("off")
    signed = normalize == "signed"
    axes[1].imshow(
        heat[r1:r2, c1:c2],
        cmap="bwr" if signed else cmap,
        vmin=-1 if signed else 0,
        vmax=1,
        alpha=0.55 if signed else 0.5,
        interpolation="nearest",
    )
    axes[0].set_title(f"box {c1},{r1} - {c2},{r2}", fontsize=7)
    axes[1].set_title("map over the box", fontsize=7)
    _score_bars(axes[2], scores, names, decision)
    fig.suptitle(title, fontsize=8)
    return figure_to_array(fig)
