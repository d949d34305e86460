"""``box_decision``: the per-box decision view (crop, its saliency, class-score bars, margin to the runner-up)."""

from __future__ import annotations

from xaiwatch.explain.base import register
from xaiwatch.explain.gradients import SaliencyEngine

__all__ = ["BoxDecisionEngine"]


@register
class BoxDecisionEngine(SaliencyEngine):
    """Input-gradient saliency of one box, drawn by callbacks as a decision panel.

    The map is :class:`SaliencyEngine`'s; ``kind = "panel"`` tells a callback to draw it with
    :func:`xaiwatch.render.panels.box_decision_panel`: the box crop, the map over the crop, the candidate's
    class scores as bars and the margin between the predicted class and the runner-up — how close the
    decision is to flipping.
    """

    name = "box_decision"
    kind = "panel"
