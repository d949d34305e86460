"""``DamoYoloModule``: fine-tune DAMO-YOLO (modelscope's code) with Lightning, on ``YoloDataModule`` batches.

The networks are built offline from the classes in the ``modelscope`` wheel (TinyNAS backbones, GiraffeNeckV2,
ZeroHead) and the official architecture numbers of DAMO-YOLO-T / S / M, written below as literal dictionaries
(configs ``damoyolo_tinynasL20_T``, ``L25_S``, ``L35_M`` and their TinyNAS structure files in the DAMO-YOLO
repository). Nothing is downloaded and no configuration file is executed.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Sequence
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities import rank_zero_info
from torch import nn

from xaiwatch.adapters.damo import DamoYoloAdapter, damo_input
from xaiwatch.core.errors import ConfigurationError
from xaiwatch.core.imports import require
from xaiwatch.models.common import DetectionValidationMixin, check_module_arguments, detection_optimizer
from xaiwatch.models.damo_loading import load_damo_weights, read_damo_directory

__all__ = ["DAMO_ARCHITECTURES", "DamoYoloModule", "build_damo_detector", "damo_architecture", "to_damo_targets"]


def _res(cin: int, cout: int, btn: int, s: int, n: int, cls: str = "SuperResConvK1KX") -> dict:
    return {"class": cls, "in": cin, "out": cout, "btn": btn, "k": 3, "s": s, "L": n}


_STEM = "ConvKXBNRELU"
#: Official architectures. ``backbone.structure`` is the TinyNAS structure file as literal data (the ``nbitsA`` /
#: ``nbitsW`` quantisation fields, unused by the network, left out); the other keys are the configs' own.
DAMO_ARCHITECTURES: dict[str, dict[str, Any]] = {
    "tiny": {  # damoyolo_tinynasL20_T, tinynas_L20_k1kx.txt
        "backbone": {
            "name": "TinyNAS_res",
            "structure": [
                {"class": _STEM, "in": 3, "out": 24, "k": 3, "s": 1},
                _res(24, 64, 24, 2, 2),
                _res(64, 96, 64, 2, 2),
                _res(96, 192, 96, 2, 2),
                _res(192, 192, 152, 1, 2),
                _res(192, 384, 192, 2, 1),
            ],
            "out_indices": (2, 4, 5),
            "with_spp": True,
            "use_focus": True,
            "act": "relu",
            "reparam": True,
        },
        "neck": {
            "name": "GiraffeNeckV2",
            "depth": 1.0,
            "hidden_ratio": 1.0,
            "in_channels": [96, 192, 384],
            "out_channels": [64, 128, 256],
            "act": "relu",
            "spp": False,
            "block_name": "BasicBlock_3x3_Reverse",
        },
        "head": {"name": "ZeroHead", "in_channels": [64, 128, 256], "stacked_convs": 0, "reg_max": 16, "act": "silu"},
    },
    "small": {  # damoyolo_tinynasL25_S, tinynas_L25_k1kx.txt
        "backbone": {
            "name": "TinyNAS_res",
            "structure": [
                {"class": _STEM, "in": 3, "out": 32, "k": 3, "s": 1},
                _res(32, 128, 24, 2, 1),
                _res(128, 128, 88, 2, 5),
                _res(128, 256, 128, 2, 3),
                _res(256, 256, 120, 1, 2),
                _res(256, 512, 144, 2, 1),
            ],
            "out_indices": (2, 4, 5),
            "with_spp": True,
            "use_focus": True,
            "act": "relu",
            "reparam": True,
        },
        "neck": {
            "name": "GiraffeNeckV2",
            "depth": 1.0,
            "hidden_ratio": 0.75,
            "in_channels": [128, 256, 512],
            "out_channels": [128, 256, 512],
            "act": "relu",
            "spp": False,
            "block_name": "BasicBlock_3x3_Reverse",
        },
        "head": {"name": "ZeroHead", "in_channels": [128, 256, 512], "stacked_convs": 0, "reg_max": 16, "act": "silu"},
    },
    "medium": {  # damoyolo_tinynasL35_M, tinynas_L35_kxkx.txt
        "backbone": {
            "name": "TinyNAS_csp",
            "structure": [
                {"class": _STEM, "in": 3, "out": 32, "k": 3, "s": 1},
                _res(32, 128, 64, 2, 2, "SuperResConvKXKX"),
                _res(128, 128, 64, 2, 4, "SuperResConvKXKX"),
                _res(128, 256, 256, 2, 4, "SuperResConvKXKX"),
                _res(256, 256, 256, 1, 4, "SuperResConvKXKX"),
                _res(256, 512, 256, 2, 3, "SuperResConvKXKX"),
            ],
            "out_indices": (2, 3, 4),
            "with_spp": True,
            "use_focus": True,
            "act": "silu",
            "reparam": True,
        },
        "neck": {
            "name": "GiraffeNeckV2",
            "depth": 1.5,
            "hidden_ratio": 1.0,
            "in_channels": [128, 256, 512],
            "out_channels": [128, 256, 512],
            "act": "silu",
            "spp": False,
            "block_name": "BasicBlock_3x3_Reverse",
        },
        "head": {"name": "ZeroHead", "in_channels": [128, 256, 512], "stacked_convs": 0, "reg_max": 16, "act": "silu"},
    },
}
_ALIASES = {"t": "tiny", "s": "small", "m": "medium"}


def damo_architecture(size: str, num_classes: int) -> dict[str, Any]:
    """A copy of the official architecture ``size`` (``"tiny"``, ``"small"``, ``"medium"``) for ``num_classes``.

    Raises:
        ConfigurationError: for an unknown size.
    """
    key = _ALIASES.get(str(size).lower(), str(size).lower())
    if key not in DAMO_ARCHITECTURES:
        raise ConfigurationError(f"`size` can be {', '.join(DAMO_ARCHITECTURES)}, got {size!r}.")
    arch = copy.deepcopy(DAMO_ARCHITECTURES[key])
    arch["head"].update(num_classes=int(num_classes), nms_conf_thre=0.05, nms_iou_thre=0.7)
    return arch


def _import_damo() -> dict[str, Any]:
    require("modelscope", extra="damo")
    try:
        from modelscope.models.base.base_torch_model import TorchModel
        from modelscope.models.cv.tinynas_detection.damo.base_models.backbones import tinynas_csp, tinynas_res
        from modelscope.models.cv.tinynas_detection.damo.base_models.heads import build_head
        from modelscope.models.cv.tinynas_detection.damo.base_models.necks import build_neck
        from modelscope.models.cv.tinynas_detection.damo.detectors.detector import Detector
    except ImportError as err:  # addict, timm, ...
        raise ConfigurationError(
            f"modelscope's DAMO-YOLO code could not be imported ({err}). Install `pip install 'xaiwatch[damo]'` "
            "(modelscope, addict, timm)."
        ) from err
    return {
        "TorchModel": TorchModel,
        "TinyNAS_res": tinynas_res.TinyNAS,
        "TinyNAS_csp": tinynas_csp.TinyNAS,
        "build_neck": build_neck,
        "build_head": build_head,
        "Detector": Detector,
    }


def build_damo_detector(architecture: dict[str, Any]) -> nn.Module:
    """Build a DAMO-YOLO ``Detector`` from an architecture dictionary (see :data:`DAMO_ARCHITECTURES`).

    The backbone is built from ``backbone.structure`` (a list of block dictionaries) instead of a structure file;
    the rest is modelscope's ``Detector``: ``init_model()`` (BatchNorm eps 1e-3 / momentum 0.03, ZeroHead's
    prior initialisation) and ``head.nms = False`` (xaiwatch's adapter post-processes).

    Raises:
        ConfigurationError: for a missing key or an unknown backbone name.
    """
    damo = _import_damo()
    try:
        bb = dict(architecture["backbone"])
        neck, head = dict(architecture["neck"]), dict(architecture["head"])
        name = bb.pop("name")
        structure = [{k: v for k, v in b.items() if k not in ("nbitsA", "nbitsW")} for b in bb.pop("structure")]
    except (KeyError, TypeError) as err:
        raise ConfigurationError(
            f"A DAMO-YOLO architecture needs backbone (name, structure, ...), neck and head dictionaries: {err!r}."
        ) from None
    if name not in ("TinyNAS_res", "TinyNAS_csp"):
        raise ConfigurationError(f"Backbone {name!r} is not supported; use TinyNAS_res or TinyNAS_csp.")
    bb.pop("structure_file", None)
    detector_cls, torch_model = damo["Detector"], damo["TorchModel"]
    net = detector_cls.__new__(detector_cls)  # Detector.__init__ would read the structure from a file
    torch_model.__init__(net)
    net.backbone = damo[name](structure_info=structure, **bb)
    net.neck = damo["build_neck"](neck)
    net.head = damo["build_head"](head)
    net.config = copy.deepcopy(architecture)
    net.init_model()
    net.head.nms = False
    return net


def to_damo_targets(
    boxes: Sequence[torch.Tensor], labels: Sequence[torch.Tensor], size: tuple[int, int], num_classes: int
) -> list:
    """Per-image ``BoxList`` targets of ZeroHead's loss from 0-based labels.

    Args:
        boxes: per image :math:`(n_i, 4)` ``x1, y1, x2, y2`` pixels.
        labels: per image :math:`(n_i,)` class indices in ``[0, num_classes)``.
        size: ``(H, W)`` of the (padded) input.
        num_classes: classes of the head.

    Returns:
        ``BoxList``s whose ``labels`` field is **1-based**, as ZeroHead's assigner expects.

    Raises:
        ConfigurationError: for a label outside ``[0, num_classes)`` or boxes not shaped :math:`(n, 4)`.
    """
    from modelscope.models.cv.tinynas_detection.damo.structures.bounding_box import BoxList

    h, w = size
    out = []
    for i, (b, lab) in enumerate(zip(boxes, labels)):
        b, lab = b.reshape(-1, 4).float(), lab.reshape(-1).long()
        if b.shape[0] != lab.shape[0]:
            raise ConfigurationError(f"Image {i} of the batch has {b.shape[0]} boxes but {lab.shape[0]} labels.")
        if lab.numel() and (int(lab.min()) < 0 or int(lab.max()) >= num_classes):
            raise ConfigurationError(
                f"Image {i} of the batch has labels {sorted(set(lab.tolist()))}, but the model has {num_classes} "
                f"classes: labels must be 0-based class indices in [0, {num_classes - 1}] (xaiwatch adds the 1 "
                "that DAMO-YOLO's ZeroHead expects). Check `num_classes` and the dataset's label files."
            )
        target = BoxList(b, (w, h), mode="xyxy")
        target.add_field("labels", lab + 1)
        out.append(target)
    return out


def _set_bn_momentum(net: nn.Module, momentum: float | None) -> None:
    for m in net.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.momentum = momentum


class DamoYoloModule(DetectionValidationMixin, pl.LightningModule):
    """A LightningModule that fine-tunes DAMO-YOLO with ZeroHead's own loss (AlignOTA, QFL + GIoU + DFL).

    Batches are those of :class:`~xaiwatch.data.YoloDataModule` (the same as :class:`YOLOv8Module`'s):
    ``images`` :math:`(B, 3, H, W)` in ``[0, 1]``, per-image ``boxes`` (``xyxy`` pixels) and 0-based
    ``labels``. The network sees ``0``-``255`` images padded to a multiple of 32 and 1-based ``BoxList``
    targets (:func:`to_damo_targets` validates the labels). Validation logs ``val/loss``, ``val/map50`` and
    ``val/map`` like :class:`YOLOv8Module`, from detections post-processed as DAMO-YOLO does (multi-class NMS).

    BatchNorm: DAMO-YOLO sets momentum 0.03, tuned for 300-epoch training; after a short fine-tune the running
    statistics still mostly describe the initial network, so eval-mode scores stay at the prior (measured: the
    best score of a model trained for a few dozen steps stayed at the head's 0.01 prior). ``bn_momentum``
    (0.1 by default, ``None`` for DAMO's own 0.03) is used during fine-tuning.

    Args:
        size: ``"tiny"`` (DAMO-YOLO-T), ``"small"`` or ``"medium"``.
        num_classes: number of classes of the new head.
        names: class names (default ``"0"``, ``"1"``, ...).
        weights: optional local DAMO-YOLO checkpoint (``.pth``/``.pt``, read with ``weights_only=True``); tensors
            matching by name and shape are copied (not the class layer of another class count), the rest reported.
        architecture: an architecture dictionary instead of ``size`` (see :data:`DAMO_ARCHITECTURES`); this is how
            :func:`~xaiwatch.models.load_damo_directory` builds the model of an official directory.
        lr: peak learning rate of AdamW.
        weight_decay: decay of conv weights (not of biases and norm layers).
        warmup_steps: steps of linear warm-up.
        bn_momentum: BatchNorm momentum during fine-tuning; ``None`` keeps DAMO-YOLO's 0.03.
        val_conf, val_iou: post-processing used for mAP.
    """

    def __init__(
        self,
        size: str = "tiny",
        num_classes: int = 3,
        names: list[str] | None = None,
        weights: str | None = None,
        architecture: dict[str, Any] | None = None,
        lr: float = 1e-3,
        weight_decay: float = 5e-4,
        warmup_steps: int = 50,
        bn_momentum: float | None = 0.1,
        val_conf: float = 0.001,
        val_iou: float = 0.7,
    ) -> None:
        super().__init__()
        check_module_arguments(num_classes, names, lr)
        if bn_momentum is not None and not 0.0 < bn_momentum <= 1.0:
            raise ConfigurationError(f"`bn_momentum` must be in (0, 1] or None, got {bn_momentum}.")
        self.save_hyperparameters()
        self.names = list(names) if names is not None else [str(i) for i in range(num_classes)]
        if architecture is None:
            architecture = damo_architecture(size, num_classes)
        else:
            architecture = copy.deepcopy(architecture)
            architecture.setdefault("head", {})["num_classes"] = num_classes
        self.net = build_damo_detector(architecture)
        self.net.names = dict(enumerate(self.names))
        if bn_momentum is not None:
            _set_bn_momentum(self.net, bn_momentum)
        self.weights_report: dict[str, list[str]] | None = None
        if weights:
            self.weights_report = load_damo_weights(self.net, weights, strict=False)
            r = self.weights_report
            rank_zero_info(
                f"Loaded {len(r['loaded'])} tensors from {os.fspath(weights)}; skipped {len(r['skipped'])} "
                f"(e.g. {r['skipped'][:3]}), {len(r['missing'])} left at initialisation."
            )
        self._map: Any = None

    # ---------------------------------------------------------------------------------------------- adapter
    def xai_adapter(self) -> DamoYoloAdapter:
        """The adapter xaiwatch's callbacks explain this model with."""
        return DamoYoloAdapter(self.net, names=self.names)

    def forward(self, images: torch.Tensor) -> Any:
        """Raw candidates of images in ``[0, 1]`` (:class:`~xaiwatch.core.types.RawOutput`); use in eval mode."""
        return DamoYoloAdapter(self.net, names=self.names).raw(images)

    # ------------------------------------------------------------------------------------------------- loss
    def _targets(self, batch: dict, x: torch.Tensor) -> list:
        targets = to_damo_targets(batch["boxes"], batch["labels"], tuple(x.shape[-2:]), len(self.names))
        return [t.to(x.device) if hasattr(t, "to") else t for t in targets]

    @staticmethod
    def _check_loss(losses: Any) -> dict:
        if not isinstance(losses, dict) or "total_loss" not in losses:
            raise RuntimeError(f"ZeroHead returned no loss ({type(losses).__name__}): no valid anchor in the batch.")
        return losses

    def _log_losses(self, stage: str, losses: dict, batch_size: int) -> None:
        self.log(f"{stage}/loss", losses["total_loss"], prog_bar=stage == "train", batch_size=batch_size)
        if stage == "train":
            for name, key in (("box", "loss_bbox"), ("cls", "loss_cls"), ("dfl", "loss_dfl")):
                self.log(f"train/{name}_loss", losses[key], batch_size=batch_size)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        """One step of ZeroHead's loss (QFL + GIoU + DFL, each averaged as DAMO-YOLO does)."""
        x = damo_input(batch["images"])
        losses = self._check_loss(self.net(x, self._targets(batch, x)))
        self._log_losses("train", losses, x.shape[0])
        return losses["total_loss"]

    # ------------------------------------------------------------------------------------------- validation
    def validation_step(self, batch: dict, batch_idx: int) -> None:
        """Loss and detections of one validation batch (the model is in eval mode here)."""
        images = batch["images"]
        adapter = DamoYoloAdapter(self.net, names=self.names, conf=self.hparams.val_conf, iou=self.hparams.val_iou)
        features = adapter.features(images)
        dets = adapter.postprocess(adapter.raw_from_features(features))
        head = self.net.head
        flag = head.training
        try:  # ZeroHead computes its loss only on its training path; its modules (no BatchNorm) stay as they are
            head.training = True
            losses = self._check_loss(head(list(features), self._targets(batch, damo_input(images))))
        finally:
            head.training = flag
        self.log("val/loss", losses["total_loss"], batch_size=images.shape[0], sync_dist=True)
        self._update_map(dets, batch)

    # -------------------------------------------------------------------------------------------- optimiser
    def configure_optimizers(self) -> Any:
        """AdamW (decay on conv / linear weights only) with linear warm-up then cosine decay to 5%."""
        total = int(self.trainer.estimated_stepping_batches) if self._trainer is not None else None
        return detection_optimizer(
            self.net, self.hparams.lr, self.hparams.weight_decay, self.hparams.warmup_steps, total
        )


def load_damo_directory(
    path: str | os.PathLike, names: list[str] | None = None, pad_background: bool = False, **module_kwargs: Any
) -> DamoYoloModule:
    """A :class:`DamoYoloModule` from an official (modelscope) DAMO-YOLO model directory.

    Reads ``damoyolo.py`` with :mod:`ast` (literal values only, never executed), the TinyNAS structure file it
    names as a literal, the weights it names with ``torch.load(weights_only=True)`` (all tensors must match), and
    takes the class names from ``names`` or from a literal ``class_names`` in ``damoyolo.py`` / ``configuration.json``
    (see :func:`~xaiwatch.models.damo_loading.read_damo_directory`). ``label_map.pkl`` is never read: it is a
    pickle, and unpickling can run code.

    Args:
        path: the model directory.
        names: class names, one per class of the head; required unless the config carries them.
        pad_background: accept a checkpoint whose head has no background channel (newer DAMO-YOLO): the
            channel modelscope's ZeroHead expects is added with zero weights; its score is never used.
        module_kwargs: more arguments of :class:`DamoYoloModule` (``lr``, ``bn_momentum``, ...).

    Returns:
        the module, with the checkpoint loaded.

    Raises:
        ConfigurationError: for a missing directory, config, structure file or weights file; a config value that is
            not a literal; a checkpoint that does not match the architecture; a class-count mismatch; a head without
            background channel (unless ``pad_background``); missing or mis-counted class names. Each message says
            which file and what to do.
    """
    architecture, names, weights = read_damo_directory(path, names)
    module_kwargs.setdefault("bn_momentum", None)  # a trained model keeps DAMO-YOLO's own BatchNorm momentum
    num_classes = int(architecture["head"]["num_classes"])
    module = DamoYoloModule(num_classes=num_classes, names=names, architecture=architecture, **module_kwargs)
    module.weights_report = load_damo_weights(module.net, weights, strict=True, pad_background=pad_background)
    return module
