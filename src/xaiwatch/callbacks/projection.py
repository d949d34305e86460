"""``ProjectionCallback``: watch classes separate in a detector's feature space, epoch by epoch."""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities import rank_zero_warn
from typing_extensions import override

from xaiwatch.adapters import DetectorAdapter
from xaiwatch.callbacks.probes import probe_item, validation_dataset
from xaiwatch.callbacks.scheduled import ScheduledCallback
from xaiwatch.callbacks.validation import validate_positive
from xaiwatch.core.errors import ConfigurationError
from xaiwatch.features import (
    LEVELS,
    METADATA_HEADER,
    Embeddings,
    align,
    aligned_init,
    displacement,
    embed,
    project,
    separability,
    validate_projection,
)
from xaiwatch.logging import XaiWriter
from xaiwatch.render.projection import projection_scatter

__all__ = ["ProjectionCallback"]

_SPRITE_SIDE = 8192  # TensorBoard's projector refuses larger sprite images


class ProjectionCallback(ScheduledCallback):
    """Project per-object (or per-image) embeddings of named layers to 2-D at every scheduled epoch.

    A fixed, seeded subset of the validation images is embedded each time: for ``level="box"`` every
    ground-truth box and every predicted box is pooled from each layer's feature map with ``roi_align`` at
    the layer's measured stride; for ``level="image"`` each image is globally average-pooled. One forward pass
    per batch gives both the detections and the features (hooks removed afterwards, no side effect on
    training). Each layer's points are projected with PCA, t-SNE or UMAP, aligned onto the previous epoch's
    layout (Procrustes; t-SNE / UMAP also start from it), and written to TensorBoard with step = completed
    epochs: the scatter picture ``projection/<layer>`` (IMAGES: colour = class, marker = ground truth
    found / missed, true / false positive), the vectors with metadata columns and a sprite of crops (PROJECTOR),
    and ``projection/<layer>/silhouette``, ``.../knn_accuracy`` (class separability of the ground-truth points in
    feature space, cosine distance) and ``.../displacement`` (how far the known points moved) (SCALARS).

    Args:
        layers: adapter layer names (``"neck.p3"``), dotted module paths, or a group prefix (``"neck"`` = every
            ``neck.*`` alias). Default: the adapter's neck layers.
        level: ``"box"`` (per object) or ``"image"`` (per image).
        method: ``"pca"``, ``"tsne"`` or ``"umap"`` (extra ``xaiwatch[umap]``).
        every_n_epochs: project after every n-th training epoch's validation.
        max_points: most points per epoch; for ``"box"`` the image subset holds at most half as many
            ground-truth boxes, the rest is for predictions (highest scores kept).
        project_at_start: also project the model before training (step 0).
        batch_size: images per forward pass.
        perplexity: t-SNE perplexity (must stay below the number of points).
        n_neighbors: UMAP neighbourhood size.
        knn_k: neighbours of the k-NN accuracy.
        iou_threshold: IoU at which a prediction is a true positive.
        thumbnail: side of the projector's sprite thumbnails in pixels.
        projector: write the PROJECTOR tab's files.
        adapter: the model adapter; otherwise ``pl_module.xai_adapter()`` or inferred from the network.
        on_error: ``"warn"`` (training continues) or ``"raise"``.
        seed: seed of the image subset and of t-SNE / UMAP.

    Raises:
        ConfigurationError: for invalid arguments here; at ``setup()`` for an unknown layer, ``max_points``
            below the number of classes, a perplexity not below the number of ground-truth points, missing
            validation data or a missing TensorBoard logger.
        MissingDependencyError: for ``method="umap"`` without ``umap-learn`` (``pip install 'xaiwatch[umap]'``).
    """

    def __init__(
        self,
        layers: Sequence[str] | str | None = None,
        level: str = "box",
        method: str = "pca",
        every_n_epochs: int = 1,
        max_points: int = 1000,
        project_at_start: bool = True,
        batch_size: int = 16,
        perplexity: float = 30.0,
        n_neighbors: int = 15,
        knn_k: int = 5,
        iou_threshold: float = 0.5,
        thumbnail: int = 32,
        projector: bool = True,
        adapter: DetectorAdapter | None = None,
        on_error: str = "warn",
        seed: int = 0,
    ) -> None:
        layers = [layers] if isinstance(layers, str) else (list(layers) if layers is not None else None)
        if layers is not None and (not layers or len(set(layers)) != len(layers)):
            raise ConfigurationError(f"`layers` must name distinct layers, got {layers}.")
        if level not in LEVELS:
            raise ConfigurationError(f"`level` can be {' or '.join(LEVELS)}, got {level!r}.")
        validate_projection(method, max_points, float(perplexity), int(n_neighbors))
        validate_positive(batch_size=batch_size, knn_k=knn_k, thumbnail=thumbnail)
        if not 0.0 < iou_threshold <= 1.0:
            raise ConfigurationError(f"`iou_threshold` must be in (0, 1], got {iou_threshold}.")
        if max_points * thumbnail**2 > _SPRITE_SIDE**2:
            raise ConfigurationError(
                f"{max_points} thumbnails of {thumbnail} px exceed TensorBoard's {_SPRITE_SIDE} px sprite; "
                "lower `thumbnail` or `max_points`."
            )
        super().__init__(every_n_epochs=every_n_epochs, run_at_start=project_at_start, on_error=on_error)
        self.layers, self.level, self.method = layers, level, method
        self.max_points, self.batch_size = int(max_points), int(batch_size)
        self.projector = bool(projector)
        self.perplexity, self.n_neighbors, self.knn_k = float(perplexity), int(n_neighbors), int(knn_k)
        self.iou_threshold, self.thumbnail = float(iou_threshold), int(thumbnail)
        self.adapter, self.seed = adapter, int(seed)
        # state (state_dict)
        self._image_indices: list[int] | None = None
        self._layouts: dict[str, dict[str, list[float]]] = {}  # layer -> point key -> last (x, y)
        # resolved at setup
        self._adapter: DetectorAdapter | None = None
        self._layer_names: list[str] = []
        self._dataset: Any = None
        self._writer: XaiWriter | None = None
        self.history: dict[str, dict[int, dict[str, float]]] = {}  # layer -> step -> scalars (rank zero computes)

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(layers=self.layers, level=self.level, method=self.method)

    # ---------------------------------------------------------------------------------------------- setup
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        name = type(self).__name__
        self._adapter = self._connect(trainer, pl_module)
        self._layer_names = self._resolve_layers(self._adapter)
        num_classes = self._adapter.num_classes
        if self.max_points < num_classes:
            raise ConfigurationError(
                f"{name}: `max_points={self.max_points}` is below the number of classes ({num_classes}); "
                "every class needs points. Raise `max_points`."
            )
        self._dataset = validation_dataset(trainer, name)
        if self._image_indices is None:  # not restored from a checkpoint
            self._image_indices = self._choose_images(self._dataset)
        validate_projection(self.method, self._known_points(), self.perplexity, self.n_neighbors)
        if trainer.limit_val_batches == 0:
            rank_zero_warn(f"{name}: `limit_val_batches=0`, validation never runs, so only step 0 is projected.")

    def _resolve_layers(self, adapter: DetectorAdapter) -> list[str]:
        aliases = list(adapter.layer_names())
        wanted = self.layers or (
            ["neck"] if any(a.startswith("neck.") for a in aliases) else [adapter.default_cam_layer]
        )
        names: list[str] = []
        for layer in wanted:
            group = [a for a in aliases if a.startswith(f"{layer}.")]
            for n in group or [layer]:
                adapter.layer(n)  # raises for an unknown layer, listing the aliases
                if n not in names:
                    names.append(n)
        return names

    def _choose_images(self, dataset: Any) -> list[int]:
        """Seeded order; an image joins while its ground-truth boxes fit the budget (``max_points // 2`` boxes)."""
        chosen, used = [], 0
        budget = self.max_points if self.level == "image" else self.max_points // 2
        for i in np.random.default_rng(self.seed).permutation(len(dataset)).tolist():
            n = 1 if self.level == "image" else len(probe_item(dataset[i])[1])
            if used + n <= budget:
                chosen.append(int(i))
                used += n
            if used >= budget:
                break
        return sorted(chosen)

    def _known_points(self) -> int:
        """Points every epoch has for sure: the chosen images, or their ground-truth boxes."""
        indices = self._image_indices or []
        if self.level == "image":
            return len(indices)
        return sum(len(probe_item(self._dataset[i])[1]) for i in indices)

    def _batches(self, device: torch.device) -> Iterator[tuple]:
        """The chosen images in batches of one size (consecutive images of another size start a new batch)."""
        batch: list[tuple] = []
        for i in self._image_indices or []:
            image, boxes, labels = probe_item(self._dataset[i])
            if batch and (len(batch) == self.batch_size or batch[0][0].shape != image.shape):
                yield _collate(batch, device)
                batch = []
            batch.append((image, boxes, labels, i))
        if batch:
            yield _collate(batch, device)

    # ---------------------------------------------------------------------------------------------- hooks
    @property
    def project_at_start(self) -> bool:
        """Whether the model is also projected before training (step 0)."""
        return self.run_at_start

    def _run(self, pl_module: pl.LightningModule, step: int) -> None:
        self.run(pl_module.device, step)

    # ------------------------------------------------------------------------------------------------ run
    def run(self, device: torch.device | str, step: int) -> dict[str, dict[str, float]]:
        """Embed, project, align and write one epoch; returns the scalars written per layer."""
        if self._adapter is None or self._image_indices is None:
            raise ConfigurationError(f"{type(self).__name__} was not set up; it runs inside `Trainer.fit`.")
        start = time.perf_counter()
        points = embed(
            self._adapter,
            self._batches(torch.device(device)),
            self._layer_names,
            level=self.level,
            epoch=step,
            iou_threshold=self.iou_threshold,
            thumbnail=self.thumbnail,
            seed=self.seed,
        )
        points = self._cap(points)
        results = {layer: self._project_layer(points, layer, step) for layer in self._layer_names}
        if self._writer is not None:
            self._writer.projection_seconds(time.perf_counter() - start, step)
            self._writer.flush()
        return results

    def _cap(self, points: Embeddings) -> Embeddings:
        """Keep every ground-truth point and the highest-scoring predictions, ``max_points`` in all."""
        if len(points) <= self.max_points:
            return points
        gt = torch.nonzero(points.is_gt).flatten()[: self.max_points]  # fewer unless resumed with a smaller budget
        pred = torch.nonzero(~points.is_gt).flatten()
        pred = pred[torch.argsort(points.scores[pred], descending=True, stable=True)][: self.max_points - len(gt)]
        return points.select(torch.cat([gt, pred.sort().values]))

    def _project_layer(self, points: Embeddings, layer: str, step: int) -> dict[str, float]:
        features = points.features[layer]
        previous = self._layouts.get(layer, {})
        init = aligned_init(features, points.keys, previous) if self.method != "pca" else None
        layout = project(features, self.method, init, self.seed, self.perplexity, self.n_neighbors)
        layout = align(layout, points.keys, previous)
        truth = points.is_gt & (points.labels >= 0)
        values = separability(features[truth], points.labels[truth], k=self.knn_k)
        values["displacement"] = displacement(layout, points.keys, previous)
        self._layouts[layer] = {k: [float(v) for v in xy] for k, xy in zip(points.keys, layout) if k is not None}
        self.history.setdefault(layer, {})[step] = values
        if self._writer is not None:
            outcomes = [row[2] for row in points.metadata]
            title = f"{layer} | {self.method} | {self.level} | epoch {step} | silhouette {values['silhouette']:.2f}"
            names = self._adapter.names if self._adapter is not None else None
            picture = projection_scatter(layout, points.labels.tolist(), outcomes, names, title)
            self._writer.projection(layer, picture, step)
            self._writer.projection_metrics(layer, values, step)
            if self.projector:
                self._writer.embedding(layer, features, points.metadata, METADATA_HEADER, points.thumbnails, step)
        return values

    # ---------------------------------------------------------------------------------------------- state
    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "image_indices": list(self._image_indices or []),
            "layouts": {layer: dict(points) for layer, points in self._layouts.items()},
            "last_step": self._last_step,
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._image_indices = list(state_dict.get("image_indices", [])) or None
        self._layouts = {k: dict(v) for k, v in state_dict.get("layouts", {}).items()}
        self._last_step = int(state_dict.get("last_step", -1))


def _collate(items: list[tuple], device: torch.device) -> tuple:
    return (
        torch.stack([im for im, _, _, _ in items]).to(device),
        [b for _, b, _, _ in items],
        [lab for _, _, lab, _ in items],
        [i for _, _, _, i in items],
    )
