"""What a layer computes and what the detector outputs: top feature-map channels and a confidence heat map.

Neither method attributes a score to pixels. :class:`FeatureMapsEngine` shows the strongest channels of a
layer (the "what does this layer see" grid); :class:`ConfidenceHeatmapEngine` paints each post-NMS
detection's confidence into its box, the detector's own answer drawn as a map (a baseline to compare
explanations with).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from xaiwatch.adapters.base import DetectorAdapter
from xaiwatch.core.context import explaining
from xaiwatch.core.errors import ConfigurationError, ShapeError, check_shape
from xaiwatch.core.types import Detections
from xaiwatch.core.validation import positive_int
from xaiwatch.explain.base import Engine, register
from xaiwatch.targets import Target

__all__ = ["FeatureMapsEngine", "ConfidenceHeatmapEngine", "top_channels", "confidence_heatmap"]


# ------------------------------------------------------------------------------------------------ feature maps
def top_channels(activation: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` channels of highest energy (mean of squares over the spatial positions) of each image.

    Args:
        activation: :math:`(B, C, h, w)` layer output.
        k: number of channels; at most ``C`` are returned.

    Returns:
        ``(values, indices)``: :math:`(B, k, h, w)` channel maps in descending order of energy and their
        :math:`(B, k)` channel indices.

    Raises:
        ShapeError: if ``activation`` is not 4-D.
        ConfigurationError: if ``k`` is not a positive integer.
    """
    check_shape(activation, ["B", "C", "h", "w"], "activation")
    k = positive_int("k", k)
    energy = activation.detach().float().pow(2).mean(dim=(2, 3))
    indices = energy.topk(min(k, activation.shape[1]), dim=1).indices
    values = activation.detach().gather(1, indices[:, :, None, None].expand(-1, -1, *activation.shape[-2:]))
    return values, indices


@register
class FeatureMapsEngine(Engine):
    """The strongest channels of a layer: a class-agnostic view of what the layer responds to.

    :meth:`attribute` gives the mean of the ``top_k`` highest-energy channel maps of the layer (see
    :func:`top_channels`), upsampled bilinearly to the image size; the target is not used (the same map for
    every target). :meth:`channels` gives the channels themselves, for a grid
    (:func:`~xaiwatch.render.panels.feature_grid`). The layer output is read with a forward hook that is
    removed on exit; no gradient is computed.

    Args:
        adapter, layer, seed, max_memory_mb: see :class:`~xaiwatch.explain.base.Engine`.
        top_k: number of channels averaged by :meth:`attribute` and returned by :meth:`channels` by default.
    """

    name = "feature_maps"
    needs_layer = True

    def __init__(
        self,
        adapter: DetectorAdapter,
        layer: str | None = None,
        seed: int = 0,
        max_memory_mb: float = 2048,
        *,
        top_k: int = 16,
    ) -> None:
        self.top_k = positive_int("top_k", top_k)
        super().__init__(adapter, layer=layer, seed=seed, max_memory_mb=max_memory_mb)

    def channels(self, images: torch.Tensor, k: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The ``k`` highest-energy channels of the layer for each image.

        Args:
            images: :math:`(B, 3, H, W)` images in ``[0, 1]``.
            k: number of channels (``top_k`` when ``None``, 16 by default).

        Returns:
            ``(values, indices)``: :math:`(B, k, h, w)` detached maps and :math:`(B, k)` channel indices.

        Raises:
            ShapeError: if ``images`` is not :math:`(B, 3, H, W)`.
            ConfigurationError: if the layer's output is not a :math:`(B, C, h, w)` tensor.
        """
        check_shape(images, ["B", 3, "H", "W"], "images")
        with explaining(self.adapter.model, seed=self.seed) as prepare:
            return top_channels(self._activation(prepare(images)), self.top_k if k is None else k)

    def _activation(self, images: torch.Tensor) -> torch.Tensor:
        captured: list[object] = []

        def keep(_module: nn.Module, _inputs: object, out: object) -> None:
            captured.append(out)

        handle = self.layer.register_forward_hook(keep)
        try:
            with torch.no_grad():
                self.adapter.raw(images.detach())
        finally:
            handle.remove()
        out = captured[0] if captured else None
        if not isinstance(out, torch.Tensor) or out.dim() != 4:
            got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise ConfigurationError(
                f"Feature maps need a convolutional layer with a (B, C, h, w) output; {self.layer_name!r} gave {got}."
            )
        return out.detach()

    def _extras(self, image, targets, matches, raw) -> dict:
        """``"channels"``: the image's ``(values (1, k, h, w), indices (1, k))`` for a channel grid."""
        return {"channels": self.channels(image)}

    def _attribute(self, images: torch.Tensor, targets: Target | Sequence[Target]) -> torch.Tensor:
        values, _ = top_channels(self._activation(images), self.top_k)
        mean = values.float().mean(dim=1, keepdim=True)
        return F.interpolate(mean, size=images.shape[-2:], mode="bilinear", align_corners=False).to(images.dtype)


# ------------------------------------------------------------------------------------------ confidence heat map
def confidence_heatmap(detections: Sequence[Detections], num_classes: int, size: Sequence[int]) -> torch.Tensor:
    """Each detection's confidence painted into its box, summed over detections, one channel per class.

    Pixel ``(r, c)`` belongs to box ``x1, y1, x2, y2`` when its centre ``(c + 0.5, r + 0.5)`` lies in
    ``[x1, x2] x [y1, y2]`` (an integer box ``0, 0, 4, 4`` covers pixels 0 to 3).

    Args:
        detections: one :class:`~xaiwatch.core.types.Detections` per image.
        num_classes: number of classes :math:`C`.
        size: ``(H, W)``.

    Returns:
        :math:`(B, C, H, W)` float maps on the detections' device.

    Raises:
        ConfigurationError: if a detection's label is not in ``[0, C)``.
    """
    h, w = int(size[0]), int(size[1])
    device = detections[0].boxes.device if len(detections) else torch.device("cpu")
    heat = torch.zeros(len(detections), int(num_classes), h, w, device=device)
    ys = torch.arange(h, device=device, dtype=torch.float32) + 0.5
    xs = torch.arange(w, device=device, dtype=torch.float32) + 0.5
    for i, det in enumerate(detections):
        if len(det) == 0:
            continue
        labels = det.labels.long().to(device)
        if int(labels.min()) < 0 or int(labels.max()) >= num_classes:
            raise ConfigurationError(f"Detection labels must be in [0, {num_classes}), got {labels.tolist()}.")
        b = det.boxes.detach().float().to(device)
        in_y = (ys[None] >= b[:, 1:2]) & (ys[None] <= b[:, 3:4])
        in_x = (xs[None] >= b[:, 0:1]) & (xs[None] <= b[:, 2:3])
        painted = det.scores.detach().float().to(device)[:, None, None] * (in_y[:, :, None] & in_x[:, None, :])
        heat[i].index_add_(0, labels, painted)
    return heat


@register
class ConfidenceHeatmapEngine(Engine):
    """The detector's post-NMS detections as a map: each box filled with its confidence (summed where boxes
    overlap), for the target's class.

    The class is the target's ``label`` (:class:`~xaiwatch.targets.ClassTarget`,
    :class:`~xaiwatch.targets.MatchedBoxTarget`, a labelled :class:`~xaiwatch.targets.BoxTarget`); a target
    without a label (``BoxTarget(candidate)``) gives the sum over all classes. Detections use the adapter's
    thresholds (``conf``, ``iou``, ``max_det``). No gradient is computed.
    """

    name = "confidence_heatmap"

    def _attribute(self, images: torch.Tensor, targets: Target | Sequence[Target]) -> torch.Tensor:
        batch = images.shape[0]
        per_image = [targets] * batch if callable(targets) else list(targets)
        if len(per_image) != batch:
            raise ShapeError("targets", (len(per_image),), [batch])
        with torch.no_grad():
            raw = self.adapter.raw(images.detach())
            heat = confidence_heatmap(self.adapter.postprocess(raw), raw.num_classes, images.shape[-2:])
        maps = []
        for i, target in enumerate(per_image):
            label = getattr(target, "label", None)
            if label is not None and not 0 <= int(label) < raw.num_classes:
                raise ConfigurationError(
                    f"Target label {label} is out of range for a model with {raw.num_classes} classes."
                )
            maps.append(heat[i].sum(dim=0, keepdim=True) if label is None else heat[i, int(label)][None])
        return torch.stack(maps).to(images.dtype)
