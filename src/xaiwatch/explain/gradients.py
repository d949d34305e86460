"""Gradient and CAM engines delegating to Captum."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from xaiwatch.explain.base import Engine, register
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


@register
class GradCamEngine(Engine):
    """Grad-CAM (Selvaraju et al. 2017) on a named layer through Captum's ``LayerGradCam``.

    The layer map (ReLU of the gradient-weighted channel sum) is upsampled bilinearly to the image size.
    """

    name = "grad_cam"
    needs_layer = True

    def _attribute(self, images: torch.Tensor, targets: Target | Sequence[Target]) -> torch.Tensor:
        from captum.attr import LayerGradCam

        cam = LayerGradCam(self.forward_func(targets), self.layer).attribute(
            images, target=None, relu_attributions=True
        )
        return F.interpolate(cam, size=images.shape[-2:], mode="bilinear", align_corners=False)
