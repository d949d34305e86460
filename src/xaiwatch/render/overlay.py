"""Pure rendering functions: matplotlib's object API on an Agg canvas, never pyplot."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from xaiwatch.core.errors import ConfigurationError
from xaiwatch.core.types import Detections

__all__ = ["normalize_map", "figure_to_array", "explanation_panel", "NORMALIZATIONS"]

NORMALIZATIONS = ("per_map", "fixed", "signed")
_PALETTE = ["#ff3b30", "#007aff", "#ffcc00", "#af52de", "#ff9500", "#5ac8fa", "#ff2d55", "#34c759"]


def normalize_map(saliency: torch.Tensor, mode: str = "per_map", scale: float | None = None) -> np.ndarray:
    """Scale a map for display.

    Args:
        saliency: :math:`(H, W)` or :math:`(1, H, W)` map.
        mode: ``"per_map"`` divides by the map's own maximum of ``|map|`` (shape only); ``"fixed"`` divides by
            ``scale`` (the same for every epoch, so brightening is real) and clips to ``[0, 1]``; ``"signed"``
            divides by ``scale`` (or the maximum of ``|map|``) keeping the sign, in ``[-1, 1]``.
        scale: the divisor of ``"fixed"``/``"signed"``.

    Returns:
        :math:`(H, W)` float array; a constant zero map stays zero.
    """
    if mode not in NORMALIZATIONS:
        raise ConfigurationError(f"`normalize` must be one of {NORMALIZATIONS}, got {mode!r}.")
    m = saliency.detach().float().cpu().reshape(saliency.shape[-2:]).numpy()
    if mode == "signed":
        s = scale if scale else float(np.abs(m).max())
        return np.clip(m / s, -1, 1) if s > 0 else np.zeros_like(m)
    m = np.abs(m)
    s = float(m.max()) if mode == "per_map" else float(scale or 0.0)
    return np.clip(m / s, 0, 1) if s > 0 else np.zeros_like(m)


def figure_to_array(fig: Figure) -> np.ndarray:
    """Render a Figure to an :math:`(H, W, 3)` uint8 array with the Agg backend."""
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


def _image_hwc(image: torch.Tensor) -> np.ndarray:
    return image.detach().float().clamp(0, 1).permute(1, 2, 0).cpu().numpy()


def _draw_boxes(ax, boxes, labels, names, style: str, scores=None, color=None, lw: float = 1.2) -> None:
    for i, (box, lab) in enumerate(zip(boxes.tolist(), labels.tolist())):
        c = color or _PALETTE[int(lab) % len(_PALETTE)]
        x1, y1, x2, y2 = box
        ax.add_patch(Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, edgecolor=c, linewidth=lw, linestyle=style))
        name = names[int(lab)] if names and int(lab) < len(names) else str(int(lab))
        text = name if scores is None else f"{name} {float(scores[i]):.2f}"
        ax.text(
            x1,
            y1 - 1,
            text,
            color="white",
            fontsize=6,
            va="bottom",
            bbox={"facecolor": c, "alpha": 0.8, "pad": 0.5, "linewidth": 0},
        )


def explanation_panel(
    image: torch.Tensor,
    saliency: torch.Tensor,
    *,
    gt_boxes: torch.Tensor | None = None,
    gt_labels: torch.Tensor | None = None,
    detections: Detections | None = None,
    tracked_box: Sequence[float] | None = None,
    names: Sequence[str] | None = None,
    title: str = "",
    subtitle: str = "",
    normalize: str = "per_map",
    scale: float | None = None,
    cmap: str = "jet",
    dpi: int = 100,
) -> np.ndarray:
    """Two panels side by side: the image with ground truth and predictions, and the map over the image.

    Ground-truth boxes are dashed, predictions solid with class and score, the explained (tracked) box is
    white and thick on the heatmap panel.

    Args:
        image: :math:`(3, H, W)` image in ``[0, 1]``.
        saliency: :math:`(1, H, W)` or :math:`(H, W)` map.
        gt_boxes, gt_labels: ground truth, :math:`(n, 4)` ``xyxy`` and :math:`(n,)`.
        detections: the model's detections on this image.
        tracked_box: the box whose score is explained.
        names: class names.
        title, subtitle: text above the panels.
        normalize, scale: see :func:`normalize_map`; ``"signed"`` uses a diverging colormap.
        cmap: colormap of unsigned maps.
        dpi: resolution; the figure is about 2 x 256 pixels wide at 100 dpi.

    Returns:
        :math:`(H', W', 3)` uint8 picture.
    """
    img = _image_hwc(image)
    heat = normalize_map(saliency, normalize, scale)
    h, w = img.shape[:2]
    fig = Figure(figsize=(5.6, 3.1), dpi=dpi)
    axes = fig.subplots(1, 2)
    fig.subplots_adjust(left=0.01, right=0.99, bottom=0.01, top=0.84, wspace=0.03)
    for ax in axes:
        ax.imshow(img, extent=(0, w, h, 0))
        ax.set_xlim(0, w)
        ax.set_ylim(h, 0)
        ax.axis("off")
    if normalize == "signed":
        axes[1].imshow(heat, cmap="bwr", vmin=-1, vmax=1, alpha=0.55, extent=(0, w, h, 0))
    else:
        axes[1].imshow(heat, cmap=cmap, vmin=0, vmax=1, alpha=0.5, extent=(0, w, h, 0))
    if gt_boxes is not None and gt_labels is not None and len(gt_boxes):
        _draw_boxes(axes[0], gt_boxes.cpu(), gt_labels.cpu(), names, "--", color="#34c759")
    if detections is not None and len(detections):
        _draw_boxes(
            axes[0], detections.boxes.cpu(), detections.labels.cpu(), names, "-", scores=detections.scores.cpu()
        )
    if tracked_box is not None:
        x1, y1, x2, y2 = [float(v) for v in tracked_box]
        axes[1].add_patch(Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, edgecolor="white", linewidth=1.8))
    axes[0].set_title("ground truth (dashed) / predictions", fontsize=7)
    axes[1].set_title(subtitle, fontsize=7)
    fig.suptitle(title, fontsize=8)
    return figure_to_array(fig)
