"""Model adapters: one per model family, and the resolution rule callbacks use."""

from __future__ import annotations

from xaiwatch.adapters.base import DetectorAdapter, apply_targets
from xaiwatch.adapters.classifier import ClassifierAdapter
from xaiwatch.adapters.damo import DamoYoloAdapter
from xaiwatch.adapters.postprocess import nms
from xaiwatch.adapters.resolve import resolve_adapter
from xaiwatch.adapters.rtdetr import RTDETRAdapter
from xaiwatch.adapters.yolov8 import YOLOv8Adapter

__all__ = [
    "ClassifierAdapter",
    "DamoYoloAdapter",
    "DetectorAdapter",
    "RTDETRAdapter",
    "YOLOv8Adapter",
    "apply_targets",
    "nms",
    "resolve_adapter",
]
