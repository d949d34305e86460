"""How a callback finds the adapter of the model it is attached to."""

from __future__ import annotations

import sys

from torch import nn

from xaiwatch.adapters.base import DetectorAdapter
from xaiwatch.core.errors import UnsupportedModelError

__all__ = ["refuse_ultralytics_wrapper", "resolve_adapter"]


def resolve_adapter(module: nn.Module, adapter: DetectorAdapter | None = None) -> DetectorAdapter:
    """Return the adapter to explain ``module`` with.

    In order: the ``adapter`` given to the callback; ``module.xai_adapter()``; an adapter inferred from the
    type of a network inside ``module`` (an ultralytics ``DetectionModel``, ``RTDETRDetectionModel``
    or ``ClassificationModel``, a DAMO-YOLO ``Detector`` from modelscope's code).

    Raises:
        UnsupportedModelError: if none of the three applies (the message says how to provide one), or if
            ``module`` holds an ultralytics ``YOLO`` wrapper (see :func:`refuse_ultralytics_wrapper`).
    """
    refuse_ultralytics_wrapper(module)
    if adapter is not None:
        if not isinstance(adapter, DetectorAdapter):
            raise UnsupportedModelError(f"`adapter` must be a DetectorAdapter, got {type(adapter).__name__}.")
        return adapter
    factory = getattr(module, "xai_adapter", None)
    if callable(factory):
        found = factory()
        if not isinstance(found, DetectorAdapter):
            raise UnsupportedModelError(
                f"{type(module).__name__}.xai_adapter() must return a DetectorAdapter, got {type(found).__name__}."
            )
        return found
    from xaiwatch.adapters.classifier import ClassifierAdapter, is_ultralytics_classification_model
    from xaiwatch.adapters.damo import DamoYoloAdapter, is_damo_detector
    from xaiwatch.adapters.rtdetr import RTDETRAdapter, is_ultralytics_rtdetr_model
    from xaiwatch.adapters.yolov8 import YOLOv8Adapter, is_ultralytics_detection_model

    for sub in module.modules():
        if is_ultralytics_rtdetr_model(sub):  # before DetectionModel, its base class
            return RTDETRAdapter(sub, names=_names_of(module))
        if is_ultralytics_detection_model(sub):
            return YOLOv8Adapter(sub, names=_names_of(module))
        if is_ultralytics_classification_model(sub):
            return ClassifierAdapter(sub, names=_names_of(module))
        if is_damo_detector(sub):
            return DamoYoloAdapter(sub, names=_names_of(module))
    raise UnsupportedModelError(
        f"Cannot explain {type(module).__name__}: no adapter. Either (1) give the callback one, "
        "`ExplainCallback(adapter=YOLOv8Adapter(net))`; (2) add a method `xai_adapter(self) -> DetectorAdapter` "
        "to your LightningModule; or (3) hold a supported network (ultralytics DetectionModel, RTDETRDetectionModel or ClassificationModel, DAMO-YOLO Detector) as a submodule so "
        "that it can be inferred."
    )


def refuse_ultralytics_wrapper(module: nn.Module) -> None:
    """Refuse a module holding an ultralytics ``YOLO`` wrapper (``ultralytics.engine.model.Model``).

    The wrapper is an ``nn.Module`` whose ``train()`` starts an ultralytics training run (which downloads
    ``coco8.yaml`` when no data is given); Lightning calls ``module.train()`` on every child, so fitting a
    LightningModule that holds one starts that run. The network to hold is ``YOLO(...).model``.

    Args:
        module: the LightningModule (or any module) the callbacks explain.

    Raises:
        UnsupportedModelError: naming the attribute that holds the wrapper and the fix.

    Example:
        >>> refuse_ultralytics_wrapper(nn.Sequential(nn.Linear(2, 2)))  # no wrapper: nothing happens
    """
    wrapper_module = sys.modules.get("ultralytics.engine.model")  # holding a YOLO means ultralytics is imported
    if wrapper_module is None:
        return
    for name, sub in module.named_modules():
        if isinstance(sub, wrapper_module.Model):
            where = f"`{type(module).__name__}.{name}`" if name else f"`{type(module).__name__}`"
            raise UnsupportedModelError(
                f"{where} is an ultralytics {type(sub).__name__} wrapper: Lightning calls `.train()` on every "
                "submodule, and the wrapper's `.train()` starts an ultralytics training run (it downloads "
                "coco8.yaml). Hold the network instead: `self.net = YOLO('yolov8n.pt').model` (a DetectionModel), "
                "or use xaiwatch.models.YOLOv8Module(weights=...)."
            )


def _names_of(module: nn.Module) -> list[str] | None:
    names = getattr(module, "names", None)
    if isinstance(names, dict):
        return [names[k] for k in sorted(names)]
    return list(names) if names else None
