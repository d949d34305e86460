"""``RTDETRModule``: fine-tune an ultralytics RT-DETR with Lightning, on ``YoloDataModule`` batches."""

from __future__ import annotations

import copy
import os
from types import SimpleNamespace
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities import rank_zero_info
from torch import nn

from xaiwatch.adapters.rtdetr import RTDETRAdapter
from xaiwatch.core.errors import ConfigurationError
from xaiwatch.core.imports import require
from xaiwatch.models.common import DetectionValidationMixin, check_module_arguments
from xaiwatch.models.yolov8 import YOLOv8Module, load_matching_weights, to_ultralytics_batch

__all__ = ["RTDETRModule"]


def _build_rtdetr(cfg: str | dict, num_classes: int) -> nn.Module:
    require("ultralytics", extra="yolo")
    os.environ.setdefault("YOLO_OFFLINE", "1")
    from ultralytics.nn.tasks import RTDETRDetectionModel, yaml_model_load
    from ultralytics.utils import LOGGER

    try:
        spec = copy.deepcopy(cfg) if isinstance(cfg, dict) else yaml_model_load(cfg)  # never change the user's dict
    except FileNotFoundError as err:
        raise ConfigurationError(
            f"Cannot find the architecture yaml {cfg!r}. Use a name ultralytics ships ('rtdetr-l.yaml', "
            "'rtdetr-resnet50.yaml') or a path to (or dict of) your own model yaml."
        ) from err
    last = (spec.get("head") or [[None, None, None]])[-1]
    if len(last) < 3 or last[2] != "RTDETRDecoder":
        raise ConfigurationError(
            f"`model={cfg!r}` does not end in an RTDETRDecoder head, so it is not an RT-DETR architecture "
            f"(its last module is {last[2] if len(last) > 2 else None!r}). Use 'rtdetr-l.yaml' or YOLOv8Module."
        )
    level = LOGGER.level
    LOGGER.setLevel("ERROR")
    try:
        return RTDETRDetectionModel(spec, nc=num_classes, verbose=False)
    finally:
        LOGGER.setLevel(level)


class RTDETRModule(DetectionValidationMixin, pl.LightningModule):
    """A LightningModule that fine-tunes an ultralytics ``RTDETRDetectionModel`` with ultralytics' own loss.

    The loss is ``RTDETRDetectionModel.loss``: ``RTDETRDetectionLoss`` (varifocal classification, L1 and GIoU box
    terms on the encoder's top-k proposals and every decoder layer, Hungarian matching) plus the contrastive
    denoising queries the decoder builds from the ground truth in training mode. As ultralytics' trainer does, the
    network gets ``nc`` and ``args`` before the first step. Batches, validation (``val/loss``, ``val/map50``,
    ``val/map``) and the optimiser schedule are those of :class:`~xaiwatch.models.YOLOv8Module`; detections for mAP
    are ultralytics' RT-DETR post-processing (no NMS) at ``val_conf``.

    Args:
        model: architecture yaml (``"rtdetr-l.yaml"``, ``"rtdetr-resnet50.yaml"``) or a path or dict.
        num_classes: number of classes of the new head.
        names: class names (default ``"0"``, ``"1"``, …).
        weights: optional local checkpoint; tensors matching by name and shape are copied, the rest reported.
        trust_pickle: allow reading an ultralytics ``.pt`` checkpoint (pickled objects, runs code).
        lr: peak learning rate of AdamW (ultralytics trains RT-DETR at 1e-4).
        weight_decay: decay of conv/linear weights.
        warmup_steps: steps of linear warm-up.
        val_conf: confidence threshold of the detections scored by mAP.

    Raises:
        ConfigurationError: for a bad argument or an architecture that is not an RT-DETR.

    Example:
        >>> module = RTDETRModule("rtdetr-l.yaml", num_classes=3)  # doctest: +SKIP
        >>> module.xai_adapter().head.num_queries  # doctest: +SKIP
        300
    """

    def __init__(
        self,
        model: str | dict = "rtdetr-l.yaml",
        num_classes: int = 3,
        names: list[str] | None = None,
        weights: str | None = None,
        trust_pickle: bool = False,
        lr: float = 1e-4,
        weight_decay: float = 1e-4,
        warmup_steps: int = 50,
        val_conf: float = 0.001,
    ) -> None:
        super().__init__()
        check_module_arguments(num_classes, names, lr)
        if not 0.0 <= val_conf <= 1.0:
            raise ConfigurationError(f"`val_conf` must be in [0, 1], got {val_conf}.")
        self.save_hyperparameters()
        self.names = list(names) if names is not None else [str(i) for i in range(num_classes)]
        self.net = _build_rtdetr(model, num_classes)
        self.net.names = dict(enumerate(self.names))
        self.net.nc = num_classes  # RTDETRDetectionModel.loss builds its criterion from these, as the trainer sets
        self.net.args = SimpleNamespace(box=7.5, cls=0.5, dfl=1.5)
        self.weights_report: dict[str, list[str]] | None = None
        if weights:
            self.weights_report = load_matching_weights(self.net, weights, trust_pickle=trust_pickle)
            r = self.weights_report
            rank_zero_info(f"Loaded {len(r['loaded'])} tensors from {weights}; skipped {len(r['skipped'])}.")
        self._map: Any = None

    def xai_adapter(self) -> RTDETRAdapter:
        """The adapter xaiwatch's callbacks explain this model with."""
        return RTDETRAdapter(self.net, names=self.names)

    def forward(self, images: torch.Tensor) -> Any:
        """The wrapped ``RTDETRDetectionModel``'s forward."""
        return self.net(images)

    def _batch(self, batch: dict) -> dict:
        images = batch["images"]
        target = to_ultralytics_batch(batch["boxes"], batch["labels"], tuple(images.shape[-2:]))
        return {"img": images, **{k: v.to(images.device) for k, v in target.items()}}

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        """One step of ultralytics' RT-DETR loss, with denoising queries."""
        loss, items = self.net.loss(self._batch(batch))
        bs = batch["images"].shape[0]
        self.log("train/loss", loss, prog_bar=True, batch_size=bs)
        for name, value in items.items():
            self.log(f"train/{name}", value, batch_size=bs)
        return loss

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        """Loss (without denoising, as in eval) and detections of one validation batch."""
        images = batch["images"]
        out = self.net(images)
        loss, _ = self.net.loss(self._batch(batch), preds=out)
        self.log("val/loss", loss, batch_size=images.shape[0], sync_dist=True)
        adapter = RTDETRAdapter(self.net, names=self.names, conf=self.hparams.val_conf)
        dets = adapter.postprocess(adapter.raw_from_output(out, images.shape[-2:]))
        self._update_map(dets, batch)

    # the same AdamW + warm-up + cosine schedule as YOLOv8Module (the mAP metric comes from the mixin)
    configure_optimizers = YOLOv8Module.configure_optimizers
