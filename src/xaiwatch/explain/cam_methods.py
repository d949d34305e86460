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
    """A CAM from a layer's activation ``A`` :math:`(N, C, h, w)` and gradient ``G`` (same shape, or None).

    ``layer`` may stand for several layers (``"neck"``: the three maps the head reads, as ultralytics' own
    LayerCAM explains). Each layer's map is then upsampled to the image, divided by its maximum (a map that is zero
    everywhere stays zero) and the maps are max-merged, per object: ultralytics' ``class_activation_map`` rule
    before it merges the objects too (it divides by ``max(peak, 1e-7)`` of the logit's gradient; ours is of the
    probability, smaller by ``p (1 - p)``, so no floor is used: the merge does not depend on the scale).
    """

    needs_layer = True
    needs_gradient = True
    multi_layer = True

    @abstractmethod
    def _cam(self, activations: torch.Tensor, grads: torch.Tensor | None) -> torch.Tensor:
        """The :math:`(N, 1, h, w)` map before upsampling."""

    def _forward(self, images: torch.Tensor, extra: Sequence[str] = ()) -> tuple[dict[str, torch.Tensor], RawOutput]:
        """The raw output and the activation of every layer of :attr:`layer_group` and of ``extra``, by name."""
        names = list(dict.fromkeys([*self.layer_group, *extra]))
        captured: dict[str, torch.Tensor] = {}
        handles = [
            self.adapter.layer(n).register_forward_hook(lambda _m, _i, out, n=n: captured.__setitem__(n, out))
            for n in names
        ]
        try:
            raw = self.adapter.raw(images)
        finally:
            for handle in handles:
                handle.remove()
        for n in names:
            activation = captured.get(n)
            if not isinstance(activation, torch.Tensor) or activation.dim() != 4:
                raise UnsupportedModelError(
                    f"Layer {n!r} does not output a (B, C, h, w) feature map; choose another layer, "
                    f"e.g. one of {list(self.adapter.layer_names())}."
                )
        return captured, raw

    def _finish(
        self, activations: Sequence[torch.Tensor], grads: Sequence[torch.Tensor | None], size: Sequence[int]
    ) -> torch.Tensor:
        merged = None
        for a, g in zip(activations, grads):
            cam = torch.relu(self._cam(a.detach(), g))
            cam = F.interpolate(cam, size=tuple(size), mode="bilinear", align_corners=False)
            if len(activations) == 1:
                return cam
            peak = cam.amax(dim=(2, 3), keepdim=True)  # 0 only for a map that is 0 everywhere (ReLU'd)
            cam = cam.div_(peak.masked_fill_(peak == 0, 1))
            merged = cam if merged is None else torch.maximum(merged, cam, out=merged)
        return merged

    def _attribute(self, images: torch.Tensor, targets: Target | Sequence[Target]) -> torch.Tensor:
        captured, raw = self._forward(images)
        activations = [captured[n] for n in self.layer_group]
        grads: list[torch.Tensor | None] = [None] * len(activations)
        if self.needs_gradient:  # each image's score depends on its own activation only (eval mode)
            grads = list(
                torch.autograd.grad(
                    apply_targets(raw, targets).sum(), activations, allow_unused=True, materialize_grads=True
                )
            )
        return self._finish(activations, grads, images.shape[-2:])

    def attribute_boxes(self, image: torch.Tensor, targets: Sequence[Target]) -> torch.Tensor:
        """The K objects of one image from one forward and batched backwards to the layers.

        When the adapter says which map each level of the head reads (:meth:`~xaiwatch.adapters.base.
        DetectorAdapter.level_inputs`) and every target is one candidate's class score, the objects of each level
        back-propagate through that level's class branch only (:meth:`~xaiwatch.adapters.base.DetectorAdapter.
        level_head`), then with one batched backward from the level's map to the layers explained that it depends
        on (:meth:`_chained_gradients`): the same gradients as one batched backward through the whole head, without
        K passes through every level's branches. Otherwise one batched backward through the whole model.
        """
        check_images(image, "image", self.adapter.input_multiple, batch=1)
        targets = list(targets)
        if not targets:
            return image.new_zeros(0, 1, *image.shape[-2:])
        k = len(targets)
        inputs = (self.adapter.level_inputs() or []) if self.needs_gradient else []
        with explaining(self.adapter.model, seed=self.seed) as prepare:
            x = prepare(image)
            captured, raw = self._forward(x.requires_grad_(self.needs_gradient), extra=inputs)
            activations = [captured[n] for n in self.layer_group]
            grads: list[torch.Tensor | None] = [None] * len(activations)
            if self.needs_gradient:
                grads = self._chained_gradients(inputs, captured, raw, targets) or self._batched_gradients(
                    activations, raw, targets
                )
            maps = self._finish([a.expand(k, -1, -1, -1) for a in activations], grads, image.shape[-2:])
        return maps.detach()

    @staticmethod
    def _batched_gradients(activations: list[torch.Tensor], raw: RawOutput, targets: list) -> list[torch.Tensor]:
        """``d score_k / d A`` of every layer from one batched backward through the whole model."""
        scores = torch.cat([t(raw) for t in targets])
        eye = torch.eye(len(targets), device=scores.device, dtype=scores.dtype)
        found = torch.autograd.grad(
            scores, activations, eye, is_grads_batched=True, allow_unused=True, materialize_grads=True
        )
        return [g[:, 0] for g in found]

    def _chained_gradients(
        self,
        inputs: list[str],
        captured: dict[str, torch.Tensor],
        raw: RawOutput,
        targets: list,
    ) -> list[torch.Tensor] | None:
        """``d score_k / d A`` of every explained layer for K single-candidate targets, level by level.

        For the targets of level ``l``: their gradients at the level's map ``M_l`` (``inputs[l]``) from its class
        branch alone (:meth:`_level_gradients`); then, at the explained layers ``M_l`` depends on, ``(dM_l/dA)^T`` of
        those gradients, one batched vector-Jacobian product per level (:meth:`_batched_upstream`). Layers ``M_l``
        does not depend on get exact zeros: the level's scores depend on the rest of the model only through ``M_l``.
        (Recomputing the layers after the first explained one for K copies and back-propagating them in one
        ordinary batched pass was measured slower: 85 + 80 ms against 112 ms for 16 targets, YOLOv8n 320 px.)

        ``None`` (the caller then back-propagates through the whole model) when the adapter has no level structure,
        a target is not one candidate's class score, or a level's head does not reproduce the raw scores.
        """
        pairs = [t.resolve(raw) if isinstance(t, Target) else None for t in targets]
        if not inputs or raw.levels is None or any(p is None for p in pairs):
            return None
        levels = raw.levels.to(raw.scores.device)
        target_levels = levels[torch.tensor([c for c, _ in pairs], device=levels.device)].tolist()
        activations = [captured[n] for n in self.layer_group]
        grads = [a.new_zeros(len(pairs), *a.shape[1:]) for a in activations]
        own: dict[int, tuple[list[int], torch.Tensor]] = {}
        for level in sorted(set(target_levels)):
            rows = [i for i, lv in enumerate(target_levels) if lv == level]
            found = self._level_gradients(level, inputs[level], captured[inputs[level]], raw, [pairs[i] for i in rows])
            if found is None:
                return None
            own[level] = rows, found
        self._batched_upstream(inputs, captured, own, grads)
        for level, (rows, g_own) in own.items():
            for j, n in enumerate(self.layer_group):
                if n == inputs[level]:
                    grads[j][rows] = g_own
        return grads

    def _batched_upstream(
        self,
        inputs: list[str],
        captured: dict[str, torch.Tensor],
        own: dict[int, tuple[list[int], torch.Tensor]],
        grads: list[torch.Tensor],
    ) -> None:
        """Fill ``grads`` at the explained layers with one batched vector-Jacobian product per level."""
        for level, (rows, g_own) in own.items():
            upstream = [j for j, n in enumerate(self.layer_group) if n != inputs[level]]
            if not upstream:
                continue
            found = torch.autograd.grad(
                captured[inputs[level]],
                [captured[self.layer_group[j]] for j in upstream],
                g_own[:, None],
                is_grads_batched=True,
                retain_graph=True,
                allow_unused=True,
            )
            for j, g in zip(upstream, found):
                if g is not None:  # None: the level's map does not depend on this layer (its gradient is zero)
                    grads[j][rows] = g[:, 0]

    def _level_gradients(
        self, level: int, layer: str, features: torch.Tensor, raw: RawOutput, pairs: list[tuple[int, int]]
    ) -> torch.Tensor | None:
        """``d score_k / d M`` at the map ``M`` that ``level`` of the head reads, from its class branch alone.

        When the adapter bounds the branch's reach (:meth:`~xaiwatch.adapters.base.DetectorAdapter.
        level_head_radius`), each score is differentiated on the window of ``M`` it depends on
        (:func:`_windowed_gradients`); otherwise on the whole map, batched over the targets. ``None`` when the
        adapter's :meth:`~xaiwatch.adapters.base.DetectorAdapter.level_head` does not reproduce the level's raw
        scores (then the head is not what the model computes).
        """
        head = self.adapter.level_head(layer)
        if head is None:
            return None
        in_level = torch.nonzero(raw.levels.to(raw.scores.device) == level).flatten()
        offset, n = int(in_level[0]), int(in_level.numel())
        if n != features.shape[-2] * features.shape[-1]:  # the layer is not this level's map
            return None
        wanted = torch.stack([raw.scores[0, c, lab] for c, lab in pairs]).detach()
        cells = [(c - offset, lab) for c, lab in pairs]
        radius = self.adapter.level_head_radius(layer)
        with torch.enable_grad():
            if radius is not None:
                grads = _windowed_gradients(head, radius, features.detach(), cells, wanted)
                if grads is not None:
                    return grads
            leaf = features.detach().requires_grad_()
            probs = head(leaf)
            if probs.shape[1] != n or not torch.allclose(
                probs.detach(), raw.scores[:, offset : offset + n].detach(), rtol=1e-4, atol=1e-6
            ):
                return None
            idx = torch.tensor([c for c, _ in cells], device=probs.device)
            labels = torch.tensor([lab for _, lab in cells], device=probs.device)
            scores = probs[0, idx, labels]
            eye = torch.eye(len(pairs), device=scores.device, dtype=scores.dtype)
            return torch.autograd.grad(scores, leaf, eye, is_grads_batched=True)[0][:, 0]


def _windowed_gradients(
    head: Callable[[torch.Tensor], torch.Tensor],
    radius: int,
    features: torch.Tensor,
    cells: list[tuple[int, int]],
    wanted: torch.Tensor,
) -> torch.Tensor | None:
    """Gradients of a level head's scores at ``cells`` (flat cell, label) of ``features`` :math:`(1, C, h, w)`, each
    from the window of cells within ``radius`` of its own.

    A window is cut at the map's border, where the branch's zero padding then falls where it falls on the whole
    map, so the window's centre score is the score of the whole map; windows of one shape share one forward and
    one backward (each score depends on its own window only). ``None`` when a centre score differs from
    ``wanted`` (the head's reach is not what the adapter says).
    """
    _, c, h, w = features.shape
    out = features.new_zeros(len(cells), c, h, w)
    groups: dict[tuple[int, int, int, int], list[tuple[int, int, int, int]]] = {}
    for k, (cell, _) in enumerate(cells):
        y, x = divmod(cell, w)
        y0, x0 = max(0, y - radius), max(0, x - radius)
        y1, x1 = min(h, y + radius + 1), min(w, x + radius + 1)
        groups.setdefault((y1 - y0, x1 - x0, y - y0, x - x0), []).append((k, y0, x0, cell))
    for (wh, ww, cy, cx), members in groups.items():
        windows = torch.cat([features[:, :, y0 : y0 + wh, x0 : x0 + ww] for _, y0, x0, _ in members])
        windows.requires_grad_()
        labels = torch.tensor([cells[k][1] for k, *_ in members], device=features.device)
        scores = head(windows)[torch.arange(len(members), device=features.device), cy * ww + cx, labels]
        if not torch.allclose(scores.detach(), wanted[[k for k, *_ in members]], rtol=1e-4, atol=1e-6):
            return None
        grads = torch.autograd.grad(scores.sum(), windows)[0]
        for g, (k, y0, x0, _) in zip(grads, members):
            out[k, :, y0 : y0 + wh, x0 : x0 + ww] = g
    return out


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
