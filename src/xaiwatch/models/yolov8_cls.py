"""``YOLOv8ClsModule``: train an ultralytics YOLOv8 classifier with Lightning on ``ClassificationDataModule`` data."""

from __future__ import annotations

import os
from typing import Any

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from pytorch_lightning.utilities import rank_zero_info
from torch import nn

from xaiwatch.adapters.classifier import ClassifierAdapter
from xaiwatch.core.errors import ConfigurationError
from xaiwatch.core.imports import require
from xaiwatch.models.yolov8 import YOLOv8Module, load_matching_weights

__all__ = ["YOLOv8ClsModule"]


def _build_classification_model(cfg: str | dict, num_classes: int) -> nn.Module:
    require("ultralytics", extra="yolo")
    os.environ.setdefault("YOLO_OFFLINE", "1")
    from ultralytics.nn.tasks import ClassificationModel
    from ultralytics.utils import LOGGER

    level = LOGGER.level
    LOGGER.setLevel("ERROR")  # "Overriding model.yaml nc=1000 with nc=3" and the summary are expected, not news
    try:
        return ClassificationModel(cfg, nc=num_classes, verbose=False)
    except FileNotFoundError as err:
        raise ConfigurationError(
            f"Cannot find the architecture yaml {cfg!r}. Use a name ultralytics ships (e.g. 'yolov8n-cls.yaml', "
            "'yolov8s-cls.yaml') or a path to your own model yaml."
        ) from err
    finally:
        LOGGER.setLevel(level)


def _logits(out: Any) -> torch.Tensor:
    """The logits of a ``Classify`` head's output: the tensor in training mode, ``(probs, logits)`` in eval."""
    return out[1] if isinstance(out, tuple) else out


class YOLOv8ClsModule(pl.LightningModule):
    """A LightningModule that trains an ultralytics ``ClassificationModel`` with cross-entropy.

    Batches are those of :class:`~xaiwatch.data.classification.ClassificationDataModule`: ``images``
    :math:`(B, 3, H, W)` in ``[0, 1]`` and ``labels`` :math:`(B,)`. Training minimises the cross-entropy of the
    ``Classify`` head's logits; validation logs ``val/loss`` and ``val/acc`` (torchmetrics
    ``MulticlassAccuracy``, micro average: the fraction of correctly classified images).

    Args:
        model: architecture yaml (``"yolov8n-cls.yaml"``, a path or a config dict).
        num_classes: number of classes of the new head, at least 2.
        names: class names (default ``"0"``, ``"1"``, …).
        weights: optional local checkpoint; tensors matching by name and shape are copied, the rest reported.
        trust_pickle: allow reading an ultralytics ``.pt`` checkpoint (pickled objects, runs code).
        lr: peak learning rate of AdamW.
        weight_decay: decay of conv/linear weights (not of biases and norm layers).
        warmup_steps: steps of linear warm-up before the cosine decay.

    Raises:
        ConfigurationError: for fewer than 2 classes, ``names`` of another length, a non-positive ``lr``, an
            unknown architecture yaml or an unusable ``weights`` file.
    """

    def __init__(
        self,
        model: str | dict = "yolov8n-cls.yaml",
        num_classes: int = 3,
        names: list[str] | None = None,
        weights: str | None = None,
        trust_pickle: bool = False,
        lr: float = 1e-3,
        weight_decay: float = 5e-4,
        warmup_steps: int = 20,
    ) -> None:
        super().__init__()
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
            raise ConfigurationError(f"`num_classes` must be an integer >= 2 for a classifier, got {num_classes!r}.")
        if names is not None and len(names) != num_classes:
            raise ConfigurationError(f"`names` has {len(names)} entries but `num_classes` is {num_classes}.")
        if lr <= 0:
            raise ConfigurationError(f"`lr` must be > 0, got {lr}.")
        self.save_hyperparameters()
        self.names = [str(n) for n in names] if names is not None else [str(i) for i in range(num_classes)]
        self.net = _build_classification_model(model, num_classes)
        self.net.names = dict(enumerate(self.names))
        self.weights_report: dict[str, list[str]] | None = None
        if weights:
            self.weights_report = load_matching_weights(self.net, weights, trust_pickle=trust_pickle)
            r = self.weights_report
            rank_zero_info(
                f"Loaded {len(r['loaded'])} tensors from {weights}; skipped {len(r['skipped'])} "
                f"(e.g. {r['skipped'][:3]}), {len(r['missing'])} left at initialisation."
            )
        from torchmetrics.classification import MulticlassAccuracy

        self.val_acc = MulticlassAccuracy(num_classes=num_classes, average="micro")

    def xai_adapter(self) -> ClassifierAdapter:
        """The adapter xaiwatch's callbacks explain this model with."""
        return ClassifierAdapter(self.net, names=self.names)

    def forward(self, images: torch.Tensor) -> Any:
        """The wrapped ``ClassificationModel``'s forward (logits in training mode, ``(probs, logits)`` in eval)."""
        return self.net(images)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        """Cross-entropy of one batch."""
        loss = F.cross_entropy(_logits(self.net(batch["images"])), batch["labels"])
        self.log("train/loss", loss, prog_bar=True, batch_size=batch["images"].shape[0])
        return loss

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        """Loss and accuracy of one validation batch (the model is in eval mode here)."""
        logits = _logits(self.net(batch["images"]))
        bs = logits.shape[0]
        self.log("val/loss", F.cross_entropy(logits, batch["labels"]), batch_size=bs, sync_dist=True)
        self.val_acc.update(logits, batch["labels"])
        self.log("val/acc", self.val_acc, prog_bar=True, batch_size=bs)

    def configure_optimizers(self) -> Any:
        """AdamW (decay on weights only) with linear warm-up then cosine decay to 5%, as :class:`YOLOv8Module`."""
        return YOLOv8Module.configure_optimizers(self)
