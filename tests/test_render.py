"""Pictures a person can read: sizes, text >= 10 px, labels that never overlap and stay inside, colour bars."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from matplotlib.text import Text

from xaiwatch.core.errors import ConfigurationError
from xaiwatch.core.types import Detections
from xaiwatch.render import explanation_panel
from xaiwatch.render.analysis import boundary_figure, boundary_panel, confusion_figure
from xaiwatch.render.filmstrip import filmstrip, filmstrip_figure
from xaiwatch.render.history import PictureHistory
from xaiwatch.render.layout import MIN_TEXT_PX, LabelPlacer, picture_title, renderer_of
from xaiwatch.render.overlay import (
    _MAP_RECT,
    display_range,
    explanation_figure,
    explanation_tile,
    figure_to_array,
    map_region,
)
from xaiwatch.render.panels import box_decision_panel
from xaiwatch.render.projection import projection_scatter

NAMES = ["circle", "triangle", "square"]


def _image(size=160):
    torch.manual_seed(0)
    return torch.rand(3, size, size) * 0.6 + 0.2


def _crowded(n=14, size=160):
    """``n`` boxes packed around the same corner: their labels cannot all fit."""
    g = torch.Generator().manual_seed(1)
    x1 = torch.randint(0, 30, (n,), generator=g).float()
    y1 = torch.randint(0, 30, (n,), generator=g).float()
    boxes = torch.stack([x1, y1, x1 + 40, y1 + 40], 1)
    boxes[0] = torch.tensor([120.0, 130.0, 160.0, 160.0])  # touches the right and bottom edges
    return Detections(
        boxes=boxes,
        scores=torch.linspace(0.95, 0.3, n),
        labels=torch.arange(n) % 3,
        candidates=torch.arange(n),
    )


def _texts(fig):
    """(artist, pixel bbox) of every visible, non-empty text, its coloured background included."""
    renderer = renderer_of(fig)
    fig.canvas.draw()
    drawn = list(fig.texts) + ([fig._suptitle] if fig._suptitle is not None else [])
    for ax in fig.axes:
        drawn += list(ax.texts) + [ax.title, ax._left_title, ax._right_title]
        if ax.axison:
            drawn += [ax.xaxis.label, ax.yaxis.label, *ax.get_xticklabels(), *ax.get_yticklabels()]
        if ax.get_legend() is not None:
            drawn += list(ax.get_legend().get_texts())
    out, seen = [], set()
    for t in drawn:
        if id(t) in seen:
            continue
        seen.add(id(t))
        if not isinstance(t, Text) or not t.get_visible() or not t.get_text().strip():
            continue
        patch = t.get_bbox_patch()
        box = patch.get_window_extent(renderer) if patch is not None else t.get_window_extent(renderer)
        out.append((t, box))
    return out


def _overlap(a, b) -> bool:
    return a.x0 < b.x1 - 0.5 and b.x0 < a.x1 - 0.5 and a.y0 < b.y1 - 0.5 and b.y0 < a.y1 - 0.5


def _inside(inner, outer, tol=0.5) -> bool:
    return (
        inner.x0 >= outer.x0 - tol
        and inner.x1 <= outer.x1 + tol
        and inner.y0 >= outer.y0 - tol
        and inner.y1 <= outer.y1 + tol
    )


def _assert_readable(fig):
    for t, box in _texts(fig):
        assert t.get_fontsize() * fig.dpi / 72 >= MIN_TEXT_PX, t.get_text()
        assert _inside(box, fig.bbox), f"{t.get_text()!r} leaves the picture: {box} vs {fig.bbox}"


def _panel_fig(**kw):
    gt = torch.tensor([[10.0, 10.0, 50.0, 50.0], [100.0, 100.0, 150.0, 150.0]])
    sal = torch.zeros(1, 160, 160)
    sal[0, 20:40, 20:40] = 0.004
    args = dict(
        gt_boxes=gt,
        gt_labels=torch.tensor([0, 1]),
        detections=_crowded(),
        tracked_box=[10.0, 10.0, 50.0, 50.0],
        tracked_label="circle 0.95",
        names=NAMES,
        subtitle="circle: detected (score 0.95, IoU 0.91)",
        method="saliency",
        probe=3,
        epoch=2,
        step=40,
        max_boxes=20,
    )
    args.update(kw)
    return explanation_figure(_image(), sal, **args)


def test_panel_size_title_and_text_size():
    fig = _panel_fig()
    pic = figure_to_array(fig)
    assert pic.shape[0] >= 2 * 310 and pic.shape[1] >= 2 * 560
    assert fig._suptitle.get_text() == "saliency | probe 03 | epoch 2 | step 40"
    _assert_readable(fig)
    # the image itself is shown at about 500 px (it was about 250 px)
    ax_map = fig.axes[1]
    assert ax_map.get_window_extent(renderer_of(fig)).width >= 480


def test_panel_labels_never_overlap_and_stay_inside():
    fig = _panel_fig()
    renderer = renderer_of(fig)
    for ax in fig.axes[:2]:
        area = ax.get_window_extent(renderer)
        boxes = [box for t, box in _texts(fig) if t in ax.texts]
        assert boxes
        for box in boxes:
            assert _inside(box, area)
        for a, b in itertools.combinations(boxes, 2):
            assert not _overlap(a, b), (a, b)
    labels = [t.get_text() for t in fig.axes[0].texts]
    assert 2 <= len(labels) < 14 + 2  # some of the 16 labels were dropped rather than drawn over others
    assert "circle 0.95" in labels  # the highest-scoring prediction keeps its label


def test_label_placer_moves_then_drops():
    fig = _panel_fig(detections=None, gt_boxes=None)
    ax = fig.axes[0]
    placer = LabelPlacer(ax)
    box = (60.0, 60.0, 100.0, 100.0)
    assert all(placer.add(box, "circle 0.50", "#ff3b30") for _ in range(4))  # above, inside, below, inside bottom
    assert not placer.add(box, "circle 0.50", "#ff3b30") and placer.dropped == 1
    ys = sorted(t.get_position()[1] for t in ax.texts)
    assert len(set(ys)) == 4


def test_colorbar_shows_the_value_range():
    sal = torch.zeros(1, 160, 160)
    sal[0, 5, 5] = -0.02
    sal[0, 6, 6] = 0.01
    for mode, scale, expected in (
        ("per_map", None, (0.0, 0.02)),
        ("fixed", 0.5, (0.0, 0.5)),
        ("signed", None, (-0.02, 0.02)),
    ):
        fig = explanation_figure(_image(), sal, normalize=mode, scale=scale)
        bar = fig.axes[2]
        assert bar.get_ylim() == pytest.approx(expected)
        assert display_range(sal, mode, scale) == pytest.approx(expected)
        ticks = [t.get_text() for t in bar.get_yticklabels()]
        assert ticks[0] == f"{expected[0]:.3g}" and ticks[-1] == f"{expected[1]:.3g}"
    fig = box_decision_panel  # every heat map has one, the decision panel's too
    assert fig is not None


def test_zero_map_leaves_the_image_untouched():
    img = _image()
    block = torch.zeros(1, 160, 160)
    block[0, 100:140, 100:140] = 1.0
    with_block = explanation_panel(img, block, colorbar=False)
    zero = explanation_panel(img, torch.zeros(1, 160, 160), colorbar=False)
    h, w = with_block.shape[:2]
    left, bottom, width, height = _MAP_RECT
    x0, x1 = round(left * w), round((left + width) * w)
    y0, y1 = round((1 - bottom - height) * h), round((1 - bottom) * h)
    a, b = with_block[y0:y1, x0:x1].astype(int), zero[y0:y1, x0:x1].astype(int)
    sy, sx = a.shape[0] / 160, a.shape[1] / 160
    mask = np.ones(a.shape[:2], bool)  # far from the block (bilinear smoothing reaches a few pixels)
    mask[int(90 * sy) : int(150 * sy), int(90 * sx) : int(150 * sx)] = False
    assert np.array_equal(a[mask], b[mask])
    inner = np.zeros_like(mask)
    inner[int(105 * sy) : int(135 * sy), int(105 * sx) : int(135 * sx)] = True
    assert np.abs(a[inner] - b[inner]).mean() > 40  # the block is painted
    # the zero-map panel shows exactly the image: compare against the image panel on the left
    assert np.abs(zero[y0:y1, x0:x1].astype(int) - zero[y0:y1, round(0.01 * w) : round(0.44 * w)]).max() < 256


def test_old_call_signature_still_works():
    pic = explanation_panel(
        _image(64), torch.rand(1, 64, 64), detections=_crowded(3, 64), tracked_box=[1, 1, 9, 9], title="t", subtitle="s"
    )
    assert pic.shape == (630, 1160, 3) and pic.dtype == np.uint8


def test_map_region_and_tile():
    pic = explanation_panel(_image(), torch.rand(1, 160, 160))
    tile = map_region(pic)
    assert abs(tile.shape[0] - 500) <= 3 and abs(tile.shape[1] - 500) <= 3
    other = np.zeros((100, 100, 3), np.uint8)
    assert map_region(other) is other
    small = explanation_tile(_image(), torch.rand(1, 160, 160), size=200)
    assert small.shape == (200, 200, 3)


def test_filmstrip_columns_are_epochs_wrapping_with_scores():
    tiles = [np.full((50, 50, 3), 25 * i, np.uint8) for i in range(9)]
    fig = filmstrip_figure(
        {"saliency": tiles, "layer_cam": tiles}, list(range(9)), "probe 03", scores=[0.1 * i for i in range(9)]
    )
    renderer = renderer_of(fig)
    tile_axes = [ax for ax in fig.axes]
    assert len(tile_axes) == 18
    sizes = {round(ax.get_window_extent(renderer).width) for ax in tile_axes}
    assert min(sizes) >= 235  # 2.4 inch tiles
    titles = [ax.get_title() for ax in tile_axes if ax.get_title()]
    assert titles == [f"epoch {i}" for i in range(9)]  # only the first method row has the epoch
    under = [ax.get_xlabel() for ax in tile_axes]
    assert under == [f"score {0.1 * i:.2f}" for i in range(9) for _ in range(2)]
    rows = sorted({round(ax.get_window_extent(renderer).y0) for ax in tile_axes})
    assert len(rows) == 4  # 2 blocks (6 + 3 epochs) x 2 methods
    _assert_readable(fig)
    for a, b in itertools.combinations([box for _, box in _texts(fig)], 2):
        assert not _overlap(a, b)
    with pytest.raises(ConfigurationError, match="`scores` has 2 values for 9 steps"):
        filmstrip({"saliency": tiles}, list(range(9)), scores=[0.1, 0.2])


def test_filmstrip_pixels_match_its_figure():
    """The fast form (texts on an Axes-less Figure, tiles pasted as pixels) is the Figure's layout: the texts are
    pixel for pixel the same, the tiles the same pictures up to resampling."""
    from xaiwatch.render.filmstrip import _layout

    rng = np.random.default_rng(0)
    tiles = [np.repeat(np.repeat(rng.integers(0, 255, (5, 5, 3), dtype=np.uint8), 100, 0), 100, 1) for _ in range(7)]
    rows, steps, scores = {"saliency": tiles, "layer_cam | neck.p3": tiles[::-1]}, list(range(0, 70, 10)), [0.5] * 7
    slow = figure_to_array(filmstrip_figure(rows, steps, "probe 03", scores=scores))
    fast = filmstrip(rows, steps, "probe 03", scores=scores)
    assert fast.shape == slow.shape
    _, _, places = _layout(rows, steps, 2.4, scores, 6)
    text = np.ones(fast.shape[:2], bool)
    for _, _, left, top in places:
        x, y = round(left * 100), round(top * 100)
        text[y - 1 : y + 241, x - 1 : x + 241] = False
        inner = np.abs(fast[y + 8 : y + 232, x + 8 : x + 232].astype(int) - slow[y + 8 : y + 232, x + 8 : x + 232])
        assert np.median(inner) <= 2  # the same blocks of colour (edges differ by resampling)
    assert np.abs(fast.astype(int) - slow)[text].max() <= 64 and (fast != slow)[text].mean() < 0.01  # anti-aliasing


def test_history_filmstrip_uses_the_map_tiles_and_scores():
    history = PictureHistory()
    for step in (0, 1, 2):
        pic = explanation_panel(_image(), torch.rand(1, 160, 160), method="saliency", epoch=step)
        history.add("probe_00", "saliency", step, pic, score=0.3 * step)
    assert history.scores("probe_00") == [0.0, 0.3, 0.6]
    strip = history.filmstrip("probe_00")
    assert strip.shape[1] >= 3 * 240 and strip.shape[0] >= 240


def _boundary_fig(min_eps):
    img = _image()
    dets = Detections(
        boxes=torch.tensor([[40.0, 30.0, 80.0, 70.0], [42.0, 28.0, 82.0, 72.0], [0.0, 0.0, 30.0, 12.0]]),
        scores=torch.tensor([0.9, 0.6, 0.4]),
        labels=torch.tensor([0, 1, 2]),
        candidates=torch.arange(3),
    )
    return boundary_figure(
        img,
        img.flip(-1),
        box=[40.0, 30.0, 80.0, 70.0],
        label=0,
        detections=dets,
        perturbed_detections=dets,
        curve=[(0.0, 0.9), (0.001, 0.6), (0.0042, 0.2)],
        min_eps=min_eps,
        conf=0.25,
        names=NAMES,
        title="circle",
        method="pgd",
        probe=3,
        epoch=0,
        step=0,
    )


@pytest.mark.parametrize("min_eps", [0.0042, None, 0.0])
def test_boundary_labels_do_not_collide_and_the_ylabel_is_off_the_images(min_eps):
    fig = _boundary_fig(min_eps)
    renderer = renderer_of(fig)
    assert fig._suptitle.get_text().startswith("pgd | probe 03 | epoch 0 | step 0")
    _assert_readable(fig)
    texts = _texts(fig)
    for (ta, a), (tb, b) in itertools.combinations(texts, 2):
        assert not _overlap(a, b), (ta.get_text(), tb.get_text())
    images = [ax.get_window_extent(renderer) for ax in fig.axes[:3]]
    curve = fig.axes[3]
    ylabel = curve.yaxis.label.get_window_extent(renderer)
    ticks = [t.get_window_extent(renderer) for t in curve.get_yticklabels() if t.get_text()]
    for region in images:
        assert not _overlap(ylabel, region)
        assert all(not _overlap(t, region) for t in ticks)
    assert boundary_panel.__name__ == "boundary_panel"


def test_other_pictures_are_readable():
    from matplotlib.figure import Figure

    pics = [
        confusion_figure(torch.tensor([[3, 1], [0, 0]]), ["circle"], "confusion", epoch=2, step=10),
        projection_scatter(np.random.rand(6, 2), [0, 1, 0, 1, 0, -1], ["TP"] * 6, NAMES, "neck", epoch=1, step=5),
        box_decision_panel(_image(), torch.rand(1, 160, 160), [10, 10, 60, 60], [0.7, 0.2, 0.1], NAMES, epoch=1),
    ]
    assert pics[0].shape[0] >= 350 and pics[1].shape[1] >= 900 and pics[2].shape[1] >= 1200
    assert isinstance(Figure(), Figure)


def test_picture_title_parts():
    assert picture_title(method="grad_cam", probe="probe_03_obj1", epoch=4) == "grad_cam | probe 03 obj1 | epoch 4"
    assert picture_title("x") == "x"
