"""``ErrorAnalysisCallback``: TP / FP / FN, TIDE error types, a confusion matrix and explained errors per epoch."""

from __future__ import annotations

import copy
import functools
import time
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from typing_extensions import override

from xaiwatch.adapters import DetectorAdapter
from xaiwatch.analysis import COUNT_TYPES, ErrorCounts
from xaiwatch.analysis.matching import validate_iou_thresholds
from xaiwatch.callbacks.base import ProbeCallback, RunContext, ShareRecord
from xaiwatch.callbacks.capture import CapturedBatch
from xaiwatch.callbacks.probes import probe_item
from xaiwatch.callbacks.validation import validate_methods
from xaiwatch.core.context import explaining
from xaiwatch.core.errors import ConfigurationError
from xaiwatch.core.validation import non_negative_int, optional_positive_int, positive_int, probability
from xaiwatch.explain import Engine, get_engine
from xaiwatch.logging import Tags
from xaiwatch.render import explanation_panel
from xaiwatch.render.analysis import confusion_figure
from xaiwatch.render.dispatch import draws_heat_map
from xaiwatch.targets import BoxTarget, MissedTarget

__all__ = ["ErrorAnalysisCallback"]

_DESCRIBE = {
    "cls": "right box, wrong class",
    "loc": "right class, poor box",
    "both": "wrong class and poor box",
    "dupe": "duplicate of a detected object",
    "bkg": "fired on background",
}


class ErrorAnalysisCallback(ProbeCallback):
    """Why the detector misses and what it hallucinates, on validation data, after every scheduled epoch.

    On a deterministic subset of the validation set (``max_images``, seeded, read in batches) the model's
    detections are matched to the ground truth per class at ``iou_threshold`` (greedy by score, as COCO) and each
    error gets its TIDE type (see :mod:`xaiwatch.analysis.matching`). TensorBoard gets, per epoch:

    - scalars ``errors/<kind>/all`` (and ``errors/<kind>/<class>`` with ``per_class=True``) for ``kind`` in ``tp fp fn cls loc both dupe
      bkg miss``;
    - ``errors/confusion``: the confusion matrix, classes + background;
    - ``errors/explain/<method>/fp_<K>``: the ``explain_top_k`` highest-scoring false positives, each explained
      with ``BoxTarget`` on its candidate (what made the model fire), ground truth drawn dashed;
    - ``errors/explain/<method>/miss_<K>``: the ``explain_top_k`` largest missed objects, each explained with
      :class:`~xaiwatch.targets.MissedTarget` (the best raw candidate on the object for its class: what the model
      saw there and why the score stayed low).

    Detections use the adapter's post-processing, at ``conf`` when given (the operating threshold whose errors
    are counted). The model is never changed (see :func:`~xaiwatch.core.context.explaining`).

    Args:
        iou_threshold: foreground IoU of a match (TIDE's ``t_f``), in ``(0, 1]``.
        background_iou: TIDE's background IoU ``t_b``, in ``[0, iou_threshold)``.
        conf: detection threshold; the adapter's ``conf`` when ``None``.
        max_images: size of the validation subset (``None``: every image).
        batch_size: images per forward pass.
        explain_method: explanation method of the error pictures (a heat-map method).
        explain_top_k: false positives and misses explained per epoch (0: none).
        layer: layer of a CAM ``explain_method``.
        method_options: keyword arguments of the explanation engine.
        every_n_epochs: analyse after every n-th epoch's validation (``None``: not by epoch).
        every_n_train_steps: analyse after every n-th optimiser step too.
        outside_fit: also analyse at the end of ``trainer.validate`` / ``trainer.test``.
        per_class: also write ``errors/<kind>/<class>`` (by default only the totals ``errors/<kind>/all``, so that
            SCALARS stays readable with many classes).
        reuse_validation: take the subset's detections from the validation pass that precedes a run by epoch
            (where the module fed xaiwatch's batches unchanged to the model, in one process), instead of a forward
            of their own; the counts are the same.
        analyze_at_start: also analyse the model before training (step 0).
        adapter: the model adapter; otherwise ``pl_module.xai_adapter()`` or inferred.
        on_error: ``"warn"`` (training continues) or ``"raise"``.
        seed: seed of the subset choice and of stochastic explanation methods.

    Raises:
        ConfigurationError: for invalid arguments here; at ``setup()`` for a missing TensorBoard logger or validation
            data, a validation subset with no ground-truth box, or an explanation method that draws no heat map.

    Example:
        >>> cb = ErrorAnalysisCallback(iou_threshold=0.5, max_images=32, explain_method="layer_cam")
        >>> cb.explain_method, cb.max_images
        ('layer_cam', 32)
    """

    def __init__(
        self,
        iou_threshold: float = 0.5,
        background_iou: float = 0.1,
        conf: float | None = None,
        max_images: int | None = 64,
        batch_size: int = 8,
        explain_method: str = "saliency",
        explain_top_k: int = 2,
        layer: str | None = None,
        method_options: dict[str, Any] | None = None,
        every_n_epochs: int | None = 1,
        analyze_at_start: bool = False,
        adapter: DetectorAdapter | None = None,
        on_error: str = "warn",
        seed: int = 0,
        every_n_train_steps: int | None = None,
        outside_fit: bool = True,
        per_class: bool = False,
        reuse_validation: bool = True,
    ) -> None:
        super().__init__(
            every_n_epochs=every_n_epochs,
            every_n_train_steps=every_n_train_steps,
            run_at_start=analyze_at_start,
            on_error=on_error,
            adapter=adapter,
            seed=seed,
            outside_fit=outside_fit,
        )
        validate_iou_thresholds(iou_threshold, background_iou)
        self.conf = None if conf is None else probability("conf", conf)
        self.max_images = optional_positive_int("max_images", max_images)
        self.batch_size = positive_int("batch_size", batch_size)
        self.explain_top_k = non_negative_int("explain_top_k", explain_top_k)
        validate_methods([explain_method])
        if not draws_heat_map(explain_method):
            raise ConfigurationError(
                f"`explain_method={explain_method!r}` is not a heat map over the image; use a map method such as "
                "saliency, layer_cam or integrated_gradients."
            )
        self.per_class = bool(per_class)
        self.reuse_validation = bool(reuse_validation)
        self.iou_threshold = float(iou_threshold)
        self.background_iou = float(background_iou)
        self.explain_method = explain_method
        self.layer = layer
        self.method_options = dict(method_options or {})
        self._engine: Engine | None = None
        self.last_counts: ErrorCounts | None = None

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(iou_threshold=self.iou_threshold, max_images=self.max_images, conf=self.conf)

    @override
    def _choose(self, dataset: Any) -> list[int]:
        n = len(dataset)
        order = np.random.default_rng(self.seed).permutation(n)
        return sorted(order[: n if self.max_images is None else self.max_images].tolist())

    @override
    def _setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self.conf is not None:
            self._adapter = copy.copy(self._adapter)
            self._adapter.conf = self.conf
        if self.explain_top_k:
            options = {"layer": self.layer, "seed": self.seed, **self.method_options}
            self._engine = get_engine(self.explain_method, self._adapter, **options)
        if not any(len(probe_item(self._dataset[i])[1]) for i in self._indices):
            raise ConfigurationError(
                f"{type(self).__name__} needs ground truth, but none of the {len(self._indices)} validation images it "
                "analyses has a box: check the validation labels (or raise `max_images`)."
            )

    # ------------------------------------------------------------------------------------------------ run
    @override
    def _run(self, share: list[int], ctx: RunContext) -> ShareRecord:
        """Count this rank's images; the errors worth explaining travel as (key, index, what, detections).
        Images the validation pass just saw take their detections from it (no forward of their own)."""
        start = time.perf_counter()
        adapter = self._adapter
        counts = ErrorCounts(adapter.num_classes, self.iou_threshold, self.background_iou)
        false_pos, misses = [], []  # (sort key, dataset index, what, detections)
        wanted = [self._indices[p] for p in share]
        found = {idx: seen for record in (self._captured if ctx.stage == "fit" else []) for idx, seen in record}
        missing = [i for i in wanted if i not in found]
        for first in range(0, len(missing), self.batch_size):
            chunk = missing[first : first + self.batch_size]
            items = [probe_item(self._dataset[i]) for i in chunk]
            for idx, (_, boxes, labels), dets in zip(chunk, items, self._detect([it[0] for it in items], ctx.device)):
                found[idx] = (boxes, labels, dets)
        for idx in wanted:
            boxes, labels, dets = found[idx]
            result = counts.update(dets, boxes, labels)
            for d, kind in enumerate(result.error):
                if kind:
                    false_pos.append((float(dets.scores[d]), idx, (d, kind), dets))
            for g in torch.nonzero(result.missed).flatten().tolist():
                area = float((boxes[g, 2] - boxes[g, 0]) * (boxes[g, 3] - boxes[g, 1]))
                misses.append((area, idx, (g,), dets))
        return ShareRecord([(0, counts, false_pos, misses)], time.perf_counter() - start)

    @override
    def _captures(self) -> dict[str, torch.nn.Module]:
        return {}  # the candidates only

    @override
    def _consume(self, batch: CapturedBatch) -> list[tuple[int, tuple]]:
        """``(index, (boxes, labels, detections))`` of the analysed images in one validation batch."""
        detections = [d.detach().to("cpu") for d in self._adapter.postprocess(batch.raw)]
        return [(i, (b, lab, d)) for i, b, lab, d in zip(batch.ids, batch.boxes, batch.labels, detections)]

    @override
    def _merge(self, records: list[ShareRecord]) -> ShareRecord:
        counts, false_pos, misses = None, [], []
        for record in records:
            for _, c, fp, miss in record.items:
                counts = c if counts is None else counts.merge(c)
                false_pos += fp
                misses += miss
        order = sorted(false_pos, key=lambda r: (-r[0], r[1])), sorted(misses, key=lambda r: (-r[0], r[1]))
        return ShareRecord([(0, counts, *order)], max(r.seconds for r in records))

    @override
    def _on_record(self, trainer: pl.Trainer, record: ShareRecord, ctx: RunContext) -> None:
        """Every rank keeps the merged counts; rank zero explains the few worst errors (``explain_top_k`` of each
        kind) here, on the training thread (the model must not change while it is explained)."""
        start = time.perf_counter()
        _, counts, false_pos, misses = record.items[0]
        self.last_counts = counts
        if self._writer is not None:
            explained = self._explain(false_pos, misses, ctx)
            record.items[0] = (0, counts, explained, [])
            record.seconds += time.perf_counter() - start

    @override
    def _write(self, record: ShareRecord, ctx: RunContext) -> None:
        """Rank zero's writer thread: counts, confusion matrix and the explained errors' pictures."""
        start = time.perf_counter()
        _, counts, explained, _ = record.items[0]
        pictures = [(subject, draw()) for subject, draw in explained]
        self._write_counts(counts, pictures, ctx)
        self._writer.scalar(Tags.ERRORS_SECONDS, record.seconds + time.perf_counter() - start, ctx.step)
        self._writer.flush()

    def _detect(self, images: list[torch.Tensor], device: torch.device) -> list:
        """Detections of images that may differ in size (same-size runs share one forward)."""
        out = []
        with explaining(self._adapter.model, seed=self.seed):
            first = 0
            while first < len(images):
                last = first + 1
                while last < len(images) and images[last].shape == images[first].shape:
                    last += 1
                batch = torch.stack(images[first:last]).to(device)
                out += [d.to("cpu") for d in self._adapter.detect(batch)]
                first = last
        return out

    def _explain(self, false_pos: list, misses: list, ctx: RunContext) -> list[tuple[str, Any]]:
        """``(subject, draw)`` of the worst errors: the maps computed now, ``draw()`` making the picture later."""
        if self._engine is None:
            return []
        names, pictures = self._adapter.names, []
        for prefix, records in (("fp", false_pos), ("miss", misses)):
            for k, (_, idx, what, dets) in enumerate(records[: self.explain_top_k]):
                image, gt_boxes, gt_labels = probe_item(self._dataset[idx])
                if prefix == "fp":
                    d, kind = what
                    label, box = int(dets.labels[d]), dets.boxes[d].tolist()
                    target = BoxTarget(int(dets.candidates[d]), label)
                    text = f"false positive {names[label]} {float(dets.scores[d]):.2f}: {kind} ({_DESCRIBE[kind]})"
                else:
                    label = int(gt_labels[what[0]])
                    target = MissedTarget(gt_boxes[what[0]], label, self.iou_threshold, conf=self._adapter.conf)
                found = self._engine.explain_boxes(image[None].to(ctx.device), [target]).cpu()
                saliency = found.maps[0]
                if prefix == "miss":
                    match = found.matches[0]
                    box = list(match.box)
                    text = f"missed {names[label]}: best candidate score {match.score:.2f}, IoU {match.iou:.2f}"
                draw = functools.partial(
                    explanation_panel,
                    image,
                    saliency,
                    gt_boxes=gt_boxes,
                    gt_labels=gt_labels,
                    detections=dets,
                    tracked_box=box,
                    names=names,
                    title=f"{prefix} {k} (val #{idx})",
                    subtitle=text,
                    method=self.explain_method,
                    epoch=ctx.epoch,
                    step=ctx.step,
                    tracked_label=("FP " if prefix == "fp" else "missed ") + names[label],
                    normalize="signed" if self._engine.signed else "per_map",
                )
                pictures.append((f"{prefix}_{k:02d}", draw))
        return pictures

    def _write_counts(self, counts: ErrorCounts, pictures: list, ctx: RunContext) -> None:
        step = ctx.step
        names = self._adapter.names
        for kind in COUNT_TYPES:
            for c, value in enumerate(counts.counts[kind].tolist() if self.per_class else []):
                self._writer.scalar(Tags.errors(kind, names[c]), value, step)
            self._writer.scalar(Tags.errors(kind, "all"), counts.totals()[kind], step)
        title = f"confusion at IoU {self.iou_threshold:g} | {counts.images} images"
        figure = confusion_figure(counts.confusion, names, title, epoch=ctx.epoch, step=step)
        self._writer.picture(Tags.ERRORS_CONFUSION, figure, step)
        for subject, picture in pictures:
            self._writer.picture(Tags.errors_explain(self.explain_method, subject), picture, step)

    # ---------------------------------------------------------------------------------------------- state
    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._load_base_state(state_dict, index_key="indices")
