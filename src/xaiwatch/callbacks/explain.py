"""``ExplainCallback``: explain fixed probe images with several methods at every scheduled epoch."""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities import rank_zero_warn
from typing_extensions import override

from xaiwatch.adapters import DetectorAdapter
from xaiwatch.callbacks.probes import (
    choose_probe_indices,
    largest_objects,
    load_probes,
    validation_dataset,
)
from xaiwatch.callbacks.scheduled import ScheduledCallback
from xaiwatch.callbacks.validation import (
    validate_choices,
    validate_methods,
    validate_positive,
    validate_probe_indices,
)
from xaiwatch.core.context import explaining
from xaiwatch.core.errors import ConfigurationError
from xaiwatch.core.types import ProbeSet
from xaiwatch.explain import Engine, get_engine
from xaiwatch.logging import XaiWriter
from xaiwatch.render import explanation_panel
from xaiwatch.render.history import PictureHistory
from xaiwatch.render.panels import box_decision_panel, feature_grid
from xaiwatch.targets import MatchedBoxTarget

__all__ = ["ExplainCallback"]


class ExplainCallback(ScheduledCallback):
    """Explain a fixed set of held-out probe images at every scheduled epoch and log them to TensorBoard.

    In each probe image up to ``max_objects`` objects are tracked (the largest ground-truth boxes, each
    followed by IoU as the model's detections change, see :class:`~xaiwatch.targets.MatchedBoxTarget`). At
    the end of every ``every_n_epochs``-th validation every method explains each tracked object's class
    score (all objects of an image in one pass where the method allows) and TensorBoard gets one picture per
    method and object, ``explain/<method>/probe_<NN>`` (``..._obj<K>`` for further objects), whose step is the
    number of completed training epochs (step 0 = before training when ``explain_at_start``). At the end of
    fit a filmstrip (rows = methods, columns = epochs) and an animated GIF per object are written to
    ``<log_dir>/xaiwatch/`` and the filmstrip to TensorBoard. Explanations never change training (see
    :func:`~xaiwatch.core.context.explaining`).

    Args:
        methods: explanation methods by name (see :func:`xaiwatch.explain.available_methods`).
        num_probe: number of probe images chosen (seeded) from the validation set.
        probe_indices: explicit validation indices instead of a seeded choice.
        every_n_epochs: explain after every n-th training epoch's validation.
        layer: layer of CAM methods (adapter alias such as ``"neck.p3"`` or a dotted path).
        adapter: the model adapter; otherwise ``pl_module.xai_adapter()`` or inferred from the network.
        normalize: ``"per_map"`` (each map scaled by its own maximum) or ``"fixed"`` (one scale per method, taken
            from the first explained epoch, so brightening over epochs is real). Signed methods are drawn with a
            diverging colormap either way.
        explain_at_start: also explain the model before training (step 0).
        max_objects: objects tracked per probe image.
        method_options: keyword arguments per method, e.g. ``{"integrated_gradients": {"n_steps": 16}}``.
        filmstrip: write the filmstrips and GIFs at the end of fit.
        on_error: ``"warn"`` (training continues) or ``"raise"``.
        seed: seed of the probe choice and of stochastic methods.
        iou_threshold: IoU at which a candidate is the tracked object.

    Raises:
        ConfigurationError: for invalid arguments here, and at ``setup()`` for an unknown layer, a missing
            TensorBoard logger, missing validation data or too few validation images.
        UnsupportedModelError: at ``setup()`` when no adapter can be found for the model, or a method cannot be
            right on it (e.g. guided backpropagation on a SiLU network).
    """

    def __init__(
        self,
        methods: Sequence[str] = ("saliency", "grad_cam"),
        num_probe: int = 8,
        probe_indices: Sequence[int] | None = None,
        every_n_epochs: int = 1,
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
    ) -> None:
        methods = [methods] if isinstance(methods, str) else list(methods)
        validate_methods(methods)
        if probe_indices is not None:
            probe_indices = validate_probe_indices(probe_indices)
            num_probe = len(probe_indices)
        validate_choices(normalize=normalize)
        validate_positive(num_probe=num_probe, max_objects=max_objects)
        if not 0.0 < iou_threshold <= 1.0:
            raise ConfigurationError(f"`iou_threshold` must be in (0, 1], got {iou_threshold}.")
        unknown = sorted(set(method_options or {}) - set(methods))
        if unknown:
            raise ConfigurationError(f"`method_options` names methods not in `methods`: {unknown}.")
        super().__init__(every_n_epochs=every_n_epochs, run_at_start=explain_at_start, on_error=on_error)
        self.methods = methods
        self.num_probe = int(num_probe)
        self.probe_indices = probe_indices
        self.layer = layer
        self.adapter = adapter
        self.normalize = normalize
        self.max_objects = int(max_objects)
        self.method_options = {k: dict(v) for k, v in (method_options or {}).items()}
        self.filmstrip = bool(filmstrip)
        self.seed = int(seed)
        self.iou_threshold = float(iou_threshold)
        # state (state_dict)
        self._probe_indices: list[int] | None = None
        self._tracked: list[list[list[float]]] = []  # per probe, per object: x1, y1, x2, y2, label
        self._scales: dict[str, float] = {}
        # resolved at setup
        self._adapter: DetectorAdapter | None = None
        self._engines: dict[str, Engine] = {}
        self._probes: ProbeSet | None = None
        self._writer: XaiWriter | None = None
        self._history = PictureHistory()

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(methods=self.methods, num_probe=self.num_probe, layer=self.layer)

    # ---------------------------------------------------------------------------------------------- setup
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        name = type(self).__name__
        self._adapter = self._connect(trainer, pl_module)
        self._engines = {
            m: get_engine(m, self._adapter, layer=self.layer, seed=self.seed, **self.method_options.get(m, {}))
            for m in self.methods
        }
        dataset = validation_dataset(trainer, name)
        if self._probe_indices is None:  # not restored from a checkpoint
            self._probe_indices = self.probe_indices or choose_probe_indices(dataset, self.num_probe, self.seed, name)
        self._probes = load_probes(dataset, self._probe_indices, name)
        if not self._tracked:
            self._tracked = [
                largest_objects(b, lab, self.max_objects) for b, lab in zip(self._probes.boxes, self._probes.labels)
            ]
        if trainer.limit_val_batches == 0:
            rank_zero_warn(f"{name}: `limit_val_batches=0`, validation never runs, so nothing will be explained.")

    @property
    def explain_at_start(self) -> bool:
        """Whether the model is also explained before training (step 0)."""
        return self.run_at_start

    # ---------------------------------------------------------------------------------------------- hooks
    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.filmstrip and trainer.is_global_zero and self._writer is not None and self._history.subjects():
            self._safely(lambda: self._write_filmstrips(trainer), "writing filmstrips")

    # ------------------------------------------------------------------------------------------------ run
    def _run(self, pl_module: pl.LightningModule, step: int) -> None:
        if self._probes is None or self._adapter is None:
            raise ConfigurationError(f"{type(self).__name__} was not set up; it runs inside `Trainer.fit`.")
        start = time.perf_counter()
        adapter = self._adapter
        probes = self._probes.to(pl_module.device)
        with explaining(adapter.model, seed=self.seed):
            detections = adapter.detect(probes.images)
        for i, dets in enumerate(detections):  # probes without ground truth track their top detection
            if not self._tracked[i] and len(dets):
                self._tracked[i] = [[*dets.boxes[0].tolist(), float(dets.labels[0])]]
        pictures = []
        for i in range(len(probes)):
            image = probes.images[i : i + 1]
            targets = [
                MatchedBoxTarget(t[:4], int(t[4]), iou_threshold=self.iou_threshold, conf=adapter.conf)
                for t in self._tracked[i]
            ]
            maps = {m: e.attribute_boxes(image, targets).cpu() for m, e in self._engines.items() if e.kind != "grid"}
            grids = {m: e.channels(image) for m, e in self._engines.items() if e.kind == "grid"}
            for method, m in maps.items():
                if self.normalize == "fixed" and method not in self._scales and len(m):
                    self._scales[method] = float(m.abs().amax()) or 1.0
            pictures.append((i, targets, maps, grids, self._class_scores(image, targets)))
        if self._writer is not None:
            self._write(probes, detections, pictures, step)
            self._writer.explain_seconds(time.perf_counter() - start, step)  # compute and rendering
            self._writer.flush()

    def _class_scores(self, image: torch.Tensor, targets: list[MatchedBoxTarget]) -> list[torch.Tensor]:
        """Class scores of each target's matched candidate (for decision panels)."""
        if not any(e.kind == "panel" for e in self._engines.values()):
            return []
        with explaining(self._adapter.model, seed=self.seed), torch.no_grad():
            raw = self._adapter.raw(image)
        return [raw.scores[0, t.last_match[0].candidate].cpu() if t.last_match else None for t in targets]

    def _write(self, probes: ProbeSet, detections: list, pictures: list, step: int) -> None:
        for i, targets, maps, grids, class_scores in pictures:
            title = f"probe {i} (val #{probes.indices[i]}) | epoch {step}"
            for method, (values, indices) in grids.items():
                picture = feature_grid(
                    values[0].cpu(), indices[0].cpu(), title=f"{method} {self._engines[method].layer_name} | {title}"
                )
                self._writer.explanation(method, f"probe_{i:02d}", picture, step)
            for k, target in enumerate(targets):
                subject = f"probe_{i:02d}" + (f"_obj{k}" if k else "")
                match = target.last_match[0] if target.last_match else None
                if match is not None:
                    self._writer.tracked(subject, match.detected, match.score, step)
                for method, m in maps.items():
                    scores = class_scores[k] if class_scores else None
                    picture = self._picture(method, probes, i, m[k], target, match, detections[i], scores, title)
                    self._writer.explanation(method, subject, picture, step)
                    if self.filmstrip:
                        self._history.add(subject, method, step, picture)

    def _picture(self, method, probes, i, saliency, target, match, dets, scores, title) -> Any:
        names = self._adapter.names
        engine = self._engines[method]
        normalize = "signed" if engine.signed else self.normalize
        if engine.kind == "panel" and match is not None and scores is not None:
            return box_decision_panel(
                probes.images[i],
                saliency,
                match.box,
                scores,
                names=names,
                title=f"{method} | {title}",
                normalize=normalize,
                scale=self._scales.get(method),
            )
        label = names[target.label] if names else str(target.label)
        state = "" if match is None else "detected" if match.detected else "missed, nearest candidate"
        subtitle = "" if match is None else f"{label}: {state} (score {match.score:.2f}, IoU {match.iou:.2f})"
        return explanation_panel(
            probes.images[i],
            saliency,
            gt_boxes=probes.boxes[i],
            gt_labels=probes.labels[i],
            detections=dets,
            tracked_box=match.box if match else None,
            names=names,
            title=f"{method} | {title}",
            subtitle=subtitle,
            normalize=normalize,
            scale=self._scales.get(method),
        )

    def _write_filmstrips(self, trainer: pl.Trainer) -> None:
        folder = Path(trainer.log_dir or trainer.default_root_dir) / "xaiwatch"
        for subject in self._history.subjects():
            self._history.write(subject, folder)
            self._writer.filmstrip(subject, self._history.filmstrip(subject), max(self._history.steps(subject)))
        self._writer.flush()

    # ---------------------------------------------------------------------------------------------- state
    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "probe_indices": list(self._probe_indices or []),
            "tracked": [[list(o) for o in t] for t in self._tracked],
            "scales": dict(self._scales),
            "last_step": self._last_step,
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._probe_indices = list(state_dict.get("probe_indices", [])) or None
        tracked = state_dict.get("tracked", [])
        # foundation checkpoints stored one object per probe as a flat list
        self._tracked = [
            [list(t)] if t and not isinstance(t[0], (list, tuple)) else [list(o) for o in t] for t in tracked
        ]
        self._scales = dict(state_dict.get("scales", {}))
        self._last_step = int(state_dict.get("last_step", -1))
