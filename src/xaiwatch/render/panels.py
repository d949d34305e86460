"""Feature-map grids and per-box decision panels: matplotlib's object API on an Agg canvas, never pyplot."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from matplotlib.figure import Figure

from xaiwatch.core.errors import ConfigurationError, check_shape
from xaiwatch.render.layout import FONT, add_colorbar, picture_title
from xaiwatch.render.overlay import display_range, figure_to_array, heat_rgba, normalize_map

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
        dpi: resolution; each cell is about 1.8 inch.

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
    fig = Figure(figsize=(1.8 * cols, 1.8 * rows + 0.5), dpi=dpi)
    axes = np.atleast_1d(fig.subplots(rows, cols, squeeze=False)).ravel()
    fig.subplots_adjust(left=0.01, right=0.99, bottom=0.01, top=1 - 0.55 / (1.8 * rows + 0.5), wspace=0.05, hspace=0.25)
    maps = values.detach().float().cpu().numpy()
    for j, ax in enumerate(axes):
        ax.axis("off")
        if j >= k:
            continue
        m = maps[j]
        lo, hi = float(m.min()), float(m.max())
        ax.imshow((m - lo) / (hi - lo) if hi > lo else np.zeros_like(m), cmap="viridis", vmin=0, vmax=1)
        ax.set_title(f"ch {idx[j]}", fontsize=FONT["tick"], pad=1.5)
    fig.suptitle(title, fontsize=FONT["axes"])
    return figure_to_array(fig)


def _score_bars(ax, scores: torch.Tensor, names: Sequence[str] | None, decision: tuple) -> None:
    top, runner_up, margin = decision
    c = scores.numel()
    labels = [names[i] if names and i < len(names) else str(i) for i in range(c)]
    ys = np.arange(c)
    ax.barh(ys, scores.numpy(), color=[_HIGHLIGHT if i == top else _OTHER for i in range(c)], height=0.7)
    ax.set_yticks(ys, labels, fontsize=FONT["tick"])
    ax.invert_yaxis()
    ax.set_xlim(0, max(1.0, float(scores.max()) * 1.05))
    ax.tick_params(axis="x", labelsize=FONT["tick"])
    over = "" if runner_up is None else f" over {labels[runner_up]}"
    ax.set_title(f"{labels[top]} {float(scores[top]):.2f}: margin {margin:.3f}{over}", fontsize=FONT["axes"])


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
    method: str | None = None,
    probe: int | str | None = None,
    epoch: int | None = None,
    step: int | None = None,
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
        dpi: resolution; the figure is 12.8 x 4.8 inches.
        method, probe, epoch, step: the title's standard parts (:func:`~xaiwatch.render.layout.picture_title`).

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
    fig = Figure(figsize=(12.8, 4.8), dpi=dpi)
    axes = [fig.add_axes(r) for r in ((0.01, 0.04, 0.28, 0.76), (0.31, 0.04, 0.28, 0.76), (0.72, 0.12, 0.26, 0.66))]
    for ax in axes[:2]:
        ax.imshow(crop, interpolation="nearest")
        ax.axis("off")
    signed = normalize == "signed"
    axes[1].imshow(heat_rgba(heat[r1:r2, c1:c2], signed, cmap), interpolation="nearest")
    vmin, vmax = display_range(saliency, normalize, scale)
    add_colorbar(fig, fig.add_axes((0.6, 0.08, 0.012, 0.62)), "bwr" if signed else cmap, vmin, vmax, "map")
    axes[0].set_title(f"box {c1},{r1} - {c2},{r2}", fontsize=FONT["axes"])
    axes[1].set_title("map over the box", fontsize=FONT["axes"])
    _score_bars(axes[2], scores, names, decision)
    full = picture_title(title, method=method, probe=probe, epoch=epoch, step=step)
    fig.suptitle(full, fontsize=FONT["title"], y=0.99, va="top")
    return figure_to_array(fig)
