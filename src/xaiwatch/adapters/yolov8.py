"""Adapter for ultralytics YOLOv8 (and v5u/v9/YOLO11/YOLO12/YOLOv10-style) ``DetectionModel``s."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn
from typing_extensions import override

from xaiwatch.adapters.base import DetectorAdapter
from xaiwatch.core.context import register_cache_reset
from xaiwatch.core.errors import UnsupportedModelError
from xaiwatch.core.types import Detections, RawOutput

__all__ = ["YOLOv8Adapter", "is_ultralytics_detection_model"]


def _levels(preds: dict | None, device: torch.device) -> torch.Tensor | None:
    """The level of each candidate, from the head's input feature maps (``preds["feats"]``)."""
    if not isinstance(preds, dict) or "feats" not in preds:
        return None
    sizes = [f.shape[2] * f.shape[3] for f in preds["feats"]]
    return torch.repeat_interleave(torch.arange(len(sizes), device=device), torch.tensor(sizes, device=device))


def is_ultralytics_detection_model(module: object) -> bool:
    """True for an ultralytics ``DetectionModel`` (checked by class, without importing ultralytics)."""
    return any(c.__name__ == "DetectionModel" and c.__module__.startswith("ultralytics") for c in type(module).__mro__)


#: layers that act on each cell of a feature map alone (batch norm in eval mode, activations)
_CELLWISE = (nn.BatchNorm2d, nn.SiLU, nn.ReLU, nn.LeakyReLU, nn.Hardswish, nn.GELU, nn.Sigmoid, nn.Identity)

#: heads whose candidates this adapter decodes: YOLOv8/YOLO11/YOLO12 ``Detect`` and YOLOv10's ``v10Detect``
_DETECT_HEADS = frozenset({"Detect", "v10Detect"})


def _unwrap(model: nn.Module) -> nn.Module:
    # ultralytics.YOLO is a wrapper whose .train() starts a training run; work on its inner DetectionModel.
    if type(model).__name__ in {"YOLO", "Model"} and type(model).__module__.startswith("ultralytics"):
        raise UnsupportedModelError(
            "Got an ultralytics `YOLO` wrapper. Pass its network instead: `YOLOv8Adapter(YOLO(path).model)` "
            "(the wrapper's `.train()` starts a training run, so xaiwatch never calls it)."
        )
    if not is_ultralytics_detection_model(model):
        raise UnsupportedModelError(
            f"YOLOv8Adapter needs an ultralytics `DetectionModel`, got {type(model).__name__}. Build one with "
            "`DetectionModel('yolov8n.yaml', nc=...)` or take `YOLO(path).model`."
        )
    head = model.model[-1]
    if type(head).__name__ == "RTDETRDecoder":
        raise UnsupportedModelError("This is an RT-DETR model: explain it with `RTDETRAdapter(model)`.")
    if type(head).__name__ not in _DETECT_HEADS:
        raise UnsupportedModelError(
            f"YOLOv8Adapter supports the plain `Detect` head (and YOLOv10's `v10Detect`), got {type(head).__name__} "
            "(segmentation, pose and OBB heads are not supported yet)."
        )
    return model


class YOLOv8Adapter(DetectorAdapter):
    """Explain an ultralytics ``DetectionModel``.

    Inputs are RGB float images in ``[0, 1]`` (ultralytics' own convention), with sides a multiple of the
    largest stride (32). Candidates are the head's decoded one-to-many outputs (``(B, 4 + C, N)``): boxes
    converted to ``xyxy`` pixels, class scores after the sigmoid. :meth:`detect` equals ultralytics'
    ``non_max_suppression`` with the same thresholds.

    End-to-end heads (YOLOv10's ``v10Detect`` after ``model.end2end = True``, which ultralytics 8.4 does not set for a
    model built from its yaml): candidates are the one-to-one branch's outputs and :meth:`detect` is its NMS-free
    top-k selection (``Detect.postprocess``) followed by the confidence threshold, as ultralytics predicts; otherwise
    (YOLOv10 by default) the one-to-many branch with NMS, as for YOLOv8.

    Layers: ``backbone.p3``/``p4``/``p5`` (last backbone stage at stride 8/16/32) and ``neck.p3``/``p4``/
    ``p5`` (the feature maps the Detect head reads). ``neck.p3`` is the default CAM layer: every level's
    candidates depend on it, and at stride 8 it resolves small objects.

    Args:
        model: ultralytics ``DetectionModel`` (``YOLO(path).model``).
        names: class names; read from ``model.names`` when omitted.
        conf, iou, max_det: post-processing thresholds of :meth:`detect`.
    """

    def __init__(
        self,
        model: nn.Module,
        names: Sequence[str] | None = None,
        conf: float = 0.25,
        iou: float = 0.7,
        max_det: int = 300,
    ) -> None:
        model = _unwrap(model)
        if names is None:
            raw_names = getattr(model, "names", None)
            if isinstance(raw_names, dict):
                names = [raw_names[k] for k in sorted(raw_names)]
            elif raw_names is not None:
                names = list(raw_names)
            else:
                names = [str(i) for i in range(model.model[-1].nc)]
        super().__init__(model, names, conf=conf, iou=iou, max_det=max_det)
        self._layers: dict[str, str] | None = None

    @property
    def head(self) -> nn.Module:
        """The ``Detect`` module."""
        return self.model.model[-1]

    def raw(self, images: torch.Tensor) -> RawOutput:
        """Decoded candidates (see :class:`DetectorAdapter`); the model must be in eval mode."""
        return self.raw_from_output(self.model(images))

    @override
    def raw_from_forward(self, output: Any, images: torch.Tensor) -> RawOutput | None:
        """The candidates of an eval-mode ``model(images)`` call; ``None`` for a training-mode output."""
        try:
            return self.raw_from_output(output)
        except UnsupportedModelError:
            return None

    def raw_from_output(self, out: tuple | torch.Tensor | dict) -> RawOutput:
        """Candidates from an eval-mode output of the model, ``(y, preds)`` or ``y`` of shape (B, 4 + C, N)."""
        if isinstance(out, dict):
            raise UnsupportedModelError(
                "The YOLOv8 model is in training mode; call the adapter inside `xaiwatch.explaining(model)` "
                "or `eval_state(model)` (its Detect head returns undecoded outputs in training mode)."
            )
        y, preds = out if isinstance(out, tuple) else (out, None)
        nc = self.head.nc
        if isinstance(preds, dict) and "one2one" in preds:  # YOLOv10-style dual head
            if getattr(self.head, "end2end", False):
                return self._one2one_raw(preds["one2one"])
            preds = preds["one2many"]
        xywh = y[:, :4].transpose(1, 2)
        boxes = torch.cat((xywh[..., :2] - xywh[..., 2:] / 2, xywh[..., :2] + xywh[..., 2:] / 2), dim=-1)
        if preds is not None and "scores" in preds:  # the same sigmoid, without a path through the box branch
            scores = preds["scores"].sigmoid().transpose(1, 2)
        else:
            scores = y[:, 4 : 4 + nc].transpose(1, 2)
        return RawOutput(boxes, scores, _levels(preds, y.device))

    def _one2one_raw(self, preds: dict) -> RawOutput:
        """Candidates of the one-to-one branch: its boxes decoded as ``Detect`` does (``xyxy`` when end-to-end)."""
        boxes = self.head._get_decode_boxes(preds).transpose(1, 2)  # dist2bbox(xywh=False) when end-to-end
        return RawOutput(boxes, preds["scores"].sigmoid().transpose(1, 2), _levels(preds, boxes.device))

    def postprocess(self, raw: RawOutput) -> list[Detections]:
        """NMS (see :class:`DetectorAdapter`), or for an end-to-end head ultralytics' NMS-free top-k selection.

        The end-to-end selection is ``Detect.get_topk_index``: the ``max_det`` candidates of highest best-class score,
        then the ``max_det`` highest (candidate, class) scores among them (a candidate may be kept for two classes),
        then scores not above ``conf`` dropped.
        """
        if not getattr(self.head, "end2end", False):
            return super().postprocess(raw)
        out = []
        for boxes, scores in zip(raw.boxes, raw.scores):
            n, nc = scores.shape
            k = min(self.max_det, n)
            first = scores.max(dim=-1).values.topk(k).indices
            values, flat = scores[first].flatten().topk(k)
            cand, labels = first[flat // nc], flat % nc
            keep = values > self.conf
            out.append(Detections(boxes[cand[keep]], values[keep], labels[keep], cand[keep]))
        return out

    def level_head(self, layer: str) -> Callable[[torch.Tensor], torch.Tensor] | None:
        """For ``neck.p3``/``p4``/``p5`` (the maps ``Detect`` reads): the level's class branch ``cv3[i]``, sigmoid."""
        path = self.layer_names().get(layer, layer)
        inputs = [f"model.{i}" for i in self.head.f]
        if path not in inputs or getattr(self.head, "end2end", False):
            return None
        branch, nc = self.head.cv3[inputs.index(path)], self.head.nc

        def scores(features: torch.Tensor) -> torch.Tensor:
            return branch(features).view(features.shape[0], nc, -1).sigmoid().transpose(1, 2)

        return scores

    def level_head_radius(self, layer: str) -> int | None:
        """The summed half-widths of the class branch's convolutions (``2`` for YOLOv8 and YOLO11: two 3 x 3).

        ``None`` unless every convolution has stride 1 and "same" padding and every other layer acts on each cell
        alone (batch norm in eval mode, activations), so that the sum bounds the branch's reach.
        """
        path = self.layer_names().get(layer, layer)
        inputs = [f"model.{i}" for i in self.head.f]
        if path not in inputs:
            return None
        radius = 0
        for module in self.head.cv3[inputs.index(path)].modules():
            if isinstance(module, nn.Conv2d):
                (kh, kw), (dh, dw) = module.kernel_size, module.dilation
                same = (dh * (kh - 1) // 2, dw * (kw - 1) // 2)
                if module.stride != (1, 1) or kh != kw or dh != dw or module.padding != same:
                    return None
                radius += same[0]
            elif not list(module.children()) and not isinstance(module, _CELLWISE):
                return None
        return radius

    def level_inputs(self) -> list[str] | None:
        """``neck.p3``, ``neck.p4``, ``neck.p5`` (the maps ``Detect`` reads, in its order); ``None`` for an end-to-end
        head, whose one-to-one branch :meth:`level_head` does not compute."""
        if getattr(self.head, "end2end", False):
            return None
        return [f"neck.p{int(s).bit_length() - 1}" for s in self.head.stride.tolist()]

    def randomization_stages(self) -> list[tuple[str, list[str]]]:
        """``head`` (``Detect``), then ``neck`` (the layers after the backbone), then ``backbone``."""
        n = len(self.model.model)
        n_backbone = len(getattr(self.model, "yaml", {}).get("backbone", [])) or min(self.head.f)
        return [
            ("head", [f"model.{n - 1}"]),
            ("neck", [f"model.{i}" for i in range(n_backbone, n - 1)]),
            ("backbone", [f"model.{i}" for i in range(n_backbone)]),
        ]

    def layer_names(self) -> dict[str, str]:
        """Aliases ``neck.p3`` … and ``backbone.p3`` … to ``model.<i>`` paths (see class docstring)."""
        if self._layers is None:
            self._layers = self._probe_layers()
        return self._layers

    @property
    def input_multiple(self) -> int:
        """The largest stride of the ``Detect`` head (32): ultralytics' ``Concat`` fails on other image sides."""
        return int(self.head.stride.max())

    @property
    def default_cam_layer(self) -> str:
        """``neck.p3``."""
        return "neck.p3"

    def _probe_layers(self) -> dict[str, str]:
        head = self.head
        strides = [int(s) for s in head.stride.tolist()]
        layers = {f"neck.p{s.bit_length() - 1}": f"model.{i}" for s, i in zip(strides, head.f)}
        n_backbone = len(getattr(self.model, "yaml", {}).get("backbone", [])) or min(head.f)
        # One cheap forward on a tiny image tells each backbone layer's stride.
        size = 2 * max(strides)
        seen: dict[int, int] = {}
        hooks = [
            m.register_forward_hook(lambda _m, _i, o, i=i: seen.__setitem__(i, o.shape[-1]))
            for i, m in enumerate(self.model.model[:n_backbone])
        ]
        from xaiwatch.core.context import eval_state, fork_rng

        p = next(self.model.parameters())
        try:
            with torch.no_grad(), eval_state(self.model), fork_rng():
                self.model(torch.zeros(1, 3, size, size, device=p.device, dtype=p.dtype))
        finally:
            for h in hooks:
                h.remove()
            self.reset_caches()
        for i in sorted(seen):
            stride = size // seen[i]
            if stride in strides:
                layers[f"backbone.p{stride.bit_length() - 1}"] = f"model.{i}"  # last layer at that stride wins
        return dict(sorted(layers.items(), key=lambda kv: (not kv[0].startswith("neck"), kv[0])))


@register_cache_reset
def _reset_detect_anchors(m: nn.Module) -> None:
    """ultralytics' ``Detect`` keeps ``anchors``/``strides`` for the last input shape (``shape``)."""
    if hasattr(m, "anchors") and hasattr(m, "shape") and hasattr(m, "stride") and hasattr(m, "dynamic"):
        m.shape = None
