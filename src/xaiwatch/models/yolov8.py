"""``YOLOv8Module``: fine-tune an ultralytics YOLOv8 detector with Lightning, on ``YoloDataModule`` batches."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities import rank_zero_info
from torch import nn

from xaiwatch.adapters.yolov8 import YOLOv8Adapter
from xaiwatch.core.errors import ConfigurationError
from xaiwatch.core.imports import require
from xaiwatch.models.common import DetectionValidationMixin, detection_optimizer

__all__ = [
    "YOLOv8Module",
    "build_detection_model",
    "load_matching_weights",
    "read_weights_file",
    "to_ultralytics_batch",
]


def build_detection_model(cfg: str | dict, num_classes: int) -> nn.Module:
    require("ultralytics", extra="yolo")
    os.environ.setdefault("YOLO_OFFLINE", "1")
    from ultralytics.nn.tasks import DetectionModel
    from ultralytics.utils import LOGGER

    level = LOGGER.level
    LOGGER.setLevel("ERROR")  # "Overriding model.yaml nc=80 with nc=3" is expected, not news
    try:
        return DetectionModel(cfg, nc=num_classes, verbose=False)
    except FileNotFoundError as err:
        raise ConfigurationError(
            f"Cannot find the architecture yaml {cfg!r}. Use a name ultralytics ships (e.g. 'yolov8n.yaml', "
            "'yolov8s.yaml') or a path to your own model yaml."
        ) from err
    finally:
        LOGGER.setLevel(level)


def read_weights_file(path: str | os.PathLike, trust_pickle: bool = False) -> Any:
    """Read a PyTorch weights file (``torch.save`` output), refusing a file that is not one.

    The file is read with ``torch.load(weights_only=True)`` (tensors and plain containers only). A file that stores
    pickled Python objects, as ultralytics ``.pt`` checkpoints do, runs code from the file when loaded: it is read
    only when ``trust_pickle=True``.

    Args:
        path: the file.
        trust_pickle: allow unpickling arbitrary objects.

    Returns:
        whatever the file holds (a state dict, a checkpoint dict, a module).

    Raises:
        ConfigurationError: if the file does not exist, is not a PyTorch file ("not a checkpoint"), is damaged, or
            needs ``trust_pickle``.
    """
    import pickle
    import zipfile

    path = Path(path)
    if not path.is_file():
        raise ConfigurationError(f"`weights` file {str(path)!r} does not exist. Pass a local .pt/.pth/.ckpt file.")
    with path.open("rb") as f:
        head = f.read(2)
    not_a_checkpoint = (
        f"`weights` file {str(path)!r} is not a checkpoint: PyTorch checkpoints are zip archives written by "
        "`torch.save` (or legacy pickles), this file is {what}. Pass the .pt/.pth/.ckpt file itself."
    )
    if not zipfile.is_zipfile(path) and head[:1] != b"\x80":
        what = "a damaged or truncated zip archive" if head == b"PK" else f"neither (it starts with {head!r})"
        raise ConfigurationError(not_a_checkpoint.format(what=what))
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        if "weights only" not in str(err).lower():
            raise ConfigurationError(not_a_checkpoint.format(what=f"unreadable ({err})")) from err
        if not trust_pickle:
            raise ConfigurationError(
                f"{str(path)!r} is not a plain state_dict: it stores pickled Python objects (as ultralytics '.pt' "
                "checkpoints do), and loading it would run code from the file. If you trust the file, pass "
                "`trust_pickle=True`; or save `YOLO(path).model.state_dict()` with torch.save once and pass that."
            ) from err
    except Exception as err:  # noqa: BLE001 - a damaged archive raises RuntimeError, EOFError, ...
        raise ConfigurationError(not_a_checkpoint.format(what=f"damaged or truncated ({err})")) from err
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except (ModuleNotFoundError, AttributeError) as err:
        raise ConfigurationError(
            f"{str(path)!r} pickles objects of a library that is not installed or of another version ({err}). "
            "Install the library that wrote it (ultralytics for YOLO .pt files)."
        ) from err
    except Exception as err:  # noqa: BLE001
        raise ConfigurationError(not_a_checkpoint.format(what=f"unreadable ({err})")) from err


def load_matching_weights(net: nn.Module, path: str | os.PathLike, trust_pickle: bool = False) -> dict[str, list[str]]:
    """Copy every tensor of a checkpoint whose name and shape match ``net``'s; report the rest.

    Reads ``state_dict`` files, Lightning checkpoints and ultralytics ``.pt`` checkpoints. The file is read
    with ``torch.load(weights_only=True)``; an ultralytics checkpoint stores a pickled model object whose
    loading runs code from the file, so it is read only when ``trust_pickle=True``.

    Returns:
        ``{"loaded": [...], "skipped": [...], "missing": [...]}``: names copied, names in the file not
        copied (absent from ``net`` or of another shape, e.g. the class layer of an 80-class model), and
        names of ``net`` the file did not provide.

    Raises:
        ConfigurationError: if the file is missing, is not a checkpoint, needs ``trust_pickle`` or matches nothing.
    """
    path = Path(path)
    ckpt = read_weights_file(path, trust_pickle=trust_pickle)
    state = _state_dict_of(ckpt, path)
    own = net.state_dict()
    loaded = [k for k, v in state.items() if k in own and own[k].shape == v.shape]
    if not loaded:
        raise ConfigurationError(
            f"No tensor of {str(path)!r} matches the model (first names in the file: {list(state)[:3]}). "
            "Is it a checkpoint of the same architecture?"
        )
    net.load_state_dict({k: state[k] for k in loaded}, strict=False)
    return {
        "loaded": loaded,
        "skipped": [k for k in state if k not in set(loaded)],
        "missing": [k for k in own if k not in state],
    }


def _state_dict_of(ckpt: Any, path: Path) -> dict[str, torch.Tensor]:
    if isinstance(ckpt, dict):
        for key in ("ema", "model", "state_dict"):
            inner = ckpt.get(key)
            if isinstance(inner, nn.Module):
                return inner.float().state_dict()
            if isinstance(inner, dict) and inner:
                ckpt = inner
                break
        if "state_dict" in ckpt and isinstance(ckpt["state_dict"], dict):
            ckpt = ckpt["state_dict"]
        out = {k.removeprefix("net."): v for k, v in ckpt.items() if isinstance(v, torch.Tensor)}
        if out:
            return out
    if isinstance(ckpt, nn.Module):
        return ckpt.float().state_dict()
    raise ConfigurationError(f"{str(path)!r} holds no tensors xaiwatch can read (got {type(ckpt).__name__}).")


def to_ultralytics_batch(boxes: Sequence[torch.Tensor], labels: Sequence[torch.Tensor], size: tuple[int, int]) -> dict:
    """Convert per-image ``xyxy`` pixel boxes to the flat batch ultralytics' ``v8DetectionLoss`` reads.

    Args:
        boxes: per image :math:`(n_i, 4)` ``x1, y1, x2, y2`` pixels.
        labels: per image :math:`(n_i,)` class indices.
        size: ``(H, W)`` of the input images.

    Returns:
        ``{"batch_idx": (M,), "cls": (M, 1), "bboxes": (M, 4) normalised cx, cy, w, h}``.
    """
    h, w = size
    device = boxes[0].device if len(boxes) else torch.device("cpu")
    idx = torch.cat([torch.full((len(b),), i, device=device, dtype=torch.float32) for i, b in enumerate(boxes)])
    xyxy = torch.cat([b.reshape(-1, 4).float() for b in boxes]) if len(boxes) else torch.zeros(0, 4)
    cls = torch.cat([lab.reshape(-1).float() for lab in labels]) if len(labels) else torch.zeros(0)
    scale = torch.tensor([w, h, w, h], device=device, dtype=torch.float32)
    cxcywh = torch.cat(((xyxy[:, :2] + xyxy[:, 2:]) / 2, xyxy[:, 2:] - xyxy[:, :2]), dim=1) / scale
    return {"batch_idx": idx, "cls": cls[:, None], "bboxes": cxcywh}


class YOLOv8Module(DetectionValidationMixin, pl.LightningModule):
    """A LightningModule that fine-tunes an ultralytics ``DetectionModel`` with ultralytics' own loss.

    Batches are those of :class:`~xaiwatch.data.YoloDataModule`: ``images`` :math:`(B, 3, H, W)` in
    ``[0, 1]``, per-image ``boxes`` (``xyxy`` pixels) and ``labels``. Validation logs ``val/loss``,
    ``val/map50`` and ``val/map`` (torchmetrics ``MeanAveragePrecision``) from detections post-processed
    exactly as ultralytics validates (conf 0.001, IoU 0.7).

    Args:
        model: architecture yaml (``"yolov8n.yaml"``, ``"yolo11n.yaml"``, ``"yolo12n.yaml"``, ``"yolov10n.yaml"`` or a
            path or dict).
        num_classes: number of classes of the new head.
        names: class names (default ``"0"``, ``"1"``, …).
        weights: optional local checkpoint; tensors matching by name and shape are copied, the rest reported.
        trust_pickle: allow reading an ultralytics ``.pt`` checkpoint (pickled objects, runs code).
        lr: peak learning rate of AdamW.
        weight_decay: decay of conv/linear weights (not of biases and norm layers).
        warmup_steps: steps of linear warm-up.
        box, cls, dfl: loss gains (ultralytics defaults 7.5, 0.5, 1.5).
        val_conf, val_iou: post-processing used for mAP.
    """

    def __init__(
        self,
        model: str | dict = "yolov8n.yaml",
        num_classes: int = 3,
        names: list[str] | None = None,
        weights: str | None = None,
        trust_pickle: bool = False,
        lr: float = 2e-3,
        weight_decay: float = 5e-4,
        warmup_steps: int = 50,
        box: float = 7.5,
        cls: float = 0.5,
        dfl: float = 1.5,
        val_conf: float = 0.001,
        val_iou: float = 0.7,
    ) -> None:
        super().__init__()
        if num_classes < 1:
            raise ConfigurationError(f"`num_classes` must be >= 1, got {num_classes}.")
        if names is not None and len(names) != num_classes:
            raise ConfigurationError(f"`names` has {len(names)} entries but `num_classes` is {num_classes}.")
        if lr <= 0:
            raise ConfigurationError(f"`lr` must be > 0, got {lr}.")
        self.save_hyperparameters()
        self.names = list(names) if names is not None else [str(i) for i in range(num_classes)]
        self.net = build_detection_model(model, num_classes)
        self.net.names = dict(enumerate(self.names))
        self.net.args = SimpleNamespace(box=box, cls=cls, dfl=dfl)
        self.weights_report: dict[str, list[str]] | None = None
        if weights:
            self.weights_report = load_matching_weights(self.net, weights, trust_pickle=trust_pickle)
            r = self.weights_report
            rank_zero_info(
                f"Loaded {len(r['loaded'])} tensors from {weights}; skipped {len(r['skipped'])} "
                f"(e.g. {r['skipped'][:3]}), {len(r['missing'])} left at initialisation."
            )
        self._criterion: Any = None
        self._map: Any = None

    # ---------------------------------------------------------------------------------------------- adapter
    def xai_adapter(self) -> YOLOv8Adapter:
        """The adapter xaiwatch's callbacks explain this model with."""
        return YOLOv8Adapter(self.net, names=self.names)

    def forward(self, images: torch.Tensor) -> Any:
        """The wrapped ``DetectionModel``'s forward (raw dict in training mode, decoded tuple in eval)."""
        return self.net(images)

    # ------------------------------------------------------------------------------------------------- loss
    @property
    def criterion(self) -> Any:
        """ultralytics' loss for this model (``model.init_criterion()``: ``v8DetectionLoss``, or ``E2ELoss`` for a
        YOLOv10-style one-to-one + one-to-many head), built on first use on the model's device."""
        device = next(self.net.parameters()).device
        current = self._criterion
        current_device = getattr(current, "device", None) or getattr(getattr(current, "one2many", None), "device", None)
        if current is None or current_device != device:
            self._criterion = self.net.init_criterion()
        return self._criterion

    def on_train_epoch_end(self) -> None:
        """Step the one-to-many/one-to-one gain schedule of ``E2ELoss`` once per epoch, as ultralytics' trainer does."""
        if self._criterion is not None and hasattr(self._criterion, "update"):
            self.net.args.epochs = int(self.trainer.max_epochs or 1) if self._trainer is not None else 1
            self._criterion.update()

    def _loss(self, preds: Any, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        images = batch["images"]
        target = to_ultralytics_batch(batch["boxes"], batch["labels"], tuple(images.shape[-2:]))
        loss, items = self.criterion(preds, {k: v.to(images.device) for k, v in target.items()})
        return loss.sum(), items

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        """One step of ultralytics' detection loss (box + cls + dfl, scaled by the batch size)."""
        loss, items = self._loss(self.net(batch["images"]), batch)
        bs = batch["images"].shape[0]
        self.log("train/loss", loss / bs, prog_bar=True, batch_size=bs)
        if isinstance(items, dict):
            items = torch.stack(list(items.values()))
        for name, value in zip(("box", "cls", "dfl"), items):
            self.log(f"train/{name}_loss", value, batch_size=bs)
        return loss

    # ------------------------------------------------------------------------------------------- validation
    def validation_step(self, batch: dict, batch_idx: int) -> None:
        """Loss and detections of one validation batch (the model is in eval mode here)."""
        images = batch["images"]
        out = self.net(images)
        loss, _ = self._loss(out, batch)
        self.log("val/loss", loss / images.shape[0], batch_size=images.shape[0], sync_dist=True)
        adapter = YOLOv8Adapter(self.net, names=self.names, conf=self.hparams.val_conf, iou=self.hparams.val_iou)
        dets = adapter.postprocess(adapter.raw_from_output(out))
        self._update_map(dets, batch)

    # -------------------------------------------------------------------------------------------- optimiser
    def configure_optimizers(self) -> Any:
        """AdamW (decay on conv / linear weights only) with linear warm-up then cosine decay to 5%."""
        total = int(self.trainer.estimated_stepping_batches) if self._trainer is not None else None
        return detection_optimizer(
            self.net, self.hparams.lr, self.hparams.weight_decay, self.hparams.warmup_steps, total
        )
