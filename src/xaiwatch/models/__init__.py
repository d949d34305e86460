"""LightningModules for fine-tuning detectors: users of the library, not part of its core."""

from __future__ import annotations

from xaiwatch.models.damo import DamoYoloModule, load_damo_directory
from xaiwatch.models.rtdetr import RTDETRModule
from xaiwatch.models.yolov8 import (
    WeightsReport,
    YOLOv8Module,
    build_detection_model,
    class_branch_names,
    load_matching_weights,
    to_ultralytics_batch,
)
from xaiwatch.models.yolov8_cls import YOLOv8ClsModule

__all__ = [
    "DamoYoloModule",
    "RTDETRModule",
    "YOLOv8ClsModule",
    "WeightsReport",
    "YOLOv8Module",
    "build_detection_model",
    "class_branch_names",
    "load_damo_directory",
    "load_matching_weights",
    "to_ultralytics_batch",
]
