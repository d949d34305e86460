"""Error analysis and decision boundaries, framework-free: detection matching (COCO's greedy rule), TIDE error
types, a confusion matrix with background, and gradient attacks finding how close a detection is to flipping."""

from __future__ import annotations

from xaiwatch.analysis.boundary import ATTACKS, AttackResult, BoundaryResult, attack_object, min_epsilon
from xaiwatch.analysis.errors import COUNT_TYPES, ErrorCounts
from xaiwatch.analysis.matching import ERROR_TYPES, ImageErrors, analyze_image, match_detections

__all__ = [
    "ATTACKS",
    "COUNT_TYPES",
    "ERROR_TYPES",
    "AttackResult",
    "BoundaryResult",
    "ErrorCounts",
    "ImageErrors",
    "analyze_image",
    "attack_object",
    "match_detections",
    "min_epsilon",
]
