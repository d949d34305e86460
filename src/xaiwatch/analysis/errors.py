"""Accumulating TP / FP / FN, TIDE error types and a confusion matrix over a validation pass."""

from __future__ import annotations

import torch

from xaiwatch.analysis.matching import ERROR_TYPES, ImageErrors, analyze_image, validate_iou_thresholds
from xaiwatch.core.errors import ConfigurationError
from xaiwatch.core.types import Detections

__all__ = ["ErrorCounts", "COUNT_TYPES"]

#: every count :class:`ErrorCounts` keeps per class: matching outcome, then TIDE's error types.
COUNT_TYPES = ("tp", "fp", "fn", *ERROR_TYPES)


class ErrorCounts:
    """Counts per class over many images, and a confusion matrix with a background row and column.

    Predictions are counted under their own class, false negatives and misses under the ground truth's. The
    confusion matrix has rows = true class and columns = predicted class, index ``C`` being background:

    - a true positive adds 1 at ``[c, c]``; the highest-scoring ``cls`` error on an unmatched ground-truth box
      at ``[g, c]`` (``g`` the box's class);
    - every other false positive (``loc``, ``both``, ``dupe``, ``bkg``, further ``cls``) at ``[C, c]``;
    - every false negative not counted at a ``cls`` error at ``[g, C]``.

    So row ``g < C`` sums to the number of ground-truth boxes of class ``g`` and column ``c < C`` to the number
    of predictions of class ``c``.

    Args:
        num_classes: number of classes ``C``.
        iou_threshold: foreground IoU of a match (TIDE's ``t_f``).
        background_iou: background IoU (TIDE's ``t_b``).

    Raises:
        ConfigurationError: for ``num_classes < 1`` or thresholds outside ``0 <= t_b < t_f <= 1``.

    Example:
        >>> counts = ErrorCounts(2)
        >>> dets = Detections(torch.tensor([[0.0, 0, 10, 10]]), torch.tensor([0.9]), torch.tensor([1]), torch.tensor([0]))
        >>> _ = counts.update(dets, torch.tensor([[0.0, 0, 10, 10]]), torch.tensor([0]))
        >>> counts.counts["cls"].tolist(), counts.confusion.tolist()
        ([0, 1], [[0, 1, 0], [0, 0, 0], [0, 0, 0]])
    """

    def __init__(self, num_classes: int, iou_threshold: float = 0.5, background_iou: float = 0.1) -> None:
        if int(num_classes) < 1:
            raise ConfigurationError(f"`num_classes` must be >= 1, got {num_classes}.")
        validate_iou_thresholds(iou_threshold, background_iou)
        self.num_classes = int(num_classes)
        self.iou_threshold = float(iou_threshold)
        self.background_iou = float(background_iou)
        self.images = 0
        self.counts = {t: torch.zeros(self.num_classes, dtype=torch.long) for t in COUNT_TYPES}
        self.confusion = torch.zeros(self.num_classes + 1, self.num_classes + 1, dtype=torch.long)

    def update(self, detections: Detections, gt_boxes: torch.Tensor, gt_labels: torch.Tensor) -> ImageErrors:
        """Add one image.

        Args:
            detections: the model's post-processed detections of the image.
            gt_boxes, gt_labels: its ground truth, :math:`(M, 4)` ``xyxy`` and :math:`(M,)`.

        Returns:
            the image's matching and errors (what :func:`analyze_image` returns).

        Raises:
            ConfigurationError: for a label outside ``[0, num_classes)``.
        """
        labels, gt_labels = detections.labels.detach().cpu().long(), gt_labels.detach().cpu().long()
        for name, lab in (("predicted", labels), ("ground-truth", gt_labels)):
            if len(lab) and not (0 <= int(lab.min()) and int(lab.max()) < self.num_classes):
                raise ConfigurationError(
                    f"A {name} label ({lab.tolist()}) is outside [0, {self.num_classes}): does `num_classes` match "
                    "the model and the dataset?"
                )
        result = analyze_image(
            detections.boxes, detections.scores, labels, gt_boxes, gt_labels, self.iou_threshold, self.background_iou
        )
        bg = self.num_classes
        cls_covered: set[int] = set()  # ground truth already in a confusion cell of a `cls` error
        for i in torch.argsort(detections.scores.detach().cpu(), descending=True, stable=True).tolist():
            kind, j, c = result.error[i], int(result.error_gt[i]), int(labels[i])
            if not kind:
                self.counts["tp"][c] += 1
                self.confusion[c, c] += 1
                continue
            self.counts["fp"][c] += 1
            self.counts[kind][c] += 1
            row = int(gt_labels[j]) if kind == "cls" and bool(result.unmatched_gt[j]) and j not in cls_covered else bg
            cls_covered.update([j] if row != bg else [])
            self.confusion[row, c] += 1
        for g in torch.nonzero(result.unmatched_gt).flatten().tolist():
            self.counts["fn"][int(gt_labels[g])] += 1
            if bool(result.missed[g]):
                self.counts["miss"][int(gt_labels[g])] += 1
            if g not in cls_covered:
                self.confusion[int(gt_labels[g]), bg] += 1
        self.images += 1
        return result

    def merge(self, other: ErrorCounts) -> ErrorCounts:
        """Add ``other``'s counts (e.g. another rank's images) into this one; returns ``self``.

        Raises:
            ConfigurationError: when the two count different classes or thresholds.
        """
        same = (self.num_classes, self.iou_threshold, self.background_iou) == (
            other.num_classes,
            other.iou_threshold,
            other.background_iou,
        )
        if not same:
            raise ConfigurationError("Cannot merge ErrorCounts of different classes or thresholds.")
        self.images += other.images
        for kind in self.counts:
            self.counts[kind] += other.counts[kind]
        self.confusion += other.confusion
        return self

    def totals(self) -> dict[str, int]:
        """Every count summed over the classes."""
        return {t: int(v.sum()) for t, v in self.counts.items()}
