"""Adapter for ultralytics RT-DETR (``RTDETRDetectionModel``): candidates are the decoder's object queries."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from typing_extensions import override

from xaiwatch.adapters.base import DetectorAdapter
from xaiwatch.core.context import register_cache_reset
from xaiwatch.core.errors import UnsupportedModelError
from xaiwatch.core.types import Detections, RawOutput

__all__ = ["RTDETRAdapter", "is_ultralytics_rtdetr_model"]


def is_ultralytics_rtdetr_model(module: object) -> bool:
    """True for an ultralytics ``RTDETRDetectionModel`` (checked by class, without importing ultralytics)."""
    return any(
        c.__name__ == "RTDETRDetectionModel" and c.__module__.startswith("ultralytics") for c in type(module).__mro__
    )


class RTDETRAdapter(DetectorAdapter):
    """Explain an ultralytics ``RTDETRDetectionModel`` (``rtdetr-l.yaml``, ``rtdetr-resnet50.yaml``, your own yaml).

    Candidates are the decoder's object queries (300 in the official models, fewer when the image has fewer encoder
    tokens): boxes of the last decoder layer converted from normalised ``cx, cy, w, h`` to ``xyxy`` pixels, and the
    per-class sigmoid of its logits. :meth:`detect` is ultralytics' RT-DETR post-processing, without NMS: the
    ``num_queries`` highest (query, class) scores (``RTDETRDecoder.postprocess``; a query may be kept for two
    classes), those not above ``conf`` dropped, at most ``max_det`` kept (``RTDETRPredictor.postprocess``). The
    ``iou`` argument is unused.

    Layers: ``neck.p3``/``p4``/``p5`` (the maps the decoder reads, found by stride), ``encoder.aifi`` (the AIFI
    transformer layer, when there is one), ``backbone.p3``/``p4``/``p5``.

    Args:
        model: ultralytics ``RTDETRDetectionModel`` (``RTDETR(path).model``).
        names: class names; read from ``model.names`` when omitted.
        conf, max_det: post-processing of :meth:`detect`.

    Raises:
        UnsupportedModelError: for another model, or the ultralytics ``RTDETR`` wrapper.

    Example:
        >>> from ultralytics.nn.tasks import RTDETRDetectionModel  # doctest: +SKIP
        >>> adapter = RTDETRAdapter(RTDETRDetectionModel("rtdetr-l.yaml", nc=3))  # doctest: +SKIP
    """

    def __init__(
        self,
        model: nn.Module,
        names: Sequence[str] | None = None,
        conf: float = 0.25,
        iou: float = 0.7,
        max_det: int = 300,
    ) -> None:
        if type(model).__name__ in {"RTDETR", "YOLO", "Model"} and type(model).__module__.startswith("ultralytics"):
            raise UnsupportedModelError(
                "Got an ultralytics `RTDETR` wrapper. Pass its network instead: `RTDETRAdapter(RTDETR(path).model)` "
                "(the wrapper's `.train()` starts a training run, so xaiwatch never calls it)."
            )
        if not is_ultralytics_rtdetr_model(model):
            raise UnsupportedModelError(
                f"RTDETRAdapter needs an ultralytics `RTDETRDetectionModel`, got {type(model).__name__}. Build one "
                "with `RTDETRDetectionModel('rtdetr-l.yaml', nc=...)` or take `RTDETR(path).model`."
            )
        if names is None:
            raw_names = getattr(model, "names", None)
            if isinstance(raw_names, dict):
                names = [raw_names[k] for k in sorted(raw_names)]
            else:
                names = list(raw_names) if raw_names is not None else [str(i) for i in range(model.model[-1].nc)]
        super().__init__(model, names, conf=conf, iou=iou, max_det=max_det)
        self._layers: dict[str, str] | None = None

    @property
    def head(self) -> nn.Module:
        """The ``RTDETRDecoder`` module."""
        return self.model.model[-1]

    def raw(self, images: torch.Tensor) -> RawOutput:
        """The queries of the last decoder layer as candidates; the model must be in eval mode."""
        return self.raw_from_output(self.model(images), images.shape[-2:])

    @override
    def raw_from_forward(self, output: Any, images: torch.Tensor) -> RawOutput | None:
        """The candidates of an eval-mode ``model(images)`` call; ``None`` for any other output."""
        try:
            return self.raw_from_output(output, images.shape[-2:])
        except UnsupportedModelError:
            return None

    def raw_from_output(self, out: tuple, size: Sequence[int]) -> RawOutput:
        """Candidates from an eval-mode output ``(y, (dec_bboxes, dec_scores, ...))`` for images of ``size`` (H, W)."""
        if not (isinstance(out, tuple) and len(out) == 2 and isinstance(out[1], (tuple, list))):
            raise UnsupportedModelError(
                "The RT-DETR model is in training mode (or export mode); call the adapter inside "
                "`xaiwatch.explaining(model)` or `eval_state(model)`."
            )
        dec_bboxes, dec_scores = out[1][0][-1], out[1][1][-1]
        h, w = (int(s) for s in size)
        scale = dec_bboxes.new_tensor([w, h, w, h])
        cxcy, wh = dec_bboxes[..., :2], dec_bboxes[..., 2:]
        boxes = torch.cat((cxcy - wh / 2, cxcy + wh / 2), dim=-1) * scale
        return RawOutput(boxes, dec_scores.sigmoid())

    def postprocess(self, raw: RawOutput) -> list[Detections]:
        """ultralytics' RT-DETR selection: top (query, class) scores, then ``conf``, then ``max_det``; no NMS."""
        out = []
        for boxes, scores in zip(raw.boxes, raw.scores):
            n, nc = scores.shape
            values, flat = scores.flatten().topk(min(n, n * nc))
            query, labels = flat // nc, flat % nc
            keep = torch.nonzero(values > self.conf).flatten()[: self.max_det]
            out.append(Detections(boxes[query[keep]], values[keep], labels[keep], query[keep]))
        return out

    def layer_names(self) -> dict[str, str]:
        """Aliases ``neck.p3`` …, ``encoder.aifi``, ``backbone.p3`` … to ``model.<i>`` paths."""
        if self._layers is None:
            self._layers = self._probe_layers()
        return self._layers

    @property
    def default_cam_layer(self) -> str:
        """``neck.p3``."""
        return "neck.p3"

    def randomization_stages(self) -> list[tuple[str, list[str]]]:
        """``head`` (the decoder), then ``neck`` (hybrid encoder: AIFI and the fusion layers), then ``backbone``."""
        n, n_backbone = len(self.model.model), self._n_backbone()
        return [
            ("head", [f"model.{n - 1}"]),
            ("neck", [f"model.{i}" for i in range(n_backbone, n - 1)]),
            ("backbone", [f"model.{i}" for i in range(n_backbone)]),
        ]

    def _n_backbone(self) -> int:
        return len(getattr(self.model, "yaml", {}).get("backbone", [])) or min(self.head.f)

    def _probe_layers(self) -> dict[str, str]:
        from xaiwatch.core.context import eval_state, fork_rng

        size = 64
        seen: dict[int, int] = {}
        layers = list(self.model.model[:-1])
        hooks = [
            m.register_forward_hook(lambda _m, _i, o, i=i: seen.__setitem__(i, o.shape[-1]))
            for i, m in enumerate(layers)
        ]
        p = next(self.model.parameters())
        try:
            with torch.no_grad(), eval_state(self.model), fork_rng():
                self.model(torch.zeros(1, 3, size, size, device=p.device, dtype=p.dtype))
        finally:
            for h in hooks:
                h.remove()
            self.reset_caches()
        names: dict[str, str] = {}
        for i in self.head.f:
            names[f"neck.p{(size // seen[i]).bit_length() - 1}"] = f"model.{i}"
        for i, m in enumerate(layers):
            if type(m).__name__ == "AIFI":
                names["encoder.aifi"] = f"model.{i}"
        for i in sorted(k for k in seen if k < self._n_backbone()):
            stride = size // seen[i]
            if stride >= 8:
                names[f"backbone.p{stride.bit_length() - 1}"] = f"model.{i}"  # last layer at that stride wins
        order = ("neck", "encoder", "backbone")
        return dict(sorted(names.items(), key=lambda kv: (order.index(kv[0].split(".")[0]), kv[0])))


@register_cache_reset
def _reset_decoder_anchors(m: nn.Module) -> None:
    """ultralytics' ``RTDETRDecoder`` keeps ``anchors``/``valid_mask`` for the last feature ``shapes``."""
    if hasattr(m, "anchors") and hasattr(m, "valid_mask") and hasattr(m, "shapes"):
        m.shapes = []
