"""The counterfactual cue test: does the predicted class change when only a suspected cue changes?"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torchvision.ops import box_iou

from xaiwatch.core.errors import ShapeError, check_shape
from xaiwatch.core.types import RawOutput

__all__ = ["object_classes", "flip_rate"]


def object_classes(raw: RawOutput, boxes: Sequence[torch.Tensor], iou: float = 0.5) -> list[torch.Tensor]:
    """The class the model gives each ground-truth object: the best-scoring candidate overlapping it.

    Uses the raw candidates, not post-processed detections, so an object whose score fell below the confidence
    threshold still has a class. Objects with no candidate at IoU ``>= iou`` get ``-1``.

    Args:
        raw: raw candidates of ``B`` images.
        boxes: per image :math:`(M_i, 4)` ground-truth ``xyxy`` boxes.
        iou: overlap a candidate needs.

    Returns:
        per image :math:`(M_i,)` class indices.
    """
    if len(boxes) != raw.scores.shape[0]:
        raise ShapeError("boxes", (len(boxes),), [raw.scores.shape[0]])
    out = []
    for i, gt in enumerate(boxes):
        gt = torch.as_tensor(gt, dtype=raw.boxes.dtype, device=raw.boxes.device).reshape(-1, 4)
        if not len(gt):
            out.append(torch.zeros(0, dtype=torch.long, device=raw.boxes.device))
            continue
        best, label = raw.scores[i].max(dim=1)  # (N,)
        overlap = box_iou(gt, raw.boxes[i]) >= iou  # (M, N)
        masked = torch.where(overlap, best[None], torch.full_like(overlap, -1.0, dtype=best.dtype))
        score, idx = masked.max(dim=1)
        out.append(torch.where(score >= 0, label[idx], torch.full_like(idx, -1)))
    return out


def flip_rate(
    adapter, images: torch.Tensor, counterfactuals: torch.Tensor, boxes: Sequence[torch.Tensor], iou: float = 0.5
) -> float:
    """Share of ground-truth objects whose predicted class changes between each image and its counterfactual.

    The counterfactual differs only in a suspected cue (another background, a marker of another colour): a
    model that decides from the object flips rarely, a model that learned the cue flips often.

    Args:
        adapter: the model's :class:`~xaiwatch.adapters.DetectorAdapter`.
        images: :math:`(N, 3, H, W)` original images.
        counterfactuals: :math:`(N, 3, H, W)` the same scenes with the cue changed.
        boxes: per image :math:`(M_i, 4)` ground-truth boxes (the same in both).
        iou: overlap a candidate needs to speak for an object (see :func:`object_classes`).

    Returns:
        the flip rate in ``[0, 1]`` over objects found in both images (``nan`` when there are none).
    """
    from xaiwatch.core.context import eval_state

    check_shape(images, ["N", 3, "H", "W"], "images")
    if counterfactuals.shape != images.shape:
        raise ShapeError("counterfactuals", tuple(counterfactuals.shape), list(images.shape))
    with torch.no_grad(), eval_state(adapter.model):
        a = object_classes(adapter.raw(images), boxes, iou)
        b = object_classes(adapter.raw(counterfactuals), boxes, iou)
    a, b = torch.cat(a), torch.cat(b)
    both = (a >= 0) & (b >= 0)
    return float((a[both] != b[both]).float().mean()) if both.any() else float("nan")


def object_scores(
    raw: RawOutput, boxes: torch.Tensor, labels: torch.Tensor, iou: float = 0.5, best: bool = False
) -> tuple[torch.Tensor, ...]:
    """Per image, one object's score for its class and the class the model gives it.

    Among the raw candidates overlapping the object's box with IoU ``>= iou``: the highest probability of
    ``label`` (the score a :class:`~xaiwatch.targets.MatchedBoxTarget` would explain) and the class of the
    best-scoring candidate (as :func:`object_classes`).

    Args:
        raw: raw candidates of ``N`` images.
        boxes: :math:`(N, 4)` one ``xyxy`` box per image.
        labels: :math:`(N,)` the objects' classes.
        iou: overlap a candidate needs.
        best: also return the best-scoring overlapping candidate's score (for its own class).

    Returns:
        ``(scores, classes)``: :math:`(N,)` float (0 without an overlapping candidate) and :math:`(N,)` long
        (``-1`` without one); with ``best``, a third :math:`(N,)` float.

    Example:
        >>> raw = RawOutput(torch.tensor([[[0.0, 0, 10, 10], [20, 20, 30, 30]]]), torch.tensor([[[0.2, 0.7], [0.9, 0]]]))
        >>> object_scores(raw, torch.tensor([[0.0, 0, 10, 10]]), torch.tensor([0]))
        (tensor([0.2000]), tensor([1]))
    """
    n = raw.scores.shape[0]
    boxes = torch.as_tensor(boxes, dtype=raw.boxes.dtype, device=raw.boxes.device).reshape(-1, 4)
    labels = torch.as_tensor(labels, device=raw.boxes.device).long().reshape(-1)
    if boxes.shape[0] != n or labels.shape[0] != n:
        raise ShapeError("boxes / labels", (boxes.shape[0], labels.shape[0]), [n, n])
    scores, classes, tops = [], [], []
    for i in range(n):
        overlap = box_iou(boxes[i : i + 1], raw.boxes[i])[0] >= iou  # (K,)
        if not bool(overlap.any()):
            scores.append(raw.scores.new_zeros(()))
            tops.append(raw.scores.new_zeros(()))
            classes.append(torch.tensor(-1, device=raw.boxes.device))
            continue
        probs = raw.scores[i][overlap]  # (k, C)
        scores.append(probs[:, int(labels[i])].max())
        top, label = probs.max(dim=1)
        tops.append(top.max())
        classes.append(label[top.argmax()])
    out = torch.stack(scores).detach().float(), torch.stack(classes).long()
    return (*out, torch.stack(tops).detach().float()) if best else out


def image_flips(
    adapter, images: torch.Tensor, counterfactuals: torch.Tensor, boxes: Sequence[torch.Tensor], iou: float = 0.5
) -> torch.Tensor:
    """Per image, the share of its ground-truth objects whose class changes in the counterfactual (see :func:`flip_rate`).

    Returns:
        :math:`(N,)` in ``[0, 1]``; ``nan`` for an image with no object found in both.
    """
    from xaiwatch.core.context import eval_state

    check_shape(images, ["N", 3, "H", "W"], "images")
    if counterfactuals.shape != images.shape:
        raise ShapeError("counterfactuals", tuple(counterfactuals.shape), list(images.shape))
    with torch.no_grad(), eval_state(adapter.model):
        a = object_classes(adapter.raw(images), boxes, iou)
        b = object_classes(adapter.raw(counterfactuals), boxes, iou)
    out = []
    for x, y in zip(a, b):
        both = (x >= 0) & (y >= 0)
        out.append((x[both] != y[both]).float().mean() if bool(both.any()) else torch.tensor(float("nan")))
    return torch.stack(out).cpu() if out else torch.zeros(0)
