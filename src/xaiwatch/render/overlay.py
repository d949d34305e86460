"""Pure rendering functions: matplotlib's object API on an Agg canvas, never pyplot."""

from __future__ import annotations

import textwrap
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from matplotlib import colormaps
from matplotlib.artist import Artist
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from xaiwatch.core.errors import ConfigurationError
from xaiwatch.core.types import Detections
from xaiwatch.render.layout import FONT, LabelPlacer, add_colorbar, picture_title, set_colorbar

__all__ = [
    "normalize_map",
    "display_range",
    "heat_rgba",
    "figure_to_array",
    "explanation_figure",
    "explanation_panel",
    "explanation_tile",
    "map_region",
    "overlay_pixels",
    "PixelGrid",
    "NORMALIZATIONS",
    "PANEL_SIZE",
]

NORMALIZATIONS = ("per_map", "fixed", "signed")
_PALETTE = ["#ff3b30", "#007aff", "#ffcc00", "#af52de", "#ff9500", "#5ac8fa", "#ff2d55", "#34c759"]
#: explanation panel size in inches (pixels = inches x dpi: 1160 x 630 at 100 dpi)
PANEL_SIZE = (11.6, 6.3)
_IMAGE_RECT = (0.01, 0.015, 0.43, 0.794)  # left, bottom, width, height (figure fractions): 499 x 500 px
_MAP_RECT = (0.46, 0.015, 0.43, 0.794)
_BAR_RECT = (0.905, 0.06, 0.016, 0.68)
_MAX_ALPHA = 0.75
_GT_COLOR = "#34c759"


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
    s = _divisor(m, mode, scale)
    if mode == "signed":
        return np.clip(m / s, -1, 1) if s > 0 else np.zeros_like(m)
    return np.clip(np.abs(m) / s, 0, 1) if s > 0 else np.zeros_like(m)


def _divisor(m: np.ndarray, mode: str, scale: float | None) -> float:
    if mode == "fixed":
        return float(scale or 0.0)
    if mode == "signed" and scale:
        return float(scale)
    return float(np.abs(m).max())


def display_range(saliency: torch.Tensor, mode: str = "per_map", scale: float | None = None) -> tuple[float, float]:
    """The map values that the ends of the colour scale stand for (see :func:`normalize_map`).

    Args:
        saliency: the map.
        mode: ``"per_map"``, ``"fixed"`` or ``"signed"``.
        scale: the divisor of ``"fixed"``/``"signed"``.

    Returns:
        ``(0, s)`` for unsigned modes, ``(-s, s)`` for ``"signed"``, ``s`` the divisor (``0`` for a zero map).

    Example:
        >>> display_range(torch.tensor([[0.0, -2.0], [1.0, 0.5]]))
        (0.0, 2.0)
    """
    if mode not in NORMALIZATIONS:
        raise ConfigurationError(f"`normalize` must be one of {NORMALIZATIONS}, got {mode!r}.")
    s = _divisor(saliency.detach().float().cpu().numpy(), mode, scale)
    return (-s, s) if mode == "signed" else (0.0, s)


def heat_rgba(heat: np.ndarray, signed: bool = False, cmap: str = "jet", max_alpha: float = _MAX_ALPHA) -> np.ndarray:
    """Colour a normalised map with an opacity proportional to its magnitude (zero = fully transparent).

    Args:
        heat: :math:`(H, W)` map in ``[0, 1]`` (``[-1, 1]`` when ``signed``).
        signed: use the diverging ``bwr`` colormap.
        cmap: colormap of unsigned maps.
        max_alpha: opacity where ``|heat| = 1``.

    Returns:
        :math:`(H, W, 4)` float RGBA array.

    Example:
        >>> heat_rgba(np.array([[0.0, 1.0]]))[..., 3].tolist()
        [[0.0, 0.75]]
    """
    if signed:
        rgba = colormaps["bwr"]((np.clip(heat, -1, 1) + 1) / 2)
    else:
        rgba = colormaps[cmap](np.clip(heat, 0, 1))
    rgba[..., 3] = max_alpha * np.clip(np.abs(heat), 0, 1)
    return rgba


def figure_to_array(fig: Figure) -> np.ndarray:
    """Render a Figure to an :math:`(H, W, 3)` uint8 array with the Agg backend."""
    canvas = fig.canvas if isinstance(fig.canvas, FigureCanvasAgg) else FigureCanvasAgg(fig)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


def _image_hwc(image: torch.Tensor) -> np.ndarray:
    return image.detach().float().clamp(0, 1).permute(1, 2, 0).cpu().numpy()


def _name(names: Sequence[str] | None, label: int) -> str:
    return names[int(label)] if names and int(label) < len(names) else str(int(label))


def _draw_boxes(
    ax, boxes, labels, names, style: str, scores=None, color=None, lw: float = 1.6, placer: LabelPlacer | None = None
) -> None:
    """Draw boxes with a label each; labels go through ``placer`` (no overlaps, inside the axes)."""
    placer = placer or LabelPlacer(ax)
    for i, (box, lab) in enumerate(zip(boxes.tolist(), labels.tolist())):
        c = color or _PALETTE[int(lab) % len(_PALETTE)]
        x1, y1, x2, y2 = box
        ax.add_patch(Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, edgecolor=c, linewidth=lw, linestyle=style))
        text = _name(names, lab) if scores is None else f"{_name(names, lab)} {float(scores[i]):.2f}"
        placer.add(box, text, c, text_color="black" if c in ("#ffcc00", "#5ac8fa", _GT_COLOR) else "white")


def _wrap(text: str, width: int, lines: int = 2) -> str:
    wrapped = textwrap.wrap(text, width=width) or [""]
    if len(wrapped) > lines:
        wrapped = wrapped[:lines]
        wrapped[-1] = wrapped[-1][: width - 1] + "…"
    return "\n".join(wrapped)


def _show_image(ax, img: np.ndarray) -> None:
    h, w = img.shape[:2]
    ax.imshow(img, extent=(0, w, h, 0), interpolation="nearest")
    ax.set_xlim(0, w)
    ax.set_ylim(h, 0)
    ax.axis("off")


@dataclass(frozen=True)
class PixelGrid:
    """Where an image of ``(rows, cols)`` pixels lands on the canvas, as matplotlib's Agg canvas draws it.

    Attributes:
        top, left: the first display pixel row (from the top) and column.
        height, width: display pixels.
        rows, cols: the image coordinate (in image pixels) sampled by each display pixel, per row and column.
    """

    top: int
    left: int
    height: int
    width: int
    rows: np.ndarray
    cols: np.ndarray

    @classmethod
    def of(cls, shape: tuple[int, int], box: tuple[float, float, float, float], canvas_height: float) -> PixelGrid:
        """The grid of an image of ``shape`` drawn into ``box`` (display pixels ``x0, y0, width, height``, y up).

        As Agg draws it (measured on matplotlib 3.11): the pixels of the box rounded to whole pixels, each showing
        the image at its centre.

        Example:
            >>> g = PixelGrid.of((2, 2), (0.6, 0.0, 4.0, 4.0), 4.0)
            >>> g.left, g.width, g.cols.tolist()
            (1, 4, [0.45, 0.95, 1.45, 1.95])
        """
        x0, y0, width, height = (float(v) for v in box)
        left, right = round(x0), round(x0 + width)
        top, bottom = round(canvas_height - round(y0 + height)), round(canvas_height - round(y0))
        cols = (np.arange(left, right) + 0.5 - x0) * shape[1] / width
        rows = (np.arange(top, bottom) + 0.5 - (canvas_height - y0 - height)) * shape[0] / height
        return cls(top, left, bottom - top, right - left, rows, cols)


def _nearest(coords: np.ndarray, n: int) -> np.ndarray:
    return np.clip(np.floor(coords), 0, n - 1).astype(np.intp)


def _linear(coords: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    x = np.clip(coords - 0.5, 0, n - 1)
    lo = np.floor(x).astype(np.intp)
    return lo, np.minimum(lo + 1, n - 1), (x - lo).astype(np.float32)


def overlay_pixels(image: np.ndarray, heat: np.ndarray, grid: PixelGrid) -> tuple[np.ndarray, np.ndarray]:
    """The image and the map over it at display resolution, composited with numpy.

    The image is enlarged pixel by pixel (``"nearest"``), the RGBA map bilinearly in premultiplied-alpha space and
    laid over it ("source over" in 8 bits), as matplotlib draws the two ``imshow`` layers (measured: 97% of the
    pixels equal, the rest within one level but for a row or column on a rounding tie), without matplotlib's float
    resampling of both layers at every picture.

    Args:
        image: :math:`(H, W, 3)` float image in ``[0, 1]``.
        heat: :math:`(H, W, 4)` float RGBA map (:func:`heat_rgba`).
        grid: where the image lands on the canvas (:meth:`PixelGrid.of`).

    Returns:
        The enlarged image and the composite, both :math:`(grid.height, grid.width, 3)` uint8.

    Example:
        >>> img, heat = np.zeros((2, 2, 3)), heat_rgba(np.array([[0.0, 0.0], [0.0, 1.0]]))
        >>> base, over = overlay_pixels(img, heat, PixelGrid.of((2, 2), (0.0, 0.0, 4.0, 4.0), 4.0))
        >>> base.shape, int(over[0, 0].max()), int(over[3, 3].max()) > 0
        ((4, 4, 3), 0, True)
    """
    h, w = image.shape[:2]
    base = _to_uint8(image[_nearest(grid.rows, h)][:, _nearest(grid.cols, w)]).astype(np.int32)
    premultiplied = np.concatenate([heat[..., :3] * heat[..., 3:], heat[..., 3:]], axis=2).astype(np.float32)
    r0, r1, fr = _linear(grid.rows, h)
    c0, c1, fc = _linear(grid.cols, w)
    rows = premultiplied[r0] * (1 - fr)[:, None, None] + premultiplied[r1] * fr[:, None, None]
    over = rows[:, c0] * (1 - fc)[None, :, None] + rows[:, c1] * fc[None, :, None]
    alpha = over[..., 3:]
    colour = _to_uint8(over[..., :3] / np.where(alpha > 0, alpha, 1)).astype(np.int32)  # demultiplied, 8 bits
    alpha8 = _to_uint8(alpha).astype(np.int32)
    composite = base + (colour - base) * alpha8 // 255  # Agg's 8-bit "source over"
    return base.astype(np.uint8), composite.astype(np.uint8)


def _to_uint8(a: np.ndarray) -> np.ndarray:
    """``[0, 1]`` floats to bytes as matplotlib converts them (truncated)."""
    return (np.clip(a, 0, 1) * 255).astype(np.uint8)


@dataclass
class _PanelParts:
    """The Figure of an explanation panel and what is drawn again for each picture (see :func:`_panel_parts`)."""

    fig: Figure
    ax_img: Any
    ax_map: Any
    cax: Any = None
    bar: Any = None
    images: dict[str, Any] = field(default_factory=dict)


def _new_parts(dpi: int, colorbar: bool) -> _PanelParts:
    fig = Figure(figsize=PANEL_SIZE, dpi=dpi)
    FigureCanvasAgg(fig)
    parts = _PanelParts(fig, fig.add_axes(_IMAGE_RECT), fig.add_axes(_MAP_RECT))
    if colorbar:
        parts.cax = fig.add_axes(_BAR_RECT)
    for ax in (parts.ax_img, parts.ax_map):
        ax.axis("off")
        ax.set_aspect("equal")
    return parts


#: per thread, ``(dpi, colorbar)`` -> the panel Figure :func:`explanation_panel` draws again for every picture
_REUSED = threading.local()


def _panel_parts(dpi: int, colorbar: bool) -> _PanelParts:
    """This thread's panel Figure of that layout: built once, then only its data, titles and boxes change.

    Building a Figure with its three axes and colour bar took about a third of a panel's drawing time; the
    callbacks draw pictures on their own writer threads, so each thread keeps its own Figure.
    """
    cache = getattr(_REUSED, "parts", None)
    if cache is None:
        cache = _REUSED.parts = {}
    key = (int(dpi), bool(colorbar))
    if key not in cache:
        cache[key] = _new_parts(dpi, colorbar)
    return cache[key]


def _clear_panel(parts: _PanelParts) -> None:
    """Remove the boxes and labels of the last picture (images, titles and colour bar are updated in place)."""
    for ax in (parts.ax_img, parts.ax_map):
        for artist in [*ax.patches, *ax.texts]:
            artist.remove()


def _grid(ax, shape: tuple[int, int]) -> PixelGrid:
    """The display pixels the axes' image of ``shape`` covers (the axes span the image exactly)."""
    box = ax.bbox
    return PixelGrid.of(shape, (box.x0, box.y0, box.width, box.height), ax.figure.bbox.height)


class _Pixels(Artist):
    """RGB pixels copied onto the Agg canvas as they are (no resampling, no float conversion), at a grid."""

    def __init__(self) -> None:
        super().__init__()
        self.rgba: np.ndarray | None = None
        self.left = self.bottom = 0

    def set_pixels(self, pixels: np.ndarray, left: int, bottom: int) -> None:
        """Show ``pixels`` (:math:`(h, w, 3)` uint8, top row first) with their bottom-left corner at that pixel."""
        rgba = np.empty((*pixels.shape[:2], 4), np.uint8)
        rgba[..., :3] = pixels
        rgba[..., 3] = 255
        self.rgba, self.left, self.bottom = rgba, int(left), int(bottom)
        self.stale = True

    def draw(self, renderer) -> None:  # noqa: D102 (matplotlib's Artist.draw)
        if self.rgba is None or not self.get_visible():
            return
        gc = renderer.new_gc()
        try:
            renderer.draw_image(gc, self.left, self.bottom, self.rgba[::-1])
        finally:
            gc.restore()
        self.stale = False


def _set_pixels(parts: _PanelParts, key: str, grid: PixelGrid, pixels: np.ndarray) -> None:
    """Put ``pixels`` on the canvas at ``grid``, below the axes' boxes and labels."""
    artist = parts.images.get(key)
    if artist is None:
        artist = parts.images[key] = _Pixels()
        artist.set_zorder(-1)
        parts.fig.add_artist(artist)
    artist.set_pixels(pixels, grid.left, round(parts.fig.bbox.height) - grid.top - grid.height)


def _draw_panel(
    parts: _PanelParts,
    image: torch.Tensor,
    saliency: torch.Tensor,
    *,
    gt_boxes: torch.Tensor | None,
    gt_labels: torch.Tensor | None,
    detections: Detections | None,
    tracked_box: Sequence[float] | None,
    tracked_label: str | None,
    names: Sequence[str] | None,
    title: str,
    subtitle: str,
    normalize: str,
    scale: float | None,
    cmap: str,
    method: str | None,
    probe: int | str | None,
    epoch: int | None,
    step: int | None,
    max_boxes: int,
) -> None:
    """Draw one explanation into ``parts`` (a fresh or a reused panel Figure)."""
    img = _image_hwc(image)
    heat = normalize_map(saliency, normalize, scale)
    signed = normalize == "signed"
    fig, ax_img, ax_map = parts.fig, parts.ax_img, parts.ax_map
    h, w = img.shape[:2]
    for ax in (ax_img, ax_map):  # data coordinates are image pixels; boxes and labels are placed in the final
        ax.set_xlim(0, w)  # (equal-aspect) axes, on a fresh or a reused Figure alike
        ax.set_ylim(h, 0)
        ax.apply_aspect()
    grid_img, grid_map = _grid(ax_img, (h, w)), _grid(ax_map, (h, w))
    _, right = overlay_pixels(img, heat_rgba(heat, signed, cmap), grid_map)
    left = _to_uint8(img[_nearest(grid_img.rows, h)][:, _nearest(grid_img.cols, w)])
    _set_pixels(parts, "image", grid_img, left)
    _set_pixels(parts, "map", grid_map, right)
    if parts.cax is not None:
        vmin, vmax = display_range(saliency, normalize, scale)
        what = {"per_map": "|map|, own max", "fixed": "|map|, fixed scale", "signed": "map, signed"}[normalize]
        if parts.bar is None:
            parts.bar = add_colorbar(fig, parts.cax, "bwr" if signed else cmap, vmin, vmax, what)
        else:
            set_colorbar(parts.bar, "bwr" if signed else cmap, vmin, vmax, what)
    placer = LabelPlacer(ax_img)
    if gt_boxes is not None and gt_labels is not None and len(gt_boxes):
        _draw_boxes(ax_img, gt_boxes.cpu(), gt_labels.cpu(), names, "--", color=_GT_COLOR, placer=placer)
    if detections is not None and len(detections):
        top = detections.scores.cpu().argsort(descending=True)[:max_boxes]
        _draw_boxes(
            ax_img,
            detections.boxes.cpu()[top],
            detections.labels.cpu()[top],
            names,
            "-",
            scores=detections.scores.cpu()[top],
            placer=placer,
        )
    if tracked_box is not None:
        x1, y1, x2, y2 = [float(v) for v in tracked_box]
        for ax in (ax_img, ax_map):
            ax.add_patch(Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, edgecolor="white", linewidth=2.4))
            ax.add_patch(Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, edgecolor="black", linewidth=0.8))
        if tracked_label:
            LabelPlacer(ax_map).add((x1, y1, x2, y2), tracked_label, "white", text_color="black")
    # a fixed title height (y=1.0, the place matplotlib's automatic placement finds above axes without ticks)
    # spares the tick layout pass that automatic placement runs at every draw
    ax_img.set_title(_wrap("ground truth (green, dashed) / predictions (solid)", 70), fontsize=FONT["axes"], y=1.0)
    ax_map.set_title(_wrap(subtitle, 70), fontsize=FONT["axes"], y=1.0)
    full = picture_title(title, method=method, probe=probe, epoch=epoch, step=step)
    fig.suptitle(_wrap(full, 120), fontsize=FONT["title"], y=0.99, va="top")


def explanation_figure(
    image: torch.Tensor,
    saliency: torch.Tensor,
    *,
    gt_boxes: torch.Tensor | None = None,
    gt_labels: torch.Tensor | None = None,
    detections: Detections | None = None,
    tracked_box: Sequence[float] | None = None,
    tracked_label: str | None = None,
    names: Sequence[str] | None = None,
    title: str = "",
    subtitle: str = "",
    normalize: str = "per_map",
    scale: float | None = None,
    cmap: str = "jet",
    dpi: int = 100,
    method: str | None = None,
    probe: int | str | None = None,
    epoch: int | None = None,
    step: int | None = None,
    max_boxes: int = 10,
    colorbar: bool = True,
) -> Figure:
    """The Figure of :func:`explanation_panel` (a new one, for callers that add to it or measure its text)."""
    parts = _new_parts(dpi, colorbar)
    _draw_panel(
        parts,
        image,
        saliency,
        gt_boxes=gt_boxes,
        gt_labels=gt_labels,
        detections=detections,
        tracked_box=tracked_box,
        tracked_label=tracked_label,
        names=names,
        title=title,
        subtitle=subtitle,
        normalize=normalize,
        scale=scale,
        cmap=cmap,
        method=method,
        probe=probe,
        epoch=epoch,
        step=step,
        max_boxes=max_boxes,
    )
    return parts.fig


def explanation_panel(
    image: torch.Tensor,
    saliency: torch.Tensor,
    *,
    gt_boxes: torch.Tensor | None = None,
    gt_labels: torch.Tensor | None = None,
    detections: Detections | None = None,
    tracked_box: Sequence[float] | None = None,
    tracked_label: str | None = None,
    names: Sequence[str] | None = None,
    title: str = "",
    subtitle: str = "",
    normalize: str = "per_map",
    scale: float | None = None,
    cmap: str = "jet",
    dpi: int = 100,
    method: str | None = None,
    probe: int | str | None = None,
    epoch: int | None = None,
    step: int | None = None,
    max_boxes: int = 10,
    colorbar: bool = True,
) -> np.ndarray:
    """Two panels side by side: the image with ground truth and predictions, and the map over the image.

    Ground-truth boxes are green and dashed, predictions solid with class and score (the ``max_boxes`` highest);
    labels never overlap and stay inside the panel (a label without a free place is left out). The explained
    (tracked) box is white on both panels. The map is drawn with an opacity proportional to its value, so the
    image is untouched where the map is zero; the colour bar gives the map values of the colour scale.

    Args:
        image: :math:`(3, H, W)` image in ``[0, 1]``.
        saliency: :math:`(1, H, W)` or :math:`(H, W)` map.
        gt_boxes, gt_labels: ground truth, :math:`(n, 4)` ``xyxy`` and :math:`(n,)`.
        detections: the model's detections on this image.
        tracked_box: the box whose score is explained.
        tracked_label: text drawn at the tracked box on the map panel (e.g. ``"false positive circle 0.41"``).
        names: class names.
        title: free text of the title line (after method, probe, epoch and step).
        subtitle: text above the map panel.
        normalize, scale: see :func:`normalize_map`; ``"signed"`` uses a diverging colormap.
        cmap: colormap of unsigned maps.
        dpi: resolution; the picture is :data:`PANEL_SIZE` x ``dpi`` pixels (1160 x 630 at 100 dpi).
        method, probe, epoch, step: the title's standard parts (see :func:`~xaiwatch.render.layout.picture_title`).
        max_boxes: predictions drawn, highest scores first.
        colorbar: draw the colour bar.

    Returns:
        :math:`(H', W', 3)` uint8 picture.

    Example:
        >>> pic = explanation_panel(torch.rand(3, 32, 32), torch.rand(1, 32, 32), method="saliency", epoch=1)
        >>> pic.shape
        (630, 1160, 3)
    """
    if normalize not in NORMALIZATIONS:
        raise ConfigurationError(f"`normalize` must be one of {NORMALIZATIONS}, got {normalize!r}.")
    parts = _panel_parts(dpi, colorbar)
    try:
        _draw_panel(
            parts,
            image,
            saliency,
            gt_boxes=gt_boxes,
            gt_labels=gt_labels,
            detections=detections,
            tracked_box=tracked_box,
            tracked_label=tracked_label,
            names=names,
            title=title,
            subtitle=subtitle,
            normalize=normalize,
            scale=scale,
            cmap=cmap,
            method=method,
            probe=probe,
            epoch=epoch,
            step=step,
            max_boxes=max_boxes,
        )
        return figure_to_array(parts.fig)
    except BaseException:
        _REUSED.parts.pop((int(dpi), bool(colorbar)), None)  # a half-drawn Figure is not used again
        raise
    finally:
        _clear_panel(parts)


def map_region(picture: np.ndarray) -> np.ndarray:
    """The map half of an :func:`explanation_panel` picture (the filmstrip tile), without titles and colour bar.

    Args:
        picture: :math:`(H, W, 3)` picture of :func:`explanation_panel` (any dpi).

    Returns:
        The crop of the map panel; other pictures (not of the panel's aspect) are returned whole.
    """
    h, w = picture.shape[:2]
    if abs(w / h - PANEL_SIZE[0] / PANEL_SIZE[1]) > 0.01:
        return picture
    left, bottom, width, height = _MAP_RECT
    x0, x1 = round(left * w), round((left + width) * w)
    y0, y1 = round((1 - bottom - height) * h), round((1 - bottom) * h)
    crop = picture[y0:y1, x0:x1]
    keep = np.where((crop < 250).any(axis=2))  # trim the white margins around the image
    if not len(keep[0]):
        return crop
    return crop[keep[0].min() : keep[0].max() + 1, keep[1].min() : keep[1].max() + 1]


def explanation_tile(
    image: torch.Tensor,
    saliency: torch.Tensor,
    *,
    tracked_box: Sequence[float] | None = None,
    normalize: str = "per_map",
    scale: float | None = None,
    cmap: str = "jet",
    size: int = 256,
) -> np.ndarray:
    """The map over the image alone, ``size`` pixels on its long side (a filmstrip tile).

    Args:
        image: :math:`(3, H, W)` image in ``[0, 1]``.
        saliency: the map.
        tracked_box: drawn white.
        normalize, scale, cmap: as in :func:`explanation_panel`.
        size: pixels of the long side.

    Returns:
        :math:`(h, w, 3)` uint8 picture.
    """
    img = _image_hwc(image)
    h, w = img.shape[:2]
    fig = Figure(figsize=(size * w / max(h, w) / 100, size * h / max(h, w) / 100), dpi=100)
    ax = fig.add_axes((0, 0, 1, 1))
    _show_image(ax, img)
    ax.imshow(heat_rgba(normalize_map(saliency, normalize, scale), normalize == "signed", cmap), extent=(0, w, h, 0))
    if tracked_box is not None:
        x1, y1, x2, y2 = [float(v) for v in tracked_box]
        ax.add_patch(Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, edgecolor="white", linewidth=2))
    return figure_to_array(fig)
