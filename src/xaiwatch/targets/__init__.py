"""Differentiable scalar targets: which detection, which class, one score per image."""

from __future__ import annotations

from xaiwatch.targets.targets import BoxTarget, ClassTarget, Match, MatchedBoxTarget, Target

__all__ = ["Target", "ClassTarget", "BoxTarget", "MatchedBoxTarget", "Match"]
