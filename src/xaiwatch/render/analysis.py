"""Pictures of the error analysis and of decision boundaries (matplotlib object API, no pyplot)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from xaiwatch.core.errors import ShapeError
from xaiwatch.core.types import Detections
from xaiwatch.render.layout import FONT, LabelPlacer, picture_title
from xaiwatch.render.overlay import _draw_boxes, _image_hwc, _name, _wrap, figure_to_array

__all__ = ["confusion_figure", "boundary_panel", "boundary_figure"]


def confusion_figure(
    confusion: torch.Tensor,
    names: Sequence[str] | None = None,
    title: str = "",
    dpi: int = 100,
    *,
    epoch: int | None = None,
    step: int | None = None,
) -> np.ndarray:
    """A confusion matrix with a background row and column, counts written in the cells.

    Args:
        confusion: :math:`(C + 1, C + 1)` counts, rows = true class, columns = predicted class, last index
            background (see :class:`~xaiwatch.analysis.ErrorCounts`).
        names: ``C`` class names.
        title: text above the matrix (after epoch and step).
        dpi: resolution.
        epoch, step: the title's standard parts.

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
    side = 2.4 + 0.6 * (c + 1)
    fig = Figure(figsize=(side + 1.0, side), dpi=dpi)
    ax = fig.add_subplot(1, 1, 1)
    ax.imshow(share.numpy(), cmap="Blues", vmin=0, vmax=1)
    for i in range(c + 1):
        for j in range(c + 1):
            if int(m[i, j]):
                dark = float(share[i, j]) > 0.6
                ax.text(
                    j,
                    i,
                    str(int(m[i, j])),
                    ha="center",
                    va="center",
                    fontsize=FONT["axes"],
                    color="white" if dark else "k",
                )
    ax.set_xticks(range(c + 1), labels, rotation=45, ha="right", fontsize=FONT["tick"])
    ax.set_yticks(range(c + 1), labels, fontsize=FONT["tick"])
    ax.set_xlabel("predicted", fontsize=FONT["axes"])
    ax.set_ylabel("true", fontsize=FONT["axes"])
    ax.set_title(_wrap(picture_title(title, epoch=epoch, step=step), 60), fontsize=FONT["axes"])
    fig.tight_layout()
    return figure_to_array(fig)


def boundary_figure(
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
    probe: int | str | None = None,
    epoch: int | None = None,
    step: int | None = None,
    method: str | None = None,
) -> Figure:
    """The Figure of :func:`boundary_panel`."""
    delta = (perturbed - image).detach().float().cpu()
    amp = float(delta.abs().max())
    shown = (0.5 + 0.5 * delta / amp) if amp > 0 else torch.full_like(delta, 0.5)
    width, height = 15.2, 4.25
    fig = Figure(figsize=(width, height), dpi=dpi)
    FigureCanvasAgg(fig)

    def rect(left: float, bottom: float, w: float, h: float) -> tuple[float, float, float, float]:
        return (left / width, bottom / height, w / width, h / height)

    image_axes = [fig.add_axes(rect(0.1 + i * 3.55, 0.15, 3.4, 3.4)) for i in range(3)]
    ax_curve = fig.add_axes(rect(11.75, 0.7, 3.0, 2.75))
    h, w = image.shape[-2:]
    x1, y1, x2, y2 = [float(v) for v in box]
    name = _name(names, label)
    panels = (
        (image, detections, "original"),
        (shown, None, f"perturbation x{0.5 / amp:.0f} (grey = none)" if amp > 0 else "no perturbation"),
        (perturbed, perturbed_detections, f"perturbed (eps {min_eps:.4f})" if min_eps else "perturbed"),
    )
    for ax, (img, dets, caption) in zip(image_axes, panels):
        ax.imshow(_image_hwc(img), extent=(0, w, h, 0), interpolation="nearest")
        ax.set_xlim(0, w)
        ax.set_ylim(h, 0)
        ax.axis("off")
        ax.set_title(caption, fontsize=FONT["axes"])
        ax.plot([x1, x2, x2, x1, x1], [y1, y1, y2, y2, y1], color="white", linestyle="--", linewidth=1.6)
        placer = LabelPlacer(ax)
        placer.add((x1, y1, x2, y2), f"attacked: {name}", "white", text_color="black")
        if dets is not None and len(dets):
            top = dets.scores.argsort(descending=True)[:max_boxes].cpu()
            _draw_boxes(
                ax,
                dets.boxes.cpu()[top],
                dets.labels.cpu()[top],
                names,
                "-",
                scores=dets.scores.cpu()[top],
                placer=placer,
            )
    eps, scores = zip(*sorted(curve)) if curve else ((), ())
    ax_curve.plot(eps, scores, "o-", color="#007aff", markersize=4)
    ax_curve.axhline(conf, color="#ff3b30", linestyle=":", linewidth=1.2, label=f"conf {conf:.2f}")
    if min_eps is not None:
        ax_curve.axvline(min_eps, color="k", linestyle="--", linewidth=1, label=f"min eps {min_eps:.4f}")
    ax_curve.set_xlabel("epsilon (L-inf)", fontsize=FONT["axes"])
    ax_curve.set_ylabel(f"score of {name}", fontsize=FONT["axes"])
    ax_curve.tick_params(labelsize=FONT["tick"])
    ax_curve.xaxis.set_major_locator(MaxNLocator(4))
    ax_curve.set_title("score against epsilon", fontsize=FONT["axes"])
    ax_curve.legend(fontsize=FONT["tick"], loc="best")
    full = picture_title(title, method=method, probe=probe, epoch=epoch, step=step)
    fig.suptitle(_wrap(full, 150), fontsize=FONT["title"], y=0.99, va="top")
    return fig


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
    probe: int | str | None = None,
    epoch: int | None = None,
    step: int | None = None,
    method: str | None = None,
) -> np.ndarray:
    """The decision-boundary picture of one object: original, amplified perturbation, perturbed image, curve.

    Box labels never overlap and stay inside their panel; the curve has its own margin, so its axis label is never
    drawn over the images.

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
        title: free text of the title (after method, probe, epoch and step).
        max_boxes: detections drawn per panel, highest scores first.
        dpi: resolution (1520 x 425 pixels at 100 dpi).
        probe, epoch, step, method: the title's standard parts (method = the attack).

    Returns:
        :math:`(H', W', 3)` uint8 picture.
    """
    return figure_to_array(
        boundary_figure(
            image,
            perturbed,
            box=box,
            label=label,
            detections=detections,
            perturbed_detections=perturbed_detections,
            curve=curve,
            min_eps=min_eps,
            conf=conf,
            names=names,
            title=title,
            max_boxes=max_boxes,
            dpi=dpi,
            probe=probe,
            epoch=epoch,
            step=step,
            method=method,
        )
    )
