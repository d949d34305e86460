"""The CAM family for detectors: Grad-CAM++, HiResCAM, LayerCAM and Eigen-CAM on a named layer.

Each map is computed from the layer's activation ``A`` (captured by a forward hook, removed in ``finally``) and,
for gradient CAMs, ``G = d score / d A`` from :func:`torch.autograd.grad` — never ``.backward()``. The formulas are
pytorch-grad-cam's (jacobgil/pytorch-grad-cam 1.5), so results can be compared with it; unlike it, the K objects
of one image are explained from one forward and one batched backward to the layer
(:meth:`~xaiwatch.explain.base.Engine.attribute_boxes`), and every map is ReLU'd as it does.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from xaiwatch.adapters.base import apply_targets
from xaiwatch.core.context import explaining
from xaiwatch.core.errors import UnsupportedModelError
from xaiwatch.core.inputs import check_images
from xaiwatch.core.types import RawOutput
from xaiwatch.explain.base import Engine, register
from xaiwatch.targets import Target

__all__ = ["GradCamPlusPlusEngine", "HiResCamEngine", "LayerCamEngine", "EigenCamEngine", "eigen_projection"]

_EPS = 1e-6  # as pytorch-grad-cam


def eigen_projection(activations: torch.Tensor) -> torch.Tensor:
    """Projection of each image's activations on their first principal component (pytorch-grad-cam's
    ``get_2d_projection``).

    Args:
        activations: :math:`(B, C, h, w)`.

    Returns:
        :math:`(B, 1, h, w)`; the sign of a singular vector is arbitrary, so each map's sign is chosen to make
        its largest-magnitude value positive (scikit-learn's ``svd_flip`` rule: the strongest response is
        bright). The sum cannot decide it: a projection of centred data sums to zero.
    """
    b, c, h, w = activations.shape
    out = []
    for a in activations.detach().float():
        m = a.reshape(c, h * w).T
        m = m - m.mean(dim=0, keepdim=True)
        _, _, vh = torch.linalg.svd(m, full_matrices=False)
        p = m @ vh[0]
        out.append(p if p[p.abs().argmax()] >= 0 else -p)
    return torch.stack(out).reshape(b, 1, h, w)


class _CamEngine(Engine):
    """A CAM from a layer's activation ``A`` :math:`(N, C, h, w)` and gradient ``G`` (same shape, or None)."""

    needs_layer = True
    needs_gradient = True

    @abstractmethod
    def _cam(self, activations: torch.Tensor, grads: torch.Tensor | None) -> torch.Tensor:
        """The :math:`(N, 1, h, w)` map before upsampling."""

    def _forward(self, images: torch.Tensor) -> tuple[torch.Tensor, RawOutput]:
        captured: list[object] = []
        handle = self.layer.register_forward_hook(lambda _m, _i, output: captured.append(output))
        try:
            raw = self.adapter.raw(images)
        finally:
            handle.remove()
        activation = captured[-1] if captured else None
        if not isinstance(activation, torch.Tensor) or activation.dim() != 4:
            raise UnsupportedModelError(
                f"Layer {self.layer_name!r} does not output a (B, C, h, w) feature map; choose another layer, "
                f"e.g. one of {list(self.adapter.layer_names())}."
            )
        return activation, raw

    def _finish(self, activations: torch.Tensor, grads: torch.Tensor | None, size: Sequence[int]) -> torch.Tensor:
        cam = torch.relu(self._cam(activations.detach(), grads))
        return F.interpolate(cam, size=tuple(size), mode="bilinear", align_corners=False)

    def _attribute(self, images: torch.Tensor, targets: Target | Sequence[Target]) -> torch.Tensor:
        activations, raw = self._forward(images)
        grads = None
        if self.needs_gradient:  # each image's score depends on its own activation only (eval mode)
            grads = torch.autograd.grad(apply_targets(raw, targets).sum(), activations)[0]
        return self._finish(activations, grads, images.shape[-2:])

    def attribute_boxes(self, image: torch.Tensor, targets: Sequence[Target]) -> torch.Tensor:
        """The K objects of one image from one forward and one batched backward to the layer.

        When the layer is the input of one level of the head (a neck output, see
        :meth:`~xaiwatch.adapters.base.DetectorAdapter.level_head`) and every target is a candidate of that
        level, the forward runs without recording the network's graph and the backward goes through that level's
        class branch only (:meth:`_level_gradients`): the same gradients, without K backward passes through the
        other levels and the box branch (whose gradients are zero for these scores).
        """
        check_images(image, "image", self.adapter.input_multiple, batch=1)
        targets = list(targets)
        if not targets:
            return image.new_zeros(0, 1, *image.shape[-2:])
        k = len(targets)
        head = self.adapter.level_head(self.layer_name) if self.needs_gradient else None
        with explaining(self.adapter.model, seed=self.seed) as prepare:
            x = prepare(image)
            grads = None
            if head is not None:
                with torch.no_grad():
                    activations, raw = self._forward(x)
                grads = self._level_gradients(head, activations, raw, targets)
            if grads is None:
                activations, raw = self._forward(x.requires_grad_())
                if self.needs_gradient:
                    scores = torch.cat([t(raw) for t in targets])
                    eye = torch.eye(k, device=scores.device, dtype=scores.dtype)
                    grads = torch.autograd.grad(scores, activations, eye, is_grads_batched=True)[0][:, 0]
            maps = self._finish(activations.expand(k, -1, -1, -1), grads, image.shape[-2:])
        return maps.detach()

    def _level_gradients(
        self, head: Callable[[torch.Tensor], torch.Tensor], activations: torch.Tensor, raw: RawOutput, targets: list
    ) -> torch.Tensor | None:
        """``d score_k / d A`` for K single-candidate targets of the level ``head`` computes, or ``None``.

        ``None`` (the caller then back-propagates through the whole model) when a target is not one candidate's
        class score, a candidate is of another level, or the head does not reproduce the raw scores.
        """
        pairs = [t.resolve(raw) if isinstance(t, Target) else None for t in targets]
        if raw.levels is None or any(p is None for p in pairs):
            return None
        levels = raw.levels.to(activations.device)
        candidates = torch.tensor([c for c, _ in pairs], device=levels.device)
        if not bool((levels[candidates] == levels[candidates[0]]).all()):
            return None
        in_level = torch.nonzero(levels == levels[candidates[0]]).flatten()
        offset, n = int(in_level[0]), int(in_level.numel())
        features = activations.detach().requires_grad_()
        probs = head(features)
        if probs.shape[1] != n or not torch.allclose(
            probs.detach(), raw.scores[:, offset : offset + n], rtol=1e-4, atol=1e-6
        ):  # the candidates are of another level than the layer's, or the head is not what the model computes
            return None
        idx = torch.tensor([c - offset for c, _ in pairs], device=probs.device)
        labels = torch.tensor([lab for _, lab in pairs], device=probs.device)
        scores = probs[0, idx, labels]
        eye = torch.eye(len(pairs), device=scores.device, dtype=scores.dtype)
        return torch.autograd.grad(scores, features, eye, is_grads_batched=True)[0][:, 0]


@register
class GradCamPlusPlusEngine(_CamEngine):
    """Grad-CAM++ (Chattopadhay et al., WACV 2018), closed-form weights as pytorch-grad-cam computes them:
    :math:`\\alpha = G^2 / (2 G^2 + \\sum_{ij} A \\cdot G^3)`, weights :math:`\\sum_{ij} \\alpha\\,\\mathrm{relu}(G)`."""

    name = "grad_cam_pp"

    def _cam(self, activations: torch.Tensor, grads: torch.Tensor | None) -> torch.Tensor:
        g2 = grads.pow(2)
        g3 = g2 * grads
        sum_a = activations.sum(dim=(2, 3), keepdim=True)
        alpha = g2 / (2 * g2 + sum_a * g3 + _EPS)
        alpha = torch.where(grads != 0, alpha, torch.zeros_like(alpha))
        weights = (torch.relu(grads) * alpha).sum(dim=(2, 3), keepdim=True)
        return (weights * activations).sum(dim=1, keepdim=True)


@register
class HiResCamEngine(_CamEngine):
    """HiResCAM (Draelos & Carin 2020): the element-wise product :math:`G \\odot A` summed over channels."""

    name = "hires_cam"

    def _cam(self, activations: torch.Tensor, grads: torch.Tensor | None) -> torch.Tensor:
        return (grads * activations).sum(dim=1, keepdim=True)


@register
class LayerCamEngine(_CamEngine):
    """LayerCAM (Jiang et al., TIP 2021): :math:`\\mathrm{relu}(G) \\odot A` summed over channels."""

    name = "layer_cam"

    def _cam(self, activations: torch.Tensor, grads: torch.Tensor | None) -> torch.Tensor:
        return (torch.relu(grads) * activations).sum(dim=1, keepdim=True)


@register
class EigenCamEngine(_CamEngine):
    """Eigen-CAM (Muhammad & Yeasin 2020): the layer's first principal component, gradient-free.

    The map does not depend on the target (it shows what the layer responds to most in the image), so all
    objects of an image get the same map.
    """

    name = "eigen_cam"
    needs_gradient = False

    def _cam(self, activations: torch.Tensor, grads: torch.Tensor | None) -> torch.Tensor:
        return eigen_projection(activations)
