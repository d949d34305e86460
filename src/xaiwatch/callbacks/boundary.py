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
from xaiwatch.callbacks.base import ProbeCallback, RunContext, ShareRecord, to_cpu
from xaiwatch.callbacks.probes import largest_objects
from xaiwatch.core.context import explaining
from xaiwatch.core.validation import in_range, non_negative_int, optional_positive_int, positive_float, positive_int
from xaiwatch.logging import Tags
from xaiwatch.render.analysis import boundary_panel

__all__ = ["DecisionBoundaryCallback"]


class DecisionBoundaryCallback(ProbeCallback):
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
        every_n_epochs: probe after every n-th epoch's validation (``None``: not by epoch).
        every_n_train_steps: probe after every n-th optimiser step too.
        outside_fit: also probe at the end of ``trainer.validate`` / ``trainer.test``.
        probe_at_start: also probe the model before training (step 0).
        adapter: the model adapter; otherwise ``pl_module.xai_adapter()`` or inferred.
        on_error: ``"warn"`` (training continues) or ``"raise"``.
        seed: seed of the probe choice.

    Raises:
        ConfigurationError: for invalid arguments (e.g. an unknown attack) here; at ``setup()`` for a missing
            TensorBoard logger or validation data, or too few validation images.

    Example:
        >>> cb = DecisionBoundaryCallback(num_probe=2, attack="fgsm", max_eps=0.05)
        >>> cb.attack, cb.num_probe, cb.max_eps
        ('fgsm', 2, 0.05)
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
        every_n_epochs: int | None = 1,
        probe_at_start: bool = True,
        adapter: DetectorAdapter | None = None,
        on_error: str = "warn",
        seed: int = 0,
        every_n_train_steps: int | None = None,
        outside_fit: bool = True,
    ) -> None:
        super().__init__(
            every_n_epochs=every_n_epochs,
            every_n_train_steps=every_n_train_steps,
            run_at_start=probe_at_start,
            on_error=on_error,
            adapter=adapter,
            num_probe=num_probe,
            probe_indices=probe_indices,
            seed=seed,
            outside_fit=outside_fit,
        )
        validate_attack(attack, steps, step_ratio, max_eps)
        self.max_objects = positive_int("max_objects", max_objects)
        self.bisection_steps = non_negative_int("bisection_steps", bisection_steps)
        self.max_steps = optional_positive_int("max_steps", max_steps)
        self.budget_seconds = None if budget_seconds is None else positive_float("budget_seconds", budget_seconds)
        self.iou_threshold = in_range("iou_threshold", iou_threshold, 0.0, 1.0, low_open=True)
        self.attack = attack
        self.max_eps = float(max_eps)
        self.steps = int(steps)
        self.step_ratio = float(step_ratio)
        self._tracked: list[list[list[float]]] = []
        self.last_results: dict[str, Any] = {}

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(attack=self.attack, num_probe=self.num_probe, max_eps=self.max_eps)

    @override
    def _setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        probes = self.probes
        if not self._tracked:
            self._tracked = [largest_objects(b, lab, self.max_objects) for b, lab in zip(probes.boxes, probes.labels)]

    @override
    def _run(self, share: list[int], ctx: RunContext) -> list[tuple]:
        start = time.perf_counter()
        adapter, probes = self._adapter, self.probes
        images = probes.images[share].to(ctx.device)
        with explaining(adapter.model, seed=self.seed):
            detections = adapter.detect(images) if share else []
        subjects = []
        for j, p in enumerate(share):
            tracked = self._tracked[p]
            if not tracked and len(detections[j]):  # probes without ground truth track their top detection
                tracked = [[*detections[j].boxes[0].tolist(), float(detections[j].labels[0])]]
            subjects += [(p, j, k, obj) for k, obj in enumerate(tracked)]
        out = []
        for n, (p, j, k, obj) in enumerate(subjects):
            if self.budget_seconds is not None and time.perf_counter() - start > self.budget_seconds:
                rank_zero_warn(
                    f"{type(self).__name__}: `budget_seconds={self.budget_seconds}` spent at step {ctx.step}; "
                    f"{len(subjects) - n} of {len(subjects)} objects not probed this time."
                )
                break
            subject = f"probe_{p:02d}" + (f"_obj{k}" if k else "")
            result = min_epsilon(
                adapter,
                images[j : j + 1],
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
            out.append((p, k, subject, obj, to_cpu(result)))
        return ShareRecord(out, time.perf_counter() - start)

    @override
    def _on_record(self, trainer: pl.Trainer, record: ShareRecord, ctx: RunContext) -> None:
        self.last_results = {subject: result for _, _, subject, _, result in record.items}
        for p, k, _, obj, _ in record.items:  # every rank keeps the same tracked objects
            if k == 0 and not self._tracked[p]:
                self._tracked[p] = [list(obj)]

    @override
    def _write(self, record: ShareRecord, ctx: RunContext) -> None:
        """Rank zero's writer thread: the scalars and the drawn pictures."""
        start = time.perf_counter()
        writer = self._writer
        for p, _, subject, obj, result in record.items:
            flipped = result.min_eps is not None
            writer.scalar(Tags.min_eps(subject), result.min_eps if flipped else self.max_eps, ctx.step)
            # an object that is not detected at all (min_eps 0) was not flipped by a perturbation
            writer.scalar(Tags.boundary_flipped(subject), float(flipped and result.min_eps > 0), ctx.step)
            writer.picture(Tags.boundary_picture(subject), self._picture(subject, p, obj, result, ctx), ctx.step)
        writer.scalar(Tags.BOUNDARY_SECONDS, record.seconds + time.perf_counter() - start, ctx.step)
        writer.flush()

    def _picture(self, subject: str, p: int, obj: list[float], result: Any, ctx: RunContext) -> Any:
        probes = self.probes
        flipped = result.min_eps is not None
        adv = result.adversarial
        names, label = self._adapter.names, int(obj[4])
        state = (
            "not detected (eps 0)"
            if result.min_eps == 0
            else f"flips at eps {result.min_eps:.4f}"
            if flipped
            else f"holds up to eps {self.max_eps:g}"
        )
        return boundary_panel(
            probes.images[p],
            adv.image[0].cpu() if adv is not None else probes.images[p],
            box=obj[:4],
            label=label,
            detections=_dets_cpu(result.clean_detections),
            perturbed_detections=_dets_cpu(adv.detections if adv is not None else result.clean_detections),
            curve=result.curve,
            min_eps=result.min_eps,
            conf=self._adapter.conf,
            names=names,
            title=f"val #{probes.indices[p]} | {names[label]}: {state}",
            method=self.attack,
            probe=subject,
            epoch=ctx.epoch,
            step=ctx.step,
        )

    @override
    def state_dict(self) -> dict[str, Any]:
        return {**self._base_state(), "tracked": [[list(o) for o in t] for t in self._tracked]}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._load_base_state(state_dict)
        self._tracked = [[list(o) for o in t] for t in state_dict.get("tracked", [])]


def _dets_cpu(dets: Any) -> Any:
    return dets.to("cpu") if hasattr(dets, "to") else dets
