"""How well classes separate in feature space, and whether a predicted box is a true or false positive."""

from __future__ import annotations

import numpy as np
import torch

from xaiwatch.core.errors import ConfigurationError, ShapeError

__all__ = ["silhouette", "knn_accuracy", "separability", "match_predictions"]


def _check(features: torch.Tensor | np.ndarray, labels: torch.Tensor | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    x = features.detach().cpu().double().numpy() if isinstance(features, torch.Tensor) else np.asarray(features, float)
    y = labels.detach().cpu().numpy() if isinstance(labels, torch.Tensor) else np.asarray(labels)
    if x.ndim != 2 or y.shape != (len(x),):
        raise ShapeError("features, labels", (*x.shape, *y.shape), ["N", "D", "N"])
    return x, y


def silhouette(features: torch.Tensor | np.ndarray, labels: torch.Tensor | np.ndarray, metric: str = "cosine") -> float:
    """Mean silhouette coefficient of the class labels (scikit-learn), in ``[-1, 1]``; ``nan`` when undefined.

    Undefined (``nan``) with fewer than 2 classes or as many classes as points.
    """
    from sklearn.metrics import silhouette_score

    x, y = _check(features, labels)
    if not 2 <= len(np.unique(y)) < len(y):
        return float("nan")
    return float(silhouette_score(x, y, metric=metric))


def knn_accuracy(
    features: torch.Tensor | np.ndarray, labels: torch.Tensor | np.ndarray, k: int = 5, metric: str = "cosine"
) -> float:
    """Leave-one-out k-nearest-neighbour class accuracy in feature space; ``nan`` with fewer than 2 points.

    Each point is classified by the majority label of its ``k`` nearest other points; a tie goes to the lower
    label, as in scikit-learn's ``KNeighborsClassifier`` with uniform weights.

    Args:
        features: :math:`(N, D)` embeddings.
        labels: :math:`(N,)` integer classes.
        k: neighbours (at most ``N - 1`` are used).
        metric: ``"cosine"`` or ``"euclidean"``.

    Returns:
        the share of points whose neighbours' majority label is their own.
    """
    from sklearn.metrics import pairwise_distances

    if int(k) < 1:
        raise ConfigurationError(f"`k` must be >= 1, got {k}.")
    x, y = _check(features, labels)
    if len(y) < 2:
        return float("nan")
    d = pairwise_distances(x, metric=metric)
    np.fill_diagonal(d, np.inf)
    k = min(int(k), len(y) - 1)
    neighbours = np.argsort(d, axis=1, kind="stable")[:, :k]
    classes = np.unique(y)
    votes = (y[neighbours][:, :, None] == classes[None, None, :]).sum(1)
    predicted = classes[votes.argmax(1)]
    return float((predicted == y).mean())


def separability(
    features: torch.Tensor | np.ndarray, labels: torch.Tensor | np.ndarray, k: int = 5, metric: str = "cosine"
) -> dict[str, float]:
    """``{"silhouette": ..., "knn_accuracy": ...}`` of the labelled points."""
    return {
        "silhouette": silhouette(features, labels, metric),
        "knn_accuracy": knn_accuracy(features, labels, k, metric),
    }


def match_predictions(
    pred_boxes: torch.Tensor,
    pred_scores: torch.Tensor,
    pred_labels: torch.Tensor,
    gt_boxes: torch.Tensor,
    gt_labels: torch.Tensor,
    iou_threshold: float = 0.5,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Greedy COCO-style matching of one image's predictions to its ground truth.

    Predictions are visited by descending score; each takes the unmatched ground-truth box of its class with
    the highest IoU (``torchvision.ops.box_iou``) if that IoU is at least ``iou_threshold``.

    Returns:
        ``(tp, gt_detected, gt_best_score)``: :math:`(P,)` bool, true positives; :math:`(G,)` bool, ground
        truth found by a prediction; :math:`(G,)` score of the prediction that found it (0 when missed).
    """
    from torchvision.ops import box_iou

    p, g = len(pred_boxes), len(gt_boxes)
    tp = torch.zeros(p, dtype=torch.bool)
    found = torch.zeros(g, dtype=torch.bool)
    best = torch.zeros(g)
    if p == 0 or g == 0:
        return tp, found, best
    iou = box_iou(pred_boxes.float().cpu(), gt_boxes.float().cpu())
    iou[pred_labels.cpu()[:, None] != gt_labels.cpu()[None, :]] = -1.0
    for i in torch.argsort(pred_scores.cpu(), descending=True, stable=True).tolist():
        row = iou[i].masked_fill(found, -1.0)
        j = int(row.argmax())
        if row[j] >= iou_threshold:
            tp[i], found[j], best[j] = True, True, float(pred_scores[i])
    return tp, found, best
