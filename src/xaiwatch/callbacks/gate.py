"""``SaliencyGate`` and ``GatedModelCheckpoint``: refuse checkpoints of a model that looks in the wrong place."""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.utilities import rank_zero_info, rank_zero_warn
from typing_extensions import override

from xaiwatch.adapters import DetectorAdapter
from xaiwatch.callbacks.base import ProbeCallback, RunContext, ShareRecord, to_cpu
from xaiwatch.callbacks.probes import largest_objects, load_probes
from xaiwatch.callbacks.validation import validate_methods
from xaiwatch.checks.context import check_context_source
from xaiwatch.checks.evaluate import CheckOptions, evaluate_probes
from xaiwatch.checks.rule import MAP_CHECKS, parse_rules
from xaiwatch.checks.verdict import INCONCLUSIVE, Verdict, judge
from xaiwatch.core.errors import ConfigurationError
from xaiwatch.core.validation import choice, positive_int
from xaiwatch.logging.tensorboard import Tags
from xaiwatch.targets import MatchedBoxTarget

__all__ = ["SaliencyGate", "GatedModelCheckpoint", "GateShare", "DEFAULT_CHECKS", "DEFAULT_CONFIRM", "merge_shares"]

#: Default thresholds, calibrated leave-one-family-out on 5 generated dataset families x 3 seeds and checked on real
#: clean fine-tunes (docs/gate.md, examples/calibrate_gate.py): the scale-free score share lost without context
#: (grey surroundings) is gated, confirmed by the in-distribution swap test (the object's class share lost when it is
#: pasted onto other validation images' surroundings): a model is refused when both means and their one-sided 90%
#: bounds exceed 0.05. The swap's flip rate and score drop are logged (they come from the same forward passes). Map
#: checks (``energy_concentration``, ``pointing_game``, ...) need saliency maps, about as costly again: they are
#: not in the defaults (callbacks/demo.yaml, gate.yaml and production.yaml log them).
DEFAULT_CHECKS: dict[str, float | None] = {
    "relative_context_reliance": 0.05,
    "swap_class_drop": 0.05,
    "context_swap": None,
    "context_swap_drop": None,
}
#: The default gate's confirmation: a score lost without context refuses a model only when the object's class
#: share is lost on other validation images' surroundings too (docs/gate.md).
DEFAULT_CONFIRM: dict[str, str] = {"relative_context_reliance": "swap_class_drop"}
MODES = ("block", "warn", "stop")
INCONCLUSIVE_STATUS = "inconclusive"

Counterfactual = Callable[[torch.Tensor, list, list], torch.Tensor]


@dataclass
class GateShare(ShareRecord):
    """What one rank's share of the gate's probes gave (a :class:`~xaiwatch.callbacks.base.ShareRecord`).

    Attributes:
        items: ``(position,)`` of each probe of the share, in the order of ``values``.
        seconds: wall time of the share.
        values: check key to the share's per-probe values (or one number for a model-level value, the same on
            every rank).
        error: ``"Type: message"`` when the share failed (``on_error="warn"``): the gate then fails.
    """

    values: dict[str, Any] = field(default_factory=dict)
    error: str | None = None


class _ShareFailed(Exception):
    """A share's error, carried to the verdict (the message is already ``"Type: message"``)."""


def merge_shares(shares: Sequence[GateShare]) -> dict[str, Any]:
    """The per-probe values of every share put back in probe order.

    A key's per-probe values (one per position of the share) are scattered to their positions; a value that is
    one number (a model-level value, computed alike on every rank) is taken from the first share that has it.
    Keys keep the order of the first share that has values. One share is returned as it is.

    Raises:
        ValueError: when a share's per-probe values do not match its positions, or shares overlap.

    Example:
        >>> a = GateShare([(0,), (2,)], values={"context_swap": torch.tensor([0.0, 0.5])})
        >>> b = GateShare([(1,)], values={"context_swap": torch.tensor([1.0])})
        >>> merge_shares([a, b])["context_swap"]
        tensor([0.0000, 1.0000, 0.5000])
    """
    if len(shares) == 1:
        return dict(shares[0].values)
    positions = sorted(p for s in shares for p, *_ in s.items)
    if positions != list(range(len(positions))):
        raise ValueError(f"the shares do not split the probe set (each position once): positions {positions}")
    n = len(positions)
    keys = list(dict.fromkeys(k for s in shares for k in s.values))
    merged: dict[str, Any] = {}
    for key in keys:
        per_probe, scalar = None, None
        for s in shares:
            value = s.values.get(key)
            rows = [p for p, *_ in s.items]
            if isinstance(value, torch.Tensor) and value.dim() >= 1 or isinstance(value, (list, tuple)):
                v = torch.as_tensor(value).reshape(-1)
                v = v if v.is_floating_point() else v.double()
                if v.numel() != len(rows):
                    raise ValueError(f"{key!r}: {v.numel()} values for the {len(rows)} probes of a share")
                if per_probe is None:
                    per_probe = torch.full((n,), float("nan"), dtype=v.dtype)
                per_probe[torch.tensor(rows, dtype=torch.long)] = v.to(per_probe.dtype)
            elif value is not None and scalar is None:
                scalar = float(value)
        merged[key] = per_probe if per_probe is not None else scalar
    return merged


class SaliencyGate(ProbeCallback):
    """Run saliency checks on a fixed probe set at each validation end and decide whether the model passes.

    The checks (see :mod:`xaiwatch.checks`) run on probe images from the validation set, one tracked object per
    probe (its largest ground-truth box, followed by IoU as the detections change). Each value is logged as
    ``saliency/<check>/<method>`` (map checks, mean over probes) or ``saliency/<check>`` (model checks), together
    with ``saliency/gate_pass`` (1 or 0) and, when it fails, the reasons as TensorBoard text
    (``saliency/gate_reason``); a CUSTOM SCALARS layout groups them. ``saliency/gate_pass`` is also put in
    ``trainer.callback_metrics`` (monitorable). Under DDP each rank evaluates its share of the probes, the
    per-probe values are gathered (every rank issues the gather) and put back in probe order, and every rank
    judges the same merged values, so every rank takes the same decision without a broadcast (the bootstrap is
    seeded). Checks never change training (they run in :func:`~xaiwatch.core.context.explaining`;
    randomisation works on deep copies).

    Modes: ``"block"`` — :class:`GatedModelCheckpoint` saves only passing models; ``"warn"`` — failures are
    warned about and logged, checkpoints are not refused; ``"stop"`` — as ``block``, and training stops after
    ``patience`` consecutive failing validations.

    Args:
        checks: check name (or ``check/method``) to threshold, ``None`` to log a check without gating on it.
            Direction is the check's own: ``pointing_game``, ``energy_in_box``, ``insertion_auc``, ``stability``
            must be at least the threshold; ``off_object_energy``, ``deletion_auc``, ``randomization_ssim``,
            ``randomization_spearman``, ``context_reliance``, ``relative_context_reliance``, ``swap_class_drop``,
            ``counterfactual_flip`` at most.
        methods: explanation methods whose maps the map checks judge.
        mode: ``"block"``, ``"warn"`` or ``"stop"``.
        patience: failing validations in a row before ``mode="stop"`` stops training.
        num_probe: probe images (seeded choice among validation images with boxes).
        probe_indices: explicit validation indices instead.
        every_n_epochs: evaluate after every n-th epoch's validation (other epochs have no decision, so
            :class:`GatedModelCheckpoint` does not save them).
        counterfactual: for ``counterfactual_flip``: a function ``(images, boxes, labels) -> images`` changing the
            suspected cue, or the ``dataset.yaml`` / folder of a counterfactual copy of the validation set in the
            same order (:func:`xaiwatch.data.write_counterfactual`).
        options: settings of the checks (:class:`~xaiwatch.checks.CheckOptions` or a dict of its fields).
        adapter: the model adapter (default: from the module).
        layer: layer of CAM methods.
        on_error: ``"warn"``: an error while checking fails the gate for that epoch and training continues;
            ``"raise"``.
        seed: probe choice and stochastic parts.
        inconclusive: what :class:`GatedModelCheckpoint` does with an *inconclusive* epoch (a gated check cannot
            be decided: fewer than ``min_defined`` probes where the tracked object is detected, or a mean over the
            threshold but not significantly, see :func:`xaiwatch.checks.judge`): ``"warn"`` (default) saves and
            warns, ``"pass"`` saves silently, ``"refuse"`` refuses like a failure.
        min_defined: defined probes a gated check needs (default: a quarter of the probes, at least 1).
        significant: a check fails only when its mean is over the threshold *significantly* (the one-sided 90%
            bootstrap bound over the probes is over it too); a mean over it within the probes' noise is
            inconclusive. ``False``: the mean alone decides.
        confirm: gated check to the gated check that must fail too before it refuses a model (the confirming check
            never refuses by itself; a check that fails alone is *inconclusive*), see :func:`xaiwatch.checks.judge`.
            Default: :data:`DEFAULT_CONFIRM` with the default ``checks``, none with checks of your own.

    Each verdict (``history`` entries: ``status`` pass / fail / inconclusive, ``values``, ``defined`` counts,
    ``reasons``, ``lines``, ``verdict`` with bootstrap intervals, see :func:`xaiwatch.checks.judge`) writes every
    check every epoch, ``nan`` included, with ``saliency/defined/<key>`` and ``saliency/gate_inconclusive``; a
    refused epoch prints one console line on rank zero. docs/gate.md explains every check and how the defaults
    were calibrated.

    Raises:
        ConfigurationError: for an unknown check or method, a threshold outside its range, an unknown mode or
            ``inconclusive``, ``min_defined`` above ``num_probe``, a ``confirm`` pair that is not two gated checks, and at ``setup()`` for missing validation data,
            probes without ground-truth boxes, context checks on probes whose boxes leave no context, or
            ``counterfactual_flip`` without ``counterfactual``.

    Example:
        >>> gate = SaliencyGate(checks={"context_reliance": 0.1, "pointing_game": None}, mode="warn")
        >>> sorted(gate.checks), gate.mode
        (['context_reliance', 'pointing_game'], 'warn')
    """

    def __init__(
        self,
        checks: Mapping[str, float | None] | None = None,
        methods: Sequence[str] = ("saliency",),
        mode: str = "block",
        patience: int = 1,
        num_probe: int = 16,
        probe_indices: Sequence[int] | None = None,
        every_n_epochs: int = 1,
        counterfactual: Counterfactual | str | Path | None = None,
        options: CheckOptions | Mapping[str, Any] | None = None,
        adapter: DetectorAdapter | None = None,
        layer: str | None = None,
        on_error: str = "warn",
        seed: int = 0,
        inconclusive: str = "warn",
        min_defined: int | None = None,
        significant: bool = True,
        confirm: Mapping[str, str] | None = None,
    ) -> None:
        methods = [methods] if isinstance(methods, str) else list(methods)
        if methods:
            validate_methods(methods)
        confirm = dict((DEFAULT_CONFIRM if checks is None else {}) if confirm is None else confirm)
        checks = dict(DEFAULT_CHECKS if checks is None else checks)
        self.rules, self.needed = parse_rules(checks, methods)
        gated = {r.key for r in self.rules}
        bad = {k: v for k, v in confirm.items() if k not in gated or v not in gated or k == v}
        if bad:
            raise ConfigurationError(
                f"`confirm` must map a gated check to another gated check (both with a threshold in `checks`; gated: "
                f"{sorted(gated)}), got {bad!r}. Give both a threshold, e.g. checks={{'relative_context_reliance': "
                "0.05, 'swap_class_drop': 0.05}, confirm={'relative_context_reliance': 'swap_class_drop'}, or drop "
                "`confirm`."
            )
        choice("mode", mode, MODES)
        if probe_indices is not None:
            num_probe = len(probe_indices)
        num_probe = positive_int("num_probe", num_probe)
        min_defined = (
            max(1, math.ceil(num_probe / 4)) if min_defined is None else positive_int("min_defined", min_defined)
        )
        if min_defined > num_probe:
            raise ConfigurationError(
                f"`min_defined={min_defined}` is more than `num_probe={num_probe}`: every check would be inconclusive. "
                "Lower `min_defined` or raise `num_probe`."
            )
        if inconclusive not in INCONCLUSIVE:
            raise ConfigurationError(
                f"`inconclusive` can be {', '.join(INCONCLUSIVE)} (what GatedModelCheckpoint does when too few probes "
                f"are defined to decide), got {inconclusive!r}."
            )
        if "counterfactual_flip" in self.needed and counterfactual is None:
            raise ConfigurationError(
                "The check 'counterfactual_flip' needs `counterfactual=`: a function (images, boxes, labels) -> images "
                "that changes the suspected cue, or a counterfactual copy of the validation set "
                "(xaiwatch.data.write_counterfactual)."
            )
        if isinstance(options, Mapping):
            unknown = sorted(set(options) - set(CheckOptions.__dataclass_fields__))
            if unknown:
                raise ConfigurationError(
                    f"Unknown `options` {unknown}; known: {sorted(CheckOptions.__dataclass_fields__)}."
                )
            options = CheckOptions(**{"seed": seed, **options})
        if options is not None and not isinstance(options, CheckOptions):
            raise ConfigurationError(
                f"`options` must be a CheckOptions or a dict of its fields, got {type(options).__name__}."
            )
        super().__init__(
            every_n_epochs=every_n_epochs,
            run_at_start=False,
            on_error=on_error,
            adapter=adapter,
            num_probe=num_probe,
            probe_indices=probe_indices,
            seed=seed,
            outside_fit=False,
        )
        self.checks = checks
        self.methods = [m for m in methods if any(c in MAP_CHECKS for c in self.needed)] or []
        self.mode = mode
        self.patience = positive_int("patience", patience)
        self.counterfactual = counterfactual
        self.options = options or CheckOptions(seed=seed)
        self.layer = layer
        self.inconclusive = inconclusive
        self.min_defined = int(min_defined)
        self.significant = bool(significant)
        self.confirm = confirm
        # state (state_dict)
        self.history: list[dict[str, Any]] = []
        self._failures = 0
        # resolved at setup
        self._engines: dict[str, Any] = {}
        self._counterfactuals: torch.Tensor | None = None

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(checks=sorted(self.checks), methods=self.methods)

    # ---------------------------------------------------------------------------------------------- setup
    @override
    def _setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        from xaiwatch.explain import get_engine

        name = type(self).__name__
        self._engines = {m: get_engine(m, self._adapter, layer=self.layer, seed=self.seed) for m in self.methods}
        empty = [i for i, b in zip(self._indices, self.probes.boxes) if not len(b)]
        if empty:
            raise ConfigurationError(
                f"{name}: probe images {empty} (validation indices) have no ground-truth boxes; the saliency checks "
                "need the object's box. Choose `probe_indices` with boxes or a validation set whose images have labels."
            )
        if self.needed & {
            "context_swap",
            "context_swap_drop",
            "swap_class_drop",
            "context_reliance",
            "relative_context_reliance",
        }:
            tracked = [largest_objects(b, lab, 1)[0][:4] for b, lab in zip(self.probes.boxes, self.probes.labels)]
            check_context_source(torch.tensor(tracked), self.probes.images.shape[-2:], name)
        if self.counterfactual is not None:
            self._counterfactuals = self._load_counterfactuals(self.counterfactual, name)
        if self._writer is not None:
            self._writer.custom_scalars(self._layout())

    def _load_counterfactuals(self, source: Counterfactual | str | Path, name: str) -> torch.Tensor:
        probes = self.probes
        if callable(source):
            out = source(
                probes.images.clone(), [b.clone() for b in probes.boxes], [lab.clone() for lab in probes.labels]
            )
            if not isinstance(out, torch.Tensor) or out.shape != probes.images.shape:
                raise ConfigurationError(
                    f"{name}: `counterfactual` must return images of shape {tuple(probes.images.shape)}, got "
                    f"{getattr(out, 'shape', type(out).__name__)}."
                )
            return out.detach().float()
        from xaiwatch.data import YoloDataset, read_dataset_yaml

        path = Path(source)
        yaml_path = path / "dataset.yaml" if path.is_dir() else path
        if not yaml_path.is_file():
            raise ConfigurationError(
                f"{name}: `counterfactual` {str(source)!r} is neither a function nor a dataset.yaml."
            )
        names, splits = read_dataset_yaml(yaml_path)
        dataset = YoloDataset(splits["val"], names=names, imgsz=probes.images.shape[-1])
        cf = load_probes(dataset, self._indices, name)
        if cf.images.shape != probes.images.shape or any(not torch.equal(a, b) for a, b in zip(cf.boxes, probes.boxes)):
            raise ConfigurationError(
                f"{name}: the counterfactual set {str(yaml_path)!r} does not match the validation set (other images "
                "or boxes at the probe indices); write it from the same data with xaiwatch.data.write_counterfactual."
            )
        return cf.images

    def _layout(self) -> dict:
        charts = {}
        for check in sorted(self.needed):
            tag = Tags.check(check) + ("/.*" if check in MAP_CHECKS else "")
            charts[check] = ["Multiline", [tag]]
        charts["gate_pass"] = ["Multiline", [Tags.GATE_PASS]]
        return {"xaiwatch saliency gate": charts}

    # ------------------------------------------------------------------------------------------------ run
    #: each rank evaluates its share of the probes (positions p with p % world == rank); the per-probe values are
    #: gathered and put back in probe order, and every rank judges the same merged values alike (no broadcast)
    @override
    def _run(self, share: list[int], ctx: RunContext) -> GateShare:
        start = time.perf_counter()
        try:
            if share == list(range(len(self._indices))):
                values = self.evaluate()
            else:  # a rank with no probe (more ranks than probes) still takes part in the gather
                values = self.evaluate(positions=share) if share else {}
            return GateShare([(p,) for p in share], time.perf_counter() - start, to_cpu(dict(values)))
        except Exception as err:
            if self.on_error == "raise":
                raise
            return GateShare([(p,) for p in share], time.perf_counter() - start, error=f"{type(err).__name__}: {err}")

    @override
    def _merge(self, records: list[Any]) -> GateShare:
        """Every rank's share in one :class:`GateShare`: per-probe values in probe order (see :func:`merge_shares`),
        or the failing ranks' errors (``rank r: ...`` when there are several ranks)."""
        errors = [
            (f"rank {rank}: {r.error}" if len(records) > 1 else r.error)
            for rank, r in enumerate(records)
            if r.error is not None
        ]
        seconds = max(r.seconds for r in records)
        if errors:
            return GateShare([], seconds, error="; ".join(errors))
        try:
            values = merge_shares(records)
        except Exception as err:
            return GateShare([], seconds, error=f"{type(err).__name__}: {err}")
        return GateShare([(p,) for r in records for p, *_ in r.items], seconds, values)

    @override
    def _on_record(self, trainer: pl.Trainer, record: GateShare, ctx: RunContext) -> None:
        self._record(trainer, self._judged(record, ctx.epoch, ctx.step))

    @override
    def _on_failure(self, trainer: pl.Trainer, reasons: list[str], ctx: RunContext) -> None:
        record = {"step": ctx.epoch, "global_step": ctx.step, "status": "fail", "passed": False, "values": {}}
        record["seconds"] = 0.0
        self._record(trainer, {**record, "reasons": [f"the checks failed with {r}" for r in reasons]})

    def _judged(self, merged: GateShare, step: int, global_step: int) -> dict[str, Any]:
        """The gate's record of the merged values (every rank: the same values, so the same verdict)."""
        start = time.perf_counter()
        try:
            if merged.error is not None:
                raise _ShareFailed(merged.error)
            verdict = self.judge(merged.values)
        except Exception as err:
            if self.on_error == "raise":
                raise
            message = str(err) if isinstance(err, _ShareFailed) else f"{type(err).__name__}: {err}"
            verdict = judge({}, self.rules, self.min_defined)
            verdict.status, verdict.error = "fail", f"the checks failed with {message}"
            rank_zero_warn(f"{type(self).__name__} failed at step {step} ({message}); the gate fails.")
        seconds = merged.seconds + time.perf_counter() - start
        return {
            "step": step,
            "global_step": int(global_step),
            "status": verdict.status,
            "passed": verdict.passed,
            "reasons": verdict.reasons,
            "lines": verdict.lines(),
            "values": {r.key: float(r.value) for r in verdict.results},
            "defined": {r.key: int(r.defined) for r in verdict.results},
            "verdict": verdict.to_dict(),
            "seconds": seconds,
        }

    def judge(self, values: dict[str, Any]) -> Verdict:
        """The verdict on per-probe check ``values`` (e.g. of :meth:`evaluate`) by this gate's rules, probe floor,
        bootstrap seed, significance rule and confirmations: the same rule the gate decides with."""
        return judge(
            values, self.rules, self.min_defined, seed=self.seed, significant=self.significant, confirm=self.confirm
        )

    def evaluate(
        self, pl_module: pl.LightningModule | None = None, positions: Sequence[int] | None = None
    ) -> dict[str, Any]:
        """Run the checks now on the probe set: per check key, one value per probe (``nan`` where undefined).

        Args:
            pl_module: unused (the gate's adapter holds the model).
            positions: only these probes (positions in the probe set; one rank's share), values in this order;
                checks that mix probes still see every probe, so each value is what the full evaluation gives
                (see :func:`~xaiwatch.checks.evaluate_probes`). ``None``: every probe.

        Raises:
            ConfigurationError: before ``setup()``, or for ``positions`` outside the probe set.
        """
        self._require_setup()
        device = next(self._adapter.model.parameters()).device
        probes = self.probes.to(device)
        tracked = [largest_objects(b, lab, 1)[0] for b, lab in zip(probes.boxes, probes.labels)]
        targets = [MatchedBoxTarget(t[:4], int(t[4]), conf=self._adapter.conf) for t in tracked]
        boxes = torch.tensor([t[:4] for t in tracked], device=device)
        labels = torch.tensor([int(t[4]) for t in tracked], device=device)
        cf = self._counterfactuals.to(device) if self._counterfactuals is not None else None
        values, _ = evaluate_probes(
            self._adapter,
            self._engines,
            probes.images,
            targets,
            boxes,
            probes.boxes,
            self.needed,
            self.options,
            cf,
            labels=labels,
            gt_labels=probes.labels,
            positions=positions,
        )
        return values

    def _record(self, trainer: pl.Trainer, record: dict[str, Any]) -> None:
        self.history.append(record)
        status = record.get("status", "pass" if record["passed"] else "fail")
        self._failures = 0 if status != "fail" else self._failures + 1
        trainer.callback_metrics[Tags.GATE_PASS] = torch.tensor(float(status == "pass"))
        step, gstep = record["step"], record["global_step"]
        if self._writer is not None:
            for key, value in record["values"].items():  # every check, every epoch: nan too, so it has a line
                self._writer.scalar(Tags.check(key), value, gstep)
                if key in record.get("defined", {}):
                    self._writer.scalar(Tags.check(f"defined/{key}"), record["defined"][key], gstep)
            self._writer.scalar(Tags.GATE_PASS, float(status == "pass"), gstep)
            self._writer.scalar(Tags.check("gate_inconclusive"), float(status == INCONCLUSIVE_STATUS), gstep)
            self._writer.scalar(Tags.GATE_SECONDS, record["seconds"], gstep)
            lines = list(record.get("lines") or record["reasons"])
            blind = _insensitive_methods(record)
            if blind:  # Adebayo et al.'s sanity check, said in words
                lines.append(f"insensitive to the model's weights (maps barely change when randomised): {blind}")
            self._writer.text(
                Tags.GATE_REASON,
                f"epoch {step} | step {gstep}: {status}\n\n" + "\n".join(f"- {r}" for r in lines),
                gstep,
            )
            self._writer.flush()
        reasons = "; ".join(record["reasons"])
        if status == "fail":
            if self.mode == "warn":
                rank_zero_warn(f"SaliencyGate: epoch {step} failed the saliency checks: {reasons}.")
            else:
                rank_zero_info(f"SaliencyGate: epoch {step} refused (no checkpoint of these weights): {reasons}")
            if self.mode == "stop" and self._failures >= self.patience:
                trainer.should_stop = True
                rank_zero_warn(
                    f"SaliencyGate: stopping training after {self._failures} failing validation(s): {reasons}."
                )
        elif status == INCONCLUSIVE_STATUS and self.inconclusive != "pass":
            action = "refused" if self.inconclusive == "refuse" and self.mode != "warn" else "not refused"
            rank_zero_warn(
                f"SaliencyGate: epoch {step} is inconclusive (a gated check could not be decided), checkpoint {action} "
                f"(`inconclusive={self.inconclusive!r}`): {reasons}"
            )

    # ------------------------------------------------------------------------------------------- decisions
    @property
    def last(self) -> dict[str, Any] | None:
        """The last decision: ``step``, ``global_step``, ``passed``, ``reasons``, ``values``."""
        return self.history[-1] if self.history else None

    def allows_checkpoint(self, global_step: int) -> bool:
        """Whether the weights after ``global_step`` optimiser steps may be saved.

        In ``"warn"`` mode always; otherwise only when the gate evaluated exactly these weights and they passed,
        or the verdict was inconclusive and ``inconclusive`` is ``"pass"`` or ``"warn"``.
        """
        if self.mode == "warn":
            return True
        last = self.last
        if last is None or last["global_step"] != int(global_step):
            return False
        status = last.get("status", "pass" if last["passed"] else "fail")
        return status == "pass" or (status == INCONCLUSIVE_STATUS and self.inconclusive != "refuse")

    # ---------------------------------------------------------------------------------------------- state
    @override
    def state_dict(self) -> dict[str, Any]:
        return {**self._base_state(), "history": [dict(r) for r in self.history], "failures": self._failures}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._load_base_state(state_dict)
        self.history = [dict(r) for r in state_dict.get("history", [])]
        self._failures = int(state_dict.get("failures", 0))


def _insensitive_methods(record: dict[str, Any]) -> list[str]:
    """Methods whose ``randomization_*`` check failed in ``record``: their maps stay alike on random weights."""
    results = (record.get("verdict") or {}).get("results", [])
    return sorted(
        {
            r["key"].split("/", 1)[1]
            for r in results
            if r["key"].startswith("randomization_") and "/" in r["key"] and r.get("status") == "fail"
        }
    )


class GatedModelCheckpoint(ModelCheckpoint):
    """A ``ModelCheckpoint`` that saves only models whose validation passed every :class:`SaliencyGate`.

    Takes every argument of ``ModelCheckpoint``. A checkpoint is written at a validation end (or train epoch
    end) only when the trainer's gates evaluated exactly these weights and they passed (gates in ``"warn"``
    mode never refuse). So ``best_model_path`` and the top-k files are always passing models, even while fewer
    than ``save_top_k`` exist (Lightning's ``check_monitor_top_k`` would keep a refused model there whatever its
    monitored value). ``save_last=True``: ``last.ckpt`` follows Lightning's rule (it is written together with a
    top-k save) for passing epochs only, so it is always a passing model, and it is never written at the end of
    training or on an exception for a model that did not pass.

    Every file in its folder is a passing model: another ``ModelCheckpoint`` writing into the same folder (e.g. a
    plain ``ModelCheckpoint(save_last=True)`` on the default folder) stops the run at ``setup()``. To also keep the
    newest model for resuming, give that one its own folder: ``ModelCheckpoint(dirpath="resume", save_last=True)``.

    Raises:
        ConfigurationError: for ``every_n_train_steps`` or ``train_time_interval`` (gate decisions exist only at
            validation); at ``setup()`` when the trainer has no :class:`SaliencyGate`, or when another
            ``ModelCheckpoint`` writes into the same folder.

    Example:
        >>> ckpt = GatedModelCheckpoint(monitor="val/map50", mode="max", save_top_k=2)
        >>> ckpt.monitor, ckpt.save_top_k
        ('val/map50', 2)
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if self._every_n_train_steps or self._train_time_interval is not None:
            raise ConfigurationError(
                "GatedModelCheckpoint saves only models the SaliencyGate evaluated, which happens at validation: "
                "remove `every_n_train_steps` / `train_time_interval` (use `every_n_epochs`)."
            )
        self._gates: list[SaliencyGate] = []
        self.refused: list[int] = []

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        self._gates = [cb for cb in trainer.callbacks if isinstance(cb, SaliencyGate)]
        if stage == "fit" and not self._gates:
            raise ConfigurationError(
                "GatedModelCheckpoint needs a SaliencyGate in the Trainer's callbacks (it saves only models the gate "
                "passed): add `SaliencyGate(...)` to `callbacks=[...]`, or use a plain ModelCheckpoint."
            )
        if stage == "fit":
            _check_folder_is_ours(self, trainer)

    def _allowed(self, trainer: pl.Trainer) -> bool:
        return all(g.allows_checkpoint(trainer.global_step) for g in self._gates)

    def _gated(self, trainer: pl.Trainer, save: Callable[[], None]) -> None:
        if self._allowed(trainer):
            save()
        elif trainer.current_epoch not in self.refused:
            self.refused.append(trainer.current_epoch)

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._should_save_on_train_epoch_end(trainer) and not self._should_skip_saving_checkpoint(trainer):
            self._gated(trainer, lambda: super(GatedModelCheckpoint, self).on_train_epoch_end(trainer, pl_module))

    @override
    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self._should_save_on_train_epoch_end(trainer) and not self._should_skip_saving_checkpoint(trainer):
            self._gated(trainer, lambda: super(GatedModelCheckpoint, self).on_validation_end(trainer, pl_module))

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._allowed(trainer):
            super().on_train_end(trainer, pl_module)

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        if self._allowed(trainer):
            super().on_exception(trainer, pl_module, exception)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "refused": list(self.refused)}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self.refused = list(state_dict.get("refused", []))


def _check_folder_is_ours(gated: GatedModelCheckpoint, trainer: pl.Trainer) -> None:
    """Stop when another ModelCheckpoint writes into the gated one's folder (its files would not be gated)."""
    mine = _path_key(gated.dirpath)
    others = [
        cb
        for cb in trainer.checkpoint_callbacks
        if cb is not gated and isinstance(cb, ModelCheckpoint) and _path_key(_checkpoint_dir(cb, trainer)) == mine
    ]
    names = ", ".join(f"{type(cb).__name__}(monitor={cb.monitor!r}, save_last={cb.save_last!r})" for cb in others)
    names = trainer.strategy.broadcast(names)  # rank zero's view decides on every rank (setup runs on all ranks)
    if names:
        raise ConfigurationError(
            f"{names} writes into the folder of GatedModelCheckpoint ({gated.dirpath}): its files (e.g. last.ckpt) "
            "would hold models the SaliencyGate refused. Give it its own folder, e.g. "
            "`ModelCheckpoint(dirpath='checkpoints/resume', save_last=True)`, or remove it "
            "(GatedModelCheckpoint(save_last=True) keeps the newest passing model)."
        )


def _checkpoint_dir(callback: ModelCheckpoint, trainer: pl.Trainer) -> str:
    """The folder a ``ModelCheckpoint`` writes into: its ``dirpath``, or the one its ``setup`` will resolve.

    Lightning resolves ``dirpath=None`` in ``ModelCheckpoint.setup`` (the first logger's
    ``save_dir/name/version/checkpoints``, else ``default_root_dir/checkpoints``); a callback set up after this one
    has not done it yet, so the same rule is applied here (no collective: every rank computes it).
    """
    if callback.dirpath is not None:
        return str(callback.dirpath)
    if trainer.loggers:
        logger = trainer.loggers[0]
        save_dir = logger.save_dir if logger.save_dir is not None else trainer.default_root_dir
        version = logger.version if isinstance(logger.version, str) else f"version_{logger.version}"
        return os.path.join(save_dir, str(logger.name), version, "checkpoints")
    return os.path.join(trainer.default_root_dir, "checkpoints")


def _path_key(path: str | os.PathLike[str] | None) -> str:
    """A comparable form of a checkpoint folder: local paths resolved (symlinks, ``..``, ``~``), URLs as given."""
    text = os.fspath(path) if path is not None else ""
    if "://" in text:
        return text.rstrip("/")
    return os.path.realpath(os.path.expanduser(text))
