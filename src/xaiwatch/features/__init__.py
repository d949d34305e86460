"""Feature-space projections, framework-free: hook capture, RoIAlign / global pooling, PCA / t-SNE / UMAP,
alignment across epochs and class-separability metrics."""

from __future__ import annotations

from xaiwatch.features.capture import box_thumbnails, capture_layers, global_pool, roi_pool, spatial_scale
from xaiwatch.features.embed import LEVELS, METADATA_HEADER, Embeddings, embed, embed_batch
from xaiwatch.features.metrics import knn_accuracy, match_predictions, separability, silhouette
from xaiwatch.features.projection import (
    METHODS,
    align,
    aligned_init,
    displacement,
    procrustes,
    project,
    validate_projection,
)

__all__ = [
    "LEVELS",
    "METADATA_HEADER",
    "METHODS",
    "Embeddings",
    "align",
    "aligned_init",
    "box_thumbnails",
    "capture_layers",
    "displacement",
    "embed",
    "embed_batch",
    "global_pool",
    "knn_accuracy",
    "match_predictions",
    "procrustes",
    "project",
    "roi_pool",
    "separability",
    "silhouette",
    "spatial_scale",
    "validate_projection",
]
