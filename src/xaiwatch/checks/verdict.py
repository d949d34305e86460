"""The gate's verdict: per-check results over the probes where the check is defined, with bootstrap intervals.

A check is measured per probe (``nan`` where it is not defined: the tracked object is not detected, or its score
is below the floor). :func:`judge` turns those values into a :class:`Verdict`: each gated check is decided on its
defined probes, carries its probe count and a bootstrap confidence interval, and is

- ``"pass"`` when the mean over the defined probes is on the threshold's passing side;
- ``"fail"`` when the mean is over the threshold *significantly*: the one-sided bootstrap bound at ``level`` (for a
  check that must stay below its threshold, the lower bound) is over it too (``significant=False``: the mean alone);
- ``"inconclusive"`` when fewer than ``min_defined`` probes are defined, or when the mean is over the threshold but
  the bound is not (the probes disagree too much to tell a failing model from noise: on real photos a clean
  detector's per-probe context drops spread over -0.8 .. 0.7, see docs/gate.md).

The verdict fails when any gated check fails, is inconclusive when none fails but one is inconclusive, and passes
otherwise. A gated check may be *confirmed by* another (``confirm={"relative_context_reliance": "swap_class_drop"}``):
it then fails only when its confirming check fails too, and is inconclusive when it would fail alone; the
confirming check never decides the verdict by itself (its result is shown with ``confirms`` set).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field

import torch

from xaiwatch.checks.rule import CHECKS, Rule, format_value
from xaiwatch.core.errors import ConfigurationError

__all__ = [
    "CheckResult",
    "Verdict",
    "INCONCLUSIVE",
    "STATUSES",
    "bootstrap_ci",
    "format_value",
    "judge",
    "one_sided_bound",
]

#: The states of a check and of a verdict (``"logged"``: a check without threshold).
STATUSES = ("pass", "fail", "inconclusive", "logged")
#: What a checkpoint gate does with an inconclusive verdict: save silently, save and warn, or refuse.
INCONCLUSIVE = ("pass", "warn", "refuse")


def bootstrap_ci(
    values: torch.Tensor | Sequence[float], level: float = 0.9, resamples: int = 1000, seed: int = 0
) -> tuple[float, float]:
    """Percentile bootstrap confidence interval of the mean of ``values`` (``nan`` entries are dropped).

    Args:
        values: per-probe values.
        level: coverage of the interval, in ``(0, 1)``.
        resamples: bootstrap resamples.
        seed: seed of a local generator (global RNGs are untouched).

    Returns:
        ``(low, high)``; ``(nan, nan)`` without values, ``(v, v)`` for one value.

    Example:
        >>> bootstrap_ci([0.5, 0.5, 0.5])
        (0.5, 0.5)
    """
    if not 0.0 < float(level) < 1.0:
        raise ConfigurationError(f"`level` must be in (0, 1), got {level!r}.")
    v = torch.as_tensor(values, dtype=torch.float64).flatten()
    v = v[~v.isnan()]
    if not v.numel():
        return math.nan, math.nan
    gen = torch.Generator().manual_seed(int(seed))
    idx = torch.randint(0, v.numel(), (int(resamples), v.numel()), generator=gen)
    means = v[idx].mean(dim=1)
    alpha = (1.0 - float(level)) / 2
    low, high = torch.quantile(means, torch.tensor([alpha, 1.0 - alpha], dtype=torch.float64)).tolist()
    return float(low), float(high)


@dataclass
class CheckResult:
    """One check's result at one evaluation.

    Attributes:
        key: the value's name (``energy_concentration/saliency``, ``context_swap``).
        value: mean over defined probes (``nan`` when none).
        defined: number of probes where the check is defined.
        total: number of probes (``None`` for a value given already averaged).
        ci: bootstrap confidence interval of ``value`` over the defined probes.
        threshold: the gate's threshold (``None`` for a logged check).
        direction: ``"min"`` (value must be >= threshold) or ``"max"``.
        status: ``"pass"``, ``"fail"``, ``"inconclusive"`` or ``"logged"``.
        bound: the one-sided bootstrap bound a failing mean was tested with (``nan`` otherwise).
        note: why an inconclusive check could not be decided.
        confirms: the gated check this one confirms (``""``: it decides the verdict itself).
    """

    key: str
    value: float
    defined: int
    total: int | None
    ci: tuple[float, float] = (math.nan, math.nan)
    threshold: float | None = None
    direction: str = "min"
    status: str = "logged"
    bound: float = math.nan
    note: str = ""
    confirms: str = ""

    def describe(self) -> str:
        """``key = value [ci] on d/n probes (needs >= t)``: failing values never print as passing."""
        value = format_value(self.value, self.threshold, self.direction)
        if self.defined > 1 and not math.isnan(self.ci[0]):
            value += f" [{self.ci[0]:.3f}, {self.ci[1]:.3f}]"
        text = f"{self.key} = {value}"
        if self.total is not None:
            text += f" on {self.defined}/{self.total} probes"
        if self.threshold is not None:
            text += f" (needs {'>=' if self.direction == 'min' else '<='} {self.threshold:g})"
        if self.status == "inconclusive" and self.note:
            text += f" - {self.note}"
        if self.confirms:
            text += f" [confirms {self.confirms}]"
        return text


@dataclass
class Verdict:
    """The gate's decision at one evaluation.

    Attributes:
        status: ``"pass"``, ``"fail"`` or ``"inconclusive"``.
        results: every check's :class:`CheckResult` (gated and logged).
        error: the error text when the checks themselves failed (the verdict then fails).
    """

    status: str
    results: list[CheckResult] = field(default_factory=list)
    error: str | None = None

    @property
    def passed(self) -> bool:
        """Whether the status is ``"pass"``."""
        return self.status == "pass"

    @property
    def values(self) -> dict[str, float]:
        """Check key to value."""
        return {r.key: r.value for r in self.results}

    @property
    def reasons(self) -> list[str]:
        """One line per failing or inconclusive gated check (the error first, if any; confirming checks are not
        reasons of their own)."""
        lines = [self.error] if self.error else []
        return lines + [r.describe() for r in self.results if r.status in ("fail", "inconclusive") and not r.confirms]

    def lines(self) -> list[str]:
        """One line per check, passing or not, led by its status (``fail: energy_concentration/saliency = ...``)."""
        return ([self.error] if self.error else []) + [f"{r.status}: {r.describe()}" for r in self.results]

    def to_dict(self) -> dict:
        """A picklable, JSON-serialisable form (for ``state_dict`` and reports)."""
        return {"status": self.status, "error": self.error, "results": [asdict(r) for r in self.results]}


def one_sided_bound(values: torch.Tensor | Sequence[float], direction: str, level: float = 0.9, seed: int = 0) -> float:
    """The one-sided bootstrap bound at ``level`` of the mean on its passing side: the lower bound for a check that
    must stay below its threshold (``direction="max"``), the upper one otherwise. A failing mean whose bound is
    beyond the threshold too fails significantly (:func:`judge`).

    Example:
        >>> one_sided_bound([0.5, 0.5, 0.5], "max")
        0.5
    """
    low, high = bootstrap_ci(values, 2 * float(level) - 1, seed=seed)  # a two-sided interval's one side
    return low if direction == "max" else high


def _as_probe_values(value) -> tuple[torch.Tensor, bool]:
    """Per-probe values as a float64 vector, and whether they are per probe (a float is an already-made mean)."""
    if isinstance(value, torch.Tensor) and value.dim() >= 1:
        return value.detach().double().flatten().cpu(), True
    if isinstance(value, (list, tuple)):
        return torch.as_tensor(value, dtype=torch.float64).flatten(), True
    return torch.tensor([float(value)], dtype=torch.float64), False


def judge(
    values: Mapping[str, object],
    rules: Sequence[Rule],
    min_defined: int = 4,
    level: float = 0.9,
    seed: int = 0,
    significant: bool = True,
    confirm: Mapping[str, str] | None = None,
) -> Verdict:
    """Decide the gate from per-probe check values.

    Args:
        values: check key to per-probe values (a tensor / list, ``nan`` where undefined) or to a single number
            (an already-aggregated value: counted as one defined probe unless ``nan``, never inconclusive by count).
        rules: the gate's thresholds (:func:`~xaiwatch.checks.parse_rules`).
        min_defined: fewer defined probes than this makes a gated check ``"inconclusive"``.
        level: confidence level of the bootstrap intervals (two-sided, as logged) and of the one-sided bound a
            failing mean is tested with.
        seed: seed of the bootstrap.
        significant: a check fails only when its one-sided bound is over the threshold too (``False``: the mean).
        confirm: gated check key to the gated check key that must fail too before it fails (the confirming check
            does not decide the verdict by itself); a check that fails while its confirmation does not is
            ``"inconclusive"``.

    Returns:
        the :class:`Verdict` (results in the order of ``values``, then rules whose key is missing).

    Example:
        >>> from xaiwatch.checks import parse_rules
        >>> rules, _ = parse_rules({"context_swap": 0.3}, [])
        >>> judge({"context_swap": [0.0, 0.1, float("nan"), 0.0]}, rules, min_defined=3).status
        'pass'
        >>> judge({"context_swap": [0.0, float("nan"), float("nan"), 0.0]}, rules, min_defined=3).status
        'inconclusive'
        >>> noisy = [0.9, -0.8, 0.7, -0.6, 0.5]  # mean 0.14: over 0.1, but not significantly
        >>> rules, _ = parse_rules({"context_swap": 0.1}, [])
        >>> judge({"context_swap": noisy}, rules, min_defined=3).status, judge({"context_swap": [0.5] * 5}, rules).status
        ('inconclusive', 'fail')
        >>> rules, _ = parse_rules({"relative_context_reliance": 0.05, "swap_class_drop": 0.05}, [])
        >>> lost = {"relative_context_reliance": [0.5] * 5}  # the score is lost without context ...
        >>> judge({**lost, "swap_class_drop": [0.0] * 5}, rules, confirm={"relative_context_reliance": "swap_class_drop"}).status
        'inconclusive'
        >>> judge({**lost, "swap_class_drop": [0.3] * 5}, rules, confirm={"relative_context_reliance": "swap_class_drop"}).status
        'fail'
    """
    by_key = {r.key: r for r in rules}
    results = []
    for key in list(values) + [k for k in by_key if k not in values]:
        raw = values.get(key, math.nan)
        v, per_probe = _as_probe_values(raw)
        ok = v[~v.isnan()]
        defined, total = int(ok.numel()), (int(v.numel()) if per_probe else None)
        mean = float(ok.mean()) if defined else math.nan
        ci = bootstrap_ci(ok, level, seed=seed) if per_probe and defined else (math.nan, math.nan)
        rule = by_key.get(key)
        bound, note = math.nan, ""
        if rule is None:
            status = "logged"
        elif defined == 0 or (per_probe and defined < int(min_defined)):
            status, note = "inconclusive", "too few probes where the tracked object is detected"
        elif rule.passes(mean):
            status = "pass"
        elif significant and per_probe and defined > 1:
            bound = one_sided_bound(ok, rule.direction, level, seed)
            status = "inconclusive" if rule.passes(bound) else "fail"
            if status == "inconclusive":
                note = f"over the threshold, but not significantly (one-sided {level:.0%} bound {bound:.3f})"
        else:
            status = "fail"
        results.append(
            CheckResult(
                key,
                mean,
                defined,
                total,
                ci,
                None if rule is None else rule.threshold,
                _direction(rule, key),
                status,
                bound,
                note,
            )
        )
    confirm = dict(confirm or {})
    unknown = [k for k in (*confirm, *confirm.values()) if k not in by_key]
    if unknown:
        raise ConfigurationError(
            f"`confirm` names {unknown}, which are not gated checks (gated: {sorted(by_key)}); give both checks of "
            "each pair a threshold in `checks`."
        )
    found = {r.key: r for r in results}
    for key, other in confirm.items():
        main, check = found[key], found[other]
        check.confirms = key
        if main.status == "fail" and check.status != "fail":
            main.status = "inconclusive"
            main.note = (
                f"over the threshold, but not confirmed by {other} ({check.status}: {format_value(check.value)})"
            )
    statuses = {r.status for r in results if not r.confirms}
    status = "fail" if "fail" in statuses else "inconclusive" if "inconclusive" in statuses else "pass"
    return Verdict(status, results)


def _direction(rule: Rule | None, key: str) -> str:
    """The direction of ``key``: its rule's, else the check's own."""
    if rule is not None:
        return rule.direction
    return CHECKS.get(key.split("/", 1)[0], "min")
