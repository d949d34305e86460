"""``ErrorAnalysisCallback``: TP / FP / FN, TIDE error types, a confusion matrix and explained errors per epoch."""

from __future__ import annotations

import copy
import time
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from typing_extensions import override

from xaiwatch.adapters import DetectorAdapter
from xaiwatch.analysis import COUNT_TYPES, ErrorCounts
from xaiwatch.analysis.matching import validate_iou_thresholds
from xaiwatch.callbacks.probes import probe_item, validation_dataset
from xaiwatch.callbacks.scheduled import ScheduledCallback
from xaiwatch.callbacks.validation import validate_methods, validate_positive
from xaiwatch.core.context import explaining
from xaiwatch.core.errors import ConfigurationError
from xaiwatch.explain import Engine, get_engine
from xaiwatch.logging import Tags, XaiWriter
from xaiwatch.render import explanation_panel
from xaiwatch.render.analysis import confusion_figure
from xaiwatch.targets import BoxTarget, MissedTarget

__all__ = ["ErrorAnalysisCallback"]

_DESCRIBE = {
    "cls": "right box, wrong class",
    "loc": "right class, poor box",
    "both": "wrong class and poor box",
    "dupe": "duplicate of a detected object",
    "bkg": "fired on background",
}


class ErrorAnalysisCallback(ScheduledCallback):
    """Why the detector misses and what it hallucinates, on validation data, after every scheduled epoch.

    On a deterministic subset of the validation set (``max_images``, seeded, read in batches) the model's
    detections are matched to the ground truth per class at ``iou_threshold`` (greedy by score, as COCO) and each
    error gets its TIDE type (see :mod:`xaiwatch.analysis.matching`). TensorBoard gets, per epoch:

    - scalars ``errors/<kind>/<class>`` (and ``errors/<kind>/all``) for ``kind`` in ``tp fp fn cls loc both dupe
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
        every_n_epochs: analyse after every n-th epoch's validation.
        analyze_at_start: also analyse the model before training (step 0).
        adapter: the model adapter; otherwise ``pl_module.xai_adapter()`` or inferred.
        on_error: ``"warn"`` (training continues) or ``"raise"``.
        seed: seed of the subset choice and of stochastic explanation methods.

    Raises:
        ConfigurationError: for invalid arguments here; at ``setup()`` for a missing TensorBoard logger or validation
            data, a validation subset with no ground-truth box, or an explanation method that draws no heat map.
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
        every_n_epochs: int = 1,
        analyze_at_start: bool = False,
        adapter: DetectorAdapter | None = None,
        on_error: str = "warn",
        seed: int = 0,
    ) -> None:
        super().__init__(every_n_epochs, analyze_at_start, on_error)
        validate_iou_thresholds(iou_threshold, background_iou)
        if conf is not None and not 0.0 <= float(conf) <= 1.0:
            raise ConfigurationError(f"`conf` must be in [0, 1], got {conf}.")
        validate_positive(batch_size=batch_size, **({} if max_images is None else {"max_images": max_images}))
        if int(explain_top_k) < 0:
            raise ConfigurationError(f"`explain_top_k` must be >= 0, got {explain_top_k}.")
        validate_methods([explain_method])
        self.iou_threshold = float(iou_threshold)
        self.background_iou = float(background_iou)
        self.conf = None if conf is None else float(conf)
        self.max_images = None if max_images is None else int(max_images)
        self.batch_size = int(batch_size)
        self.explain_method = explain_method
        self.explain_top_k = int(explain_top_k)
        self.layer = layer
        self.method_options = dict(method_options or {})
        self.adapter = adapter
        self.seed = int(seed)
        self._indices: list[int] | None = None
        self._adapter: DetectorAdapter | None = None
        self._engine: Engine | None = None
        self._dataset: Any = None
        self._writer: XaiWriter | None = None
        self.last_counts: ErrorCounts | None = None

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(iou_threshold=self.iou_threshold, max_images=self.max_images, conf=self.conf)

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        name = type(self).__name__
        adapter = self._connect(trainer, pl_module)
        if self.conf is not None:
            adapter = copy.copy(adapter)
            adapter.conf = self.conf
        self._adapter = adapter
        if self.explain_top_k:
            options = {"layer": self.layer, "seed": self.seed, **self.method_options}
            self._engine = get_engine(self.explain_method, adapter, **options)
            if self._engine.kind != "map":
                raise ConfigurationError(
                    f"{name}: `explain_method={self.explain_method!r}` draws a {self._engine.kind}, not a heat map; "
                    "use a map method such as saliency, grad_cam or integrated_gradients."
                )
        self._dataset = validation_dataset(trainer, name)
        if self._indices is None:  # not restored from a checkpoint
            n = len(self._dataset)
            order = np.random.default_rng(self.seed).permutation(n)
            self._indices = sorted(order[: n if self.max_images is None else self.max_images].tolist())
        if not any(len(probe_item(self._dataset[i])[1]) for i in self._indices):
            raise ConfigurationError(
                f"{name} needs ground truth, but none of the {len(self._indices)} validation images it analyses has a "
                "box: check the validation labels (or raise `max_images`)."
            )

    # ------------------------------------------------------------------------------------------------ run
    def _run(self, pl_module: pl.LightningModule, step: int) -> None:
        self._require_setup(self._adapter, self._indices)
        start = time.perf_counter()
        adapter, device = self._adapter, pl_module.device
        counts = ErrorCounts(adapter.num_classes, self.iou_threshold, self.background_iou)
        false_pos, misses = [], []  # (sort key, dataset index, what, detections)
        for first in range(0, len(self._indices), self.batch_size):
            chunk = self._indices[first : first + self.batch_size]
            items = [probe_item(self._dataset[i]) for i in chunk]
            for idx, (_, boxes, labels), dets in zip(chunk, items, self._detect([it[0] for it in items], device)):
                result = counts.update(dets, boxes, labels)
                for d, kind in enumerate(result.error):
                    if kind:
                        false_pos.append((float(dets.scores[d]), idx, (d, kind), dets))
                for g in torch.nonzero(result.missed).flatten().tolist():
                    area = float((boxes[g, 2] - boxes[g, 0]) * (boxes[g, 3] - boxes[g, 1]))
                    misses.append((area, idx, (g,), dets))
        self.last_counts = counts
        pictures = self._explain(sorted(false_pos, key=lambda r: -r[0]), sorted(misses, key=lambda r: -r[0]), device)
        if self._writer is not None:
            self._write(counts, pictures, step)
            self._writer.scalar(Tags.ERRORS_SECONDS, time.perf_counter() - start, step)
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

    def _explain(self, false_pos: list, misses: list, device: torch.device) -> list[tuple[str, np.ndarray]]:
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
                saliency = self._engine.attribute_boxes(image[None].to(device), [target])[0].cpu()
                if prefix == "miss":
                    match = target.last_match[0]
                    box = list(match.box)
                    text = f"missed {names[label]}: best candidate score {match.score:.2f}, IoU {match.iou:.2f}"
                picture = explanation_panel(
                    image,
                    saliency,
                    gt_boxes=gt_boxes,
                    gt_labels=gt_labels,
                    detections=dets,
                    tracked_box=box,
                    names=names,
                    title=f"{self.explain_method} | {prefix} {k} (val #{idx})",
                    subtitle=text,
                    normalize="signed" if self._engine.signed else "per_map",
                )
                pictures.append((f"{prefix}_{k:02d}", picture))
        return pictures

    def _write(self, counts: ErrorCounts, pictures: list, step: int) -> None:
        names = self._adapter.names
        for kind in COUNT_TYPES:
            for c, value in enumerate(counts.counts[kind].tolist()):
                self._writer.scalar(Tags.errors(kind, names[c]), value, step)
            self._writer.scalar(Tags.errors(kind, "all"), counts.totals()[kind], step)
        title = f"confusion at IoU {self.iou_threshold:g} | epoch {step} | {counts.images} images"
        self._writer.picture(Tags.ERRORS_CONFUSION, confusion_figure(counts.confusion, names, title), step)
        for subject, picture in pictures:
            self._writer.picture(Tags.errors_explain(self.explain_method, subject), picture, step)

    # ---------------------------------------------------------------------------------------------- state
    @override
    def state_dict(self) -> dict[str, Any]:
        return {"indices": list(self._indices or []), "last_step": self._last_step}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._indices = list(state_dict.get("indices", [])) or None
        self._last_step = int(state_dict.get("last_step", -1))
