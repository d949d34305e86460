"""Plumbing shared by the fine-tuning modules: optimiser groups with a warm-up/cosine schedule, mAP validation."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from xaiwatch.core.errors import ConfigurationError
from xaiwatch.core.types import Detections

__all__ = ["detection_optimizer", "DetectionValidationMixin", "check_module_arguments"]


def check_module_arguments(num_classes: int, names: Sequence[str] | None, lr: float) -> None:
    """The arguments every fine-tuning module shares, checked in its constructor.

    Raises:
        ConfigurationError: for ``num_classes < 1``, ``names`` of another length, or ``lr <= 0``.

    Example:
        >>> check_module_arguments(3, ["a", "b", "c"], 1e-3)
    """
    if num_classes < 1:
        raise ConfigurationError(f"`num_classes` must be >= 1, got {num_classes}.")
    if names is not None and len(names) != num_classes:
        raise ConfigurationError(f"`names` has {len(names)} entries but `num_classes` is {num_classes}.")
    if lr <= 0:
        raise ConfigurationError(f"`lr` must be > 0, got {lr}.")


def detection_optimizer(
    net: nn.Module, lr: float, weight_decay: float, warmup_steps: int, total_steps: int | None
) -> dict[str, Any]:
    """AdamW with weight decay on the weights of convolutions and linear layers only (not on biases, norms or
    other vectors, as ultralytics and DAMO-YOLO do), linear warm-up then cosine decay to 5% over ``total_steps``.

    Args:
        net: the network.
        lr: peak learning rate.
        weight_decay: decay of the weight matrices / kernels.
        warmup_steps: warm-up optimiser steps (at most a fifth of the run).
        total_steps: optimiser steps of the run (``trainer.estimated_stepping_batches``); 1000 when unknown.

    Returns:
        Lightning's ``{"optimizer", "lr_scheduler"}`` dict, the schedule stepping every optimiser step.

    Example:
        >>> net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
        >>> out = detection_optimizer(net, 1e-3, 5e-4, warmup_steps=10, total_steps=100)
        >>> [len(g["params"]) for g in out["optimizer"].param_groups]
        [1, 3]
    """
    decay, no_decay = [], []
    for module in net.modules():
        norm = isinstance(module, (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm))
        for name, p in module.named_parameters(recurse=False):
            (decay if name == "weight" and p.ndim >= 2 and not norm else no_decay).append(p)
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=lr,
        betas=(0.9, 0.999),
    )
    total = max(int(total_steps), 1) if total_steps is not None else 1000
    warm = min(int(warmup_steps), max(total // 5, 1))

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        t = min((step - warm) / max(total - warm, 1), 1.0)
        return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * t))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
    return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


class DetectionValidationMixin:
    """``val/map50`` and ``val/map`` of a LightningModule from torchmetrics' ``MeanAveragePrecision``.

    The module calls :meth:`_update_map` in ``validation_step``; the epoch end logs and resets the metric. The
    metric is created lazily on the module's device (it is not a child module, torchmetrics #531); the module's
    ``__init__`` sets ``self._map = None`` (a class attribute would shadow the registered metric).
    """

    @property
    def map_metric(self) -> Any:
        """torchmetrics ``MeanAveragePrecision`` (xyxy boxes), created on first use."""
        if self._map is None:
            from torchmetrics.detection import MeanAveragePrecision

            self._map = MeanAveragePrecision(box_format="xyxy", iou_type="bbox").to(self.device)
        return self._map

    def _update_map(self, detections: Sequence[Detections], batch: dict) -> None:
        device = batch["images"].device
        self.map_metric.update(
            [{"boxes": d.boxes, "scores": d.scores, "labels": d.labels} for d in detections],
            [{"boxes": b.to(device), "labels": lab.to(device)} for b, lab in zip(batch["boxes"], batch["labels"])],
        )

    def on_validation_epoch_end(self) -> None:
        """Log ``val/map50`` and ``val/map``."""
        result = self.map_metric.compute()
        self.map_metric.reset()
        self.log("val/map50", result["map_50"].float(), prog_bar=True, sync_dist=True)
        self.log("val/map", result["map"].float(), sync_dist=True)
