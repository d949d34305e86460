"""Detection matching (COCO's greedy rule) and TIDE error types, per image, framework-free.

Matching follows COCO's ``evaluateImg``: predictions in descending score order each take the unmatched
ground-truth box *of their class* with the highest IoU, provided that IoU is at least the foreground
threshold ``t_f``. Unmatched predictions are false positives, unmatched ground truth false negatives.

Every false positive then gets the TIDE type (Bolya et al., ECCV 2020, in the order of TIDE's
``quantify.py``; ``IoU_max`` is a prediction's largest IoU with ground truth, ``t_b`` the background threshold):

1. ``loc``: ``t_b <= IoU_max <= t_f`` with ground truth of its own class (right class, bad box);
2. ``cls``: ``IoU_max >= t_f`` with ground truth of another class (right box, wrong class);
3. ``dupe``: ``IoU_max >= t_f`` with ground truth of its class already matched by a higher-scoring box;
4. ``bkg``: ``IoU_max <= t_b`` with every ground-truth box (the model fired on background);
5. ``both``: everything else (wrong class and bad box).

A ground-truth box that no prediction matched is ``miss`` unless a ``cls`` or ``loc`` error already covers
it (TIDE's "usable" ground truth: fixing that error would have found it).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torchvision.ops import box_iou

from xaiwatch.core.errors import ConfigurationError, check_shape
from xaiwatch.core.validation import in_range

__all__ = ["ERROR_TYPES", "ImageErrors", "analyze_image", "match_detections", "validate_iou_thresholds"]

#: TIDE's six error types, in TIDE's order of presentation.
ERROR_TYPES = ("cls", "loc", "both", "dupe", "bkg", "miss")


def validate_iou_thresholds(iou_threshold: float, background_iou: float = 0.1) -> None:
    """Check the foreground and background IoU thresholds.

    Raises:
        ConfigurationError: unless ``0 < iou_threshold <= 1`` and ``0 <= background_iou < iou_threshold``.
    """
    in_range("iou_threshold", iou_threshold, 0.0, 1.0, low_open=True)
    if not 0.0 <= float(background_iou) < float(iou_threshold):
        raise ConfigurationError(
            f"`background_iou` must be in [0, iou_threshold={iou_threshold}), got {background_iou}."
        )


def match_detections(
    boxes: torch.Tensor,
    scores: torch.Tensor,
    labels: torch.Tensor,
    gt_boxes: torch.Tensor,
    gt_labels: torch.Tensor,
    iou_threshold: float = 0.5,
) -> torch.Tensor:
    """COCO's greedy per-class matching of one image's predictions to its ground truth.

    Args:
        boxes, scores, labels: :math:`(N, 4)` ``xyxy`` predictions, :math:`(N,)` scores and :math:`(N,)` classes.
        gt_boxes, gt_labels: :math:`(M, 4)` ``xyxy`` ground truth and :math:`(M,)` classes.
        iou_threshold: minimum IoU of a match (``t_f``).

    Returns:
        :math:`(N,)` long tensor: the index of the ground-truth box each prediction matched, ``-1`` if none
        (a false positive).

    Raises:
        ConfigurationError: for a threshold outside ``(0, 1]``.
        ShapeError: for boxes that are not :math:`(N, 4)`.
    """
    validate_iou_thresholds(iou_threshold, 0.0)
    check_shape(boxes, ["N", 4], "boxes")
    check_shape(gt_boxes, ["M", 4], "gt_boxes")
    matched = torch.full((len(boxes),), -1, dtype=torch.long)
    if not len(boxes) or not len(gt_boxes):
        return matched
    ious = box_iou(boxes.detach().float().cpu(), gt_boxes.detach().float().cpu())
    same = labels.cpu()[:, None] == gt_labels.cpu()[None, :]
    taken = torch.zeros(len(gt_boxes), dtype=torch.bool)
    for i in torch.argsort(scores.detach().cpu(), descending=True, stable=True).tolist():
        candidates = torch.where(same[i] & ~taken, ious[i], torch.full_like(ious[i], -1.0))
        j = int(candidates.argmax())
        if candidates[j] >= iou_threshold:
            matched[i], taken[j] = j, True
    return matched


@dataclass
class ImageErrors:
    """Matching and TIDE errors of one image; prediction order is the caller's.

    Attributes:
        matched_gt: :math:`(N,)` ground-truth index each prediction matched (``-1``: false positive).
        error: :math:`N` strings, ``""`` for a true positive, else one of ``cls loc both dupe bkg``.
        error_gt: :math:`(N,)` the ground-truth box an error refers to (``-1`` for ``bkg``/``both``).
        missed: :math:`(M,)` True for ground truth of error type ``miss``.
        unmatched_gt: :math:`(M,)` True for every false negative (``miss`` or covered by ``cls``/``loc``).
    """

    matched_gt: torch.Tensor
    error: list[str]
    error_gt: torch.Tensor
    missed: torch.Tensor
    unmatched_gt: torch.Tensor

    @property
    def tp(self) -> torch.Tensor:
        """:math:`(N,)` True for true positives."""
        return self.matched_gt >= 0


def analyze_image(
    boxes: torch.Tensor,
    scores: torch.Tensor,
    labels: torch.Tensor,
    gt_boxes: torch.Tensor,
    gt_labels: torch.Tensor,
    iou_threshold: float = 0.5,
    background_iou: float = 0.1,
) -> ImageErrors:
    """Match one image's predictions and give every error its TIDE type (see the module docstring).

    Args:
        boxes, scores, labels: the predictions, :math:`(N, 4)` ``xyxy``, :math:`(N,)`, :math:`(N,)`.
        gt_boxes, gt_labels: the ground truth, :math:`(M, 4)` ``xyxy``, :math:`(M,)`.
        iou_threshold: foreground IoU ``t_f`` (TIDE and COCO AP50: 0.5).
        background_iou: background IoU ``t_b`` (TIDE: 0.1).

    Returns:
        the per-prediction and per-ground-truth result.

    Raises:
        ConfigurationError: for thresholds outside ``0 <= t_b < t_f <= 1``.
    """
    validate_iou_thresholds(iou_threshold, background_iou)
    matched = match_detections(boxes, scores, labels, gt_boxes, gt_labels, iou_threshold)
    n, m = len(boxes), len(gt_boxes)
    error = ["" if j >= 0 else "bkg" for j in matched.tolist()]
    error_gt = torch.full((n,), -1, dtype=torch.long)
    used = torch.zeros(m, dtype=torch.bool)
    used[matched[matched >= 0]] = True
    covered = torch.zeros(m, dtype=torch.bool)
    if n and m:
        ious = box_iou(boxes.detach().float().cpu(), gt_boxes.detach().float().cpu())
        same = labels.cpu()[:, None] == gt_labels.cpu()[None, :]
        zero = torch.zeros_like(ious)
        cls_iou, other_iou = torch.where(same, ious, zero), torch.where(same, zero, ious)
        used_cls_iou = torch.where(used[None, :], cls_iou, zero)
        for i in torch.argsort(scores.detach().cpu(), descending=True, stable=True).tolist():
            if matched[i] >= 0:
                continue
            error[i], error_gt[i] = _tide_type(
                cls_iou[i], other_iou[i], used_cls_iou[i], ious[i], iou_threshold, background_iou
            )
            if error[i] in ("cls", "loc") and not used[error_gt[i]]:
                covered[error_gt[i]] = True
    return ImageErrors(matched, error, error_gt, ~used & ~covered, ~used)


def _tide_type(
    cls_iou: torch.Tensor,
    other_iou: torch.Tensor,
    used_cls_iou: torch.Tensor,
    ious: torch.Tensor,
    t_f: float,
    t_b: float,
) -> tuple[str, int]:
    """TIDE's type of one false positive, and the ground-truth box it refers to (``-1`` if none)."""
    j = int(cls_iou.argmax())
    if t_b <= float(cls_iou[j]) <= t_f:
        return "loc", j
    j = int(other_iou.argmax())
    if float(other_iou[j]) >= t_f:
        return "cls", j
    j = int(used_cls_iou.argmax())
    if float(used_cls_iou[j]) >= t_f:
        return "dupe", j
    if float(ious.max()) <= t_b:
        return "bkg", -1
    return "both", -1
