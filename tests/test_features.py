"""xaiwatch.features: capture, RoIAlign / GAP pooling against torchvision, projections, alignment, metrics."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
from torchvision.ops import roi_align

from conftest import SquaresDataset
from xaiwatch.adapters import YOLOv8Adapter
from xaiwatch.core import imports
from xaiwatch.core.errors import ConfigurationError, MissingDependencyError, ShapeError
from xaiwatch.features import (
    align,
    aligned_init,
    box_thumbnails,
    capture_layers,
    displacement,
    embed,
    global_pool,
    knn_accuracy,
    match_predictions,
    procrustes,
    project,
    roi_pool,
    silhouette,
    spatial_scale,
)
from xaiwatch.render.projection import projection_scatter


def _hooks(model: torch.nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks) for m in model.modules())


def _batch(n: int = 6, seed: int = 1):
    items = SquaresDataset(n, seed).items
    return (
        torch.stack([d["image"] for d in items]),
        [d["boxes"] for d in items],
        [d["labels"] for d in items],
        list(range(n)),
    )


def test_capture_removes_hooks_also_after_an_error(tiny_net):
    layer = tiny_net.model[15]
    before = _hooks(tiny_net)
    with pytest.raises(RuntimeError, match="boom"):
        with capture_layers({"p3": layer}) as maps:
            tiny_net.eval()(torch.zeros(1, 3, 64, 64))
            assert maps["p3"].shape == (1, 16, 8, 8)
            raise RuntimeError("boom")
    assert _hooks(tiny_net) == before


def test_spatial_scale_is_measured():
    assert spatial_scale(torch.zeros(1, 4, 8, 12), (64, 96)) == pytest.approx(1 / 8)
    assert spatial_scale(torch.zeros(1, 4, 3, 3), (20, 20)) == pytest.approx(3 / 20)  # 20 / 8 rounded up
    with pytest.raises(ConfigurationError, match="not a strided map"):
        spatial_scale(torch.zeros(1, 4, 8, 2), (64, 64))
    with pytest.raises(ShapeError):
        spatial_scale(torch.zeros(4, 8), (64, 64))


def test_box_embeddings_equal_hand_roi_align(tiny_net):
    """Each ground-truth and predicted box's vector is torchvision's roi_align of the captured map, averaged."""
    adapter = YOLOv8Adapter(tiny_net, names=["r", "g", "b"], conf=0.001)
    images, boxes, labels, ids = _batch()
    points = embed(adapter, [(images, boxes, labels, ids)], ["neck.p3", "neck.p4"], level="box")
    tiny_net.eval()
    with torch.no_grad(), capture_layers({"p3": tiny_net.model[15], "p4": tiny_net.model[18]}) as maps:
        detections = adapter.detect(images)
    assert sum(len(d) for d in detections) > 0  # predictions are embedded too
    rois = [torch.cat([b, d.boxes]) for b, d in zip(boxes, detections)]
    for name, key, stride in (("neck.p3", "p3", 8), ("neck.p4", "p4", 16)):
        hand = roi_align(maps[key], rois, 2, spatial_scale=1 / stride, sampling_ratio=2, aligned=True).mean((2, 3))
        assert torch.allclose(points.features[name], hand, atol=1e-6), name
    assert len(points) == sum(len(r) for r in rois) == len(points.metadata) == len(points.keys)
    assert points.thumbnails.shape == (len(points), 3, 32, 32)
    first = 0
    for i, (b, d) in enumerate(zip(boxes, detections)):  # per image: ground truth first, then predictions
        assert (
            points.is_gt[first : first + len(b)].all()
            and not points.is_gt[first + len(b) : first + len(b) + len(d)].any()
        )
        assert points.keys[first] == f"gt:{i}:0" and points.metadata[first][:2] == [
            ["r", "g", "b"][int(labels[i])],
            "gt",
        ]
        first += len(b) + len(d)
    assert _hooks(tiny_net) == 0
    x1, y1, x2, y2 = boxes[0][0].long().tolist()  # a thumbnail is the box's crop (a filled square)
    crop = images[0, :, y1:y2, x1:x2].mean((1, 2))
    assert torch.allclose(points.thumbnails[0].mean((1, 2)), crop, atol=0.05)


def test_image_embeddings_are_global_average_pools(tiny_net):
    adapter = YOLOv8Adapter(tiny_net)
    images, boxes, labels, ids = _batch(4)
    boxes[3], labels[3] = torch.zeros(0, 4), torch.zeros(0, dtype=torch.long)  # an image without objects
    points = embed(
        adapter,
        [(images[:2], boxes[:2], labels[:2], ids[:2]), (images[2:], boxes[2:], labels[2:], ids[2:])],
        ["neck.p5"],
        level="image",
    )
    with torch.no_grad(), capture_layers({"p5": tiny_net.model[21]}) as maps:
        tiny_net.eval()(images)
    assert torch.allclose(points.features["neck.p5"], maps["p5"].mean((2, 3)), atol=1e-6)
    assert torch.equal(global_pool(maps["p5"]), maps["p5"].mean((2, 3)))
    assert points.labels.tolist() == [0, 1, 2, -1] and points.keys == [f"image:{i}" for i in range(4)]


def test_roi_pool_cardinality_and_bad_input():
    feature = torch.rand(2, 5, 8, 8)
    assert roi_pool(feature, [torch.zeros(0, 4), torch.zeros(0, 4)], 0.125).shape == (0, 5)
    assert box_thumbnails(torch.rand(1, 3, 16, 16), [torch.zeros(0, 4)], 8).shape == (0, 3, 8, 8)
    with pytest.raises(ShapeError):
        roi_pool(feature, [torch.zeros(1, 4)], 0.125)
    with pytest.raises(ConfigurationError, match="level"):
        embed(None, [], ["x"], level="pixel")


def test_pca_matches_hand_svd():
    x = np.random.default_rng(0).normal(size=(50, 6)) * np.array([5, 3, 1, 1, 1, 1])
    layout = project(torch.tensor(x), "pca")
    centred = x - x.mean(0)
    _, _, vt = np.linalg.svd(centred, full_matrices=False)
    hand = centred @ vt[:2].T
    assert np.allclose(np.abs(layout), np.abs(hand), atol=1e-8)


def test_procrustes_recovers_a_similarity_transform():
    rng = np.random.default_rng(1)
    source = rng.normal(size=(20, 2))
    angle = 0.7
    rotation = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]]) @ np.diag([1, -1])
    target = source @ rotation * 2.5 + np.array([3.0, -1.0])
    r, s, t = procrustes(source, target)
    assert np.allclose(r, rotation) and s == pytest.approx(2.5) and np.allclose(t, [3.0, -1.0])


def _two_epochs(seed: int = 0) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Three clusters in 16-D, and the same points a little later (drift + noise), as two epochs of features."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(3, 16)) * 4
    a = np.concatenate([c + rng.normal(size=(40, 16)) for c in centres])
    b = a + 0.3 * rng.normal(size=a.shape) + 0.5 * rng.normal(size=(1, 16))
    return a, -b, [f"p{i}" for i in range(len(a))]  # -b: the same geometry, mirrored (PCA's sign ambiguity)


@pytest.mark.parametrize("method", ["pca", "tsne", "umap"])
def test_alignment_reduces_point_displacement(method):
    a, b, keys = _two_epochs()
    kw = {"perplexity": 20.0, "n_neighbors": 10}
    first = project(a, method, seed=0, **kw)
    previous = {k: xy for k, xy in zip(keys, first)}
    free = project(b, method, seed=1, **kw)
    init = None if method == "pca" else aligned_init(b, keys, previous)
    aligned = align(project(b, method, init=init, seed=1, **kw), keys, previous)
    assert displacement(aligned, keys, previous) < 0.5 * displacement(free, keys, previous)
    assert displacement(aligned, keys, previous) < 0.5


def test_aligned_init_keeps_known_points_and_places_new_ones():
    a, b, keys = _two_epochs()
    previous = {k: xy for k, xy in zip(keys[:100], project(a[:100], "pca"))}
    init = aligned_init(b, keys, previous)
    assert np.allclose(init[:100], np.asarray([previous[k] for k in keys[:100]]))
    assert np.isfinite(init).all() and init.shape == (120, 2)
    assert aligned_init(b, [None] * 120, previous) is None


def test_projection_bad_input(monkeypatch):
    x = torch.rand(10, 4)
    with pytest.raises(ConfigurationError, match="perplexity=30.0` must be smaller than the number of points \\(10\\)"):
        project(x, "tsne")
    with pytest.raises(ConfigurationError, match="`method` can be pca, tsne, umap, got 'lda'"):
        project(x, "lda")
    with pytest.raises(ConfigurationError, match="init"):
        project(x, "tsne", init=np.zeros((3, 2)), perplexity=3)
    with pytest.raises(ShapeError):
        project(torch.rand(10), "pca")
    monkeypatch.setattr(imports, "available", lambda module: module != "umap")
    with pytest.raises(MissingDependencyError, match=r"pip install 'xaiwatch\[umap\]'"):
        project(x, "umap")


def test_separability_matches_scikit_learn():
    from sklearn.metrics import silhouette_score
    from sklearn.model_selection import LeaveOneOut, cross_val_score
    from sklearn.neighbors import KNeighborsClassifier

    rng = np.random.default_rng(3)
    y = np.repeat([0, 1, 2], 20)
    x = rng.normal(size=(60, 8)) + y[:, None] * 0.8
    assert silhouette(x, y) == pytest.approx(silhouette_score(x, y, metric="cosine"))
    knn = KNeighborsClassifier(5, metric="cosine", algorithm="brute")
    reference = cross_val_score(knn, x, y, cv=LeaveOneOut()).mean()
    assert knn_accuracy(torch.tensor(x), torch.tensor(y), k=5) == pytest.approx(reference)
    assert np.isnan(silhouette(x, np.zeros(60)))  # one class: undefined
    with pytest.raises(ConfigurationError, match="`k` must be >= 1"):
        knn_accuracy(x, y, k=0)


def test_match_predictions_by_hand():
    gt = torch.tensor([[0.0, 0, 10, 10], [20, 20, 30, 30]])
    gt_labels = torch.tensor([0, 1])
    pred = torch.tensor([[0.0, 0, 10, 9], [1, 0, 10, 10], [20, 20, 30, 30], [50, 50, 60, 60]])
    scores = torch.tensor([0.6, 0.9, 0.8, 0.7])
    labels = torch.tensor([0, 0, 0, 1])  # third: right place, wrong class
    tp, found, best = match_predictions(pred, scores, labels, gt, gt_labels, 0.5)
    assert tp.tolist() == [False, True, False, False]  # the 0.9 box takes the object; the 0.6 duplicate is a FP
    assert found.tolist() == [True, False] and best.tolist() == pytest.approx([0.9, 0.0])


def test_projection_scatter_picture():
    coords = np.random.default_rng(0).normal(size=(12, 2))
    outcomes = ["GT detected", "GT missed", "TP", "FP"] * 3
    picture = projection_scatter(coords, [0, 1, 2, -1] * 3, outcomes, ["a", "b", "c"], title="t")
    assert picture.dtype == np.uint8 and picture.shape[2] == 3 and picture.std() > 5
    with pytest.raises(ShapeError):
        projection_scatter(coords, [0] * 11, outcomes)


def test_features_import_without_lightning():
    code = (
        "import sys; sys.modules['pytorch_lightning'] = None; sys.modules['lightning'] = None\n"
        "import xaiwatch.features, xaiwatch.render.projection\n"
        "assert 'matplotlib.pyplot' not in sys.modules and 'umap' not in sys.modules\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
