"""Where a map's evidence lies relative to boxes: pointing game, energy in box, off-object energy."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from xaiwatch.core.errors import ConfigurationError, ShapeError

__all__ = [
    "as_maps",
    "box_masks",
    "pointing_game",
    "energy_in_box",
    "energy_concentration",
    "rank_accuracy",
    "off_object_energy",
]


def as_maps(maps: torch.Tensor) -> torch.Tensor:
    """``(N, 1, H, W)`` or ``(N, H, W)`` maps as ``(N, H, W)`` float.

    Raises:
        ShapeError: for any other shape.
    """
    if maps.dim() == 4 and maps.shape[1] == 1:
        maps = maps[:, 0]
    if maps.dim() != 3:
        raise ShapeError("maps", tuple(maps.shape), ["N", "(1,)", "H", "W"])
    return maps.float()


def _as_boxes(boxes: torch.Tensor | Sequence[float], n: int | None = None) -> torch.Tensor:
    boxes = torch.as_tensor(boxes, dtype=torch.float32).reshape(-1, 4)
    if n is not None and boxes.shape[0] != n:
        raise ShapeError("boxes", tuple(boxes.shape), [n, 4])
    return boxes


def box_masks(boxes: torch.Tensor, size: Sequence[int], tolerance: float = 0.0) -> torch.Tensor:
    """Pixels whose centre lies inside each box grown by ``tolerance`` pixels on every side.

    Args:
        boxes: :math:`(N, 4)` ``xyxy`` pixel boxes (pixel ``x`` covers ``[x, x + 1)``).
        size: ``(H, W)``.
        tolerance: pixels added on each side.

    Returns:
        :math:`(N, H, W)` boolean masks.
    """
    boxes = _as_boxes(boxes)
    h, w = int(size[0]), int(size[1])
    ys = torch.arange(h, dtype=torch.float32, device=boxes.device) + 0.5
    xs = torch.arange(w, dtype=torch.float32, device=boxes.device) + 0.5
    x1, y1, x2, y2 = (boxes[:, i, None] for i in range(4))
    inside_x = (xs >= x1 - tolerance) & (xs <= x2 + tolerance)  # (N, W)
    inside_y = (ys >= y1 - tolerance) & (ys <= y2 + tolerance)  # (N, H)
    return inside_y[:, :, None] & inside_x[:, None, :]


def pointing_game(maps: torch.Tensor, boxes: torch.Tensor, tolerance: float = 15.0) -> torch.Tensor:
    """Zhang et al. (2016): whether each map's maximum falls within ``tolerance`` pixels of its object's box.

    A constant map (no maximum, e.g. an all-zero Grad-CAM) is a miss.

    Args:
        maps: :math:`(N, 1, H, W)` maps (signed maps: their largest value; take ``abs`` first if magnitude counts).
        boxes: :math:`(N, 4)` ``xyxy`` box of the object each map explains.
        tolerance: pixels (15 in the original protocol, at 224 px).

    Returns:
        :math:`(N,)` bool, ``True`` for a hit.
    """
    if float(tolerance) < 0:
        raise ConfigurationError(f"`tolerance` must be >= 0, got {tolerance}.")
    maps = as_maps(maps)
    n, h, w = maps.shape
    boxes = _as_boxes(boxes, n).to(maps.device)
    flat = maps.reshape(n, -1)
    peak = flat.argmax(dim=1)
    y, x = peak // w + 0.5, peak % w + 0.5
    hit = (x >= boxes[:, 0] - tolerance) & (x <= boxes[:, 2] + tolerance)
    hit &= (y >= boxes[:, 1] - tolerance) & (y <= boxes[:, 3] + tolerance)
    return hit & (flat.amax(dim=1) > flat.amin(dim=1))


def _positive_share(maps: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    positive = maps.clamp(min=0)
    total = positive.sum(dim=(1, 2))
    inside = (positive * masks).sum(dim=(1, 2))
    return torch.where(total > 0, inside / total.clamp(min=torch.finfo(total.dtype).tiny), torch.zeros_like(total))


def energy_in_box(maps: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """Share of each map's positive attribution inside its object's box (Score-CAM's energy pointing game).

    Args:
        maps: :math:`(N, 1, H, W)` maps; only positive values count (pass ``abs`` of a gradient for magnitude).
        boxes: :math:`(N, 4)` ``xyxy`` box of the object each map explains.

    Returns:
        :math:`(N,)` in ``[0, 1]``; 0 for a map without positive values.
    """
    maps = as_maps(maps)
    boxes = _as_boxes(boxes, maps.shape[0]).to(maps.device)
    return _positive_share(maps, box_masks(boxes, maps.shape[-2:]))


def energy_concentration(maps: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """:func:`energy_in_box` divided by the box's share of the image: how concentrated the evidence is on the box.

    1 means the map is as concentrated on the box as a uniform map (no localisation), above 1 more, below 1
    less (the evidence is elsewhere). Unlike the energy share itself, it does not grow with object size: a map
    that puts 40% of its energy on a box covering 10% of the image scores 4, on a box covering 40% scores 1.

    Args:
        maps: :math:`(N, 1, H, W)` maps (only positive values count).
        boxes: :math:`(N, 4)` ``xyxy`` box of the object each map explains.

    Returns:
        :math:`(N,)` in ``[0, H W / area]``; 0 for a map without positive values, ``nan`` for an empty box.

    Example:
        >>> m = torch.zeros(1, 1, 10, 10); m[0, 0, :5, :5] = 1.0; m[0, 0, 5:, 5:] = 1.0
        >>> energy_concentration(m, torch.tensor([[0.0, 0.0, 5.0, 5.0]]))  # half the energy on a quarter
        tensor([2.])
    """
    maps = as_maps(maps)
    boxes = _as_boxes(boxes, maps.shape[0]).to(maps.device)
    masks = box_masks(boxes, maps.shape[-2:])
    share = masks.float().mean(dim=(1, 2))
    energy = _positive_share(maps, masks)
    return torch.where(share > 0, energy / share.clamp(min=1e-12), torch.full_like(energy, float("nan")))


def rank_accuracy(maps: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """Arras et al. (2022) relevance rank accuracy: the share of the ``K`` highest-ranked pixels inside the box.

    ``K`` is the number of pixels of the box. 1 means the box's pixels are exactly the map's top ``K``; a random
    map scores the box's area share on average. Ties at the ``K``-th value are broken by pixel order.

    Args:
        maps: :math:`(N, 1, H, W)` maps (ranked by value; pass ``abs`` for magnitude).
        boxes: :math:`(N, 4)` ``xyxy`` boxes.

    Returns:
        :math:`(N,)` in ``[0, 1]``; ``nan`` for an empty box or a constant map (no ranking).

    Example:
        >>> m = torch.zeros(1, 1, 4, 4); m[0, 0, 0, :3] = 1.0
        >>> rank_accuracy(m, torch.tensor([[0.0, 0.0, 2.0, 2.0]]))  # top 4 = 3 ones + first zero; 2 in the box
        tensor([0.5000])
    """
    maps = as_maps(maps)
    n = maps.shape[0]
    boxes = _as_boxes(boxes, n).to(maps.device)
    masks = box_masks(boxes, maps.shape[-2:]).reshape(n, -1)
    flat = maps.reshape(n, -1)
    order = flat.argsort(dim=1, descending=True, stable=True)
    k = masks.sum(dim=1)
    top = torch.arange(flat.shape[1], device=flat.device)[None] < k[:, None]  # (N, HW) in rank order
    hits = (masks.gather(1, order) & top).sum(dim=1).float()
    out = hits / k.clamp(min=1).float()
    constant = flat.amax(dim=1) <= flat.amin(dim=1)
    return torch.where((k > 0) & ~constant, out, torch.full_like(out, float("nan")))


def off_object_energy(maps: torch.Tensor, gt_boxes: Sequence[torch.Tensor]) -> torch.Tensor:
    """Share of each map's positive attribution outside *all* ground-truth boxes of its image.

    Args:
        maps: :math:`(N, 1, H, W)` maps.
        gt_boxes: per map, the image's :math:`(M_i, 4)` ground-truth boxes.

    Returns:
        :math:`(N,)` in ``[0, 1]``; 0 for a map without positive values.
    """
    maps = as_maps(maps)
    if len(gt_boxes) != maps.shape[0]:
        raise ShapeError("gt_boxes", (len(gt_boxes),), [maps.shape[0]])
    union = torch.stack([box_masks(_as_boxes(b).to(maps.device), maps.shape[-2:]).any(dim=0) for b in gt_boxes])
    return _positive_share(maps, ~union)
