"""``DecisionBoundaryCallback``: how close each tracked detection is to flipping, as the model trains."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import pytorch_lightning as pl
from pytorch_lightning.utilities import rank_zero_warn
from typing_extensions import override

from xaiwatch.adapters import DetectorAdapter
from xaiwatch.analysis.boundary import min_epsilon, validate_attack
from xaiwatch.callbacks.probes import (
    choose_probe_indices,
    largest_objects,
    load_probes,
    validation_dataset,
)
from xaiwatch.callbacks.scheduled import ScheduledCallback
from xaiwatch.callbacks.validation import validate_positive, validate_probe_indices
from xaiwatch.core.context import explaining
from xaiwatch.core.errors import ConfigurationError
from xaiwatch.core.types import ProbeSet
from xaiwatch.logging import Tags, XaiWriter
from xaiwatch.render.analysis import boundary_panel

__all__ = ["DecisionBoundaryCallback"]


class DecisionBoundaryCallback(ScheduledCallback):
    """Track, per probe object and epoch, the smallest L-inf perturbation that removes its detection or flips it.

    The probe images are chosen once (seeded) from the validation set, as by
    :class:`~xaiwatch.callbacks.ExplainCallback`; in each, the ``max_objects`` largest ground-truth objects are
    tracked (a probe without ground truth tracks its first top detection). After every scheduled validation, a
    gradient attack (FGSM or PGD, L-inf) on each object's class score is bisected for the minimal epsilon (see
    :func:`~xaiwatch.analysis.min_epsilon`). TensorBoard gets, per object (``probe_<NN>``, ``..._obj<K>``):

    - ``boundary/min_eps/<subject>``: the minimal epsilon (0: the object is not detected at all; ``max_eps`` when
      nothing up to ``max_eps`` flips it, then ``boundary/flipped/<subject>`` is 0), a robustness trend;
    - ``boundary/picture/<subject>``: original, amplified perturbation, perturbed image with its new detections
      and the object's score against epsilon.

    Cost per object is at most ``(1 + bisection_steps) * steps`` forward + backward passes (``max_steps`` caps
    it); ``budget_seconds`` bounds a whole run: objects left when it is spent are skipped that epoch, with a
    warning. The model is never changed (see :func:`~xaiwatch.core.context.explaining`).

    Args:
        num_probe: number of probe images chosen (seeded) from the validation set.
        probe_indices: explicit validation indices instead of a seeded choice.
        max_objects: objects tracked per probe image.
        attack: ``"pgd"`` or ``"fgsm"``.
        max_eps: largest L-inf radius tried, in image units (``[0, 1]`` images).
        steps: PGD steps per attack.
        step_ratio: PGD step size after the first (FGSM) step, as a fraction of epsilon.
        bisection_steps: halvings of the epsilon bracket.
        max_steps: gradient steps allowed per object and epoch (``None``: no cap).
        budget_seconds: wall-time budget of one run (``None``: no budget).
        iou_threshold: IoU at which a detection is still the tracked object.
        every_n_epochs: probe after every n-th epoch's validation.
        probe_at_start: also probe the model before training (step 0).
        adapter: the model adapter; otherwise ``pl_module.xai_adapter()`` or inferred.
        on_error: ``"warn"`` (training continues) or ``"raise"``.
        seed: seed of the probe choice.

    Raises:
        ConfigurationError: for invalid arguments (e.g. an unknown attack) here; at ``setup()`` for a missing
            TensorBoard logger or validation data, or too few validation images.
    """

    def __init__(
        self,
        num_probe: int = 4,
        probe_indices: Sequence[int] | None = None,
        max_objects: int = 1,
        attack: str = "pgd",
        max_eps: float = 0.1,
        steps: int = 5,
        step_ratio: float = 0.25,
        bisection_steps: int = 5,
        max_steps: int | None = None,
        budget_seconds: float | None = None,
        iou_threshold: float = 0.5,
        every_n_epochs: int = 1,
        probe_at_start: bool = True,
        adapter: DetectorAdapter | None = None,
        on_error: str = "warn",
        seed: int = 0,
    ) -> None:
        super().__init__(every_n_epochs, probe_at_start, on_error)
        validate_attack(attack, steps, step_ratio, max_eps)
        if probe_indices is not None:
            probe_indices = validate_probe_indices(probe_indices)
            num_probe = len(probe_indices)
        validate_positive(num_probe=num_probe, max_objects=max_objects)
        if int(bisection_steps) < 0:
            raise ConfigurationError(f"`bisection_steps` must be >= 0, got {bisection_steps}.")
        if max_steps is not None and int(max_steps) < 1:
            raise ConfigurationError(f"`max_steps` must be >= 1, got {max_steps}.")
        if budget_seconds is not None and float(budget_seconds) <= 0:
            raise ConfigurationError(f"`budget_seconds` must be > 0, got {budget_seconds}.")
        if not 0.0 < float(iou_threshold) <= 1.0:
            raise ConfigurationError(f"`iou_threshold` must be in (0, 1], got {iou_threshold}.")
        self.num_probe = int(num_probe)
        self.probe_indices = probe_indices
        self.max_objects = int(max_objects)
        self.attack = attack
        self.max_eps = float(max_eps)
        self.steps = int(steps)
        self.step_ratio = float(step_ratio)
        self.bisection_steps = int(bisection_steps)
        self.max_steps = None if max_steps is None else int(max_steps)
        self.budget_seconds = None if budget_seconds is None else float(budget_seconds)
        self.iou_threshold = float(iou_threshold)
        self.adapter = adapter
        self.seed = int(seed)
        self._probe_indices: list[int] | None = None
        self._tracked: list[list[list[float]]] = []
        self._adapter: DetectorAdapter | None = None
        self._probes: ProbeSet | None = None
        self._writer: XaiWriter | None = None
        self.last_results: dict[str, Any] = {}

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(attack=self.attack, num_probe=self.num_probe, max_eps=self.max_eps)

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        name = type(self).__name__
        self._adapter = self._connect(trainer, pl_module)
        dataset = validation_dataset(trainer, name)
        if self._probe_indices is None:  # not restored from a checkpoint
            self._probe_indices = self.probe_indices or choose_probe_indices(dataset, self.num_probe, self.seed, name)
        self._probes = load_probes(dataset, self._probe_indices, name)
        if not self._tracked:
            self._tracked = [
                largest_objects(b, lab, self.max_objects) for b, lab in zip(self._probes.boxes, self._probes.labels)
            ]

    def _run(self, pl_module: pl.LightningModule, step: int) -> None:
        self._require_setup(self._adapter, self._probes)
        start = time.perf_counter()
        adapter, probes = self._adapter, self._probes.to(pl_module.device)
        with explaining(adapter.model, seed=self.seed):
            detections = adapter.detect(probes.images)
        for i, dets in enumerate(detections):  # probes without ground truth track their top detection
            if not self._tracked[i] and len(dets):
                self._tracked[i] = [[*dets.boxes[0].tolist(), float(dets.labels[0])]]
        subjects = [(i, k, obj) for i, objs in enumerate(self._tracked) for k, obj in enumerate(objs)]
        self.last_results = {}
        for n, (i, k, obj) in enumerate(subjects):
            if self.budget_seconds is not None and time.perf_counter() - start > self.budget_seconds:
                rank_zero_warn(
                    f"{type(self).__name__}: `budget_seconds={self.budget_seconds}` spent at step {step}; "
                    f"{len(subjects) - n} of {len(subjects)} objects not probed this epoch."
                )
                break
            subject = f"probe_{i:02d}" + (f"_obj{k}" if k else "")
            result = min_epsilon(
                adapter,
                probes.images[i : i + 1],
                obj[:4],
                int(obj[4]),
                attack=self.attack,
                max_eps=self.max_eps,
                steps=self.steps,
                step_ratio=self.step_ratio,
                bisection_steps=self.bisection_steps,
                max_steps=self.max_steps,
                iou_threshold=self.iou_threshold,
            )
            self.last_results[subject] = result
            if self._writer is not None:
                self._write(subject, probes, i, obj, result, step)
        if self._writer is not None:
            self._writer.scalar(Tags.BOUNDARY_SECONDS, time.perf_counter() - start, step)
            self._writer.flush()

    def _write(self, subject: str, probes: ProbeSet, i: int, obj: list[float], result: Any, step: int) -> None:
        flipped = result.min_eps is not None
        self._writer.scalar(Tags.min_eps(subject), result.min_eps if flipped else self.max_eps, step)
        self._writer.scalar(Tags.boundary_flipped(subject), float(flipped), step)
        adv = result.adversarial
        names, label = self._adapter.names, int(obj[4])
        state = (
            "not detected (eps 0)"
            if result.min_eps == 0
            else f"flips at eps {result.min_eps:.4f}"
            if flipped
            else f"holds up to eps {self.max_eps:g}"
        )
        picture = boundary_panel(
            probes.images[i],
            adv.image[0] if adv is not None else probes.images[i],
            box=obj[:4],
            label=label,
            detections=result.clean_detections,
            perturbed_detections=adv.detections if adv is not None else result.clean_detections,
            curve=result.curve,
            min_eps=result.min_eps,
            conf=self._adapter.conf,
            names=names,
            title=f"{self.attack} | {subject} (val #{probes.indices[i]}) | epoch {step} | {names[label]}: {state}",
        )
        self._writer.picture(Tags.boundary_picture(subject), picture, step)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "probe_indices": list(self._probe_indices or []),
            "tracked": [[list(o) for o in t] for t in self._tracked],
            "last_step": self._last_step,
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._probe_indices = list(state_dict.get("probe_indices", [])) or None
        self._tracked = [[list(o) for o in t] for t in state_dict.get("tracked", [])]
        self._last_step = int(state_dict.get("last_step", -1))
