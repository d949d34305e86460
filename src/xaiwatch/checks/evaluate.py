"""All checks of one probe set in one call: what :class:`~xaiwatch.callbacks.SaliencyGate` runs each epoch."""

from __future__ import annotations

import functools
import math
import numbers
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import torch

from xaiwatch.checks import localization, perturbation, randomization, similarity
from xaiwatch.checks.context import class_shares, context_swap
from xaiwatch.checks.counterfactual import image_flips, object_scores
from xaiwatch.checks.rule import value_key
from xaiwatch.core.context import explaining
from xaiwatch.core.errors import ConfigurationError

__all__ = ["CheckOptions", "evaluate_checks", "evaluate_probes"]


@dataclass
class CheckOptions:
    """Settings of the checks.

    Args:
        tolerance: pointing-game tolerance in pixels.
        steps: deletion / insertion steps.
        fill: what replaces the context in ``context_reliance`` (see :func:`~xaiwatch.checks.fill_image`).
        relative: ``context_reliance`` as a share of the original score (``relative_context_reliance`` always is).
        min_score: the score floor: a probe whose tracked object scores below it for its class is not *defined*
            (its checks are ``nan`` and it does not count). ``None``: the adapter's detection threshold ``conf``.
        noise: input noise of ``stability``.
        seed: seed of the noise and of the randomised weights.
        stages: randomisation stages (default: the adapter's ``randomization_stages()``, all of them).
        batch_size: probes explained per pass.
        fills: the surroundings of ``context_swap`` (see :data:`~xaiwatch.checks.context.CONTEXT_FILLS`; other
            probes' contexts by default: on the calibration families blur never flipped a shortcut model's class).
        donors: other probes' contexts per probe in ``context_swap``.
        context_margin: ``context_swap`` / ``relative_context_reliance`` keep the box grown by this share of its
            shorter side (see :func:`~xaiwatch.checks.context_swap`). 0.25: on the calibration families a tight box
            refused a clean model whose objects always carry a frame (docs/gate.md).
    """

    tolerance: float = 15.0
    steps: int = 16
    fill: str | float = "grey"
    relative: bool = False
    min_score: float | None = None
    noise: float = 0.02
    seed: int = 0
    stages: list | None = field(default=None)
    batch_size: int = 8
    fills: tuple[str, ...] = ("swap",)
    donors: int = 2
    context_margin: float = 0.25


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
    values = torch.as_tensor(values).float()
    return float(values.nanmean()) if values.numel() and not bool(values.isnan().all()) else math.nan


def _floor(adapter, options: CheckOptions) -> float:
    return float(getattr(adapter, "conf", 0.25) if options.min_score is None else options.min_score)


def _labels(targets: Sequence, labels) -> torch.Tensor:
    if labels is not None:
        return torch.as_tensor(labels).reshape(-1).long()
    return torch.tensor([int(t.label) for t in targets], dtype=torch.long)


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
    labels: torch.Tensor | None = None,
    gt_labels: Sequence[torch.Tensor] | None = None,
) -> tuple[dict[str, float], dict[str, torch.Tensor]]:
    """Run ``checks`` on ``N`` probes with one tracked object each: the mean over defined probes of each check.

    See :func:`evaluate_probes` (same arguments); this averages its per-probe values.

    Returns:
        ``(values, maps)``: the mean over defined probes of each check (keys ``check/method`` or ``check``;
        ``nan`` when no probe is defined) and each method's :math:`(N, 1, H, W)` maps.
    """
    per_probe, maps = evaluate_probes(
        adapter, engines, images, targets, boxes, gt_boxes, checks, options, counterfactuals, labels, gt_labels
    )
    return {k: _mean(v) for k, v in per_probe.items()}, maps


def evaluate_probes(
    adapter,
    engines: Mapping[str, object],
    images: torch.Tensor,
    targets: Sequence,
    boxes: torch.Tensor,
    gt_boxes: Sequence[torch.Tensor],
    checks: set[str],
    options: CheckOptions | None = None,
    counterfactuals: torch.Tensor | None = None,
    labels: torch.Tensor | None = None,
    gt_labels: Sequence[torch.Tensor] | None = None,
    positions: Sequence[int] | None = None,
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Run ``checks`` on ``N`` probes with one tracked object each: one value per probe, ``nan`` where undefined.

    A probe is defined when its tracked object scores at least the floor (``options.min_score``, default the
    adapter's ``conf``) for its class on a candidate overlapping its box (IoU >= 0.5): a check on an object the
    model does not detect measures noise, not reliance. ``counterfactual_flip`` is defined per probe where an
    object is found in both images.

    Args:
        adapter: the model adapter.
        engines: method name to engine (map checks run for each).
        images: :math:`(N, 3, H, W)` probe images.
        targets: ``N`` targets (one tracked object per probe).
        boxes: :math:`(N, 4)` boxes of the tracked objects.
        gt_boxes: per probe, all its ground-truth boxes (``off_object_energy``, ``counterfactual_flip``, donors).
        checks: names of the checks to run (see :data:`~xaiwatch.checks.rule.CHECKS`).
        options: settings.
        counterfactuals: :math:`(N, 3, H, W)` the probes with a suspected cue changed (``counterfactual_flip``).
        labels: :math:`(N,)` classes of the tracked objects (default: each target's ``label``).
        gt_labels: per probe, the classes of ``gt_boxes`` (``context_swap`` prefers donors of other classes).
        positions: evaluate only these probes (a rank's share of the probe set, see
            :class:`~xaiwatch.callbacks.SaliencyGate`); the other arguments still describe all ``N`` probes. Every
            value is a probe's own: checks that mix probes see the whole set (``context_swap`` chooses donors among
            all ``N`` and pastes the object onto their images; ``stability`` draws the noise of all ``N``;
            randomisation re-initialises the same seeded copy of the model), so a probe's values do not depend on
            the share it is in: on the CPU here bit for bit (``tests/test_gate_shares.py``); a backend whose kernels
            round differently by batch size may differ in the last bits. Methods that draw noise per batch
            (``smoothgrad``, ``gradient_shap``) give each probe the draw of its slot in its batch, so their maps
            (already dependent on ``batch_size``) differ between shares. ``None``: all of them.

    Returns:
        ``(values, maps)``: :math:`(N,)` values per check key (``check/method`` or ``check``), and each method's
        :math:`(N, 1, H, W)` maps; with ``positions``, :math:`(M,)` values and :math:`(M, 1, H, W)` maps in the
        order of ``positions``.

    Raises:
        ConfigurationError: for ``positions`` that are not a non-empty list of distinct indices below ``N``.
    """
    o = options or CheckOptions()
    labels = _labels(targets, labels)
    floor = _floor(adapter, o)
    pool = _Pool.of(images, boxes, labels, gt_boxes, gt_labels, positions)  # every probe, for checks that mix them
    images, targets, boxes, labels, gt_boxes, gt_labels, counterfactuals = pool.share(targets, counterfactuals)
    with explaining(adapter.model, seed=o.seed), torch.no_grad():
        raw = adapter.raw(images.detach())
        score, cls = object_scores(raw, boxes, labels.to(images.device))
        share = class_shares(raw, boxes, labels.to(images.device))
    defined = score.cpu() >= floor
    nan = torch.tensor(float("nan"))
    maps = {m: _maps(e, images, targets, o.batch_size) for m, e in engines.items()}
    values: dict[str, torch.Tensor] = {}
    for method, engine in engines.items():
        found = _map_checks(adapter, engine, method, maps[method], images, targets, boxes, gt_boxes, checks, o, pool)
        values.update({k: torch.where(defined, v.float().cpu(), nan) for k, v in found.items()})
    shared = "relative_context_reliance" in checks and o.fill == "grey"  # the grey variant of context_swap
    for name, relative in (("context_reliance", o.relative), ("relative_context_reliance", True)):
        if name in checks and not (shared and name == "relative_context_reliance"):
            with explaining(adapter.model, seed=o.seed):
                drop = perturbation.context_reliance(
                    functools.partial(adapter.score, targets=list(targets)),
                    images,
                    boxes,
                    fill=o.fill,
                    relative=relative,
                    min_score=0.0,
                )
            values[name] = torch.where(defined, drop.float().cpu(), nan)
    swaps = {"context_swap", "context_swap_drop", "swap_class_drop"}
    if swaps & checks or shared:
        fills = tuple(o.fills) if swaps & checks else ()
        with explaining(adapter.model, seed=o.seed):
            swap = context_swap(
                adapter,
                pool.images,
                pool.boxes,
                pool.labels,
                pool.gt_boxes,
                pool.gt_labels,
                fills or ("grey",),
                o.donors,
                min_score=floor,
                extra_fills=("grey",) if shared else (),
                original=(score, cls, share),
                margin=o.context_margin,
                positions=pool.rows,
            )
        for name, v in (
            ("context_swap", swap.flip),
            ("context_swap_drop", swap.drop),
            ("swap_class_drop", swap.class_drop),
        ):
            if name in checks:
                values[name] = v
        if shared:
            values["relative_context_reliance"] = torch.where(defined, swap.by_fill["grey"][1], nan)
    if "counterfactual_flip" in checks and counterfactuals is not None:
        with explaining(adapter.model, seed=o.seed):
            values["counterfactual_flip"] = image_flips(adapter, images, counterfactuals, gt_boxes)
    return values, maps


def _map_checks(
    adapter, engine, method, m, images, targets, boxes, gt_boxes, checks, o, pool=None
) -> dict[str, torch.Tensor]:
    """The checks of one method's maps ``m`` :math:`(N, 1, H, W)`: one value per probe (of the share, see
    :class:`_Pool`)."""
    key = functools.partial(value_key, method=method)
    values = {}
    simple = {
        "pointing_game": lambda: localization.pointing_game(m, boxes, o.tolerance),
        "energy_in_box": lambda: localization.energy_in_box(m, boxes),
        "energy_concentration": lambda: localization.energy_concentration(m, boxes),
        "rank_accuracy": lambda: localization.rank_accuracy(m, boxes),
        "off_object_energy": lambda: localization.off_object_energy(m, gt_boxes),
    }
    for name, fn in simple.items():
        if name in checks:
            values[key(name)] = fn()
    for mode in ("deletion", "insertion"):
        if f"{mode}_auc" in checks:
            with explaining(adapter.model, seed=o.seed):
                aucs = [
                    perturbation.deletion_insertion(
                        functools.partial(adapter.score, targets=t), images[i], m[i], mode=mode, steps=o.steps
                    )[0]
                    for i, t in enumerate(targets)
                ]
            values[key(f"{mode}_auc")] = torch.stack(aucs)
    if "stability" in checks:
        if pool is None or pool.rows is None:
            values[key("stability")] = perturbation.stability(
                lambda x: engine.attribute(x, list(targets)), images, o.noise, o.seed
            )
        else:  # the noise of the whole probe set, so each probe's noise is the same in every share
            values[key("stability")] = perturbation.stability(
                pool.rows_only(lambda x: engine.attribute(x, list(targets))), pool.images, o.noise, o.seed
            )[pool.index(m.device).cpu()]
    wanted = [c for c in ("randomization_ssim", "randomization_spearman") if c in checks]
    if wanted:
        values.update(_randomization(adapter, engine, method, m, images, targets, wanted, o))
    return values


def _randomization(adapter, engine, method, m, images, targets, wanted, o) -> dict[str, torch.Tensor]:
    """Similarity of ``m`` with the maps of the fully randomised cascade (one value per similarity and probe)."""
    from xaiwatch.explain import get_engine

    def map_fn(model) -> torch.Tensor:
        if model is adapter.model:
            return m
        twin = get_engine(method, adapter.with_model(model), layer=engine.layer_name, seed=engine.seed)
        return _maps(twin, images, targets, o.batch_size)

    stages = o.stages or adapter.randomization_stages()
    *_, (_, randomized) = randomization.cascading_randomization(adapter.model, stages, seed=o.seed)
    other = map_fn(randomized)  # maps of the fully randomised copy, shared by both similarities
    return {value_key(c, method): getattr(similarity, c.split("_", 1)[1])(m, other) for c in wanted}


@dataclass
class _Pool:
    """The whole probe set, when only a share of it (``rows``: positions) is evaluated; ``rows=None``: all of it.

    Checks that mix probes read the pool; every other check runs on the share (:meth:`share`).
    """

    images: torch.Tensor
    boxes: torch.Tensor
    labels: torch.Tensor
    gt_boxes: Sequence[torch.Tensor]
    gt_labels: Sequence[torch.Tensor] | None
    rows: list[int] | None

    @classmethod
    def of(cls, images, boxes, labels, gt_boxes, gt_labels, positions) -> _Pool:
        n = images.shape[0]
        rows = None
        if positions is not None:
            given = list(positions) if isinstance(positions, Iterable) and not isinstance(positions, str) else None
            ints = given is not None and all(isinstance(p, numbers.Integral) and not isinstance(p, bool) for p in given)
            rows = [int(p) for p in given] if ints else None
            if not rows or len(set(rows)) != len(rows) or any(not 0 <= p < n for p in rows):
                raise ConfigurationError(
                    f"`positions` must be a non-empty list of distinct probe positions in [0, {n}) (a share of the "
                    f"{n} probes), got {positions!r}."
                )
            if rows == list(range(n)):
                rows = None  # every probe, in order: the plain path
        return cls(images, boxes, labels, gt_boxes, gt_labels, rows)

    def index(self, device) -> torch.Tensor:
        return torch.tensor(self.rows, dtype=torch.long, device=device)

    def share(self, targets: Sequence, counterfactuals: torch.Tensor | None) -> tuple:
        """``(images, targets, boxes, labels, gt_boxes, gt_labels, counterfactuals)`` of the share's probes."""
        rows = self.rows
        if rows is None:
            return self.images, targets, self.boxes, self.labels, self.gt_boxes, self.gt_labels, counterfactuals

        def take(x: torch.Tensor) -> torch.Tensor:
            return x[self.index(x.device)]

        return (
            take(self.images),
            [targets[p] for p in rows],
            take(torch.as_tensor(self.boxes)),
            take(self.labels),
            [self.gt_boxes[p] for p in rows],
            None if self.gt_labels is None else [self.gt_labels[p] for p in rows],
            None if counterfactuals is None else take(counterfactuals),
        )

    def rows_only(self, map_fn):
        """``map_fn`` of the share's images, run on pool-shaped images: zero maps for the other probes."""

        def run(x: torch.Tensor) -> torch.Tensor:
            own = map_fn(x[self.index(x.device)])
            out = own.new_zeros((x.shape[0], *own.shape[1:]))
            out[self.index(own.device)] = own
            return out

        return run
