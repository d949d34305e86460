"""The gate's decision rule: thresholds on check values, validated when the gate is built."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from xaiwatch.core.errors import ConfigurationError

__all__ = ["CHECKS", "MODEL_CHECKS", "RANGES", "Rule", "parse_rules", "decide", "value_key", "format_value"]

#: Checks of a map, computed for every method: name -> ("min" | "max": which side of the threshold passes).
MAP_CHECKS: dict[str, str] = {
    "pointing_game": "min",
    "energy_in_box": "min",
    "energy_concentration": "min",
    "rank_accuracy": "min",
    "off_object_energy": "max",
    "deletion_auc": "max",
    "insertion_auc": "min",
    "randomization_ssim": "max",
    "randomization_spearman": "max",
    "stability": "min",
}
#: Checks of the model itself (no map): name -> direction.
MODEL_CHECKS: dict[str, str] = {
    "context_reliance": "max",
    "relative_context_reliance": "max",
    "context_swap": "max",
    "context_swap_drop": "max",
    "swap_class_drop": "max",
    "counterfactual_flip": "max",
}
#: Threshold ranges other than ``[0, 1]``: ``energy_concentration`` is a ratio to a uniform map (1 = uniform).
RANGES: dict[str, tuple[float, float]] = {
    "randomization_spearman": (-1.0, 1.0),
    "energy_concentration": (0.0, math.inf),
}
#: Every check the gate knows.
CHECKS: dict[str, str] = {**MAP_CHECKS, **MODEL_CHECKS}


def format_value(value: float, threshold: float | None = None, direction: str = "min") -> str:
    """``value`` with enough digits that the printed number passes ``threshold`` exactly when ``value`` does.

    Three decimals by default; more when rounding would move the value across the threshold (``0.4497`` against
    ``>= 0.45`` prints ``0.4497``, not ``0.450``).

    Example:
        >>> format_value(0.4497, 0.45, "min"), format_value(0.4497, 0.2, "min"), format_value(float("nan"))
        ('0.4497', '0.450', 'n/a')
    """
    if value is None or math.isnan(value):
        return "n/a"
    if math.isinf(value):
        return str(value)
    for digits in range(3, 13):
        text = f"{value:.{digits}f}"
        if threshold is None:
            return text
        if _passes(float(text), threshold, direction) == _passes(value, threshold, direction):
            return text
    return repr(float(value))


def _passes(value: float, threshold: float, direction: str) -> bool:
    return value >= threshold if direction == "min" else value <= threshold


def value_key(check: str, method: str | None = None) -> str:
    """The name of a check value: ``energy_in_box/saliency`` for map checks, ``context_reliance`` for model checks."""
    return check if check in MODEL_CHECKS or method is None else f"{check}/{method}"


@dataclass(frozen=True)
class Rule:
    """One threshold: the value ``key`` must be ``>= threshold`` (``direction="min"``) or ``<=`` it (``"max"``)."""

    key: str
    check: str
    threshold: float
    direction: str

    def passes(self, value: float) -> bool:
        """Whether ``value`` passes (``nan``, i.e. nothing to measure, never does)."""
        if value is None or math.isnan(value):
            return False
        return value >= self.threshold if self.direction == "min" else value <= self.threshold

    def describe(self, value: float | None) -> str:
        """``key = value (needs >= threshold)``, with enough digits that a failing value never prints as passing."""
        sign = ">=" if self.direction == "min" else "<="
        shown = format_value(math.nan if value is None else float(value), self.threshold, self.direction)
        return f"{self.key} = {shown} (needs {sign} {self.threshold:g})"


def parse_rules(checks: Mapping[str, float | None], methods: Sequence[str]) -> tuple[list[Rule], set[str]]:
    """Validate the gate's ``checks`` and turn them into rules.

    Args:
        checks: check name (or ``check/method`` for one method) to a threshold in ``[0, 1]`` (``[-1, 1]`` for the
            Spearman randomization check), or ``None`` to compute and log the check without gating on it.
        methods: the explanation methods of the gate (a map check applies to each).

    Returns:
        ``(rules, checks to compute)``.

    Raises:
        ConfigurationError: for an unknown check or method, a threshold outside its range, or a map check
            without a method.
    """
    if not isinstance(checks, Mapping) or not checks:
        raise ConfigurationError(
            f"`checks` must be a non-empty mapping of check name to threshold (or None to only log), e.g. "
            f"{{'energy_in_box': 0.25, 'context_reliance': 0.3}}; known checks: {sorted(CHECKS)}."
        )
    rules, needed = [], set()
    for key, threshold in checks.items():
        check, _, method = str(key).partition("/")
        if check not in CHECKS:
            raise ConfigurationError(f"Unknown check {check!r} in `checks`. Known checks: {sorted(CHECKS)}.")
        if method and check in MODEL_CHECKS:
            raise ConfigurationError(f"{check!r} is a check of the model, not of a method's map: use {check!r}.")
        if method and method not in methods:
            raise ConfigurationError(f"`checks` names method {method!r} which is not in `methods` ({list(methods)}).")
        if check in MAP_CHECKS and not methods:
            raise ConfigurationError(f"{check!r} checks explanation maps: give at least one method in `methods`.")
        needed.add(check)
        if threshold is None:
            continue
        low, high = RANGES.get(check, (0.0, 1.0))
        number = isinstance(threshold, (int, float)) and not isinstance(threshold, bool)
        if not number or not math.isfinite(threshold) or not low <= threshold <= high:
            raise ConfigurationError(
                f"The threshold of {key!r} must be a finite number in [{low:g}, {high:g}], got {threshold!r}."
            )
        targets = [method] if method else (methods if check in MAP_CHECKS else [None])
        rules += [Rule(value_key(check, m), check, float(threshold), CHECKS[check]) for m in targets]
    return rules, needed


def decide(values: Mapping[str, float], rules: Sequence[Rule]) -> tuple[bool, list[str]]:
    """Apply ``rules`` to measured ``values``: ``(passed, one line per failed rule)``."""
    failed = [r.describe(values.get(r.key)) for r in rules if not r.passes(values.get(r.key, float("nan")))]
    return not failed, failed
