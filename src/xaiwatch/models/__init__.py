"""LightningModules for fine-tuning detectors: users of the library, not part of its core."""

from __future__ import annotations

from xaiwatch.models.damo import DamoYoloModule
from xaiwatch.models.damo_loading import load_damo_directory
from xaiwatch.models.yolov8 import (
    WeightsReport,
    YOLOv8Module,
    class_branch_names,
    load_matching_weights,
    to_ultralytics_batch,
)
from xaiwatch.models.yolov8_cls import YOLOv8ClsModule

__all__ = [
    "DamoYoloModule",
    "YOLOv8ClsModule",
    "WeightsReport",
    "YOLOv8Module",
    "class_branch_names",
    "load_damo_directory",
    "load_matching_weights",
    "to_ultralytics_batch",
]
