"""All checks of one probe set in one call: what :class:`~xaiwatch.callbacks.SaliencyGate` runs each epoch."""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch

from xaiwatch.checks import localization, perturbation, randomization, similarity
from xaiwatch.checks.counterfactual import flip_rate
from xaiwatch.checks.rule import value_key
from xaiwatch.core.context import explaining

__all__ = ["CheckOptions", "evaluate_checks"]


@dataclass
class CheckOptions:
    """Settings of the checks (the defaults are those the gate's default thresholds were chosen with).

    Args:
        tolerance: pointing-game tolerance in pixels.
        steps: deletion / insertion steps.
        fill: what replaces the context in ``context_reliance`` (see :func:`~xaiwatch.checks.fill_image`).
        relative: ``context_reliance`` as a share of the original score.
        min_score: probes whose tracked object scores below this do not count in ``context_reliance``.
        noise: input noise of ``stability``.
        seed: seed of the noise and of the randomised weights.
        stages: randomisation stages (default: the adapter's ``randomization_stages()``, all of them).
        batch_size: probes explained per pass.
    """

    tolerance: float = 15.0
    steps: int = 16
    fill: str | float = "grey"
    relative: bool = False
    min_score: float = 0.05
    noise: float = 0.02
    seed: int = 0
    stages: list | None = field(default=None)
    batch_size: int = 8


def _maps(engine, images: torch.Tensor, targets: Sequence, batch_size: int) -> torch.Tensor:
    """One map per probe (probe ``i`` explains ``targets[i]``), ``batch_size`` probes per pass.

    Probes are independent images explained in eval mode, so a batch gives each probe's own map (tested equal to
    one probe at a time) in about half the time on a CPU.
    """
    size = max(1, int(batch_size))
    return torch.cat(
        [engine.attribute(images[i : i + size], list(targets[i : i + size])) for i in range(0, len(targets), size)]
    )


def _mean(values: torch.Tensor) -> float:
    values = values.float()
    return float(values.nanmean()) if values.numel() and not bool(values.isnan().all()) else math.nan


def evaluate_checks(
    adapter,
    engines: Mapping[str, object],
    images: torch.Tensor,
    targets: Sequence,
    boxes: torch.Tensor,
    gt_boxes: Sequence[torch.Tensor],
    checks: set[str],
    options: CheckOptions | None = None,
    counterfactuals: torch.Tensor | None = None,
) -> tuple[dict[str, float], dict[str, torch.Tensor]]:
    """Run ``checks`` on ``N`` probes with one tracked object each.

    Args:
        adapter: the model adapter.
        engines: method name to engine (map checks run for each).
        images: :math:`(N, 3, H, W)` probe images.
        targets: ``N`` targets (one tracked object per probe).
        boxes: :math:`(N, 4)` boxes of the tracked objects.
        gt_boxes: per probe, all its ground-truth boxes (``off_object_energy``, ``counterfactual_flip``).
        checks: names of the checks to run (see :data:`~xaiwatch.checks.rule.CHECKS`).
        options: settings.
        counterfactuals: :math:`(N, 3, H, W)` the probes with a suspected cue changed (``counterfactual_flip``).

    Returns:
        ``(values, maps)``: the mean over probes of each check (keys ``check/method`` or ``check``; ``nan`` when no
        probe could be measured) and each method's :math:`(N, 1, H, W)` maps.
    """
    o = options or CheckOptions()
    maps = {m: _maps(e, images, targets, o.batch_size) for m, e in engines.items()}
    values: dict[str, float] = {}
    for method, engine in engines.items():
        values.update(_map_checks(adapter, engine, method, maps[method], images, targets, boxes, gt_boxes, checks, o))
    if "context_reliance" in checks:
        with explaining(adapter.model, seed=o.seed):
            drop = perturbation.context_reliance(
                functools.partial(adapter.score, targets=list(targets)),
                images,
                boxes,
                fill=o.fill,
                relative=o.relative,
                min_score=o.min_score,
            )
        values["context_reliance"] = _mean(drop)
    if "counterfactual_flip" in checks and counterfactuals is not None:
        with explaining(adapter.model, seed=o.seed):
            values["counterfactual_flip"] = flip_rate(adapter, images, counterfactuals, gt_boxes)
    return values, maps


def _map_checks(adapter, engine, method, m, images, targets, boxes, gt_boxes, checks, o) -> dict[str, float]:
    """The checks of one method's maps ``m`` :math:`(N, 1, H, W)`."""
    key = functools.partial(value_key, method=method)
    values = {}
    if "pointing_game" in checks:
        values[key("pointing_game")] = _mean(localization.pointing_game(m, boxes, o.tolerance))
    if "energy_in_box" in checks:
        values[key("energy_in_box")] = _mean(localization.energy_in_box(m, boxes))
    if "off_object_energy" in checks:
        values[key("off_object_energy")] = _mean(localization.off_object_energy(m, gt_boxes))
    for mode in ("deletion", "insertion"):
        if f"{mode}_auc" in checks:
            with explaining(adapter.model, seed=o.seed):
                aucs = [
                    perturbation.deletion_insertion(
                        functools.partial(adapter.score, targets=t), images[i], m[i], mode=mode, steps=o.steps
                    )[0]
                    for i, t in enumerate(targets)
                ]
            values[key(f"{mode}_auc")] = _mean(torch.stack(aucs))
    if "stability" in checks:
        values[key("stability")] = _mean(
            perturbation.stability(lambda x: engine.attribute(x, list(targets)), images, o.noise, o.seed)
        )
    wanted = [c for c in ("randomization_ssim", "randomization_spearman") if c in checks]
    if wanted:
        values.update(_randomization(adapter, engine, method, m, images, targets, wanted, o))
    return values


def _randomization(adapter, engine, method, m, images, targets, wanted, o) -> dict[str, float]:
    """Similarity of ``m`` with the maps of the fully randomised cascade (one value per similarity)."""
    from xaiwatch.explain import get_engine

    def map_fn(model) -> torch.Tensor:
        if model is adapter.model:
            return m
        twin = get_engine(method, adapter.with_model(model), layer=engine.layer_name, seed=engine.seed)
        return _maps(twin, images, targets, o.batch_size)

    stages = o.stages or adapter.randomization_stages()
    *_, (_, randomized) = randomization.cascading_randomization(adapter.model, stages, seed=o.seed)
    other = map_fn(randomized)  # maps of the fully randomised copy, shared by both similarities
    return {value_key(c, method): _mean(getattr(similarity, c.split("_", 1)[1])(m, other)) for c in wanted}
