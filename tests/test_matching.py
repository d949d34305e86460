"""Matching (COCO's greedy rule) and TIDE error types on hand-built cases; matching against pycocotools."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from xaiwatch.analysis import ErrorCounts, analyze_image, match_detections
from xaiwatch.core.errors import ConfigurationError
from xaiwatch.core.types import Detections

GT = torch.tensor([[0.0, 0, 10, 10], [20, 20, 30, 30]])
GT_LABELS = torch.tensor([0, 1])


def _dets(boxes, scores, labels) -> Detections:
    return Detections(
        torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
        torch.tensor(scores, dtype=torch.float32),
        torch.tensor(labels),
        torch.arange(len(scores)),
    )


def _analyze(dets: Detections, gt=GT, gt_labels=GT_LABELS, **kw):
    return analyze_image(dets.boxes, dets.scores, dets.labels, gt, gt_labels, **kw)


def test_true_positive_and_duplicate():
    # IoU([0,0,10,10],[0,0,10,9]) = 0.9; the higher score wins the match even though it is listed second
    dets = _dets([[0, 0, 10, 9], [0, 0, 10, 10]], [0.6, 0.9], [0, 0])
    r = _analyze(dets)
    assert r.matched_gt.tolist() == [-1, 0]
    assert r.error == ["dupe", ""]
    assert r.error_gt.tolist() == [0, -1]
    assert r.missed.tolist() == [False, True]  # the class-1 object was not found at all


def test_wrong_class_covers_the_missed_object():
    r = _analyze(_dets([[20, 20, 30, 30]], [0.8], [0]))  # right box, class 0 instead of 1
    assert r.error == ["cls"] and r.error_gt.tolist() == [1]
    assert r.unmatched_gt.tolist() == [True, True]
    assert r.missed.tolist() == [True, False]  # covered by the cls error: not a miss


def test_low_iou_is_localisation_and_background_and_both():
    # IoU([0,0,10,10],[5,0,15,10]) = 50/150 = 1/3: between 0.1 and 0.5
    # IoU([20,20,30,30],[25,20,35,30]) = 1/3 but with class 0 (GT class 1): both
    # [50,50,60,60] overlaps nothing: background
    dets = _dets([[5, 0, 15, 10], [25, 20, 35, 30], [50, 50, 60, 60]], [0.9, 0.8, 0.7], [0, 0, 1])
    r = _analyze(dets)
    assert r.error == ["loc", "both", "bkg"]
    assert r.error_gt.tolist() == [0, -1, -1]
    assert r.missed.tolist() == [False, True]  # object 0 covered by the loc error, object 1 missed
    # a stricter background threshold turns "both" (IoU 1/3 with another class) into background
    assert _analyze(dets, background_iou=0.4).error == ["bkg", "bkg", "bkg"]


def test_iou_threshold_moves_the_match():
    dets = _dets([[5, 0, 15, 10]], [0.9], [0])  # IoU 1/3
    assert match_detections(dets.boxes, dets.scores, dets.labels, GT, GT_LABELS, 0.5).tolist() == [-1]
    assert match_detections(dets.boxes, dets.scores, dets.labels, GT, GT_LABELS, 0.3).tolist() == [0]


def test_cardinality_no_predictions_no_ground_truth():
    r = _analyze(_dets([], [], []))
    assert r.error == [] and r.missed.tolist() == [True, True]
    r = _analyze(_dets([[0, 0, 5, 5]], [0.5], [0]), gt=torch.zeros(0, 4), gt_labels=torch.zeros(0, dtype=torch.long))
    assert r.error == ["bkg"] and len(r.missed) == 0


def test_counts_and_confusion_matrix():
    counts = ErrorCounts(num_classes=2)
    # image 1: TP class 0, duplicate class 0, cls error on object 1, background class 1
    counts.update(
        _dets([[0, 0, 10, 10], [0, 0, 10, 9], [20, 20, 30, 30], [50, 50, 60, 60]], [0.9, 0.8, 0.7, 0.6], [0, 0, 0, 1]),
        GT,
        GT_LABELS,
    )
    # image 2: nothing predicted: two misses
    counts.update(_dets([], [], []), GT, GT_LABELS)
    c = {k: v.tolist() for k, v in counts.counts.items()}
    assert c["tp"] == [1, 0] and c["fp"] == [2, 1] and c["fn"] == [1, 2]
    assert c["dupe"] == [1, 0] and c["cls"] == [1, 0] and c["bkg"] == [0, 1] and c["miss"] == [1, 1]
    assert counts.confusion.tolist() == [
        [1, 0, 1],  # class 0: one TP, one missed
        [1, 0, 1],  # class 1: predicted as class 0 once (cls), missed once
        [1, 1, 0],  # background: the duplicate (class 0) and the background box (class 1)
    ]
    assert counts.confusion[:2].sum(1).tolist() == [2, 2]  # rows = ground-truth objects per class
    assert counts.totals()["fp"] == 3 and counts.images == 2


def _coco(images):
    """pycocotools' evaluateImg dtMatches at IoU 0.5 for a list of (dets, gt_boxes, gt_labels)."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    gt = {"images": [], "annotations": [], "categories": [{"id": c} for c in range(3)]}
    dt = []
    for i, (d, gb, gl) in enumerate(images):
        gt["images"].append({"id": i})
        for b, lab in zip(gb.tolist(), gl.tolist()):
            w, h = b[2] - b[0], b[3] - b[1]
            gt["annotations"].append(
                {
                    "id": len(gt["annotations"]) + 1,
                    "image_id": i,
                    "category_id": lab,
                    "bbox": [b[0], b[1], w, h],
                    "area": w * h,
                    "iscrowd": 0,
                }
            )
        for b, s, lab in zip(d.boxes.tolist(), d.scores.tolist(), d.labels.tolist()):
            dt.append({"image_id": i, "category_id": lab, "bbox": [b[0], b[1], b[2] - b[0], b[3] - b[1]], "score": s})
    coco = COCO()
    coco.dataset = gt
    coco.createIndex()
    ev = COCOeval(coco, coco.loadRes(dt) if dt else COCO(), "bbox")
    ev.params.iouThrs = np.array([0.5])
    ev.params.maxDets = [100]
    ev.params.areaRng, ev.params.areaRngLbl = [[0, 1e10]], ["all"]
    ev.evaluate()
    tp = 0
    for e in ev.evalImgs:
        if e is not None:
            tp += int((e["dtMatches"][0] > 0).sum())
    return tp


def test_matches_pycocotools_on_random_images():
    g = torch.Generator().manual_seed(0)
    images = []
    for _ in range(12):
        m, n = int(torch.randint(0, 5, (1,), generator=g)), int(torch.randint(0, 8, (1,), generator=g))
        xy = torch.rand(m, 2, generator=g) * 40
        gb = torch.cat([xy, xy + 8 + torch.rand(m, 2, generator=g) * 16], 1).round()
        gl = torch.randint(0, 3, (m,), generator=g)
        src = torch.randint(0, max(m, 1), (n,), generator=g)
        base = gb[src] if m else torch.rand(n, 4, generator=g) * 40
        db = (base + torch.randn(n, 4, generator=g) * 3).round()
        db = torch.cat([db[:, :2], torch.maximum(db[:, 2:], db[:, :2] + 2)], 1)
        dl = torch.where(
            torch.rand(n, generator=g) < 0.8,
            gl[src] if m else torch.zeros(n, dtype=torch.long),
            torch.randint(0, 3, (n,), generator=g),
        )
        images.append((Detections(db, torch.rand(n, generator=g), dl, torch.arange(n)), gb, gl))
    counts = ErrorCounts(3)
    for d, gb, gl in images:
        counts.update(d, gb, gl)
    assert counts.totals()["tp"] == _coco(images)
    assert counts.totals()["tp"] > 5 and counts.totals()["fp"] > 5  # the case exercised both


def test_bad_input():
    with pytest.raises(ConfigurationError, match=r"`iou_threshold` must be in \(0, 1\], got 0"):
        ErrorCounts(3, iou_threshold=0)
    with pytest.raises(ConfigurationError, match="iou_threshold"):
        analyze_image(GT, torch.ones(2), GT_LABELS, GT, GT_LABELS, iou_threshold=1.5)
    with pytest.raises(ConfigurationError, match="background_iou"):
        ErrorCounts(3, iou_threshold=0.5, background_iou=0.5)
    with pytest.raises(ConfigurationError, match="outside"):
        ErrorCounts(2).update(_dets([[0, 0, 5, 5]], [0.5], [2]), GT, GT_LABELS)
