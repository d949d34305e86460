"""Differentiable scalar targets: which detection, which class, one score per image."""

from __future__ import annotations

from xaiwatch.targets.targets import BoxTarget, ClassTarget, Match, MatchedBoxTarget, MissedTarget, Target

__all__ = ["Target", "ClassTarget", "BoxTarget", "MatchedBoxTarget", "MissedTarget", "Match"]
