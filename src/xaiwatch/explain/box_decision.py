"""``box_decision``: the per-box decision view (crop, its saliency, class-score bars, margin to the runner-up)."""

from __future__ import annotations

import torch

from xaiwatch.explain.base import register
from xaiwatch.explain.gradients import SaliencyEngine

__all__ = ["BoxDecisionEngine"]


@register
class BoxDecisionEngine(SaliencyEngine):
    """Input-gradient saliency of one box, drawn by callbacks as a decision panel.

    The map is :class:`SaliencyEngine`'s; its :class:`~xaiwatch.core.types.Explanation` also carries each box's
    per-class scores (``extras["class_scores"]``, :math:`(K, C)`, ``nan`` rows for a target that names no box),
    which :mod:`xaiwatch.render` draws with
    :func:`xaiwatch.render.panels.box_decision_panel`: the box crop, the map over the crop, the candidate's
    class scores as bars and the margin between the predicted class and the runner-up — how close the
    decision is to flipping.
    """

    name = "box_decision"
    needs_raw = True

    def _extras(self, image, targets, matches, raw) -> dict:
        rows = []
        for target, match in zip(targets, matches):
            resolved = (match.candidate, target.label) if match is not None else target.resolve(raw)
            rows.append(raw.scores[0, resolved[0]] if resolved else torch.full_like(raw.scores[0, 0], float("nan")))
        return {"class_scores": torch.stack(rows).detach() if rows else raw.scores.new_zeros(0, raw.num_classes)}
