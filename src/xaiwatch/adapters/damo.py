"""Adapter for DAMO-YOLO detectors built from modelscope's code (``Detector``: TinyNAS, GiraffeNeckV2, ZeroHead)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import batched_nms

from xaiwatch.adapters.base import DetectorAdapter
from xaiwatch.core.context import register_cache_reset
from xaiwatch.core.errors import UnsupportedModelError
from xaiwatch.core.types import Detections, RawOutput

__all__ = ["DamoYoloAdapter", "damo_input", "damo_postprocess", "is_damo_detector"]

#: DAMO-YOLO's input sides must be a multiple of the largest stride
STRIDE = 32

#: GiraffeNeckV2 returns ``(x5, x7, x6)``: the outputs of these three merge stages are the P3, P4, P5 maps
_NECK_OUTPUTS = {"neck.p3": "neck.merge_5", "neck.p4": "neck.merge_7", "neck.p5": "neck.merge_6"}


def is_damo_detector(module: object) -> bool:
    """True for a DAMO-YOLO network from modelscope's code: a ``backbone``, a ``neck`` and a ``ZeroHead`` ``head``.

    Checked by class names and modules, without importing modelscope.
    """
    if not isinstance(module, nn.Module):
        return False
    head = getattr(module, "head", None)
    return (
        any(c.__module__.startswith("modelscope.models.cv.tinynas_detection") for c in type(module).__mro__)
        and isinstance(getattr(module, "backbone", None), nn.Module)
        and isinstance(getattr(module, "neck", None), nn.Module)
        and type(head).__name__ == "ZeroHead"
    )


def damo_input(images: torch.Tensor) -> torch.Tensor:
    """DAMO-YOLO's input from xaiwatch's: RGB ``[0, 1]`` to ``0``-``255``, zero-padded right and bottom to a multiple
    of 32 (as DAMO-YOLO's ``to_image_list``); boxes keep their pixel coordinates.

    Args:
        images: :math:`(B, 3, H, W)` float images in ``[0, 1]``.

    Returns:
        :math:`(B, 3, H', W')` with :math:`H', W'` the next multiples of 32.
    """
    h, w = images.shape[-2:]
    pad_h, pad_w = -h % STRIDE, -w % STRIDE
    x = images * 255.0
    return F.pad(x, (0, pad_w, 0, pad_h)) if pad_h or pad_w else x


def damo_postprocess(raw: RawOutput, conf: float = 0.05, iou: float = 0.7, max_det: int = 500) -> list[Detections]:
    """DAMO-YOLO's own post-processing (``damo.utils.boxes.postprocess``), keeping each box's candidate index.

    Multi-class: every (candidate, class) pair whose score is above ``conf`` (strict) enters a class-wise
    :func:`torchvision.ops.batched_nms`, so one candidate can give boxes of several classes; at most
    ``max_det`` boxes are kept, by descending score (DAMO-YOLO keeps 500).

    Args:
        raw: candidates of a batch.
        conf: score threshold.
        iou: IoU threshold of the suppression.
        max_det: maximum number of boxes per image.

    Returns:
        one :class:`~xaiwatch.core.types.Detections` per image; ``labels`` are 0-based (DAMO's ``BoxList`` adds 1).
    """
    out = []
    for boxes, scores in zip(raw.boxes, raw.scores):
        cand, labels = torch.nonzero(scores > conf, as_tuple=True)
        if cand.numel() == 0:
            out.append(Detections.empty(boxes.device))
            continue
        kept = batched_nms(boxes[cand], scores[cand, labels], labels, iou)[:max_det]
        idx = cand[kept]
        out.append(Detections(boxes[idx], scores[idx, labels[kept]], labels[kept], idx))
    return out


class DamoYoloAdapter(DetectorAdapter):
    """Explain a DAMO-YOLO ``Detector`` (modelscope's ``tinynas_detection.damo`` code).

    Inputs are RGB float images in ``[0, 1]``; :meth:`raw` scales them to DAMO-YOLO's ``0``-``255`` (no mean or
    std) and zero-pads them to a multiple of 32. Candidates are ZeroHead's decoded outputs, computed from the
    head's own modules exactly as its eval forward does (``sigmoid`` class scores without the background
    channel, DFL-integrated distances times the stride around each cell's corner), but without ZeroHead's
    ``mlvl_priors`` cache: the priors are rebuilt for every call, so a call under ``inference_mode`` never leaks
    into a gradient call. :meth:`detect` equals DAMO-YOLO's ``postprocess`` (multi-class NMS, see
    :func:`damo_postprocess`).

    Layers: ``backbone.p3``/``p4``/``p5`` (the TinyNAS stages the neck reads) and ``neck.p3``/``p4``/``p5`` (the
    maps ZeroHead reads). Which candidates a neck map explains: GiraffeNeckV2 computes P4 from P3 and P5 from
    P4, so ``neck.p3`` (the default CAM layer) explains the candidates of every level, ``neck.p4`` those of P4
    and P5, ``neck.p5`` those of P5 only; :meth:`levels_explained` says it in code.

    Args:
        model: the DAMO-YOLO ``Detector`` (e.g. ``DamoYoloModule(...).net``).
        names: class names; read from ``model.names`` when omitted, else ``"0"``, ``"1"``, ...
        conf, iou, max_det: post-processing of :meth:`detect` (DAMO-YOLO's own: 0.05, 0.7, 500).
    """

    def __init__(
        self,
        model: nn.Module,
        names: Sequence[str] | None = None,
        conf: float = 0.25,
        iou: float = 0.7,
        max_det: int = 500,
    ) -> None:
        if not is_damo_detector(model):
            raise UnsupportedModelError(
                f"DamoYoloAdapter needs a DAMO-YOLO network from modelscope's code (backbone, neck and a ZeroHead "
                f"head), got {type(model).__name__}. Build one with `xaiwatch.models.DamoYoloModule(...).net` or "
                "`xaiwatch.models.load_damo_directory(path).net`."
            )
        head = model.head
        if names is None:
            raw_names = getattr(model, "names", None)
            if isinstance(raw_names, dict):
                names = [raw_names[k] for k in sorted(raw_names)]
            elif raw_names is not None:
                names = list(raw_names)
            else:
                names = [str(i) for i in range(head.num_classes)]
        if len(names) != head.num_classes:
            raise UnsupportedModelError(
                f"`names` has {len(names)} entries but the ZeroHead predicts {head.num_classes} classes."
            )
        super().__init__(model, names, conf=conf, iou=iou, max_det=max_det)

    @property
    def head(self) -> nn.Module:
        """The ``ZeroHead`` module."""
        return self.model.head

    # ------------------------------------------------------------------------------------------------ forward
    def features(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The neck's P3, P4, P5 maps of images in ``[0, 1]``."""
        return tuple(self.model.neck(self.model.backbone(damo_input(images))))

    def raw(self, images: torch.Tensor) -> RawOutput:
        """Decoded candidates (see :class:`DetectorAdapter`); call it in eval mode (BatchNorm statistics)."""
        return self.raw_from_features(self.features(images))

    def raw_from_features(self, features: Sequence[torch.Tensor]) -> RawOutput:
        """Candidates from the neck's maps, as ZeroHead's eval forward computes them (``nms=False``)."""
        head = self.head
        scores, boxes, sizes = [], [], []
        for i, (x, stride) in enumerate(zip(features, head.strides)):
            scores.append(self._level_scores(i, x))
            reg_feat = x
            for conv in head.reg_convs[i]:
                reg_feat = conv(reg_feat)
            reg = head.scales[i](head.gfl_reg[i](reg_feat)).float()
            n, _, h, w = reg.shape
            dist = F.softmax(reg.reshape(n, 4, head.reg_max + 1, h, w), dim=2)
            dist = dist.flatten(start_dim=3).permute(0, 3, 1, 2)
            dist = head.integral(dist) * stride
            ys, xs = torch.meshgrid(
                torch.arange(h, device=x.device, dtype=torch.float32) * stride,
                torch.arange(w, device=x.device, dtype=torch.float32) * stride,
                indexing="ij",
            )
            centers = torch.stack((xs.flatten(), ys.flatten()), dim=-1)
            boxes.append(torch.cat((centers - dist[..., :2], centers + dist[..., 2:]), dim=-1))
            sizes.append(h * w)
        device = features[0].device
        levels = torch.repeat_interleave(torch.arange(len(sizes), device=device), torch.tensor(sizes, device=device))
        return RawOutput(torch.cat(boxes, dim=1), torch.cat(scores, dim=1), levels)

    def _level_scores(self, level: int, features: torch.Tensor) -> torch.Tensor:
        """Class probabilities :math:`(B, h w, K)` of one level (background channel dropped)."""
        head = self.head
        cls_feat = features
        for conv in head.cls_convs[level]:
            cls_feat = conv(cls_feat)
        scores = head.gfl_cls[level](cls_feat).sigmoid().flatten(start_dim=2).permute(0, 2, 1)
        return scores[..., : head.num_classes]

    def postprocess(self, raw: RawOutput) -> list[Detections]:
        """DAMO-YOLO's multi-class NMS with this adapter's thresholds (see :func:`damo_postprocess`)."""
        return damo_postprocess(raw, conf=self.conf, iou=self.iou, max_det=self.max_det)

    # ------------------------------------------------------------------------------------------------- layers
    def layer_names(self) -> dict[str, str]:
        """``neck.p3``/``p4``/``p5`` and ``backbone.p3``/``p4``/``p5`` to module paths (see class docstring)."""
        layers = dict(_NECK_OUTPUTS)
        backbone = self.model.backbone
        out_indices = list(getattr(backbone, "out_indices", []))
        attr = "csp_stage" if hasattr(backbone, "csp_stage") else "block_list"  # TinyNAS_csp / TinyNAS_res
        if hasattr(backbone, attr) and len(out_indices) == 3:
            for p, idx in zip((3, 4, 5), out_indices):
                layers[f"backbone.p{p}"] = f"backbone.{attr}.{idx}"
        return layers

    def randomization_stages(self) -> list[tuple[str, list[str]]]:
        """``head`` (ZeroHead), then ``neck`` (GiraffeNeckV2), then ``backbone`` (TinyNAS)."""
        return [("head", ["head"]), ("neck", ["neck"]), ("backbone", ["backbone"])]

    @property
    def default_cam_layer(self) -> str:
        """``neck.p3``: every level's candidates depend on it."""
        return "neck.p3"

    def levels_explained(self, layer: str) -> tuple[int, ...] | None:
        """Levels (0 = P3) whose candidates depend on the neck map ``layer``; ``None`` for other layers.

        A CAM of a candidate of another level is zero everywhere: explain it at ``neck.p3``.
        """
        path = self.layer_names().get(layer, layer)
        order = list(_NECK_OUTPUTS.values())
        return tuple(range(order.index(path), 3)) if path in order else None

    def level_inputs(self) -> list[str] | None:
        """``neck.p3``, ``neck.p4``, ``neck.p5``: the maps ZeroHead reads, in its level order."""
        return list(_NECK_OUTPUTS)

    def level_head(self, layer: str) -> Callable[[torch.Tensor], torch.Tensor] | None:
        """For ``neck.p3``/``p4``/``p5``: that level's class branch of ZeroHead, sigmoid, without the background."""
        path = self.layer_names().get(layer, layer)
        order = list(_NECK_OUTPUTS.values())
        if path not in order:
            return None
        level = order.index(path)

        def scores(features: torch.Tensor) -> torch.Tensor:
            return self._level_scores(level, features)

        return scores


@register_cache_reset
def _reset_zerohead_priors(m: nn.Module) -> None:
    """DAMO-YOLO's ``ZeroHead`` keeps ``mlvl_priors`` keyed on ``feat_size[0]``: both are reset (clearing the
    priors alone makes its next call of the same shape fail)."""
    if hasattr(m, "mlvl_priors"):
        m.mlvl_priors = None
        if isinstance(getattr(m, "feat_size", None), list) and m.feat_size:
            m.feat_size[0] = torch.zeros(4)
