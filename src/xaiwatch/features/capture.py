"""Forward-hook capture of named layers and the pooling of their feature maps into one vector per point."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping, Sequence

import torch
from torch import nn

from xaiwatch.core.errors import ConfigurationError, ShapeError, check_shape

__all__ = ["capture_layers", "spatial_scale", "roi_pool", "global_pool", "box_thumbnails"]


def _feature_map(output: object, name: str) -> torch.Tensor:
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        output = output[0]
    if not isinstance(output, torch.Tensor) or output.dim() != 4:
        shape = tuple(output.shape) if isinstance(output, torch.Tensor) else type(output).__name__
        raise ShapeError(f"output of layer {name!r}", shape if isinstance(shape, tuple) else (), ["B", "C", "H", "W"])
    return output


@contextlib.contextmanager
def capture_layers(layers: Mapping[str, nn.Module]) -> Iterator[dict[str, torch.Tensor]]:
    """Record the output of each named layer during the forward passes run inside the context.

    The hooks are removed in ``finally``, also when the forward pass fails. Each forward pass overwrites the
    previous batch's maps, so a caller streaming over a dataset holds one batch of feature maps at a time.

    Args:
        layers: name to module.

    Yields:
        a dict ``name -> (B, C, h, w)`` feature map (detached), filled by each forward pass.

    Raises:
        ShapeError: during the forward pass, if a layer's output is not a :math:`(B, C, h, w)` tensor.

    Example:
        >>> net = nn.Sequential(nn.Conv2d(3, 4, 3, stride=2, padding=1), nn.ReLU())
        >>> with capture_layers({"conv": net[0]}) as maps:
        ...     _ = net(torch.zeros(2, 3, 8, 8))
        >>> tuple(maps["conv"].shape), len(net[0]._forward_hooks)
        ((2, 4, 4, 4), 0)
    """
    maps: dict[str, torch.Tensor] = {}
    handles = []

    def hook(name: str) -> Callable[[nn.Module, object, object], None]:
        def record(_module: nn.Module, _inputs: object, output: object) -> None:
            maps[name] = _feature_map(output, name).detach()

        return record

    try:
        for name, module in layers.items():
            handles.append(module.register_forward_hook(hook(name)))
        yield maps
    finally:
        for h in handles:
            h.remove()


def spatial_scale(feature: torch.Tensor, image_size: Sequence[int]) -> float:
    """Feature-map pixels per input pixel (``1 / stride``), measured from the two sizes.

    Measuring instead of assuming makes any adapter's layers work (YOLOv8's P3 is 1/8, DAMO-YOLO's too, a
    backbone stage may be 1/4).

    Args:
        feature: :math:`(B, C, h, w)` feature map.
        image_size: ``(H, W)`` of the input images.

    Returns:
        ``w / W``.

    Raises:
        ShapeError: if the map is not 4-D.
        ConfigurationError: if the two axes give clearly different scales (the layer is not a plain
            strided map of the image).
    """
    check_shape(feature, ["B", "C", "h", "w"], "feature")
    sy, sx = feature.shape[-2] / float(image_size[0]), feature.shape[-1] / float(image_size[1])
    if abs(sy - sx) > 0.5 * max(1.0 / image_size[0], 1.0 / image_size[1]) + 0.05 * sx:
        raise ConfigurationError(
            f"Layer map {tuple(feature.shape[-2:])} is not a strided map of the {tuple(image_size)} input; "
            "choose a convolutional layer (backbone or neck output)."
        )
    return float(sx)


def _roi_align(x: torch.Tensor, boxes: Sequence[torch.Tensor], size: int, scale: float, sampling: int) -> torch.Tensor:
    from torchvision.ops import roi_align

    if len(boxes) != x.shape[0]:
        raise ShapeError("boxes", (len(boxes),), [x.shape[0]])
    rois = [torch.as_tensor(b).to(x.device, x.dtype).reshape(-1, 4) for b in boxes]
    if sum(len(b) for b in rois) == 0:
        return x.new_zeros(0, x.shape[1], size, size)
    return roi_align(x, rois, size, spatial_scale=scale, sampling_ratio=sampling, aligned=True)


def roi_pool(
    feature: torch.Tensor, boxes: Sequence[torch.Tensor], scale: float, output_size: int = 2, sampling_ratio: int = 2
) -> torch.Tensor:
    """One vector per box: ``torchvision.ops.roi_align`` on the feature map, averaged over the output cells.

    Args:
        feature: :math:`(B, C, h, w)` feature map of a batch.
        boxes: per image a :math:`(n_i, 4)` tensor of ``x1, y1, x2, y2`` input pixels.
        scale: :func:`spatial_scale` of the map.
        output_size: roi_align's output grid (``output_size x output_size`` cells, then averaged).
        sampling_ratio: roi_align's samples per cell and axis.

    Returns:
        :math:`(\\sum n_i, C)` embeddings, in image order then box order.

    Raises:
        ShapeError: if the map is not 4-D or ``boxes`` has not one entry per image.
    """
    check_shape(feature, ["B", "C", "h", "w"], "feature")
    return _roi_align(feature, boxes, output_size, scale, sampling_ratio).mean(dim=(2, 3))


def global_pool(feature: torch.Tensor) -> torch.Tensor:
    """Per-image embedding: global average pooling, :math:`(B, C, h, w) \\to (B, C)`."""
    check_shape(feature, ["B", "C", "h", "w"], "feature")
    return feature.mean(dim=(2, 3))


def box_thumbnails(images: torch.Tensor, boxes: Sequence[torch.Tensor], size: int = 32) -> torch.Tensor:
    """Square thumbnails of each box (the projector's sprite): bilinear ``roi_align`` on the image itself.

    Args:
        images: :math:`(B, 3, H, W)` images in ``[0, 1]``.
        boxes: per image a :math:`(n_i, 4)` tensor of pixel boxes.
        size: thumbnail side in pixels.

    Returns:
        :math:`(\\sum n_i, 3, size, size)` crops in ``[0, 1]``.
    """
    check_shape(images, ["B", 3, "H", "W"], "images")
    return _roi_align(images, boxes, size, 1.0, 2).clamp(0.0, 1.0)
