"""Detection data: the procedural shapes dataset (with planted shortcuts) and an ultralytics-layout reader.

:func:`generate` writes a dataset to disk, :func:`write_counterfactual` re-renders a shortcut dataset with the
cue changed, :class:`YoloDataModule` loads any ultralytics-layout dataset for Lightning.
"""

from __future__ import annotations

from xaiwatch.data.classification import ClassificationDataModule, ClassificationDataset, generate_classification
from xaiwatch.data.shapes import generate, object_masks, read_specs, render, write_counterfactual
from xaiwatch.data.yolo import YoloDataModule, YoloDataset, collate_detection, letterbox, read_dataset_yaml

__all__ = [
    "ClassificationDataModule",
    "ClassificationDataset",
    "generate_classification",
    "YoloDataModule",
    "YoloDataset",
    "collate_detection",
    "generate",
    "letterbox",
    "object_masks",
    "read_dataset_yaml",
    "read_specs",
    "render",
    "write_counterfactual",
]
