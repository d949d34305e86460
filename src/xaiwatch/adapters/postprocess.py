"""Post-processing shared by adapters: class-aware NMS that remembers each kept box's candidate index."""

from __future__ import annotations

import torch
from torchvision.ops import batched_nms

from xaiwatch.core.types import Detections, RawOutput

__all__ = ["nms"]


def nms(
    raw: RawOutput, conf: float = 0.25, iou: float = 0.7, max_det: int = 300, max_nms: int = 30000
) -> list[Detections]:
    """Class-aware non-maximum suppression (best class per candidate), as ultralytics' ``non_max_suppression``.

    Each candidate keeps its best class; candidates whose best score is not above ``conf`` are dropped;
    at most ``max_nms`` highest-scoring candidates enter :func:`torchvision.ops.batched_nms`; at most
    ``max_det`` boxes are kept, in descending score order.

    Args:
        raw: candidates of a batch.
        conf: score threshold (strict, as ultralytics).
        iou: IoU threshold of the suppression.
        max_det: maximum number of kept boxes per image.
        max_nms: maximum number of candidates entering the suppression.

    Returns:
        one :class:`Detections` per image, with ``candidates`` indexing ``raw``'s second dimension.
    """
    out = []
    for boxes, scores in zip(raw.boxes, raw.scores):
        best, labels = scores.max(dim=1)
        keep = torch.nonzero(best > conf).flatten()
        if keep.numel() > max_nms:
            keep = keep[best[keep].argsort(descending=True)[:max_nms]]
        kept = batched_nms(boxes[keep].float(), best[keep].float(), labels[keep], iou)[:max_det]
        idx = keep[kept]
        out.append(Detections(boxes[idx], best[idx], labels[idx], idx))
    return out
