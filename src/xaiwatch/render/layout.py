"""Text that can be read: picture titles, box labels placed without overlap, a colour bar with the value range.

Every function here works on matplotlib's object API (a ``Figure`` on an Agg canvas), never pyplot.
"""

from __future__ import annotations

from collections.abc import Sequence

from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.cm import ScalarMappable
from matplotlib.colorbar import Colorbar
from matplotlib.colors import Normalize
from matplotlib.figure import Figure
from matplotlib.transforms import Bbox

__all__ = ["picture_title", "LabelPlacer", "add_colorbar", "set_colorbar", "MIN_TEXT_PX", "FONT"]

#: the smallest text height (pixels at 100 % zoom) any xaiwatch picture uses
MIN_TEXT_PX = 10.0
#: font sizes in points; at 100 dpi one point is 100 / 72 pixels, so 8 pt = 11 px
FONT = {"label": 9.0, "tick": 8.5, "axes": 10.0, "title": 12.0}


def picture_title(
    title: str = "",
    *,
    method: str | None = None,
    probe: int | str | None = None,
    epoch: int | None = None,
    step: int | None = None,
) -> str:
    """One title line: ``method | probe NN | epoch E | step S | title`` (parts that are ``None`` are left out).

    Args:
        title: free text appended after the standard parts.
        method: explanation method.
        probe: probe number (``3`` becomes ``probe 03``) or a subject name such as ``"probe_03_obj1"``.
        epoch: epochs trained.
        step: optimiser steps (``trainer.global_step``).

    Returns:
        The title.

    Example:
        >>> picture_title("val #12", method="saliency", probe=3, epoch=2, step=40)
        'saliency | probe 03 | epoch 2 | step 40 | val #12'
    """
    parts = []
    if method:
        parts.append(str(method))
    if probe is not None:
        parts.append(f"probe {probe:02d}" if isinstance(probe, int) else str(probe).replace("_", " "))
    if epoch is not None:
        parts.append(f"epoch {int(epoch)}")
    if step is not None:
        parts.append(f"step {int(step)}")
    if title:
        parts.append(title)
    return " | ".join(parts)


def renderer_of(fig: Figure):
    """The Agg renderer of ``fig`` (attaches an Agg canvas when the figure has none)."""
    canvas = fig.canvas if isinstance(fig.canvas, FigureCanvasAgg) else FigureCanvasAgg(fig)
    return canvas.get_renderer()


def _overlaps(a: Bbox, b: Bbox) -> bool:
    return a.x0 < b.x1 and b.x0 < a.x1 and a.y0 < b.y1 and b.y0 < a.y1


class LabelPlacer:
    """Places box labels in one axes so that no two overlap and each stays inside the axes.

    Each label tries, in order: above the box's top-left corner, inside it, below the bottom-left corner, inside
    the bottom; it is shifted sideways to stay inside the axes. A label that finds no free place is dropped
    (:attr:`dropped` counts them), never drawn over another.

    Args:
        ax: the axes (its position in the figure must be final).
        fontsize: label font size in points.
    """

    def __init__(self, ax: Axes, fontsize: float = FONT["label"]) -> None:
        self.ax = ax
        self.fontsize = fontsize
        self.renderer = renderer_of(ax.figure)
        self.area = ax.get_window_extent(self.renderer)
        self.placed: list[Bbox] = []
        self.dropped = 0
        self._pad = 1.5  # points around the text (the coloured background)

    def reserve(self, bbox: Bbox) -> None:
        """Keep labels off a region (pixels), e.g. another text."""
        self.placed.append(bbox)

    def _size(self, text: str) -> tuple[float, float]:
        probe = self.ax.text(0, 0, text, fontsize=self.fontsize)
        ext = probe.get_window_extent(self.renderer)
        probe.remove()
        pad = self._pad * self.ax.figure.dpi / 72
        return ext.width + 2 * pad + 2, ext.height + 2 * pad + 2

    def add(self, box: Sequence[float], text: str, color: str, text_color: str = "white") -> bool:
        """Draw ``text`` next to ``box`` (``x1, y1, x2, y2`` in data coordinates); return False when dropped."""
        width, height = self._size(text)
        to_px = self.ax.transData
        (px1, py_top), (px2, py_bottom) = to_px.transform([(box[0], box[1]), (box[2], box[3])])
        top, bottom = max(py_top, py_bottom), min(py_top, py_bottom)  # pixel y grows upwards
        left = min(px1, px2)
        area = self.area
        for y0 in (top, top - height, bottom - height, bottom):  # above, inside top, below, inside bottom
            x0 = min(max(left, area.x0), area.x1 - width)
            rect = Bbox.from_bounds(x0, y0, width, height)
            inside = rect.x0 >= area.x0 and rect.x1 <= area.x1 and rect.y0 >= area.y0 and rect.y1 <= area.y1
            if inside and not any(_overlaps(rect, other) for other in self.placed):
                self.placed.append(rect)
                pad = self._pad * self.ax.figure.dpi / 72 + 1
                x, y = to_px.inverted().transform((rect.x0 + pad, rect.y0 + pad))
                self.ax.text(
                    x,
                    y,
                    text,
                    color=text_color,
                    fontsize=self.fontsize,
                    ha="left",
                    va="bottom",
                    clip_on=True,
                    bbox={"facecolor": color, "alpha": 0.85, "pad": self._pad, "linewidth": 0},
                )
                return True
        self.dropped += 1
        return False


def add_colorbar(fig: Figure, cax: Axes, cmap: str, vmin: float, vmax: float, label: str) -> Colorbar:
    """A vertical colour bar in ``cax`` from ``vmin`` to ``vmax`` (ticks at both ends and the middle).

    Args:
        fig: the figure.
        cax: the axes of the bar.
        cmap: colormap name.
        vmin, vmax: the value range the colours stand for.
        label: what the values are, drawn above the bar.

    Returns:
        The colour bar (:func:`set_colorbar` gives it another colormap, range and label).
    """
    bar = fig.colorbar(ScalarMappable(norm=Normalize(vmin, vmax if vmax > vmin else vmin + 1.0), cmap=cmap), cax=cax)
    set_colorbar(bar, cmap, vmin, vmax, label)
    return bar


def set_colorbar(bar: Colorbar, cmap: str, vmin: float, vmax: float, label: str) -> None:
    """Give a colour bar of :func:`add_colorbar` another colormap, value range and label (a figure drawn again).

    Args:
        bar: the colour bar.
        cmap: colormap name.
        vmin, vmax: the value range the colours stand for (an empty range shows ``vmin`` to ``vmin + 1``).
        label: what the values are, drawn above the bar.
    """
    if not vmax > vmin:
        vmax = vmin + 1.0
    mappable = bar.mappable
    if mappable.cmap.name != cmap or tuple(mappable.get_clim()) != (vmin, vmax):
        with mappable.callbacks.blocked():
            mappable.set_cmap(cmap)
            mappable.set_clim(vmin, vmax)
        bar.update_normal(mappable)
    bar.set_ticks([vmin, (vmin + vmax) / 2, vmax])
    bar.set_ticklabels([f"{v:.3g}" for v in (vmin, (vmin + vmax) / 2, vmax)])
    bar.ax.tick_params(labelsize=FONT["tick"])
    bar.ax.set_title(label, fontsize=FONT["tick"], loc="left", pad=6, y=1.0)  # fixed y: no layout pass per picture
