"""The automatic counterfactual context test: is an object still itself when its surroundings are replaced?

Each probe's tracked object (its box, pixel for pixel) is kept and everything around it replaced: by the
context of other probe images (the object pasted onto another validation image whose objects are of other
classes and do not overlap it), by a blur of its own image, and by grey. The model re-scores the object in each
variant: a model that recognises the object keeps its class and most of its score; a model that learned the
context (a class-correlated background, tint or halo) changes its class or loses its score. Nothing is needed
from the user: the variants are built from the validation images and their boxes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torchvision.ops import box_iou

from xaiwatch.checks.counterfactual import object_scores
from xaiwatch.checks.localization import _as_boxes, box_masks
from xaiwatch.checks.perturbation import fill_image
from xaiwatch.core.errors import ConfigurationError, check_shape

__all__ = ["CONTEXT_FILLS", "ContextSwap", "class_shares", "context_donors", "context_swap", "check_context_source"]

#: What replaces a probe object's surroundings: other probes' context, a blur of its own image, grey.
CONTEXT_FILLS = ("swap", "blur", "grey")
_MAX_BOX_SHARE = 0.9  # a box covering more of the image leaves no context to replace


@dataclass
class ContextSwap:
    """Per-probe results of :func:`context_swap`.

    Attributes:
        flip: :math:`(N,)` share of a probe's variants in which the object's class changes (``nan``: undefined).
        drop: :math:`(N,)` mean relative drop of the object's class score over its variants, in ``[-1, 1]``.
        score: :math:`(N,)` the object's class score in the original image.
        defined: :math:`(N,)` bool: the object scores at least ``min_score`` and has context to replace.
        by_fill: fill name to :math:`(N,)` flips and drops of that fill alone (``{"swap": (flip, drop), ...}``).
        class_drop: :math:`(N,)` mean relative drop of the object's *class share* (its class's probability over the
            sum of all classes' on the candidate that speaks for it, see :func:`class_shares`) over the variants of
            ``fills`` where the object still has a candidate, in ``[-1, 1]`` (``swap_class_drop``). With one class
            the share is 1 on every candidate, so this is 0 wherever defined: one-class data has no class for a
            context to carry.
    """

    flip: torch.Tensor
    drop: torch.Tensor
    score: torch.Tensor
    defined: torch.Tensor
    by_fill: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    class_drop: torch.Tensor | None = None


def class_shares(raw, boxes: torch.Tensor, labels: torch.Tensor, iou: float = 0.5) -> torch.Tensor:
    """Per image, the object's class share: on the raw candidate that speaks for it (the one overlapping its box
    with IoU ``>= iou`` that gives its class the highest probability, the candidate
    :func:`~xaiwatch.checks.object_scores` reads the score from), its class's probability over the sum of every
    class's probability.

    The share says *as what* the model sees the object, not how sure it is that an object is there: surroundings
    that lower every class's probability alike (a detector that finds fewer objects on an unfamiliar background)
    leave it unchanged, surroundings that carry one class's evidence move it.

    Args:
        raw: raw candidates of ``N`` images (:class:`~xaiwatch.core.types.RawOutput`).
        boxes: :math:`(N, 4)` one ``xyxy`` box per image.
        labels: :math:`(N,)` the objects' classes.
        iou: overlap a candidate needs.

    Returns:
        :math:`(N,)` shares in ``[0, 1]``; ``nan`` where no candidate overlaps the box or every probability is 0.

    Example:
        >>> from xaiwatch.core.types import RawOutput
        >>> raw = RawOutput(torch.tensor([[[0.0, 0, 10, 10], [0, 0, 9, 10]]]), torch.tensor([[[0.2, 0.6], [0.3, 0.1]]]))
        >>> class_shares(raw, torch.tensor([[0.0, 0, 10, 10]]), torch.tensor([0]))  # the 2nd box: 0.3 / (0.3 + 0.1)
        tensor([0.7500])
    """
    n = raw.scores.shape[0]
    boxes = torch.as_tensor(boxes, dtype=raw.boxes.dtype, device=raw.boxes.device).reshape(-1, 4)
    labels = torch.as_tensor(labels, device=raw.boxes.device).long().reshape(-1)
    out = []
    for i in range(n):
        overlap = box_iou(boxes[i : i + 1], raw.boxes[i])[0] >= iou
        if not bool(overlap.any()):
            out.append(float("nan"))
            continue
        probs = raw.scores[i][overlap].detach().float()  # (k, C)
        best = probs[int(probs[:, int(labels[i])].argmax())]
        total = float(best.sum())
        out.append(float(best[int(labels[i])]) / total if total > 0 else float("nan"))
    return torch.tensor(out, dtype=torch.float32)


def _overlaps(box: torch.Tensor, others: torch.Tensor, gap: float) -> bool:
    if not len(others):
        return False
    o = others.reshape(-1, 4)
    return bool(
        (
            (o[:, 0] < box[2] + gap) & (box[0] < o[:, 2] + gap) & (o[:, 1] < box[3] + gap) & (box[1] < o[:, 3] + gap)
        ).any()
    )


def context_donors(
    boxes: torch.Tensor,
    labels: torch.Tensor,
    gt_boxes: Sequence[torch.Tensor],
    gt_labels: Sequence[torch.Tensor] | None = None,
    donors: int = 2,
    gap: float = 2.0,
) -> list[list[int]]:
    """For each probe, other probes whose context can surround its object.

    A donor's objects must not overlap the pasted box (grown by ``gap`` pixels); donors none of whose objects
    share the probe's class come first (their context is another class's), then the others, in cyclic order.

    Args:
        boxes: :math:`(N, 4)` the tracked boxes.
        labels: :math:`(N,)` their classes.
        gt_boxes: per probe, all its ground-truth boxes.
        gt_labels: per probe, their classes (default: only the tracked labels are known).
        donors: donors per probe.
        gap: pixels between the pasted box and a donor's objects.

    Returns:
        per probe, up to ``donors`` indices of other probes.

    Example:
        >>> b = torch.tensor([[0.0, 0, 4, 4], [10, 10, 14, 14], [0, 0, 4, 4]])
        >>> context_donors(b, torch.tensor([0, 1, 1]), [x[None] for x in b], donors=1)
        [[1], [0], [1]]
    """
    boxes = _as_boxes(boxes)
    labels = torch.as_tensor(labels).reshape(-1).long()
    n = boxes.shape[0]
    gt_labels = gt_labels if gt_labels is not None else [labels[i : i + 1] for i in range(n)]
    out = []
    for i in range(n):
        order = [(i + d) % n for d in range(1, n)]
        usable = [j for j in order if not _overlaps(boxes[i], _as_boxes(gt_boxes[j]), gap)]
        other = [j for j in usable if int(labels[i]) not in torch.as_tensor(gt_labels[j]).reshape(-1).tolist()]
        same = [j for j in usable if j not in other]
        out.append((other + same)[: max(0, int(donors))])
    return out


def check_context_source(boxes: torch.Tensor, size: Sequence[int], name: str = "SaliencyGate") -> None:
    """Raise when no probe has context to replace (every tracked box covers at least 90% of the image).

    Raises:
        ConfigurationError: naming the fix (probes with smaller objects, or a gate without context checks).
    """
    boxes = _as_boxes(boxes)
    share = box_masks(boxes, size).float().mean(dim=(1, 2)) if len(boxes) else torch.ones(0)
    if not bool((share < _MAX_BOX_SHARE).any()):
        raise ConfigurationError(
            f"{name}: the context checks replace everything around each probe's object, but every probe's box covers "
            f"at least {_MAX_BOX_SHARE:.0%} of its image (shares {[round(float(s), 2) for s in share]}): there is no "
            "context. Choose `probe_indices` with smaller objects or remove 'context_swap' / 'context_reliance' / "
            "'relative_context_reliance' / 'swap_class_drop' from `checks`."
        )


def _kept(boxes: torch.Tensor, margin: float) -> torch.Tensor:
    """The boxes grown by ``margin`` times their shorter side on every side (what a variant keeps)."""
    side = torch.minimum(boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1])[:, None]
    return boxes + float(margin) * side * torch.tensor([-1.0, -1.0, 1.0, 1.0], device=boxes.device)


def _variants(
    images, boxes, fill: str, donors: list[list[int]], slot: int, pool: torch.Tensor | None = None, rows=None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The probes with everything outside ``boxes`` replaced by ``fill`` (``swap``: donor ``slot``'s image).

    ``images`` are the probes at positions ``rows`` of ``pool`` (default: the pool itself); donors index ``pool``.
    """
    keep = box_masks(boxes, images.shape[-2:])[:, None].to(images.device)
    if fill == "swap":
        pool = images if pool is None else pool
        rows = range(images.shape[0]) if rows is None else rows
        src = [d[slot] if len(d) > slot else r for r, d in zip(rows, donors)]
        ok = torch.tensor([len(d) > slot for d in donors], device=images.device)
        background = pool[torch.tensor(src, device=pool.device)].to(images.device)
    else:
        ok = torch.ones(images.shape[0], dtype=torch.bool, device=images.device)
        background = fill_image(images, fill)
    return torch.where(keep, images, background), ok


def context_swap(
    adapter,
    images: torch.Tensor,
    boxes: torch.Tensor,
    labels: torch.Tensor,
    gt_boxes: Sequence[torch.Tensor],
    gt_labels: Sequence[torch.Tensor] | None = None,
    fills: Sequence[str] = CONTEXT_FILLS,
    donors: int = 2,
    min_score: float = 0.25,
    iou: float = 0.5,
    extra_fills: Sequence[str] = (),
    original: tuple[torch.Tensor, torch.Tensor] | None = None,
    margin: float = 0.0,
    positions: Sequence[int] | None = None,
) -> ContextSwap:
    """Re-score each probe's object with its surroundings replaced (see the module docstring).

    ``swap`` contributes ``donors`` variants (other probes' contexts), ``blur`` and ``grey`` one each. A probe is
    defined when its object scores at least ``min_score`` for its class in the original image and its box leaves
    context (covers less than 90% of the image). A variant counts for the flip only when the object is still
    detected in it (a candidate overlapping the box scores at least ``min_score`` for some class): the flip asks
    *as what* the model sees the object on new surroundings; an object that is simply lost (the surroundings
    carried its objectness, not its class) shows in ``drop`` instead. ``class_drop`` is the continuous form of the
    flip: the relative drop of the object's class share (:func:`class_shares`), read on the candidate that speaks
    for the pasted box, so a model that finds an object less sure of *an object* on other surroundings (as a real
    aerial detector does on another tile) but not of *its class* keeps it at 0.

    Args:
        adapter: the model adapter (``raw``).
        images: :math:`(N, 3, H, W)` probe images in ``[0, 1]``.
        boxes: :math:`(N, 4)` the tracked objects' boxes.
        labels: :math:`(N,)` their classes.
        gt_boxes: per probe, all its ground-truth boxes (donor choice).
        gt_labels: per probe, their classes (donors of other classes first).
        fills: any of :data:`CONTEXT_FILLS`.
        donors: swap variants per probe.
        min_score: the score floor below which a probe is undefined.
        iou: overlap a candidate needs to speak for the object.
        extra_fills: fills scored into ``by_fill`` only, not into ``flip`` / ``drop`` (one forward pass shared with
            another check: the grey fill's drop is ``relative_context_reliance``).
        original: the originals' ``(scores, classes)`` from :func:`~xaiwatch.checks.object_scores` when already
            computed, optionally with their class shares as a third entry (saves a forward pass).
        margin: keep this much of the surroundings too, as a share of the box's shorter side on every side (the
            immediate surroundings an object always has, such as a frame, are then kept as part of it).
        positions: re-score only the probes at these positions (a share of the probe set, as one rank of several
            does); ``images`` ... ``gt_labels`` still describe every probe, so the donors are chosen among all of
            them and a probe's variants are the same whichever share it is in. ``original`` is then of these probes.

    Returns:
        a :class:`ContextSwap` (of the probes at ``positions``, in that order, when given).

    Raises:
        ConfigurationError: for an unknown fill, or ``positions`` that are not distinct positions of the probes.
    """
    from xaiwatch.core.context import eval_state

    unknown = [f for f in (*fills, *extra_fills) if f not in CONTEXT_FILLS]
    if unknown or not fills:
        raise ConfigurationError(f"`fills` must be a non-empty subset of {CONTEXT_FILLS}, got {list(fills)!r}.")
    check_shape(images, ["N", 3, "H", "W"], "images")
    images = images.detach()
    boxes = _as_boxes(boxes, images.shape[0]).to(images.device)
    labels = torch.as_tensor(labels, device=images.device).reshape(-1).long()
    if not 0.0 <= float(margin) <= 2.0:
        raise ConfigurationError(f"`margin` must be in [0, 2] (a share of the box's side), got {margin!r}.")
    pairs = donors and context_donors(
        boxes.cpu(),
        labels.cpu(),
        [torch.as_tensor(b).cpu() for b in gt_boxes],
        None if gt_labels is None else [torch.as_tensor(x).cpu() for x in gt_labels],
        donors,
    )
    pairs = pairs or [[] for _ in range(images.shape[0])]
    pool, rows = images, None
    if positions is not None:  # the share: its probes; donors still index (and paste from) the whole pool
        rows = [int(p) for p in positions]
        if not rows or len(set(rows)) != len(rows) or not all(0 <= p < images.shape[0] for p in rows):
            raise ConfigurationError(
                f"`positions` must be distinct probe positions in [0, {images.shape[0]}), got {list(positions)!r}."
            )
        at = torch.tensor(rows, dtype=torch.long, device=images.device)
        images, boxes, labels, pairs = images[at], boxes[at], labels[at], [pairs[p] for p in rows]
    kept = _kept(boxes, margin)
    every = list(dict.fromkeys([*fills, *extra_fills]))
    jobs = [(f, s) for f in every for s in (range(int(donors)) if f == "swap" else (0,))]

    def score(x: torch.Tensor, b: torch.Tensor, lab: torch.Tensor) -> tuple[torch.Tensor, ...]:
        raw = adapter.raw(x)
        s, c, top = object_scores(raw, b, lab, iou, best=True)
        return s.cpu(), c.cpu(), top.cpu(), class_shares(raw, b, lab, iou)

    share = box_masks(kept, images.shape[-2:]).float().mean(dim=(1, 2)).cpu()
    with torch.no_grad(), eval_state(adapter.model):
        s0, c0, share0 = _originals(original, lambda: score(images, boxes, labels))
        defined = (s0 >= float(min_score)) & (share < _MAX_BOX_SHARE)
        # only defined probes are re-scored (the others' values are nan whatever their variants give)
        live = [i for i in range(images.shape[0]) if bool(defined[i])]
        where = list(range(images.shape[0])) if rows is None else rows
        results = [
            (fill, *_rescored(score, images, kept, boxes, labels, fill, slot, pairs, pool, where, live))
            for fill, slot in jobs
        ]
    nan = torch.full_like(s0, float("nan"))
    flips, drops, class_drops, by_fill = [], [], [], {}
    for fill, ok, s1, c1, top1, share1 in results:
        counted = ok & defined & (c0 >= 0) & (c1 >= 0) & (top1 >= float(min_score))  # still detected, as what?
        flip = torch.where(counted, (c1 != c0).float(), nan)
        drop = torch.where(ok & defined, ((s0 - s1) / s0.clamp(min=1e-6)).clamp(-1, 1), nan)
        if fill in fills:
            flips.append(flip)
            drops.append(drop)
            kept_share = ok & defined & ~share0.isnan() & ~share1.isnan()  # the object still has a candidate
            relative = ((share0 - share1) / share0.clamp(min=1e-6)).clamp(-1, 1)
            class_drops.append(torch.where(kept_share, relative, nan))
        prev = by_fill.get(fill)
        by_fill[fill] = (
            (flip, drop)
            if prev is None
            else (torch.stack([prev[0], flip]).nanmean(0), torch.stack([prev[1], drop]).nanmean(0))
        )
    flip = _nanmean_rows(torch.stack(flips))
    drop = _nanmean_rows(torch.stack(drops))
    class_drop = _nanmean_rows(torch.stack(class_drops))
    return ContextSwap(flip, torch.where(defined, drop, nan), s0, defined, by_fill, class_drop)


def _rescored(score, images, kept, boxes, labels, fill, slot, pairs, pool, where, live) -> tuple[torch.Tensor, ...]:
    """``(ok, scores, classes, best scores, class shares)`` of one variant, re-scored only at the ``live`` probes
    (``ok`` False, scores 0, classes -1, shares ``nan`` elsewhere)."""
    n = images.shape[0]
    out = [torch.zeros(n), torch.full((n,), -1, dtype=torch.long), torch.zeros(n), torch.full((n,), math.nan)]
    ok = torch.zeros(n, dtype=torch.bool)
    if live:
        at = torch.tensor(live, dtype=torch.long, device=images.device)
        variant, ok_live = _variants(
            images[at], kept[at], fill, [pairs[i] for i in live], slot, pool, [where[i] for i in live]
        )
        for full, part in zip(out, score(variant, boxes[at], labels[at])):
            full[at.cpu()] = part.to(full.dtype)
        ok[at.cpu()] = ok_live.cpu()
    return (ok, *out)


def _originals(original, score) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The originals' ``(scores, classes, class shares)``: from ``original`` when it has them, else one forward."""
    if original is not None and len(original) >= 3:
        return original[0].cpu().float(), original[1].cpu().long(), original[2].cpu().float()
    s0, c0, _, share0 = score()
    if original is not None:
        s0, c0 = original[0].cpu().float(), original[1].cpu().long()
    return s0, c0, share0


def _nanmean_rows(x: torch.Tensor) -> torch.Tensor:
    """Column means ignoring ``nan`` (``nan`` where a column has none), without nanmean's warning."""
    ok = ~x.isnan()
    total = torch.where(ok, x, torch.zeros_like(x)).sum(0)
    count = ok.sum(0)
    return torch.where(count > 0, total / count.clamp(min=1), torch.full_like(total, float("nan")))
