"""Explanation panels drawn fast: one reused Figure per thread, image and map composited with numpy.

Every picture must equal what a fresh Figure draws (nothing left over from the picture before, on any thread), and
the numpy composite must match what matplotlib's own ``imshow`` layers draw.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from xaiwatch.core.types import Detections
from xaiwatch.render import explanation_panel
from xaiwatch.render.overlay import (
    _IMAGE_RECT,
    _MAP_RECT,
    PANEL_SIZE,
    PixelGrid,
    explanation_figure,
    figure_to_array,
    heat_rgba,
    normalize_map,
    overlay_pixels,
)

NAMES = ["circle", "triangle", "square"]


def _case(i: int, size: tuple[int, int] = (160, 160)) -> tuple[torch.Tensor, torch.Tensor, dict]:
    g = torch.Generator().manual_seed(i)
    h, w = size
    image = torch.rand(3, h, w, generator=g) * 0.6 + 0.2
    saliency = torch.rand(1, h, w, generator=g) ** 3 * (i + 1)
    corner = torch.rand(6, 2, generator=g) * (min(h, w) - 50)
    boxes = torch.cat([corner, corner + 20 + torch.rand(6, 2, generator=g) * 25], 1)
    dets = Detections(
        boxes=boxes[:5] + 2,
        scores=torch.rand(5, generator=g),
        labels=torch.randint(0, 3, (5,), generator=g),
        candidates=torch.arange(5),
    )
    mode = ["per_map", "fixed", "signed"][i % 3]
    kwargs = dict(
        gt_boxes=boxes[:3] if i % 2 == 0 else None,
        gt_labels=torch.tensor([0, 1, 2]) if i % 2 == 0 else None,
        detections=dets if i != 1 else None,
        tracked_box=boxes[0].tolist() if i != 3 else None,
        tracked_label=f"circle 0.{i}5",
        names=NAMES,
        title=f"val #{i}",
        subtitle=f"circle: detected (score 0.{i}1, IoU 0.77)",
        normalize=mode,
        scale=2.0 if mode == "fixed" else None,
        method="saliency",
        probe=f"probe_{i:02d}",
        epoch=i,
        step=40 * i,
    )
    if mode == "signed":
        saliency = saliency - saliency.mean()
    return image, saliency, kwargs


def _fresh(image, saliency, **kwargs) -> np.ndarray:
    return figure_to_array(explanation_figure(image, saliency, **kwargs))


def test_reused_figure_draws_exactly_what_a_fresh_one_draws():
    """Pictures of different sizes, modes, boxes and colour bars in a row: none keeps anything of the one before."""
    cases = [_case(0), _case(1, (96, 160)), _case(2), _case(3, (64, 64)), _case(4, (160, 120)), _case(5)]
    for image, saliency, kwargs in cases + cases[::-1]:
        assert np.array_equal(explanation_panel(image, saliency, **kwargs), _fresh(image, saliency, **kwargs))
    image, saliency, kwargs = _case(6)
    for colorbar in (False, True, False):
        pic = explanation_panel(image, saliency, colorbar=colorbar, **kwargs)
        assert np.array_equal(pic, _fresh(image, saliency, colorbar=colorbar, **kwargs))


def test_each_thread_draws_on_its_own_figure():
    cases = [_case(i) for i in range(6)]
    expected = [_fresh(img, sal, **kw) for img, sal, kw in cases]
    with ThreadPoolExecutor(max_workers=3) as pool:
        pictures = list(pool.map(lambda c: explanation_panel(c[0], c[1], **c[2]), cases * 2))
    for k, pic in enumerate(pictures):
        assert np.array_equal(pic, expected[k % len(cases)]), k


def test_a_failed_picture_does_not_spoil_the_next():
    image, saliency, kwargs = _case(0)
    explanation_panel(image, saliency, **kwargs)
    bad = dict(kwargs, gt_boxes=torch.zeros(3, 3))  # boxes with 3 coordinates: fails half-way through drawing
    with pytest.raises(ValueError):
        explanation_panel(image, saliency, **bad)
    image, saliency, kwargs = _case(2)
    assert np.array_equal(explanation_panel(image, saliency, **kwargs), _fresh(image, saliency, **kwargs))


def _matplotlib_layers(image: np.ndarray, heat: np.ndarray) -> np.ndarray:
    """The two panels as matplotlib's ``imshow`` draws them (what the panels were drawn with before)."""
    fig = Figure(figsize=PANEL_SIZE, dpi=100)
    FigureCanvasAgg(fig)
    h, w = image.shape[:2]
    for rect, layers in ((_IMAGE_RECT, [(image, "nearest")]), (_MAP_RECT, [(image, "nearest"), (heat, "bilinear")])):
        ax = fig.add_axes(rect)
        for data, interpolation in layers:
            ax.imshow(data, extent=(0, w, h, 0), interpolation=interpolation)
        ax.set_xlim(0, w)
        ax.set_ylim(h, 0)
        ax.axis("off")
    return figure_to_array(fig)


@pytest.mark.parametrize("size", [(160, 160), (120, 160), (64, 64)])
def test_numpy_composite_matches_matplotlib(size):
    g = torch.Generator().manual_seed(3)
    image = (torch.rand(3, *size, generator=g) * 0.6 + 0.2).permute(1, 2, 0).numpy()
    blob = torch.zeros(1, *size)
    blob[0, size[0] // 4 : size[0] // 2, size[1] // 3 : size[1] // 2] = 1.0
    heat = heat_rgba(normalize_map(blob + 0.3 * torch.rand(1, *size, generator=g)))
    reference = _matplotlib_layers(image, heat).astype(int)
    ours = np.full_like(reference, 255)
    fig = Figure(figsize=PANEL_SIZE, dpi=100)
    for rect, which in ((_IMAGE_RECT, 0), (_MAP_RECT, 1)):
        ax = fig.add_axes(rect)
        ax.set_xlim(0, size[1])
        ax.set_ylim(size[0], 0)
        ax.set_aspect("equal")
        ax.apply_aspect()
        grid = PixelGrid.of(size, ax.bbox.bounds, fig.bbox.height)
        pixels = overlay_pixels(image, heat, grid)[which]
        ours[grid.top : grid.top + grid.height, grid.left : grid.left + grid.width] = pixels
    diff = np.abs(ours - reference).max(axis=2)
    assert (diff > 2).mean() < 0.004  # a pixel row or column on a rounding tie at most
    assert (diff > 1).mean() < 0.004 and diff.mean() < 0.2
    painted, ours_painted = (reference < 250).any(axis=2), (ours < 250).any(axis=2)
    assert painted.mean() > 0.3 and np.logical_xor(painted, ours_painted).mean() < 0.002  # the same place
