"""Small typed containers shared by every layer."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import torch

__all__ = ["Detections", "RawOutput", "ProbeSet", "Match", "Explanation"]


@dataclass
class Detections:
    """Post-processed detections of one image.

    Attributes:
        boxes: :math:`(N, 4)` boxes ``x1, y1, x2, y2`` in pixels of the model's input image.
        scores: :math:`(N,)` confidence of each box.
        labels: :math:`(N,)` class index of each box.
        candidates: :math:`(N,)` index of the raw candidate ("anchor") each box was kept from; this is what
            lets a target follow a box back into the differentiable raw output.
    """

    boxes: torch.Tensor
    scores: torch.Tensor
    labels: torch.Tensor
    candidates: torch.Tensor

    def __len__(self) -> int:
        return int(self.boxes.shape[0])

    def to(self, device: torch.device | str) -> Detections:
        """Move every field to ``device``."""
        return Detections(*(t.to(device) for t in (self.boxes, self.scores, self.labels, self.candidates)))

    def detach(self) -> Detections:
        """Detach every field from the autograd graph."""
        return Detections(*(t.detach() for t in (self.boxes, self.scores, self.labels, self.candidates)))

    @classmethod
    def empty(cls, device: torch.device | str = "cpu") -> Detections:
        """Detections with no box."""
        z = torch.zeros(0, device=device)
        return cls(z.reshape(0, 4), z, z.long(), z.long())


@dataclass
class RawOutput:
    """A detector's differentiable raw output in one family-independent form.

    Attributes:
        boxes: :math:`(B, N, 4)` candidate boxes ``x1, y1, x2, y2`` in input pixels.
        scores: :math:`(B, N, C)` per-class probabilities in ``[0, 1]`` (already multiplied by objectness
            for families that have one).
        levels: :math:`(N,)` index of the feature level (stride) each candidate comes from, or ``None``.
    """

    boxes: torch.Tensor
    scores: torch.Tensor
    levels: torch.Tensor | None = None

    def __getitem__(self, item: slice | int) -> RawOutput:
        if isinstance(item, int):
            item = slice(item, item + 1)
        return replace(self, boxes=self.boxes[item], scores=self.scores[item])

    @property
    def num_classes(self) -> int:
        """Number of classes ``C``."""
        return int(self.scores.shape[-1])


@dataclass
class ProbeSet:
    """The fixed held-out images explained every epoch.

    Attributes:
        images: :math:`(P, 3, H, W)` float images in ``[0, 1]``.
        boxes: ground-truth boxes per probe, each :math:`(n_i, 4)` xyxy pixels.
        labels: ground-truth labels per probe, each :math:`(n_i,)`.
        indices: index of each probe in the validation dataset (``-1`` for user-given images).
    """

    images: torch.Tensor
    boxes: list[torch.Tensor] = field(default_factory=list)
    labels: list[torch.Tensor] = field(default_factory=list)
    indices: list[int] = field(default_factory=list)

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def to(self, device: torch.device | str) -> ProbeSet:
        """Move images and boxes to ``device``."""
        return ProbeSet(
            self.images.to(device),
            [b.to(device) for b in self.boxes],
            [lab.to(device) for lab in self.labels],
            list(self.indices),
        )


@dataclass(frozen=True)
class Match:
    """The candidate a box target resolved to on one image.

    Attributes:
        candidate: index of the raw candidate explained.
        iou: its IoU with the reference box.
        score: its score for the target's class.
        detected: whether it is the object at the detector's threshold (IoU and score high enough).
        box: its box ``x1, y1, x2, y2``.
    """

    candidate: int
    iou: float
    score: float
    detected: bool
    box: tuple[float, float, float, float]


@dataclass
class Explanation:
    """What an engine found for ``K`` targets of one image: returned, never written into the targets.

    Attributes:
        method: the engine's registered name.
        maps: :math:`(K, 1, H, W)` maps, one per target.
        matches: per target, the :class:`Match` it resolved to (``None`` for targets that name no box).
        extras: method-specific results for drawing, e.g. ``"channels"`` (feature maps' top channels) or
            ``"class_scores"`` (a box's per-class scores, for decision panels).

    Example:
        >>> e = Explanation("saliency", torch.zeros(2, 1, 8, 8), [None, None])
        >>> len(e), e.maps.shape
        (2, torch.Size([2, 1, 8, 8]))
    """

    method: str
    maps: torch.Tensor
    matches: list[Match | None]
    extras: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.maps.shape[0])

    def cpu(self) -> Explanation:
        """The same record with tensors on the CPU (to gather or draw)."""

        def move(v: Any) -> Any:
            if isinstance(v, torch.Tensor):
                return v.detach().cpu()
            if isinstance(v, (list, tuple)):
                return type(v)(move(x) for x in v)
            return v

        return Explanation(
            self.method, self.maps.detach().cpu(), list(self.matches), {k: move(v) for k, v in self.extras.items()}
        )
