"""Gradient and CAM engines delegating to Captum."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from xaiwatch.core.context import explaining
from xaiwatch.core.inputs import check_images
from xaiwatch.explain.base import Engine, register
from xaiwatch.explain.cam_methods import _CamEngine
from xaiwatch.targets import Target

__all__ = ["SaliencyEngine", "GradCamEngine"]


@register
class SaliencyEngine(Engine):
    """Input-gradient saliency (Simonyan et al. 2014) through Captum's ``Saliency``.

    The map is the absolute gradient of the target's score with respect to each pixel, maximised over the
    colour channels.
    """

    name = "saliency"

    def _attribute(self, images: torch.Tensor, targets: Target | Sequence[Target]) -> torch.Tensor:
        from captum.attr import Saliency

        grads = Saliency(self.forward_func(targets)).attribute(images, target=None, abs=True)
        return grads.amax(dim=1, keepdim=True)

    def attribute_boxes(self, image: torch.Tensor, targets: Sequence[Target]) -> torch.Tensor:
        """The K objects of one image: one forward, one batched backward (``is_grads_batched``) to the input."""
        check_images(image, "image", self.adapter.input_multiple, batch=1)
        targets = list(targets)
        if not targets:
            return image.new_zeros(0, 1, *image.shape[-2:])
        with explaining(self.adapter.model, seed=self.seed) as prepare:
            x = prepare(image).requires_grad_()
            raw = self.adapter.raw(x)
            scores = torch.cat([t(raw) for t in targets])
            eye = torch.eye(len(targets), device=scores.device, dtype=scores.dtype)
            grads = torch.autograd.grad(scores, x, eye, is_grads_batched=True)[0][:, 0]
        return grads.abs().amax(dim=1, keepdim=True).detach()


@register
class GradCamEngine(_CamEngine):
    """Grad-CAM (Selvaraju et al. 2017) on a named layer through Captum's ``LayerGradCam``.

    The layer map (ReLU of the gradient-weighted channel sum) is upsampled bilinearly to the image size.
    :meth:`attribute_boxes` computes the same formula for K objects from one forward and one batched backward to
    the layer (tested equal to Captum).
    """

    name = "grad_cam"
    needs_layer = True

    def _attribute(self, images: torch.Tensor, targets: Target | Sequence[Target]) -> torch.Tensor:
        if len(self.layers) > 1:  # a group of layers: each layer's map by the same formula, merged
            return super()._attribute(images, targets)
        from captum.attr import LayerGradCam

        cam = LayerGradCam(self.forward_func(targets), self.layer).attribute(
            images, target=None, relu_attributions=True
        )
        return F.interpolate(cam, size=images.shape[-2:], mode="bilinear", align_corners=False)

    def _cam(self, activations: torch.Tensor, grads: torch.Tensor | None) -> torch.Tensor:
        return (grads.mean(dim=(2, 3), keepdim=True) * activations).sum(dim=1, keepdim=True)
