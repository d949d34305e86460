"""Per-object and per-image embeddings of a detector, streamed batch by batch, with metadata per point."""

from __future__ import annotations

import functools
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from xaiwatch.core.context import explaining
from xaiwatch.core.errors import ConfigurationError
from xaiwatch.core.types import Detections
from xaiwatch.features.capture import box_thumbnails, capture_layers, global_pool, roi_pool, spatial_scale
from xaiwatch.features.metrics import match_predictions

if TYPE_CHECKING:
    from xaiwatch.adapters import DetectorAdapter

__all__ = ["LEVELS", "METADATA_HEADER", "Embeddings", "embed", "embed_batch"]

LEVELS = ("box", "image")
METADATA_HEADER = ["class", "source", "outcome", "score", "image", "epoch"]
_Batch = tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor], list[int]]


@dataclass
class Embeddings:
    """Points of one pass: a vector per layer, and what each point is.

    Attributes:
        features: layer name to :math:`(N, C_l)` float tensor (CPU).
        labels: :math:`(N,)` class of each point (ground-truth class, predicted class, or for ``level="image"``
            the class of the image's largest ground-truth object, ``-1`` for an image without objects).
        is_gt: :math:`(N,)` True for ground-truth boxes (and for images).
        metadata: one row per point, columns :data:`METADATA_HEADER` (strings, for the TensorBoard projector).
        keys: a key stable across epochs for points that stay the same (ground-truth boxes, images), else ``None``.
        scores: :math:`(N,)` prediction score (of the prediction that found a ground-truth box; 0 when missed).
        thumbnails: :math:`(N, 3, t, t)` crops of each box (whole images for ``level="image"``).
    """

    features: dict[str, torch.Tensor] = field(default_factory=dict)
    labels: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.long))
    is_gt: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.bool))
    metadata: list[list[str]] = field(default_factory=list)
    keys: list[str | None] = field(default_factory=list)
    scores: torch.Tensor = field(default_factory=lambda: torch.zeros(0))
    thumbnails: torch.Tensor = field(default_factory=lambda: torch.zeros(0, 3, 1, 1))

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def select(self, rows: Sequence[int] | torch.Tensor) -> Embeddings:
        """The points at ``rows``, in that order."""
        idx = torch.as_tensor(rows, dtype=torch.long).reshape(-1)
        picked = idx.tolist()
        return Embeddings(
            {k: v[idx] for k, v in self.features.items()},
            self.labels[idx],
            self.is_gt[idx],
            [self.metadata[i] for i in picked],
            [self.keys[i] for i in picked],
            self.scores[idx],
            self.thumbnails[idx],
        )

    def in_image_order(self, order: Sequence[int]) -> Embeddings:
        """The points re-ordered image by image as in ``order`` (validation indices; each image's own points keep
        their order): what :func:`embed` returns for batches of those images in that order."""
        rank = {int(i): r for r, i in enumerate(order)}
        where = [rank.get(int(row[4]), len(rank)) for row in self.metadata]
        return self.select(sorted(range(len(where)), key=where.__getitem__))

    @staticmethod
    def cat(parts: Sequence[Embeddings]) -> Embeddings:
        """Concatenate the points of several batches."""
        parts = [p for p in parts if len(p)]
        if not parts:
            return Embeddings()
        return Embeddings(
            {k: torch.cat([p.features[k] for p in parts]) for k in parts[0].features},
            torch.cat([p.labels for p in parts]),
            torch.cat([p.is_gt for p in parts]),
            [row for p in parts for row in p.metadata],
            [key for p in parts for key in p.keys],
            torch.cat([p.scores for p in parts]),
            torch.cat([p.thumbnails for p in parts]),
        )


def _name(names: Sequence[str] | None, label: int) -> str:
    if label < 0:
        return "none"
    return names[label] if names is not None and label < len(names) else str(label)


@dataclass
class _Pass:
    """What every batch of one pass shares."""

    names: Sequence[str] | None
    epoch: int
    iou_threshold: float
    thumbnail: int


def _box_points(batch: _Batch, detections: list[Detections], maps: dict[str, torch.Tensor], ctx: _Pass) -> Embeddings:
    """Ground truth then predictions of each image; one ``roi_align`` per layer for the whole batch."""
    images, gt_boxes, gt_labels, ids = batch
    rois, parts = [], []
    for i, dets in enumerate(detections):
        tp, found, best = match_predictions(
            dets.boxes, dets.scores, dets.labels, gt_boxes[i], gt_labels[i], ctx.iou_threshold
        )
        rois.append(torch.cat([gt_boxes[i].to(images.device).reshape(-1, 4), dets.boxes.to(images.device)]))
        g = len(gt_boxes[i])
        labels = torch.cat([gt_labels[i].cpu().long(), dets.labels.cpu().long()])
        scores = torch.cat([best, dets.scores.cpu().float()])
        outcome = ["GT detected" if f else "GT missed" for f in found.tolist()] + [
            "TP" if t else "FP" for t in tp.tolist()
        ]
        rows = [
            [_name(ctx.names, int(c)), "gt" if j < g else "pred", o, f"{float(s):.3f}", str(ids[i]), str(ctx.epoch)]
            for j, (c, o, s) in enumerate(zip(labels.tolist(), outcome, scores.tolist()))
        ]
        keys = [f"gt:{ids[i]}:{j}" if j < g else None for j in range(len(labels))]
        parts.append(Embeddings({}, labels, torch.arange(len(labels)) < g, rows, keys, scores))
    points = Embeddings.cat(parts)
    size = images.shape[-2:]
    points.features = {k: roi_pool(m, rois, spatial_scale(m, size)).cpu() for k, m in maps.items()}
    points.thumbnails = box_thumbnails(images, rois, ctx.thumbnail).cpu()
    return points


def _image_points(batch: _Batch, detections: list[Detections], maps: dict[str, torch.Tensor], ctx: _Pass) -> Embeddings:
    images, gt_boxes, gt_labels, ids = batch
    names, epoch, thumb = ctx.names, ctx.epoch, ctx.thumbnail
    labels = []
    for b, lab in zip(gt_boxes, gt_labels):
        area = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1]) if len(b) else None
        labels.append(int(lab[int(area.argmax())]) if area is not None else -1)
    scores = [float(d.scores.max()) if len(d) else 0.0 for d in detections]
    rows = [
        [_name(names, c), "image", f"{len(d)} detections / {len(b)} objects", f"{s:.3f}", str(i), str(epoch)]
        for c, d, b, s, i in zip(labels, detections, gt_boxes, scores, ids)
    ]
    thumbs = torch.nn.functional.interpolate(images, size=(thumb, thumb), mode="bilinear", antialias=True)
    return Embeddings(
        {k: global_pool(m).cpu() for k, m in maps.items()},
        torch.tensor(labels, dtype=torch.long),
        torch.ones(len(labels), dtype=torch.bool),
        rows,
        [f"image:{i}" for i in ids],
        torch.tensor(scores),
        thumbs.clamp(0, 1).cpu(),
    )


def embed_batch(
    images: torch.Tensor,
    gt_boxes: Sequence[torch.Tensor],
    gt_labels: Sequence[torch.Tensor],
    ids: Sequence[int],
    detections: list[Detections],
    maps: dict[str, torch.Tensor],
    level: str = "box",
    names: Sequence[str] | None = None,
    epoch: int = 0,
    iou_threshold: float = 0.5,
    thumbnail: int = 32,
) -> Embeddings:
    """The points of one batch whose forward pass is already done (detections and captured layer maps), as
    :func:`embed` computes them per batch (the projection reads the validation pass with it).

    Args:
        images: :math:`(B, 3, H, W)` the images in ``[0, 1]``.
        gt_boxes: ground-truth boxes per image (``xyxy`` pixels).
        gt_labels: ground-truth classes per image.
        ids: an id per image (its validation index).
        detections: the adapter's detections per image.
        maps: layer name to :math:`(B, C, h, w)` feature map.
        level: ``"box"`` or ``"image"``.
        names: class names (metadata).
        epoch: written in each point's metadata.
        iou_threshold: IoU at which a prediction is a true positive.
        thumbnail: side of the sprite thumbnails.
    """
    if level not in LEVELS:
        raise ConfigurationError(f"`level` can be box or image, got {level!r}.")
    batch = (images, list(gt_boxes), list(gt_labels), list(ids))
    ctx = _Pass(names, epoch, iou_threshold, thumbnail)
    return (_box_points if level == "box" else _image_points)(batch, detections, maps, ctx)


def embed(
    adapter: DetectorAdapter,
    batches: Iterable[tuple[torch.Tensor, Sequence[torch.Tensor], Sequence[torch.Tensor], Sequence[int]]],
    layers: Sequence[str],
    level: str = "box",
    epoch: int = 0,
    iou_threshold: float = 0.5,
    thumbnail: int = 32,
    seed: int = 0,
) -> Embeddings:
    """Embed every ground-truth and predicted box (or every image) of a stream of batches.

    One forward pass per batch gives both the detections (``adapter.detect``) and the captured layer maps;
    each batch's maps are pooled and dropped before the next batch, so only the vectors are kept. Runs in
    :func:`~xaiwatch.core.context.explaining`: no side effect on the model, hooks removed afterwards.

    Args:
        adapter: a :class:`~xaiwatch.adapters.DetectorAdapter`.
        batches: ``(images (B, 3, H, W) in [0, 1], gt boxes per image (n_i, 4) xyxy pixels, gt labels per
            image, image ids)``.
        layers: layer names of the adapter (aliases such as ``"neck.p3"`` or dotted paths).
        level: ``"box"`` (RoIAlign per box) or ``"image"`` (global average pooling).
        epoch: written in each point's metadata.
        iou_threshold: IoU at which a prediction is a true positive.
        thumbnail: side of the sprite thumbnails.
        seed: seed of the explaining context.

    Returns:
        the :class:`Embeddings` of all points, in batch order (per image: ground truth, then predictions).

    Raises:
        ConfigurationError: for an unknown level or layer.
    """
    if level not in LEVELS:
        raise ConfigurationError(f"`level` can be box or image, got {level!r}.")
    modules = {name: adapter.layer(name) for name in layers}
    points_of = functools.partial(
        embed_batch, level=level, names=adapter.names, epoch=epoch, iou_threshold=iou_threshold, thumbnail=thumbnail
    )
    parts = []
    with explaining(adapter.model, seed=seed) as prepare, torch.no_grad(), capture_layers(modules) as maps:
        for images, gt_boxes, gt_labels, ids in batches:
            images = prepare(images)
            detections = adapter.detect(images)
            parts.append(points_of(images, gt_boxes, gt_labels, ids, detections, maps))
            maps.clear()
    return Embeddings.cat(parts)
