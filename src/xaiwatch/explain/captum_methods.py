"""Path, noise and perturbation attributions through Captum, batched within a memory budget.

Methods that evaluate the model many times per image (Integrated Gradients steps, SmoothGrad and
GradientShap samples, occlusion windows) take their internal batch size from
:class:`~xaiwatch.explain.budget.BatchBudget`: a measured pass of one image and ``max_memory_mb``.

Their targets are *frozen* on the clean image first: a :class:`~xaiwatch.targets.MatchedBoxTarget` chooses
its candidate on the image being explained (the engine returns that choice in its ``Explanation``), and the perturbed,
noisy or interpolated images are then scored on that same candidate. Re-matching on a half-black
interpolation or an occluded image would explain a different box at each step.
"""

from __future__ import annotations

import math
from abc import abstractmethod
from collections.abc import Callable, Sequence
from typing import ClassVar

import torch
import torch.nn.functional as F

from xaiwatch.adapters.base import DetectorAdapter
from xaiwatch.core.errors import ConfigurationError, ShapeError
from xaiwatch.core.validation import positive_float, positive_int
from xaiwatch.explain.base import Engine, register
from xaiwatch.explain.budget import BatchBudget
from xaiwatch.targets import BoxTarget, MatchedBoxTarget, Target

__all__ = [
    "IntegratedGradientsEngine",
    "InputXGradientEngine",
    "SmoothGradEngine",
    "GradientShapEngine",
    "OcclusionEngine",
    "LayerConductanceEngine",
    "LayerIntegratedGradientsEngine",
    "make_baseline",
    "blur",
]

BASELINES = ("black", "grey", "blur")


def check_baseline(baseline: str | float) -> str | float:
    """Validate a baseline name or constant (see :func:`make_baseline`)."""
    if isinstance(baseline, str):
        if baseline not in BASELINES:
            raise ConfigurationError(f"`baseline` can be {', '.join(BASELINES)} or a number, got {baseline!r}.")
        return baseline
    if isinstance(baseline, bool) or not isinstance(baseline, (int, float)) or not math.isfinite(baseline):
        raise ConfigurationError(f"`baseline` can be {', '.join(BASELINES)} or a number, got {baseline!r}.")
    return float(baseline)


def blur(images: torch.Tensor) -> torch.Tensor:
    """Gaussian blur with sigma = 1/16 of the shorter side: the "blur" baseline, content without detail.

    The same result as ``torchvision.transforms.functional.gaussian_blur`` (its kernel and reflect padding,
    tested equal), computed as two 1-D convolutions: at 320 px the kernel is 121 px wide and torchvision's 2-D
    convolution took 0.19 s per image here, longer than the whole GradientShap it serves.

    Args:
        images: :math:`(B, 3, H, W)`.

    Returns:
        :math:`(B, 3, H, W)` blurred images.
    """
    side = min(images.shape[-2:])
    sigma = max(side / 16.0, 0.5)
    kernel = min(2 * math.ceil(3 * sigma) + 1, 2 * ((side - 1) // 2) + 1)
    if kernel <= 1:
        return images.clone()
    x = torch.linspace(-(kernel - 1) / 2, (kernel - 1) / 2, kernel, device=images.device, dtype=images.dtype)
    weights = torch.exp(-0.5 * (x / sigma) ** 2)
    weights = (weights / weights.sum()).expand(images.shape[1], 1, kernel)
    out = F.pad(images, [kernel // 2] * 4, mode="reflect")
    out = F.conv2d(out, weights[:, :, None, :], groups=images.shape[1])
    return F.conv2d(out, weights[:, :, :, None], groups=images.shape[1])


def make_baseline(images: torch.Tensor, baseline: str | float) -> torch.Tensor:
    """The reference image of a path method.

    Args:
        images: :math:`(B, 3, H, W)` images in ``[0, 1]``.
        baseline: ``"black"`` (0), ``"grey"`` (0.5), ``"blur"`` (:func:`blur` of each image) or a constant.

    Returns:
        :math:`(B, 3, H, W)` baselines, detached.
    """
    if baseline == "blur":
        return blur(images.detach())
    value = {"black": 0.0, "grey": 0.5}.get(baseline, baseline) if isinstance(baseline, str) else baseline
    return torch.full_like(images.detach(), float(value))


def _layer_map(attr: torch.Tensor | tuple, size: Sequence[int]) -> torch.Tensor:
    """A layer attribution :math:`(B, C, h, w)` summed over channels and upsampled to ``size``."""
    attr = attr[0] if isinstance(attr, tuple) else attr
    if attr.dim() != 4:
        raise ConfigurationError(
            f"Layer attributions need a convolutional layer with (B, C, h, w) output, got shape {tuple(attr.shape)}."
        )
    return F.interpolate(attr.sum(dim=1, keepdim=True), size=tuple(size), mode="bilinear", align_corners=False)


def freeze_targets(
    engine: Engine, images: torch.Tensor, targets: Target | Sequence[Target]
) -> list[tuple[slice, Target]]:
    """Split a batch into groups explained with one fixed target each.

    A single target that is not a :class:`MatchedBoxTarget` covers the whole batch. Otherwise each image
    gets its own target, and a ``MatchedBoxTarget`` is replaced by a :class:`BoxTarget` on the candidate
    it matches on the clean image.

    Returns:
        ``(slice of the batch, target)`` pairs covering the batch in order.
    """
    batch = images.shape[0]
    if callable(targets) and not isinstance(targets, MatchedBoxTarget):
        return [(slice(0, batch), targets)]
    per_image = [targets] * batch if callable(targets) else list(targets)
    if len(per_image) != batch:
        raise ShapeError("targets", (len(per_image),), [batch])
    groups: list[tuple[slice, Target]] = []
    with torch.no_grad():
        for i, target in enumerate(per_image):
            if isinstance(target, MatchedBoxTarget):
                match = target.match(engine.adapter.raw(images[i : i + 1].detach()))
                target = BoxTarget(match[0].candidate, target.label)
            groups.append((slice(i, i + 1), target))
    return groups


class BudgetedEngine(Engine):
    """Base of engines that evaluate the model many times: frozen targets, batch size from the budget.

    Subclasses implement :meth:`evaluations` (model evaluations one image needs) and :meth:`_attribute_group`,
    given a slice of the batch, its fixed scalar function and the number of evaluations one batched pass may
    hold: the fastest batch size on this machine within ``max_memory_mb`` (see
    :meth:`~xaiwatch.explain.budget.BatchBudget.fastest`), measured once per image size.
    """

    #: explain each image on its own: stochastic methods whose noise, drawn per batch, would otherwise depend on
    #: how images and samples are batched together
    per_image: ClassVar[bool] = False
    #: choose the batch size by measured speed within the budget; off where batching changes the random draws
    tune_batch: ClassVar[bool] = True

    def _attribute(self, images: torch.Tensor, targets: Target | Sequence[Target]) -> torch.Tensor:
        if self.per_image:
            targets = [targets] * images.shape[0] if callable(targets) else targets
        maps = []
        for part, target in freeze_targets(self, images, targets):
            forward = self.forward_func(target)
            group = images[part]
            needed = self.evaluations(group) * group.shape[0]
            if self.tune_batch:
                per_batch = self.budget.fastest(self.name, forward, group[:1], needed)
            else:
                per_batch = min(self.samples_per_batch(forward, group), needed)
            maps.append(self._attribute_group(group, forward, per_batch))
        return torch.cat(maps)

    @property
    def budget(self) -> BatchBudget:
        """The engine's :class:`~xaiwatch.explain.budget.BatchBudget` (measurements cached across calls)."""
        if getattr(self, "_budget", None) is None:
            self._budget = BatchBudget(self.max_memory_mb)
        return self._budget

    def samples_per_batch(self, forward: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor) -> int:
        """The most images one batched evaluation may hold within ``max_memory_mb`` (measured once per size)."""
        return self.budget.samples(self.name, forward, images[:1])

    @abstractmethod
    def evaluations(self, images: torch.Tensor) -> int:
        """Model evaluations one image of this size needs (IG steps, noise samples, occlusion windows)."""

    @abstractmethod
    def _attribute_group(
        self, images: torch.Tensor, forward: Callable[[torch.Tensor], torch.Tensor], per_batch: int
    ) -> torch.Tensor:
        """Maps of images sharing one target function, evaluating at most ``per_batch`` samples at once."""


class _PathEngine(BudgetedEngine):
    """Shared options of Integrated-Gradients-style engines: steps, baseline, quadrature."""

    def __init__(
        self,
        adapter: DetectorAdapter,
        layer: str | None = None,
        seed: int = 0,
        max_memory_mb: float = 2048,
        *,
        n_steps: int = 32,
        baseline: str | float = "black",
        method: str = "gausslegendre",
    ) -> None:
        self.n_steps = positive_int("n_steps", n_steps)
        self.baseline = check_baseline(baseline)
        methods = ("gausslegendre", "riemann_trapezoid", "riemann_left", "riemann_right", "riemann_middle")
        if method not in methods:
            raise ConfigurationError(f"`method` can be {', '.join(methods)}, got {method!r}.")
        self.method = method
        super().__init__(adapter, layer=layer, seed=seed, max_memory_mb=max_memory_mb)

    def evaluations(self, images: torch.Tensor) -> int:
        """One evaluation per step of the path."""
        return self.n_steps


@register
class IntegratedGradientsEngine(_PathEngine):
    """Integrated Gradients (Sundararajan et al. 2017) through Captum's ``IntegratedGradients``.

    Signed map: the attribution summed over colour channels; its total approximates
    ``score(image) - score(baseline)`` (completeness).

    Args:
        adapter, layer, seed, max_memory_mb: see :class:`~xaiwatch.explain.base.Engine`.
        n_steps: number of points on the path (Gauss-Legendre quadrature by default).
        baseline: ``"black"``, ``"grey"``, ``"blur"`` or a constant (see :func:`make_baseline`).
        method: Captum's quadrature rule.
    """

    name = "integrated_gradients"
    signed = True

    def _attribute_group(self, images: torch.Tensor, forward: Callable, per_batch: int) -> torch.Tensor:
        from captum.attr import IntegratedGradients

        attr = IntegratedGradients(forward).attribute(
            images,
            baselines=make_baseline(images, self.baseline),
            target=None,
            n_steps=self.n_steps,
            method=self.method,
            internal_batch_size=max(per_batch, images.shape[0]),
        )
        return attr.sum(dim=1, keepdim=True)


@register
class InputXGradientEngine(Engine):
    """Input x gradient (Shrikumar et al. 2016) through Captum's ``InputXGradient``; signed, summed over colours."""

    name = "input_x_gradient"
    signed = True

    def _attribute(self, images: torch.Tensor, targets: Target | Sequence[Target]) -> torch.Tensor:
        from captum.attr import InputXGradient

        return InputXGradient(self.forward_func(targets)).attribute(images, target=None).sum(dim=1, keepdim=True)


@register
class SmoothGradEngine(BudgetedEngine):
    """SmoothGrad (Smilkov et al. 2017) through Captum's ``NoiseTunnel(Saliency)``.

    The absolute gradient averaged over noisy copies of the image, maximised over colour channels. The noise
    is Gaussian with standard deviation ``noise_level`` times the input range (images are in ``[0, 1]``, so
    0.15 by default); it is drawn from the RNG the explaining context seeds with ``seed``, so two calls give
    the same map.

    Args:
        adapter, layer, seed, max_memory_mb: see :class:`~xaiwatch.explain.base.Engine`.
        nt_samples: number of noisy copies per image.
        noise_level: noise standard deviation as a fraction of the input range ``[0, 1]``.
    """

    name = "smoothgrad"
    per_image = True

    def __init__(
        self,
        adapter: DetectorAdapter,
        layer: str | None = None,
        seed: int = 0,
        max_memory_mb: float = 2048,
        *,
        nt_samples: int = 16,
        noise_level: float = 0.15,
    ) -> None:
        self.nt_samples = positive_int("nt_samples", nt_samples)
        self.noise_level = positive_float("noise_level", noise_level)
        super().__init__(adapter, layer=layer, seed=seed, max_memory_mb=max_memory_mb)

    def evaluations(self, images: torch.Tensor) -> int:
        """One evaluation per noisy copy."""
        return self.nt_samples

    def _attribute_group(self, images: torch.Tensor, forward: Callable, per_batch: int) -> torch.Tensor:
        from captum.attr import NoiseTunnel, Saliency

        attr = NoiseTunnel(Saliency(forward)).attribute(
            images,
            nt_type="smoothgrad",
            nt_samples=self.nt_samples,
            nt_samples_batch_size=max(1, per_batch // images.shape[0]),
            stdevs=self.noise_level,
            target=None,
            abs=True,
        )
        return attr.amax(dim=1, keepdim=True)


@register
class GradientShapEngine(BudgetedEngine):
    """GradientShap (Lundberg & Lee 2017) through Captum's ``GradientShap``; signed, summed over colours.

    Each image is explained against the distribution {black, grey, the image blurred}; each of the
    ``n_samples`` samples draws a baseline from it, a point on the path and Gaussian noise (``stdevs``), from
    the seeded RNG. Samples are evaluated in chunks that fit ``max_memory_mb`` and averaged.

    Args:
        adapter, layer, seed, max_memory_mb: see :class:`~xaiwatch.explain.base.Engine`.
        n_samples: number of random samples per image.
        stdevs: standard deviation of the noise added to each sample.
    """

    name = "gradient_shap"
    signed = True
    per_image = True  # each image has its own baseline distribution (its own blur)
    tune_batch = False  # each chunk of samples draws its own baselines, path points and noise

    def __init__(
        self,
        adapter: DetectorAdapter,
        layer: str | None = None,
        seed: int = 0,
        max_memory_mb: float = 2048,
        *,
        n_samples: int = 16,
        stdevs: float = 0.09,
    ) -> None:
        self.n_samples = positive_int("n_samples", n_samples)
        if isinstance(stdevs, bool) or not isinstance(stdevs, (int, float)) or not 0 <= stdevs < math.inf:
            raise ConfigurationError(f"`stdevs` must be a number >= 0, got {stdevs!r}.")
        self.stdevs = float(stdevs)
        super().__init__(adapter, layer=layer, seed=seed, max_memory_mb=max_memory_mb)

    def evaluations(self, images: torch.Tensor) -> int:
        """One evaluation per random sample."""
        return self.n_samples

    def _attribute_group(self, images: torch.Tensor, forward: Callable, per_batch: int) -> torch.Tensor:
        from captum.attr import GradientShap

        baselines = gradient_shap_baselines(images)
        total, done = torch.zeros_like(images), 0
        while done < self.n_samples:
            n = min(per_batch, self.n_samples - done)
            attr = GradientShap(forward).attribute(
                images, baselines=baselines, n_samples=n, stdevs=self.stdevs, target=None
            )
            total, done = total + attr * n, done + n
        return (total / self.n_samples).sum(dim=1, keepdim=True)


def gradient_shap_baselines(image: torch.Tensor) -> torch.Tensor:
    """The baseline distribution of :class:`GradientShapEngine`: black, grey, blurred image, :math:`(3, 3, H, W)`."""
    return torch.cat([make_baseline(image, "black"), make_baseline(image, "grey"), blur(image.detach())])


@register
class OcclusionEngine(BudgetedEngine):
    """Occlusion (Zeiler & Fergus 2014) through Captum's ``Occlusion``; signed, summed over colours.

    A grey (0.5) square window slides over the image; each pixel gets the average drop of the score over the
    windows covering it, for each colour channel (the window covers all three, so the sum over colours is
    three times that drop). Windows are evaluated in batches that fit ``max_memory_mb``.

    Args:
        adapter, layer, seed, max_memory_mb: see :class:`~xaiwatch.explain.base.Engine`.
        window: window side in pixels; 1/8 of the shorter image side when ``None``.
        stride: step between windows in pixels; half the window when ``None``.
        fill: value of the occluded pixels.
    """

    name = "occlusion"
    signed = True

    def __init__(
        self,
        adapter: DetectorAdapter,
        layer: str | None = None,
        seed: int = 0,
        max_memory_mb: float = 2048,
        *,
        window: int | None = None,
        stride: int | None = None,
        fill: float = 0.5,
    ) -> None:
        self.window = None if window is None else positive_int("window", window)
        self.stride = None if stride is None else positive_int("stride", stride)
        if isinstance(fill, bool) or not isinstance(fill, (int, float)) or not math.isfinite(fill):
            raise ConfigurationError(f"`fill` must be a number, got {fill!r}.")
        self.fill = float(fill)
        super().__init__(adapter, layer=layer, seed=seed, max_memory_mb=max_memory_mb)

    def window_and_stride(self, height: int, width: int) -> tuple[int, int]:
        """The window side and stride used for an image of this size."""
        window = self.window or max(1, min(height, width) // 8)
        if window > min(height, width):
            raise ConfigurationError(f"`window` ({window}) is larger than the image ({height}x{width}).")
        return window, self.stride or max(1, window // 2)

    def evaluations(self, images: torch.Tensor) -> int:
        """One evaluation per window position."""
        height, width = images.shape[-2:]
        window, stride = self.window_and_stride(height, width)
        return ((height - window) // stride + 1) * ((width - window) // stride + 1)

    def _attribute_group(self, images: torch.Tensor, forward: Callable, per_batch: int) -> torch.Tensor:
        from captum.attr import Occlusion

        window, stride = self.window_and_stride(*images.shape[-2:])
        attr = Occlusion(forward).attribute(
            images,
            sliding_window_shapes=(3, window, window),
            strides=(3, stride, stride),
            baselines=self.fill,
            target=None,
            perturbations_per_eval=max(1, per_batch // images.shape[0]),
        )
        return attr.sum(dim=1, keepdim=True)


class _LayerPathEngine(_PathEngine):
    """A Captum path method on a named layer; the layer map summed over channels and upsampled."""

    needs_layer = True
    signed = True
    captum_class: str = ""
    #: interpolation points Captum needs per image in one evaluation (LayerConductance needs two)
    min_points_per_image: int = 1

    def _attribute_group(self, images: torch.Tensor, forward: Callable, per_batch: int) -> torch.Tensor:
        import captum.attr

        attr = getattr(captum.attr, self.captum_class)(forward, self.layer).attribute(
            images,
            baselines=make_baseline(images, self.baseline),
            target=None,
            n_steps=self.n_steps,
            method=self.method,
            internal_batch_size=max(per_batch, self.min_points_per_image * images.shape[0]),
        )
        return _layer_map(attr, images.shape[-2:])


@register
class LayerConductanceEngine(_LayerPathEngine):
    """Layer conductance (Dhamdhere et al. 2018) on a named layer through Captum's ``LayerConductance``.

    Signed: the layer attribution summed over channels, upsampled bilinearly to the image size.

    Args:
        adapter, layer, seed, max_memory_mb: see :class:`~xaiwatch.explain.base.Engine`.
        n_steps, baseline, method: as for :class:`IntegratedGradientsEngine`.
    """

    name = "layer_conductance"
    captum_class = "LayerConductance"
    min_points_per_image = 2


@register
class LayerIntegratedGradientsEngine(_LayerPathEngine):
    """Integrated Gradients of a named layer's output through Captum's ``LayerIntegratedGradients``.

    Signed: the layer attribution summed over channels, upsampled bilinearly to the image size.

    Args:
        adapter, layer, seed, max_memory_mb: see :class:`~xaiwatch.explain.base.Engine`.
        n_steps, baseline, method: as for :class:`IntegratedGradientsEngine`.
    """

    name = "layer_integrated_gradients"
    captum_class = "LayerIntegratedGradients"
