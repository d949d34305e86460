"""``ProjectionCallback``: watch classes separate in a detector's feature space, epoch by epoch."""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from typing_extensions import override

from xaiwatch.adapters import DetectorAdapter
from xaiwatch.callbacks.base import ProbeCallback, RunContext, ShareRecord
from xaiwatch.callbacks.capture import CapturedBatch
from xaiwatch.callbacks.probes import probe_item
from xaiwatch.core.errors import ConfigurationError
from xaiwatch.core.validation import in_range, positive_int
from xaiwatch.features import (
    LEVELS,
    METADATA_HEADER,
    Embeddings,
    align,
    aligned_init,
    displacement,
    embed,
    embed_batch,
    project,
    separability,
    validate_projection,
)
from xaiwatch.logging import Tags
from xaiwatch.render.projection import projection_scatter

__all__ = ["ProjectionCallback"]

_SPRITE_SIDE = 8192  # TensorBoard's projector refuses larger sprite images


class ProjectionCallback(ProbeCallback):
    """Project per-object (or per-image) embeddings of named layers to 2-D at every scheduled epoch.

    A fixed, seeded subset of the validation images is embedded each time: for ``level="box"`` every
    ground-truth box and every predicted box is pooled from each layer's feature map with ``roi_align`` at
    the layer's measured stride; for ``level="image"`` each image is globally average-pooled. One forward pass
    per batch gives both the detections and the features (hooks removed afterwards, no side effect on
    training); after a validation epoch, that pass is the validation's own (``reuse_validation``), so the
    subset costs no forward of its own. Each layer's points are projected with PCA, t-SNE or UMAP, aligned onto
    the previous epoch's layout (Procrustes; t-SNE / UMAP also start from it), and written to TensorBoard with
    step = completed epochs: the scatter picture ``projection/<layer>`` (IMAGES: colour = class, marker = ground truth
    found / missed, true / false positive), the vectors with metadata columns and a sprite of crops (PROJECTOR),
    and ``projection/<layer>/silhouette``, ``.../knn_accuracy`` (class separability of the ground-truth points in
    feature space, cosine distance) and ``.../displacement`` (how far the known points moved) (SCALARS).

    Args:
        layers: adapter layer names (``"neck.p3"``), dotted module paths, or a group prefix (``"neck"`` = every
            ``neck.*`` alias). Default: the adapter's neck layers.
        level: ``"box"`` (per object) or ``"image"`` (per image).
        method: ``"pca"``, ``"tsne"`` or ``"umap"`` (extra ``xaiwatch[umap]``).
        every_n_epochs: project after every n-th training epoch's validation (``None``: not by epoch).
        every_n_train_steps: project after every n-th optimiser step too.
        outside_fit: also project at the end of ``trainer.validate`` / ``trainer.test``.
        reuse_validation: take the features and detections of the subset from the validation pass that precedes a
            run by epoch (hooks for that epoch only), where the module fed xaiwatch's batches (``"images"``,
            ``"indices"``, ``"paths"``) unchanged to the model in one process; images it did not see, and runs by
            step, at start or under DDP, get a forward of their own. The points are the same either way.
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

    Example:
        >>> cb = ProjectionCallback(layers=["neck"], method="pca", max_points=500, every_n_epochs=2)
        >>> cb.layers, cb.max_points, cb.every_n_epochs
        (['neck'], 500, 2)
    """

    def __init__(
        self,
        layers: Sequence[str] | str | None = None,
        level: str = "box",
        method: str = "pca",
        every_n_epochs: int | None = 1,
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
        every_n_train_steps: int | None = None,
        outside_fit: bool = True,
        reuse_validation: bool = True,
    ) -> None:
        layers = [layers] if isinstance(layers, str) else (list(layers) if layers is not None else None)
        if layers is not None and (not layers or len(set(layers)) != len(layers)):
            raise ConfigurationError(f"`layers` must name distinct layers, got {layers}.")
        if level not in LEVELS:
            raise ConfigurationError(f"`level` can be {' or '.join(LEVELS)}, got {level!r}.")
        validate_projection(method, max_points, float(perplexity), int(n_neighbors))
        for name, value in (("batch_size", batch_size), ("knn_k", knn_k), ("thumbnail", thumbnail)):
            positive_int(name, value)
        in_range("iou_threshold", iou_threshold, 0.0, 1.0, low_open=True)
        if max_points * thumbnail**2 > _SPRITE_SIDE**2:
            raise ConfigurationError(
                f"{max_points} thumbnails of {thumbnail} px exceed TensorBoard's {_SPRITE_SIDE} px sprite; "
                "lower `thumbnail` or `max_points`."
            )
        super().__init__(
            every_n_epochs=every_n_epochs,
            every_n_train_steps=every_n_train_steps,
            run_at_start=project_at_start,
            on_error=on_error,
            adapter=adapter,
            seed=seed,
            outside_fit=outside_fit,
        )
        self.layers, self.level, self.method = layers, level, method
        self.reuse_validation = bool(reuse_validation)
        self.max_points, self.batch_size = int(max_points), int(batch_size)
        self.projector = bool(projector)
        self.perplexity, self.n_neighbors, self.knn_k = float(perplexity), int(n_neighbors), int(knn_k)
        self.iou_threshold, self.thumbnail = float(iou_threshold), int(thumbnail)
        # state (state_dict)
        self._layouts: dict[str, dict[str, list[float]]] = {}  # layer -> point key -> last (x, y)
        # resolved at setup
        self._imported = True  # whether the PROJECTOR epochs of the resumed runs are copied in (a fit: at first write)
        self._layer_names: list[str] = []
        self.history: dict[str, dict[int, dict[str, float]]] = {}  # layer -> step -> scalars (rank zero computes)

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(layers=self.layers, level=self.level, method=self.method)

    # ---------------------------------------------------------------------------------------------- setup
    @override
    def _setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        name = type(self).__name__
        self._layer_names = self._resolve_layers(self._adapter)
        num_classes = self._adapter.num_classes
        if self.max_points < num_classes:
            raise ConfigurationError(
                f"{name}: `max_points={self.max_points}` is below the number of classes ({num_classes}); "
                "every class needs points. Raise `max_points`."
            )
        validate_projection(self.method, self._known_points(), self.perplexity, self.n_neighbors)
        self._imported = stage != "fit"  # a fit's first write copies the PROJECTOR epochs of the runs it resumed

    def _resolve_layers(self, adapter: DetectorAdapter) -> list[str]:
        aliases = list(adapter.layer_names())
        wanted = self.layers or (
            ["neck"] if any(a.startswith("neck.") for a in aliases) else [adapter.default_cam_layer]
        )
        return adapter.layer_group(",".join(wanted))  # raises for an unknown layer, listing the aliases

    @override
    def _choose(self, dataset: Any) -> list[int]:
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
        indices = self._indices or []
        if self.level == "image":
            return len(indices)
        return sum(len(probe_item(self._dataset[i])[1]) for i in indices)

    def _batches(self, device: torch.device, indices: list[int] | None = None) -> Iterator[tuple]:
        """The chosen images in batches of one size (consecutive images of another size start a new batch)."""
        batch: list[tuple] = []
        for i in self._indices if indices is None else indices:
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

    @override
    def _captures(self) -> dict[str, torch.nn.Module]:
        return {name: self._adapter.layer(name) for name in self._layer_names}

    @override
    def _consume(self, batch: CapturedBatch) -> tuple[list[int], Embeddings]:
        """The points of the subset's images in one validation batch (pooled now: no map outlives its batch)."""
        detections = [d.detach() for d in self._adapter.postprocess(batch.raw)]
        names = self._adapter.names
        points = embed_batch(
            batch.images, batch.boxes, batch.labels, batch.ids, detections, batch.maps, self.level, names,
            self._capture_epoch, self.iou_threshold, self.thumbnail,
        )  # fmt: skip
        return batch.ids, points

    @override
    def _run(self, share: list[int], ctx: RunContext) -> ShareRecord:
        """Embed this rank's images (one forward per batch, or none for those the validation pass embedded);
        rank zero projects every rank's points."""
        start = time.perf_counter()
        wanted = [self._indices[p] for p in share]
        captured = self._captured if ctx.stage == "fit" else []
        seen = {i for ids, _ in captured for i in ids}
        parts = [points for _, points in captured]
        missing = [i for i in wanted if i not in seen]
        if missing:
            parts.append(self._embed(ctx.device, missing, ctx.epoch))
        points = Embeddings.cat(parts).in_image_order(wanted) if seen else Embeddings.cat(parts)
        return ShareRecord([(share[0] if share else 0, points)], time.perf_counter() - start)

    @override
    def _write(self, record: ShareRecord, ctx: RunContext) -> None:
        start = time.perf_counter()
        if not self._imported and self.projector:
            self._import_earlier()
        self._project(Embeddings.cat([points for _, points in record.items]), ctx.step, ctx.epoch)
        self._writer.projection_seconds(record.seconds + time.perf_counter() - start, ctx.step)
        self._writer.flush()

    def _import_earlier(self) -> None:
        """The PROJECTOR epochs of the runs a resumed fit continues, copied into its log folder (the checkpoint's
        state, restored after ``setup()``, names those runs' folders)."""
        from xaiwatch.logging.projector import import_embeddings

        self._imported = True
        for folder in self._restored_log_dirs:
            import_embeddings(self.log_dir, folder, Tags.projection(""))

    def _embed(self, device: torch.device | str, indices: list[int], epoch: int) -> Embeddings:
        return embed(
            self._adapter,
            self._batches(torch.device(device), indices),
            self._layer_names,
            level=self.level,
            epoch=epoch,
            iou_threshold=self.iou_threshold,
            thumbnail=self.thumbnail,
            seed=self.seed,
        )

    def _project(self, points: Embeddings, step: int, epoch: int | None = None) -> dict[str, dict[str, float]]:
        points = self._cap(points)
        return {layer: self._project_layer(points, layer, step, epoch) for layer in self._layer_names}

    # ------------------------------------------------------------------------------------------------ run
    def run(self, device: torch.device | str, step: int) -> dict[str, dict[str, float]]:
        """Embed, project, align and write one step in this process (all images); returns the scalars per layer."""
        self._require_setup()
        start = time.perf_counter()
        results = self._project(self._embed(device, list(self._indices), step), step)
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

    def _project_layer(self, points: Embeddings, layer: str, step: int, epoch: int | None = None) -> dict[str, float]:
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
            title = f"{layer} | {self.method} | {self.level} | silhouette {values['silhouette']:.2f}"
            names = self._adapter.names if self._adapter is not None else None
            picture = projection_scatter(layout, points.labels.tolist(), outcomes, names, title, epoch=epoch, step=step)
            self._writer.projection(layer, picture, step)
            self._writer.projection_metrics(layer, values, step)
            if self.projector:
                self._writer.embedding(layer, features, points.metadata, METADATA_HEADER, points.thumbnails, step)
        return values

    # ---------------------------------------------------------------------------------------------- state
    @override
    def state_dict(self) -> dict[str, Any]:
        return {**self._base_state(), "layouts": {layer: dict(points) for layer, points in self._layouts.items()}}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._load_base_state(state_dict, index_key="image_indices")
        self._layouts = {k: dict(v) for k, v in state_dict.get("layouts", {}).items()}


def _collate(items: list[tuple], device: torch.device) -> tuple:
    return (
        torch.stack([im for im, _, _, _ in items]).to(device),
        [b for _, b, _, _ in items],
        [lab for _, _, lab, _ in items],
        [i for _, _, _, i in items],
    )
