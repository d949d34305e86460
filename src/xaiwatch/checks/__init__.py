"""Saliency checks: plain functions over maps, boxes and models (no Lightning), and the gate's decision rule.

Each check answers one question about an explanation or about the model it explains:

- :func:`pointing_game`, :func:`energy_in_box`, :func:`off_object_energy` — does the map point at the object?
- :func:`deletion_insertion` — does the box's score follow the map's ranking of pixels?
- :func:`randomization_similarity` — does the map change when the model's weights are randomised?
- :func:`stability` — does the map survive small input noise?
- :func:`energy_concentration`, :func:`rank_accuracy` — the same, scale-free (1 / the area share = a uniform map)?
- :func:`context_reliance` — does the box's score survive the removal of everything around it?
- :func:`instance_specificity` — does a box's map light its own object rather than the other objects?
- :func:`context_swap` — does the object keep its class on other images' context, blurred or grey surroundings?
- :func:`flip_rate` — does the predicted class change when only a suspected cue changes?

:func:`judge` turns per-probe values into a :class:`Verdict` (pass / fail / inconclusive, with probe counts and
bootstrap intervals).
"""

from __future__ import annotations

from xaiwatch.checks.context import CONTEXT_FILLS, ContextSwap, check_context_source, context_donors, context_swap
from xaiwatch.checks.counterfactual import flip_rate, image_flips, object_classes, object_scores
from xaiwatch.checks.evaluate import CheckOptions, evaluate_checks, evaluate_probes
from xaiwatch.checks.localization import (
    box_masks,
    energy_concentration,
    energy_in_box,
    off_object_energy,
    pointing_game,
    rank_accuracy,
)
from xaiwatch.checks.perturbation import FILLS, context_reliance, deletion_insertion, fill_image, stability
from xaiwatch.checks.randomization import cascading_randomization, randomization_similarity, randomize
from xaiwatch.checks.rule import CHECKS, Rule, decide, format_value, parse_rules
from xaiwatch.checks.similarity import normalize_magnitude, spearman, ssim
from xaiwatch.checks.specificity import instance_specificity, specificity_baseline
from xaiwatch.checks.verdict import CheckResult, Verdict, bootstrap_ci, judge

__all__ = [
    "CHECKS",
    "CONTEXT_FILLS",
    "CheckResult",
    "ContextSwap",
    "Verdict",
    "bootstrap_ci",
    "check_context_source",
    "context_donors",
    "context_swap",
    "energy_concentration",
    "evaluate_probes",
    "format_value",
    "image_flips",
    "judge",
    "object_scores",
    "rank_accuracy",
    "CheckOptions",
    "FILLS",
    "Rule",
    "decide",
    "evaluate_checks",
    "parse_rules",
    "box_masks",
    "cascading_randomization",
    "context_reliance",
    "deletion_insertion",
    "energy_in_box",
    "fill_image",
    "instance_specificity",
    "flip_rate",
    "normalize_magnitude",
    "object_classes",
    "off_object_energy",
    "pointing_game",
    "randomization_similarity",
    "randomize",
    "spearman",
    "specificity_baseline",
    "ssim",
    "stability",
]
