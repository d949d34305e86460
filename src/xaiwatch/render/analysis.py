"""Pictures of the error analysis and of decision boundaries (matplotlib object API, no pyplot)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from matplotlib.figure import Figure

from xaiwatch.core.errors import ShapeError
from xaiwatch.core.types import Detections
from xaiwatch.render.overlay import _draw_boxes, _image_hwc, figure_to_array

__all__ = ["confusion_figure", "boundary_panel"]


def confusion_figure(
    confusion: torch.Tensor, names: Sequence[str] | None = None, title: str = "", dpi: int = 100
) -> np.ndarray:
    """A confusion matrix with a background row and column, counts written in the cells.

    Args:
        confusion: :math:`(C + 1, C + 1)` counts, rows = true class, columns = predicted class, last index
            background (see :class:`~xaiwatch.analysis.ErrorCounts`).
        names: ``C`` class names.
        title: text above the matrix.
        dpi: resolution.

    Returns:
        :math:`(H, W, 3)` uint8 picture; colours are row-normalised (the share of each true class).

    Raises:
        ShapeError: for a matrix that is not square, or ``names`` of another length.
    """
    m = confusion.detach().cpu().long()
    if m.dim() != 2 or m.shape[0] != m.shape[1] or m.shape[0] < 2:
        raise ShapeError("confusion", tuple(m.shape), ["C+1", "C+1"])
    c = m.shape[0] - 1
    labels = list(names) if names is not None else [str(i) for i in range(c)]
    if len(labels) != c:
        raise ShapeError("names", (len(labels),), [c])
    labels.append("background")
    share = m.float() / m.sum(1, keepdim=True).clamp(min=1)
    side = 1.6 + 0.45 * (c + 1)
    fig = Figure(figsize=(side + 0.6, side), dpi=dpi)
    ax = fig.add_subplot(1, 1, 1)
    ax.imshow(share.numpy(), cmap="Blues", vmin=0, vmax=1)
    for i in range(c + 1):
        for j in range(c + 1):
            if int(m[i, j]):
                dark = float(share[i, j]) > 0.6
                ax.text(j, i, str(int(m[i, j])), ha="center", va="center", fontsize=7, color="white" if dark else "k")
    ax.set_xticks(range(c + 1), labels, rotation=45, ha="right", fontsize=7)
    ax.set_yticks(range(c + 1), labels, fontsize=7)
    ax.set_xlabel("predicted", fontsize=8)
    ax.set_ylabel("true", fontsize=8)
    ax.set_title(title, fontsize=8)
    fig.tight_layout()
    return figure_to_array(fig)


def boundary_panel(
    image: torch.Tensor,
    perturbed: torch.Tensor,
    *,
    box: Sequence[float],
    label: int,
    detections: Detections | None,
    perturbed_detections: Detections | None,
    curve: Sequence[tuple[float, float]],
    min_eps: float | None,
    conf: float,
    names: Sequence[str] | None = None,
    title: str = "",
    max_boxes: int = 10,
    dpi: int = 100,
) -> np.ndarray:
    """The decision-boundary picture of one object: original, amplified perturbation, perturbed image, curve.

    Args:
        image: :math:`(3, H, W)` original image in ``[0, 1]``.
        perturbed: :math:`(3, H, W)` the adversarial image at the minimal epsilon.
        box, label: the attacked object (drawn white, dashed).
        detections: the detections on the original image.
        perturbed_detections: the detections on the perturbed image.
        curve: ``(eps, score)`` pairs of the attacks, drawn as the object's score against epsilon.
        min_eps: the minimal epsilon (vertical line), ``None`` when nothing flipped the object.
        conf: the detection threshold (horizontal line).
        names: class names.
        title: text above the panels.
        max_boxes: detections drawn per panel, highest scores first.
        dpi: resolution.

    Returns:
        :math:`(H', W', 3)` uint8 picture.
    """
    delta = (perturbed - image).detach().float().cpu()
    amp = float(delta.abs().max())
    shown = (0.5 + 0.5 * delta / amp) if amp > 0 else torch.full_like(delta, 0.5)
    fig = Figure(figsize=(9.6, 2.8), dpi=dpi)
    axes = fig.subplots(1, 4, gridspec_kw={"width_ratios": [1, 1, 1, 1.25]})
    fig.subplots_adjust(left=0.01, right=0.98, bottom=0.16, top=0.8, wspace=0.12)
    h, w = image.shape[-2:]
    x1, y1, x2, y2 = [float(v) for v in box]
    name = names[label] if names and label < len(names) else str(label)
    panels = (
        (image, detections, "original"),
        (shown, None, f"perturbation x{0.5 / amp:.0f}" if amp > 0 else "no perturbation"),
        (perturbed, perturbed_detections, f"perturbed (eps {min_eps:.4f})" if min_eps else "perturbed"),
    )
    for ax, (img, dets, caption) in zip(axes[:3], panels):
        ax.imshow(_image_hwc(img), extent=(0, w, h, 0))
        ax.set_xlim(0, w)
        ax.set_ylim(h, 0)
        ax.axis("off")
        ax.set_title(caption, fontsize=7)
        ax.plot([x1, x2, x2, x1, x1], [y1, y1, y2, y2, y1], color="white", linestyle="--", linewidth=1.2)
        if dets is not None and len(dets):
            top = dets.scores.argsort(descending=True)[:max_boxes].cpu()
            _draw_boxes(ax, dets.boxes.cpu()[top], dets.labels.cpu()[top], names, "-", scores=dets.scores.cpu()[top])
        for artist in ax.texts:  # labels of boxes reaching outside the image stay in their panel
            artist.set_clip_on(True)
    ax = axes[3]
    eps, scores = zip(*sorted(curve)) if curve else ((), ())
    ax.plot(eps, scores, "o-", color="#007aff", markersize=3)
    ax.axhline(conf, color="#ff3b30", linestyle=":", linewidth=1, label=f"conf {conf:.2f}")
    if min_eps is not None:
        ax.axvline(min_eps, color="k", linestyle="--", linewidth=1, label=f"min eps {min_eps:.4f}")
    ax.set_xlabel("epsilon (L-inf)", fontsize=7)
    ax.set_ylabel(f"score of {name}", fontsize=7)
    ax.tick_params(labelsize=6)
    ax.legend(fontsize=6)
    fig.suptitle(title, fontsize=8)
    return figure_to_array(fig)
