"""``ExplainCallback``: explain fixed probe images with several methods at every scheduled step."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities import rank_zero_warn
from typing_extensions import override

from xaiwatch.adapters import DetectorAdapter
from xaiwatch.callbacks.base import ProbeCallback, RunContext, ShareRecord
from xaiwatch.callbacks.probes import largest_objects
from xaiwatch.callbacks.validation import validate_method_options, validate_methods
from xaiwatch.core.context import explaining
from xaiwatch.core.types import Explanation
from xaiwatch.core.validation import choice, in_range, positive_int
from xaiwatch.explain import Engine, get_engine
from xaiwatch.logging.reader import read_pictures
from xaiwatch.render.dispatch import draw_explanation, per_image
from xaiwatch.render.history import PictureHistory, encode
from xaiwatch.targets import MatchedBoxTarget

__all__ = ["ExplainCallback"]


class ExplainCallback(ProbeCallback):
    """Explain a fixed set of held-out probe images at every scheduled step and log them to TensorBoard.

    In each probe image up to ``max_objects`` objects are tracked (the largest ground-truth boxes, each followed
    by IoU as the model's detections change, see :class:`~xaiwatch.targets.MatchedBoxTarget`). At the end of every
    ``every_n_epochs``-th validation (and/or every ``every_n_train_steps`` optimiser steps) every method explains
    each tracked object's class score (all objects of an image in one pass where the method allows) and
    TensorBoard gets one picture per method and object, ``explain/<method>/probe_<NN>`` (``..._obj<K>`` for further
    objects; ``NN`` is the probe's position in the probe set, the same in every callback with the same probe
    choice), at step ``trainer.global_step`` (step 0 = before training when ``explain_at_start``). At the end of
    fit a filmstrip (rows = methods, columns = steps, earlier runs of a resumed fit included) and an animated GIF
    per object are written to ``<log_dir>/xaiwatch/`` and the filmstrip to TensorBoard. With several processes
    each rank explains and draws its share of the probes; rank zero writes. Explanations never change training
    (see :func:`~xaiwatch.core.context.explaining`).

    Args:
        methods: explanation methods by name (see :func:`xaiwatch.explain.available_methods`). The default CAM is
            ``layer_cam``: element-wise, so its map stays on the explained box, while Grad-CAM's spatially averaged
            weights light every object of the class (measured on a real people detector, docs/real-models.md).
        num_probe: number of probe images chosen (seeded) from the validation set.
        probe_indices: explicit validation indices instead of a seeded choice.
        every_n_epochs: explain after every n-th training epoch's validation (``None``: not by epoch).
        every_n_train_steps: explain after every n-th optimiser step too (``None``: not by step).
        layer: layer of CAM methods (adapter alias such as ``"neck.p3"`` or a dotted path).
        adapter: the model adapter; otherwise ``pl_module.xai_adapter()`` or inferred from the network.
        normalize: ``"per_map"`` (each map scaled by its own maximum) or ``"fixed"`` (one scale per method and
            object, taken from its first explained step, so brightening over epochs is real). Signed methods are
            drawn with a diverging colormap either way.
        explain_at_start: also explain the model before training (step 0).
        max_objects: objects tracked per probe image.
        method_options: keyword arguments per method, e.g. ``{"integrated_gradients": {"n_steps": 16}}``.
        filmstrip: write the filmstrips and GIFs at the end of fit.
        on_error: ``"warn"`` (training continues) or ``"raise"``.
        seed: seed of the probe choice and of stochastic methods.
        iou_threshold: IoU at which a candidate is the tracked object.
        outside_fit: also explain at the end of ``trainer.validate`` / ``trainer.test``.

    Raises:
        ConfigurationError: for invalid arguments here, and at ``setup()`` for an unknown layer, a missing
            TensorBoard logger, missing validation data or too few validation images.
        UnsupportedModelError: at ``setup()`` when no adapter can be found for the model, or a method cannot be
            right on it (e.g. guided backpropagation on a SiLU network).

    Example:
        >>> cb = ExplainCallback(methods=["saliency", "layer_cam"], num_probe=4, every_n_train_steps=500)
        >>> cb.methods, cb.every_n_epochs, cb.every_n_train_steps
        (['saliency', 'layer_cam'], 1, 500)
    """

    def __init__(
        self,
        methods: Sequence[str] = ("saliency", "layer_cam"),
        num_probe: int = 8,
        probe_indices: Sequence[int] | None = None,
        every_n_epochs: int | None = 1,
        layer: str | None = None,
        adapter: DetectorAdapter | None = None,
        normalize: str = "per_map",
        explain_at_start: bool = True,
        max_objects: int = 1,
        method_options: dict[str, dict[str, Any]] | None = None,
        filmstrip: bool = True,
        on_error: str = "warn",
        seed: int = 0,
        iou_threshold: float = 0.5,
        every_n_train_steps: int | None = None,
        outside_fit: bool = True,
    ) -> None:
        methods = [methods] if isinstance(methods, str) else list(methods)
        validate_methods(methods)
        self.method_options = validate_method_options(method_options, methods)
        super().__init__(
            every_n_epochs=every_n_epochs,
            every_n_train_steps=every_n_train_steps,
            run_at_start=explain_at_start,
            on_error=on_error,
            adapter=adapter,
            num_probe=num_probe,
            probe_indices=probe_indices,
            seed=seed,
            outside_fit=outside_fit,
        )
        self.methods = methods
        self.layer = layer
        self.normalize = choice("normalize", normalize, ("per_map", "fixed"))
        self.max_objects = positive_int("max_objects", max_objects)
        self.filmstrip = bool(filmstrip)
        self.iou_threshold = in_range("iou_threshold", iou_threshold, 0.0, 1.0, low_open=True)
        # state (state_dict)
        self._tracked: list[list[list[float]]] = []  # per probe, per object: x1, y1, x2, y2, label
        self._scales: dict[str, float] = {}  # "<method>/<subject>" -> scale of normalize="fixed"
        # resolved at setup
        self._engines: dict[str, Engine] = {}
        self._history = PictureHistory()

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(methods=self.methods, num_probe=self.num_probe, layer=self.layer)

    @property
    def explain_at_start(self) -> bool:
        """Whether the model is also explained before training (step 0)."""
        return self.run_at_start

    # ---------------------------------------------------------------------------------------------- setup
    @override
    def _setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._engines = {
            m: get_engine(m, self._adapter, layer=self.layer, seed=self.seed, **self.method_options.get(m, {}))
            for m in self.methods
        }
        probes = self.probes
        if not self._tracked:
            self._tracked = [largest_objects(b, lab, self.max_objects) for b, lab in zip(probes.boxes, probes.labels)]

    # ------------------------------------------------------------------------------------------------ run
    @override
    def _run(self, share: list[int], ctx: RunContext) -> ShareRecord:
        """Explain this rank's probes; the maps (CPU) travel to rank zero, which draws them on its writer thread."""
        start = time.perf_counter()
        adapter = self._adapter
        images = self.probes.images[share].to(ctx.device)
        out = []
        with explaining(adapter.model, seed=self.seed):  # once per run: the engines' own entries nest cheaply
            with torch.no_grad():  # one batched forward: the detections, and each probe's matches below
                raw = adapter.raw(images) if share else None
            detections = [d.detach() for d in adapter.postprocess(raw)] if share else []
            for j, p in enumerate(share):
                tracked = self._tracked[p]
                if not tracked and len(detections[j]):  # probes without ground truth track their top detection
                    tracked = [[*detections[j].boxes[0].tolist(), float(detections[j].labels[0])]]
                targets = [
                    MatchedBoxTarget(t[:4], int(t[4]), iou_threshold=self.iou_threshold, conf=adapter.conf)
                    for t in tracked
                ]
                found = {
                    m: e.explain_boxes(images[j : j + 1], targets, raw=raw[j]).cpu() for m, e in self._engines.items()
                }
                out.append((p, tracked, found, detections[j].to("cpu")))
        return ShareRecord(out, time.perf_counter() - start)

    @override
    def _on_record(self, trainer: pl.Trainer, record: ShareRecord, ctx: RunContext) -> None:
        for p, tracked, _, _ in record.items:  # every rank keeps the same tracked objects
            self._tracked[p] = [list(t) for t in tracked]

    @override
    def _write(self, record: ShareRecord, ctx: RunContext) -> None:
        """Rank zero's writer thread: draw every picture and write it, the tracked scores and the cost."""
        start = time.perf_counter()
        writer = self._writer
        for p, tracked, found, dets in record.items:
            matches = next(iter(found.values())).matches
            for k, match in enumerate(matches):
                if match is not None:
                    writer.tracked(_subject(p, k), match.detected, match.score, ctx.step)
            for method, k, picture, tile in self._pictures(p, tracked, found, dets, ctx):
                subject = _subject(p, k)
                png = encode(picture)  # once: TensorBoard's image and the history's frame are the same bytes
                writer.explanation(method, subject, picture, ctx.step, png=png)
                if self.filmstrip and ctx.stage == "fit":
                    match = matches[k] if k < len(matches) else None
                    score = match.score if match is not None else None
                    self._history.add(subject, method, ctx.step, picture, tile=tile, score=score, encoded=png)
        writer.explain_seconds(record.seconds + time.perf_counter() - start, ctx.step)  # compute and drawing
        writer.flush()

    def _pictures(self, p: int, tracked: list, found: dict[str, Explanation], dets, ctx: RunContext) -> list:
        """``(method, object k, picture, filmstrip tile or None)`` of one probe."""
        probes = self.probes
        title = f"val #{probes.indices[p]}" + ("" if ctx.stage == "fit" else f" | {ctx.stage}")
        pictures = []
        for method, explanation in found.items():
            engine = self._engines[method]
            for k in [0] if per_image(method) else range(len(tracked)):
                subject = _subject(p, k)
                key = f"{method}/{subject}"
                if self.normalize == "fixed" and key not in self._scales and len(explanation):
                    self._scales[key] = float(explanation.maps[k].abs().amax()) or 1.0
                picture = draw_explanation(
                    explanation,
                    k,
                    probes.images[p],
                    names=self._adapter.names,
                    title=title,
                    label=int(tracked[k][4]) if k < len(tracked) else None,
                    gt_boxes=probes.boxes[p],
                    gt_labels=probes.labels[p],
                    detections=dets,
                    normalize=self.normalize,
                    signed=engine.signed,
                    scale=self._scales.get(key),
                    layer=engine.layer_name,
                    probe=subject,
                    epoch=ctx.epoch,
                    step=ctx.step,
                )
                pictures.append((method, k, *picture))
        return pictures

    # ---------------------------------------------------------------------------------------------- end
    @override
    def _at_fit_end(self) -> None:
        if self.filmstrip:
            self._write_filmstrips()

    def _earlier_pictures(self) -> None:
        """Pictures of steps this process did not draw (a resumed fit): read back from the log folders of the runs
        before the resume. A fresh fit drew every picture itself, so it reads nothing (reading and decoding its own
        log was 2.4 s of the demo's end of fit)."""

        def missing(tag: str, step: int) -> bool:
            _, method, subject = tag.split("/", 2)
            return method in self.methods and not self._history.has(subject, method, step)

        for folder in self._restored_log_dirs:
            for tag, by_step in read_pictures(folder, "explain/", wanted=missing).items():
                _, method, subject = tag.split("/", 2)
                for step, picture in by_step.items():
                    self._history.add(subject, method, step, picture)

    def _write_filmstrips(self) -> None:
        self._earlier_pictures()
        if not self._history.subjects():
            rank_zero_warn(f"{type(self).__name__}: nothing was explained during fit, so no filmstrip was written.")
            return
        folder = self.log_dir / "xaiwatch"
        for subject in self._history.subjects():
            if not self._history.steps(subject):
                continue
            strip = self._history.filmstrip(subject)
            self._history.write(subject, folder, strip=strip)
            self._writer.filmstrip(subject, strip, max(self._history.steps(subject)))
        self._writer.flush()

    # ---------------------------------------------------------------------------------------------- state
    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            **self._base_state(),
            "tracked": [[list(o) for o in t] for t in self._tracked],
            "scales": dict(self._scales),
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._load_base_state(state_dict)
        tracked = state_dict.get("tracked", [])
        # foundation checkpoints stored one object per probe as a flat list
        self._tracked = [
            [list(t)] if t and not isinstance(t[0], (list, tuple)) else [list(o) for o in t] for t in tracked
        ]
        self._scales = dict(state_dict.get("scales", {}))


def _subject(p: int, k: int) -> str:
    """``probe_<NN>`` (``_obj<K>`` for further objects): the same name for the same probe in every callback."""
    return f"probe_{p:02d}" + (f"_obj{k}" if k else "")
