"""How each method's :class:`~xaiwatch.core.types.Explanation` is drawn: the one place that knows it.

Callbacks never branch on the method: they hand the record to :func:`draw_explanation`. Heat-map methods get
an :func:`~xaiwatch.render.explanation_panel`; ``feature_maps`` a channel grid; ``box_decision`` a decision panel.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from xaiwatch.core.types import Detections, Explanation
from xaiwatch.render.layout import picture_title
from xaiwatch.render.overlay import explanation_panel, explanation_tile
from xaiwatch.render.panels import box_decision_panel, feature_grid

__all__ = ["draws_heat_map", "per_image", "draw_explanation"]

#: methods drawn as one picture per image, not per target
_PER_IMAGE = {"feature_maps"}
_PANELS = {"box_decision"}


def draws_heat_map(method: str) -> bool:
    """Whether ``method``'s pictures are heat maps over the image (what error analysis can show).

    Example:
        >>> draws_heat_map("saliency"), draws_heat_map("feature_maps")
        (True, False)
    """
    return method not in _PER_IMAGE and method not in _PANELS


def per_image(method: str) -> bool:
    """Whether ``method`` draws one picture per image (channel grids) rather than one per target."""
    return method in _PER_IMAGE


def draw_explanation(
    explanation: Explanation,
    k: int,
    image: torch.Tensor,
    *,
    names: Sequence[str] | None,
    title: str,
    label: int | None = None,
    gt_boxes: torch.Tensor | None = None,
    gt_labels: torch.Tensor | None = None,
    detections: Detections | None = None,
    normalize: str = "per_map",
    signed: bool = False,
    scale: float | None = None,
    layer: str | None = None,
    probe: str | None = None,
    epoch: int | None = None,
    step: int | None = None,
) -> tuple[np.ndarray, np.ndarray | None]:
    """The picture of target ``k`` of ``explanation`` on its :math:`(3, H, W)` ``image``, and its filmstrip tile
    (``None``: the picture's own map panel).

    Titles say method, probe, epoch and step; the subtitle says whether the tracked object is detected (score,
    IoU) or which nearest candidate of a missed object is explained. ``signed`` methods are drawn with a
    diverging colour map.
    """
    method = explanation.method
    normalize = "signed" if signed else normalize
    where = {"method": method, "probe": probe, "epoch": epoch, "step": step}
    if method in _PER_IMAGE:
        values, indices = explanation.extras["channels"]
        grid_title = picture_title(f"{layer or ''} {title}".strip(), **where)
        return feature_grid(values[0].cpu(), indices[0].cpu(), title=grid_title), None
    match = explanation.matches[k] if k < len(explanation.matches) else None
    saliency = explanation.maps[k].cpu()
    scores: Any = explanation.extras.get("class_scores")
    heads: Any = explanation.extras.get("heads")
    if heads is not None:  # attention: every head and their average (a 2 x 4 grid for 8 heads)
        from xaiwatch.render.attention import attention_heads_grid

        box = match.box if match is not None else None
        grid = attention_heads_grid(image, heads[k].cpu(), box=box, title=picture_title(title, **where))
        return grid, explanation_tile(image, saliency, tracked_box=box, normalize=normalize, scale=scale)
    if method in _PANELS and match is not None and scores is not None:
        panel = box_decision_panel(
            image, saliency, match.box, scores[k], names=names, title=title, normalize=normalize, scale=scale, **where
        )
        return panel, explanation_tile(image, saliency, tracked_box=match.box, normalize=normalize, scale=scale)
    name = "" if label is None else names[label] if names and label < len(names) else str(label)
    state = "" if match is None else "detected" if match.detected else "missed, nearest candidate"
    subtitle = "" if match is None else f"{name}: {state} (score {match.score:.2f}, IoU {match.iou:.2f})"
    panel = explanation_panel(
        image,
        saliency,
        gt_boxes=gt_boxes,
        gt_labels=gt_labels,
        detections=detections,
        tracked_box=match.box if match else None,
        names=names,
        title=title,
        subtitle=subtitle,
        normalize=normalize,
        scale=scale,
        tracked_label=f"{name} {match.score:.2f}" if match is not None else None,
        **where,
    )
    return panel, None
