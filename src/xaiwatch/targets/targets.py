"""Targets are small callables ``target(raw) -> Tensor[B]`` over a detector's raw candidates.

Like pytorch-grad-cam's ``FasterRCNNBoxScoreTarget`` (not Captum's ``target=`` union): an engine calls
Captum with ``forward_func = lambda x: target(adapter.raw(x))`` and ``target=None``. A target follows the
device and dtype of the raw output it is given.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence

import torch
from torchvision.ops import box_iou

from xaiwatch.core.errors import ConfigurationError
from xaiwatch.core.types import Match, RawOutput
from xaiwatch.core.validation import in_range

__all__ = ["Target", "ClassTarget", "BoxTarget", "MatchedBoxTarget", "MissedTarget", "Match"]


def _check_label(label: int | None, raw: RawOutput) -> None:
    if label is not None and not 0 <= label < raw.num_classes:
        raise ConfigurationError(f"Target label {label} is out of range for a model with {raw.num_classes} classes.")


class Target(ABC):
    """A differentiable scalar per image computed from raw candidates."""

    @abstractmethod
    def __call__(self, raw: RawOutput) -> torch.Tensor:
        """Return :math:`(B,)` scores for the :math:`B` images of ``raw``."""

    def describe(self) -> str:
        """A short human-readable description, used in figure titles."""
        return repr(self)

    def resolve(self, raw: RawOutput) -> tuple[int, int] | None:
        """The ``(candidate, label)`` whose score this target is on the one image of ``raw``, when it is one.

        Engines use it to differentiate only the part of the head that computes that score. ``None`` (the
        default) when the score is not a single candidate's class score.
        """
        return None


class ClassTarget(Target):
    """The highest score of class ``label`` over all candidates (a classifier's logit, for a detector).

    Args:
        label: class index.
    """

    def __init__(self, label: int) -> None:
        if int(label) < 0:
            raise ConfigurationError(f"`label` must be >= 0, got {label}.")
        self.label = int(label)

    def __call__(self, raw: RawOutput) -> torch.Tensor:
        _check_label(self.label, raw)
        return raw.scores[..., self.label].amax(dim=1)

    def __repr__(self) -> str:
        return f"ClassTarget({self.label})"


class BoxTarget(Target):
    """The score of one raw candidate (the ``candidates`` index of a :class:`Detections` box).

    Args:
        candidate: index of the candidate in the raw output.
        label: class whose score is explained; the candidate's best class when ``None``.
    """

    def __init__(self, candidate: int, label: int | None = None) -> None:
        if int(candidate) < 0:
            raise ConfigurationError(f"`candidate` must be >= 0, got {candidate}.")
        self.candidate = int(candidate)
        self.label = None if label is None else int(label)

    def __call__(self, raw: RawOutput) -> torch.Tensor:
        _check_label(self.label, raw)
        if self.candidate >= raw.scores.shape[1]:
            raise ConfigurationError(
                f"Candidate {self.candidate} does not exist: the model produced {raw.scores.shape[1]} candidates "
                "for this input size."
            )
        s = raw.scores[:, self.candidate]
        return s.amax(dim=-1) if self.label is None else s[:, self.label]

    def resolve(self, raw: RawOutput) -> tuple[int, int] | None:
        """``(candidate, label)``; ``None`` without a label (the best class is a max, not one score)."""
        self(raw[:1])  # the same checks as a call
        return None if self.label is None else (self.candidate, self.label)

    def __repr__(self) -> str:
        return f"BoxTarget({self.candidate}, label={self.label})"


class MatchedBoxTarget(Target):
    """Follows one object across epochs: the candidate that best matches a reference box and class.

    Among candidates whose box overlaps ``box`` with IoU >= ``iou_threshold``, the one with the highest score
    for ``label`` is explained; the object counts as *detected* when that score is at least ``conf``. When no
    candidate overlaps that much (the model does not see the object), the candidate maximising
    ``IoU x score`` among those that overlap at all is explained and ``detected`` is False. The choice is made
    without gradients (:meth:`match`; engines return it in their :class:`~xaiwatch.core.types.Explanation`, the
    target itself is never changed); the returned score is differentiable.

    Args:
        box: reference box ``x1, y1, x2, y2`` in input pixels (a ground-truth box, or an earlier detection).
        label: class index.
        iou_threshold: minimum IoU for a candidate to be the same object.
        conf: score from which the object counts as detected.
    """

    def __init__(self, box: Sequence[float] | torch.Tensor, label: int, iou_threshold: float = 0.5, conf: float = 0.25):
        box_t = torch.as_tensor(box, dtype=torch.float32).flatten()
        if box_t.numel() != 4 or not bool((box_t[2:] > box_t[:2]).all()):
            raise ConfigurationError(f"`box` must be x1, y1, x2, y2 with x2 > x1 and y2 > y1, got {box_t.tolist()}.")
        iou_threshold = in_range("iou_threshold", iou_threshold, 0.0, 1.0, low_open=True)
        if int(label) < 0:
            raise ConfigurationError(f"`label` must be >= 0, got {label}.")
        self.box = box_t
        self.label = int(label)
        self.iou_threshold = float(iou_threshold)
        self.conf = float(conf)

    def match(self, raw: RawOutput) -> list[Match]:
        """Choose the candidate to explain in each image of ``raw`` (no gradients)."""
        _check_label(self.label, raw)
        matches = []
        with torch.no_grad():
            ref = self.box.to(raw.boxes.device, raw.boxes.dtype)[None]
            for boxes, scores in zip(raw.boxes, raw.scores[..., self.label]):
                ious = box_iou(ref, boxes.detach())[0]
                same = ious >= self.iou_threshold
                if bool(same.any()):
                    i = int(torch.where(same, scores, torch.full_like(scores, -1.0)).argmax())
                else:
                    i = int((ious * scores).argmax()) if bool((ious > 0).any()) else int(scores.argmax())
                s, u = float(scores[i]), float(ious[i])
                matches.append(Match(i, u, s, u >= self.iou_threshold and s >= self.conf, tuple(boxes[i].tolist())))
        return matches

    def resolve(self, raw: RawOutput) -> tuple[int, int] | None:
        """The matched candidate on the one image of ``raw`` and the label."""
        return self.match(raw[:1])[0].candidate, self.label

    def __call__(self, raw: RawOutput) -> torch.Tensor:
        idx = torch.tensor([m.candidate for m in self.match(raw)], device=raw.scores.device)
        return raw.scores[torch.arange(len(idx), device=idx.device), idx, self.label]

    def __repr__(self) -> str:
        return f"MatchedBoxTarget(box={[round(v, 1) for v in self.box.tolist()]}, label={self.label})"


class MissedTarget(MatchedBoxTarget):
    """A false negative: the best raw candidate overlapping a missed ground-truth object, for its class.

    Explains what the model saw at a missed object and why the score stayed low. The candidate is chosen as
    in :class:`MatchedBoxTarget`: among candidates whose box overlaps ``gt_box`` with IoU >= ``iou_threshold``,
    the one with the highest score for ``label`` (the candidate that came closest to detecting the object);
    when none overlaps that much, the candidate maximising ``IoU x score`` (:meth:`match` says which).

    Args:
        gt_box: the missed ground-truth box ``x1, y1, x2, y2`` in input pixels.
        label: its class.
        iou_threshold: minimum IoU of a candidate on the object (the matching threshold of the error analysis).
        conf: detection threshold (``detected`` of the :class:`Match` says whether the object is now found).

    Example:
        >>> raw = RawOutput(torch.tensor([[[0.0, 0, 10, 10], [0, 0, 9, 10], [20, 20, 30, 30]]]),
        ...                 torch.tensor([[[0.1, 0.0], [0.2, 0.0], [0.9, 0.0]]]))
        >>> target = MissedTarget([0, 0, 10, 10], label=0)
        >>> target(raw), target.match(raw)[0].candidate
        (tensor([0.2000]), 1)
    """

    def __init__(
        self, gt_box: Sequence[float] | torch.Tensor, label: int, iou_threshold: float = 0.5, conf: float = 0.25
    ) -> None:
        super().__init__(gt_box, label, iou_threshold=iou_threshold, conf=conf)

    def __repr__(self) -> str:
        return f"MissedTarget(gt_box={[round(v, 1) for v in self.box.tolist()]}, label={self.label})"
