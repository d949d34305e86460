"""Instance specificity: does a box's map light *that* object, or every object of the class?

Grad-CAM weights a feature map by the spatial mean of its gradient, so on a detector it answers "where is the
class", not "where is this box": the map of one person lights the other people too. This check measures it.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from xaiwatch.checks.localization import _as_boxes, as_maps, box_masks
from xaiwatch.core.errors import ShapeError

__all__ = ["instance_specificity", "specificity_baseline"]


def _regions(
    target: torch.Tensor, others: torch.Tensor, size: Sequence[int], device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    t = box_masks(target.reshape(1, 4).to(device), size)[0]
    o = box_masks(others.to(device), size).any(dim=0) if others.numel() else torch.zeros_like(t)
    return t & ~o, o & ~t  # pixels in both belong to neither (they cannot tell the objects apart)


def instance_specificity(
    maps: torch.Tensor, target_boxes: torch.Tensor, other_boxes: Sequence[torch.Tensor]
) -> torch.Tensor:
    """Share of a map's object energy that lies on its own box rather than on the other objects' boxes.

    For map ``i`` with positive part :math:`P = \\max(m_i, 0)`, target box :math:`T` and the union :math:`O` of the
    other objects' boxes of the same image (pixel masks as in :func:`~xaiwatch.checks.box_masks`)::

        specificity = P(T \\ O) / (P(T \\ O) + P(O \\ T))

    where :math:`P(R)` is the sum of :math:`P` over region :math:`R`. Pixels inside both the target and another
    box count for neither side: there the map cannot say which object it means. Background pixels (outside every
    box) do not count either; :func:`~xaiwatch.checks.energy_in_box` measures those. 1 means every bit of object
    energy is on the target, 0 that it is all on the others; a map spread evenly over the objects scores the
    area share :func:`specificity_baseline`. Only positive values count, as in ``energy_in_box``: pass ``abs`` of
    signed maps (Integrated Gradients, Input x Gradient) to measure magnitude.

    Args:
        maps: :math:`(N, 1, H, W)` maps, one per explained box.
        target_boxes: :math:`(N, 4)` ``xyxy`` pixel box each map explains.
        other_boxes: per map, the :math:`(M_i, 4)` boxes of the *other* objects of its image (the target's own box
            excluded; may be empty).

    Returns:
        :math:`(N,)` in ``[0, 1]``; ``nan`` where the image has no other object (specificity is undefined),
        0 where the map has no positive value on either region.

    Raises:
        ShapeError: if the numbers of maps, target boxes and ``other_boxes`` entries differ.

    Example:
        >>> m = torch.zeros(1, 1, 8, 8)
        >>> m[..., 0:4, 0:4] = 1.0            # all on the target
        >>> m[..., 4:8, 4:8] = 1.0 / 3         # a third as much on the other object
        >>> instance_specificity(m, torch.tensor([[0.0, 0, 4, 4]]), [torch.tensor([[4.0, 4, 8, 8]])])
        tensor([0.7500])
    """
    maps = as_maps(maps)
    n = maps.shape[0]
    targets = _as_boxes(target_boxes, n)
    if len(other_boxes) != n:
        raise ShapeError("other_boxes", (len(other_boxes),), [n])
    positive = maps.clamp(min=0)
    out = torch.empty(n, dtype=torch.float32, device=maps.device)
    for i in range(n):
        others = _as_boxes(other_boxes[i])
        if not others.numel():
            out[i] = float("nan")
            continue
        t, o = _regions(targets[i], others, maps.shape[-2:], maps.device)
        on_t, on_o = (positive[i] * t).sum(), (positive[i] * o).sum()
        total = on_t + on_o
        out[i] = on_t / total if total > 0 else total.new_zeros(())
    return out


def specificity_baseline(
    target_boxes: torch.Tensor, other_boxes: Sequence[torch.Tensor], size: Sequence[int]
) -> torch.Tensor:
    """:func:`instance_specificity` of a constant map: the target's share of the object area (the chance level).

    Args:
        target_boxes: :math:`(N, 4)` ``xyxy`` boxes.
        other_boxes: per box, the other objects' :math:`(M_i, 4)` boxes.
        size: ``(H, W)`` of the maps.

    Returns:
        :math:`(N,)`; ``nan`` where there is no other object.

    Example:
        >>> specificity_baseline(torch.tensor([[0.0, 0, 4, 4]]), [torch.tensor([[0.0, 0, 8, 4]])], (8, 8))
        tensor([0.])
    """
    targets = _as_boxes(target_boxes)
    ones = torch.ones(targets.shape[0], 1, int(size[0]), int(size[1]))
    return instance_specificity(ones, targets, other_boxes)
