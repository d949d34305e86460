"""``YOLOv8Module``: fine-tune an ultralytics YOLOv8 detector with Lightning, on ``YoloDataModule`` batches."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
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
from xaiwatch.models.common import DetectionValidationMixin, check_module_arguments, detection_optimizer

__all__ = [
    "WeightsReport",
    "YOLOv8Module",
    "build_detection_model",
    "class_branch_names",
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


@dataclass(frozen=True)
class WeightsReport:
    """What :func:`load_matching_weights` copied from a checkpoint into a model, and what it left at initialisation.

    Attributes:
        path: the checkpoint file.
        total: number of tensors in the model's ``state_dict``.
        kept: names of the model's tensors copied from the file (same name and shape).
        reinitialised: names of the model's tensors left at their fresh initialisation.
        class_branch: names of the model's tensors that depend on the class count (the Detect head's ``cv3``
            branch, a classifier's ``linear``): re-initialising them is expected when the class count differs.
        skipped: names in the file that were not copied (absent from the model, or of another shape).
        source_classes: the number of classes of the file's model, when the file says (ultralytics ``.pt``).
        source_names: the class names of the file's model, when the file says.

    Example:
        >>> r = WeightsReport("w.pt", 3, ["a", "b"], ["head.w"], ["head.w"], ["head.w"], 80)
        >>> r.summary()
        "kept 2 of 3 tensors from 'w.pt'; re-initialised 1 (all in the class branch; the file has 80 classes)"
    """

    path: str
    total: int
    kept: list[str]
    reinitialised: list[str]
    class_branch: list[str]
    skipped: list[str]
    source_classes: int | None = None
    source_names: list[str] | None = field(default=None, repr=False)

    @property
    def unexpected(self) -> list[str]:
        """Re-initialised tensors outside the class branch: a sign of another architecture."""
        branch = set(self.class_branch)
        return [k for k in self.reinitialised if k not in branch]

    def summary(self) -> str:
        """One line: how many tensors were kept and re-initialised, and where the re-initialised ones are."""
        where = "all in the class branch" if not self.unexpected else f"{len(self.unexpected)} outside the class branch"
        classes = f"; the file has {self.source_classes} classes" if self.source_classes is not None else ""
        return (
            f"kept {len(self.kept)} of {self.total} tensors from {self.path!r}; re-initialised "
            f"{len(self.reinitialised)} ({where}{classes})"
        )

    def __getitem__(self, key: str) -> list[str]:
        """The dict keys of earlier versions: ``"loaded"`` (kept), ``"missing"`` (re-initialised), ``"skipped"``."""
        aliases = {"loaded": self.kept, "missing": self.reinitialised, "skipped": self.skipped}
        if key not in aliases:
            raise KeyError(f"{key!r}; use the attributes kept / reinitialised / skipped / class_branch")
        return aliases[key]


def class_branch_names(net: nn.Module) -> list[str]:
    """Names of ``net``'s tensors whose shape or meaning depends on the number of classes.

    For an ultralytics ``Detect`` head (the last layer, with a ``cv3`` class branch) these are the tensors of
    ``cv3`` (and of ``one2one_cv3`` for end-to-end heads); for a ``Classify`` head, its ``linear`` layer. YOLOv8's
    class branch has a hidden width ``max(c0, min(nc, 100))``, so on YOLOv8n its whole branch changes shape with the
    class count, while on YOLOv8s only the last 1x1 convolution of each level does.

    Args:
        net: an ultralytics model (``DetectionModel``, ``ClassificationModel``) or any module.

    Returns:
        The tensor names (empty when no such head is found).
    """
    layers = getattr(net, "model", None)
    if not isinstance(layers, nn.Sequential) or not len(layers):
        return []
    head_index = len(layers) - 1
    prefixes = [
        f"model.{head_index}.{branch}."
        for branch in ("cv3", "one2one_cv3", "linear")
        if isinstance(getattr(layers[head_index], branch, None), nn.Module)
    ]
    return [k for k in net.state_dict() if k.startswith(tuple(prefixes))]


def _source_classes(ckpt: Any) -> tuple[int | None, list[str] | None]:
    model = None
    if isinstance(ckpt, dict):
        model = ckpt.get("ema") if isinstance(ckpt.get("ema"), nn.Module) else ckpt.get("model")
    elif isinstance(ckpt, nn.Module):
        model = ckpt
    names = getattr(model, "names", None)
    if isinstance(names, dict):
        names = [str(names[k]) for k in sorted(names)]
    nc = getattr(model, "nc", None) if model is not None else None
    if names is not None and nc is None:
        nc = len(names)
    return (int(nc) if nc is not None else None), (list(names) if names is not None else None)


def _drop_orphan_counters(kept: list[str], own: dict[str, torch.Tensor]) -> list[str]:
    """A BatchNorm's scalar ``num_batches_tracked`` always matches in shape: keep it only with its layer's weight."""
    kept_set = set(kept)
    out = []
    for k in kept:
        layer, _, leaf = k.rpartition(".")
        if leaf == "num_batches_tracked" and f"{layer}.weight" in own and f"{layer}.weight" not in kept_set:
            continue
        out.append(k)
    return out


def _first_width(state: dict[str, torch.Tensor]) -> int | None:
    w = state.get("model.0.conv.weight")
    return int(w.shape[0]) if w is not None and w.dim() == 4 else None


def load_matching_weights(
    net: nn.Module, path: str | os.PathLike, trust_pickle: bool = False, strict: bool = False
) -> WeightsReport:
    """Copy every tensor of a checkpoint whose name and shape match ``net``'s; report the rest.

    Reads ``state_dict`` files, Lightning checkpoints and ultralytics ``.pt`` checkpoints. The file is read
    with ``torch.load(weights_only=True)``; an ultralytics checkpoint stores a pickled model object whose
    loading runs code from the file, so it is read only when ``trust_pickle=True``. Tensors of another shape
    (e.g. the class branch of a head trained for another class count) keep ``net``'s fresh initialisation.

    Args:
        net: the model to load into.
        path: the checkpoint.
        trust_pickle: allow unpickling Python objects (runs code from the file).
        strict: refuse the transfer when a tensor outside the class branch (:func:`class_branch_names`) is not
            found in the file or has another shape, i.e. the file is of another architecture or scale.

    Returns:
        The :class:`WeightsReport` (``report["loaded"]``, ``["skipped"]``, ``["missing"]`` still work).

    Raises:
        ConfigurationError: if the file is missing, not a checkpoint, needs ``trust_pickle``, matches nothing,
            or (``strict``) leaves tensors outside the class branch uninitialised.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigurationError(f"`weights` file {str(path)!r} does not exist. Pass a local .pt/.pth/.ckpt file.")
    ckpt = read_weights_file(path, trust_pickle=trust_pickle)
    source_classes, source_names = _source_classes(ckpt)
    state = _state_dict_of(ckpt, path)
    own = net.state_dict()
    kept = [k for k, v in state.items() if k in own and own[k].shape == v.shape]
    kept = _drop_orphan_counters(kept, own)
    if not kept:
        raise ConfigurationError(
            f"No tensor of {str(path)!r} matches the model (first names in the file: {list(state)[:3]}). "
            "Is it a checkpoint of the same architecture?"
        )
    kept_set = set(kept)
    report = WeightsReport(
        path=str(path),
        total=len(own),
        kept=[k for k in own if k in kept_set],
        reinitialised=[k for k in own if k not in kept_set],
        class_branch=class_branch_names(net),
        skipped=[k for k in state if k not in kept_set],
        source_classes=source_classes,
        source_names=source_names,
    )
    if strict and report.unexpected:
        theirs, ours = _first_width(state), _first_width(own)
        width = (
            f" The file's first convolution has {theirs} output channels, the model's {ours}: another scale "
            "(YOLOv8 n/s/m/l/x have 16/32/48/64/80)."
            if theirs is not None and ours is not None and theirs != ours
            else ""
        )
        raise ConfigurationError(
            f"`weights` {str(path)!r} fits this model only in part: {report.summary()}, e.g. "
            f"{report.unexpected[:3]}. It looks like a checkpoint of another architecture.{width} Pass the "
            "architecture yaml the checkpoint was trained with (`model=`), or `strict=False` to keep the partial "
            "transfer."
        )
    net.load_state_dict({k: state[k] for k in kept}, strict=False)
    return report


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


def _check_labels(dataset: Any, num_classes: int, names: Sequence[str]) -> None:
    """Raise if a label of a :class:`~xaiwatch.data.YoloDataset`-like dataset is not a class of the model."""
    labels, paths = getattr(dataset, "labels", None), getattr(dataset, "image_paths", None)
    if labels is None or paths is None:
        return
    from xaiwatch.data.yolo import label_path

    for cls, image in zip(labels, paths):
        bad = [int(c) for c in cls if not 0 <= int(c) < num_classes]
        if bad:
            data_names = list(getattr(dataset, "names", []))
            name = f" ({data_names[bad[0]]!r})" if bad[0] < len(data_names) else ""
            raise ConfigurationError(
                f"{label_path(image)} has class {bad[0]}{name} but the model has `num_classes`={num_classes} "
                f"(names {list(names)}). The data has {len(data_names) or 'more'} classes: build the module with "
                "num_classes=datamodule.num_classes and names=datamodule.names, or remap the labels."
            )


def _check_batch_labels(batch: dict, num_classes: int) -> None:
    """The same check on one batch, for loaders other than ``YoloDataModule`` (one max / min over the labels)."""
    labels = [lab.reshape(-1) for lab in batch["labels"]]
    if not labels or not sum(lab.numel() for lab in labels):
        return
    flat = torch.cat(labels)
    if int(flat.max()) < num_classes and int(flat.min()) >= 0:
        return
    for i, lab in enumerate(labels):
        bad = [int(c) for c in lab.tolist() if not 0 <= int(c) < num_classes]
        if bad:
            paths = batch.get("paths")
            where = paths[i] if isinstance(paths, list) and i < len(paths) else i
            raise ConfigurationError(
                f"a batch has class {bad[0]} (image {where}) but the model has `num_classes`={num_classes}; "
                "build the module with the data's number of classes, or remap the labels."
            )


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
        weights: optional local checkpoint; tensors matching by name and shape are copied (backbone, neck, box
            branch), the class branch of the head is re-initialised when its shape differs (another class count),
            and :attr:`weights_report` (a :class:`WeightsReport`) says which tensors were kept.
        trust_pickle: allow reading an ultralytics ``.pt`` checkpoint (pickled objects, runs code).
        strict: refuse ``weights`` that leave tensors outside the class branch uninitialised (another
            architecture or scale, e.g. YOLOv8s weights into YOLOv8n); ``False`` keeps the partial transfer.
        lr: peak learning rate of AdamW.
        weight_decay: decay of conv/linear weights (not of biases and norm layers).
        warmup_steps: steps of linear warm-up.
        box, cls, dfl: loss gains (ultralytics defaults 7.5, 0.5, 1.5).
        val_conf, val_iou: post-processing used for mAP.

    Raises:
        ConfigurationError: for an invalid argument or unusable ``weights`` (see :func:`load_matching_weights`);
            in :meth:`setup`, for data whose labels exceed ``num_classes`` or whose image size is not a multiple
            of the model's stride.

    Example:
        >>> module = YOLOv8Module("yolov8n.yaml", num_classes=1, names=["tree"])  # doctest: +SKIP
        >>> module = YOLOv8Module("yolov8n.yaml", num_classes=1, weights="ABD.pt", trust_pickle=True)  # doctest: +SKIP
        >>> module.weights_report.summary()  # doctest: +SKIP
        "kept 319 of 355 tensors from 'ABD.pt'; re-initialised 36 (all in the class branch; the file has 147 classes)"
    """

    def __init__(
        self,
        model: str | dict = "yolov8n.yaml",
        num_classes: int = 3,
        names: list[str] | None = None,
        weights: str | None = None,
        trust_pickle: bool = False,
        strict: bool = True,
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
        check_module_arguments(num_classes, names, lr)
        self.save_hyperparameters()
        self.names = list(names) if names is not None else [str(i) for i in range(num_classes)]
        self.net = build_detection_model(model, num_classes)
        self.net.names = dict(enumerate(self.names))
        self.net.args = SimpleNamespace(box=box, cls=cls, dfl=dfl)
        self.weights_report: WeightsReport | None = None
        if weights:
            self.weights_report = load_matching_weights(self.net, weights, trust_pickle=trust_pickle, strict=strict)
            rank_zero_info(f"[xaiwatch] YOLOv8Module: {self.weights_report.summary()}.")
        self._criterion: Any = None
        self._map: Any = None

    # ------------------------------------------------------------------------------------------------ setup
    def setup(self, stage: str) -> None:
        """Check the data against the model before any step: label classes and image size (see ``Raises``)."""
        datamodule = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
        if datamodule is None:
            return
        stride = int(max(getattr(self.net, "stride", torch.tensor([32])).max().item(), 1))
        imgsz = getattr(datamodule, "hparams", {}).get("imgsz") if hasattr(datamodule, "hparams") else None
        if isinstance(imgsz, int) and imgsz % stride:
            lo, hi = max(stride, imgsz // stride * stride), (imgsz // stride + 1) * stride
            raise ConfigurationError(
                f"`imgsz` of the data is {imgsz}, not a multiple of the model's largest stride {stride}: the neck's "
                f"feature maps would not line up. Use imgsz={lo} or {hi}."
            )
        for attr in ("train_dataset", "val_dataset"):
            _check_labels(getattr(datamodule, attr, None), self.hparams.num_classes, self.names)

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
        _check_batch_labels(batch, self.hparams.num_classes)
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
