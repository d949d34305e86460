"""Adapter for image classifiers: an ultralytics ``ClassificationModel`` or any module returning class scores.

A classifier is treated as a detector with a single candidate that covers the whole image, so every target
and engine written for detectors applies unchanged: ``ClassTarget(label)``, ``BoxTarget(0, label)`` and
``MatchedBoxTarget(whole_image_box, label)`` all explain the probability of ``label``.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import nn

from xaiwatch.adapters.base import DetectorAdapter
from xaiwatch.core.errors import ConfigurationError, ShapeError, UnsupportedModelError
from xaiwatch.core.types import Detections, RawOutput

__all__ = ["ClassifierAdapter", "is_ultralytics_classification_model", "probe_feature_sizes"]

_OUTPUTS = ("probs", "logits")
_STRIDES = (8, 16, 32)


def is_ultralytics_classification_model(module: object) -> bool:
    """True for an ultralytics ``ClassificationModel`` (checked by class, without importing ultralytics)."""
    return any(
        c.__name__ == "ClassificationModel" and c.__module__.startswith("ultralytics") for c in type(module).__mro__
    )


def probe_feature_sizes(
    model: nn.Module, modules: Iterable[tuple[str, nn.Module]], size: int
) -> tuple[list[tuple[str, tuple[int, int]]], torch.Tensor]:
    """Run one forward on a zero image and record the spatial size of each given module's 4-D output.

    The forward runs without gradients, in eval mode, with the random streams forked; the hooks are removed
    afterwards.

    Args:
        model: the model to run.
        modules: ``(dotted path, module)`` pairs to watch.
        size: side of the square zero image.

    Returns:
        ``(path, (h, w))`` of every watched module whose output is a 4-D tensor, in the order the modules
        finished (a container finishes after its children), and the model's output.
    """
    from xaiwatch.core.context import eval_state, fork_rng, reset_caches

    seen: list[tuple[str, tuple[int, int]]] = []

    def record(path: str):
        def hook(_m: nn.Module, _i: object, out: object) -> None:
            if isinstance(out, torch.Tensor) and out.dim() == 4:
                seen.append((path, (int(out.shape[-2]), int(out.shape[-1]))))

        return hook

    hooks = [m.register_forward_hook(record(path)) for path, m in modules]
    p = next(model.parameters(), None)
    device, dtype = (p.device, p.dtype) if p is not None else (torch.device("cpu"), torch.float32)
    try:
        with torch.no_grad(), eval_state(model), fork_rng():
            out = model(torch.zeros(1, 3, size, size, device=device, dtype=dtype))
    finally:
        for h in hooks:
            h.remove()
        reset_caches(model)
    return seen, out


def _stride_aliases(seen: list[tuple[str, tuple[int, int]]], size: int) -> dict[str, str]:
    """``backbone.p3``/``p4``/``p5``: the last module (in finishing order) whose output has stride 8/16/32."""
    layers: dict[str, str] = {}
    for path, (h, w) in seen:
        if h and w and size % h == 0 and size // h == size // w and size // h in _STRIDES:
            stride = size // h
            layers[f"backbone.p{stride.bit_length() - 1}"] = path  # last one at that stride wins
    return dict(sorted(layers.items()))


def _check_ultralytics(model: nn.Module) -> None:
    if type(model).__name__ in {"YOLO", "Model"} and type(model).__module__.startswith("ultralytics"):
        raise UnsupportedModelError(
            "Got an ultralytics `YOLO` wrapper. Pass its network instead: `ClassifierAdapter(YOLO(path).model)` "
            "(the wrapper's `.train()` starts a training run, so xaiwatch never calls it)."
        )
    if is_ultralytics_classification_model(model) and type(model.model[-1]).__name__ != "Classify":
        raise UnsupportedModelError(
            f"ClassifierAdapter supports ultralytics classification models ending in a `Classify` head, got "
            f"{type(model.model[-1]).__name__}. Wrap the network in a module returning logits and pass that."
        )
    if any(c.__module__.startswith("ultralytics") and c.__name__ == "DetectionModel" for c in type(model).__mro__):
        raise UnsupportedModelError("Got an ultralytics DetectionModel; explain it with `YOLOv8Adapter`.")


def _names_from(model: nn.Module) -> list[str] | None:
    raw = getattr(model, "names", None)
    if isinstance(raw, dict):
        return [str(raw[k]) for k in sorted(raw)]
    if isinstance(raw, (list, tuple)):
        return [str(n) for n in raw]
    return None


class ClassifierAdapter(DetectorAdapter):
    """Explain an image classifier as a detector with one whole-image candidate.

    :meth:`raw` returns ``boxes`` :math:`(B, 1, 4)` equal to ``[0, 0, W, H]`` and ``scores`` :math:`(B, 1, C)`,
    the class probabilities. For an ultralytics ``ClassificationModel`` they are the softmax its ``Classify``
    head returns in eval mode (``(probs, logits)``; in training mode the head returns logits, to which the same
    softmax is applied). A plain module must return :math:`(B, C)` logits (``output="logits"``, softmax
    applied here) or probabilities (``output="probs"``, used as they are).

    :meth:`detect` returns the top class as one whole-image box when its probability is above ``conf``. The
    default ``conf=0.5`` makes a kept box (and a ``MatchedBoxTarget`` counting as *detected*) mean that the
    class is the unambiguous top class; pass ``conf=0`` to always keep the top class.

    Layers: ``backbone.p3``/``p4``/``p5`` (last module whose output has stride 8/16/32, found with one forward
    pass at ``probe_size``) and ``head.input``, the last feature map before the classifier (for ultralytics,
    the layer the ``Classify`` head reads; for a plain module, the last module with a spatial 4-D output). An
    ultralytics model also has ``head.conv``, the head's own 1x1 convolution before global pooling.
    ``head.input`` is the default CAM layer.

    Args:
        model: an ultralytics ``ClassificationModel`` (``YOLO("yolov8n-cls.pt").model``) or a module mapping
            :math:`(B, 3, H, W)` images in ``[0, 1]`` to :math:`(B, C)` scores.
        names: class names; read from ``model.names`` when omitted, else ``"0"``, ``"1"``, ….
        output: what a plain module returns, ``"logits"`` (default) or ``"probs"``. Not allowed for an
            ultralytics model, whose output is read from its head.
        conf: probability above which :meth:`detect` keeps the top class.
        probe_size: side of the zero image used to find the layers (and the number of classes of a plain
            module without ``names``).

    Raises:
        UnsupportedModelError: for an ultralytics wrapper, detection model or non-``Classify`` head.
        ConfigurationError: for an invalid ``output``, ``conf`` or ``probe_size``.
    """

    def __init__(
        self,
        model: nn.Module,
        names: Sequence[str] | None = None,
        output: str | None = None,
        conf: float = 0.5,
        probe_size: int = 64,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise ConfigurationError(f"`model` must be a torch.nn.Module, got {type(model).__name__}.")
        _check_ultralytics(model)
        self.is_ultralytics = is_ultralytics_classification_model(model)
        if self.is_ultralytics and output is not None:
            raise ConfigurationError(
                f"`output={output!r}` is only for plain modules: an ultralytics ClassificationModel's output is read "
                "from its Classify head (probabilities in eval mode, logits in training mode). Leave `output` unset."
            )
        output = output or "logits"
        if output not in _OUTPUTS:
            raise ConfigurationError(f"`output` must be one of {_OUTPUTS}, got {output!r}.")
        if isinstance(probe_size, bool) or not isinstance(probe_size, int) or probe_size < 32:
            raise ConfigurationError(f"`probe_size` must be an integer >= 32, got {probe_size!r}.")
        self.output = "ultralytics" if self.is_ultralytics else output
        self.probe_size = probe_size
        self._layers: dict[str, str] | None = None
        self._num_outputs: int | None = None
        super().__init__(model, names=None, conf=conf, iou=1.0, max_det=1)
        names = names if names is not None else _names_from(model)
        if names is None:
            self._probe()
            names = [str(i) for i in range(int(self._num_outputs))]
        self.names = [str(n) for n in names]

    # ----------------------------------------------------------------------------------------------- scores
    def probabilities(self, images: torch.Tensor) -> torch.Tensor:
        """Differentiable class probabilities.

        Args:
            images: :math:`(B, 3, H, W)` float images in ``[0, 1]``.

        Returns:
            :math:`(B, C)` probabilities (rows sum to 1 unless a plain module returns other ``"probs"``).
        """
        return self._probs_from_output(self.model(images), images.shape[0])

    def _probs_from_output(self, out: object, batch: int) -> torch.Tensor:
        if self.is_ultralytics:
            if isinstance(out, tuple):  # eval mode: (softmax, logits)
                out = out[0]
            elif self.model.model[-1].training:  # training mode: logits
                out = out.softmax(1)
            # export mode: softmax already
        elif self.output == "logits":
            out = self._check_output(out, batch).softmax(1)
        return self._check_output(out, batch)

    def _check_output(self, out: object, batch: int) -> torch.Tensor:
        if not isinstance(out, torch.Tensor):
            raise UnsupportedModelError(
                f"ClassifierAdapter needs a model returning a (B, C) tensor of class scores, got "
                f"{type(out).__name__}. Wrap the model so that its forward returns the logits."
            )
        if out.dim() != 2 or out.shape[0] != batch:
            raise ShapeError("model output", tuple(out.shape), [batch, "C"])
        return out

    def raw(self, images: torch.Tensor) -> RawOutput:
        """One whole-image candidate per image: boxes :math:`(B, 1, 4)` ``[0, 0, W, H]``, scores :math:`(B, 1, C)`.

        Args:
            images: :math:`(B, 3, H, W)` float images in ``[0, 1]``.

        Returns:
            the candidates (see :class:`~xaiwatch.core.types.RawOutput`).
        """
        probs = self.probabilities(images)
        h, w = images.shape[-2:]
        box = torch.tensor([0.0, 0.0, float(w), float(h)], device=probs.device, dtype=probs.dtype)
        return RawOutput(box.expand(probs.shape[0], 1, 4), probs[:, None, :], None)

    def postprocess(self, raw: RawOutput) -> list[Detections]:
        """The top class of each image as one whole-image box, kept when its probability is above ``conf``."""
        out = []
        for boxes, scores in zip(raw.boxes, raw.scores):
            best, label = scores[0].max(dim=0)
            if float(best) > self.conf:
                idx = torch.zeros(1, dtype=torch.long, device=boxes.device)
                out.append(Detections(boxes[:1], best[None], label[None], idx))
            else:
                out.append(Detections.empty(boxes.device))
        return out

    # ----------------------------------------------------------------------------------------------- layers
    def layer_names(self) -> dict[str, str]:
        """Aliases ``backbone.p3`` …, ``head.input`` (and ``head.conv``) to dotted module paths."""
        if self._layers is None:
            self._probe()
        return dict(self._layers)

    @property
    def default_cam_layer(self) -> str:
        """``head.input``, the last feature map before the classifier.

        Raises:
            UnsupportedModelError: when a plain module has no module with a spatial output.
        """
        if "head.input" not in self.layer_names():
            raise UnsupportedModelError(
                f"{type(self.model).__name__} has no module with a spatial (B, C, H, W) output at {self.probe_size} "
                "px, so CAM methods have no default layer. Pass `layer=` (a dotted module path), use gradient "
                "methods, or a larger `probe_size`."
            )
        return "head.input"

    def _probe(self) -> None:
        if self.is_ultralytics:
            self._layers = self._ultralytics_layers()
            self._num_outputs = int(self.model.model[-1].linear.out_features)
            return
        modules = [(n, m) for n, m in self.model.named_modules() if n]
        seen, out = probe_feature_sizes(self.model, modules, self.probe_size)
        self._num_outputs = int(self._check_output(out, 1).shape[1])
        spatial = [(n, hw) for n, hw in seen if min(hw) > 1]
        self._layers = {**_stride_aliases(spatial, self.probe_size), "head.input": spatial[-1][0]} if spatial else {}

    def _ultralytics_layers(self) -> dict[str, str]:
        head = self.model.model[-1]
        modules = [(f"model.{i}", m) for i, m in enumerate(self.model.model[:-1])]
        seen, _ = probe_feature_sizes(self.model, modules, self.probe_size)
        f = head.f if isinstance(head.f, int) else head.f[-1]
        source = f if f >= 0 else int(getattr(head, "i", len(self.model.model) - 1)) + f
        return {
            **_stride_aliases(seen, self.probe_size),
            "head.input": f"model.{source}",
            "head.conv": f"model.{len(self.model.model) - 1}.conv",
        }
