"""Modified-backpropagation methods through Captum, refused on models where Captum's rules do not apply.

Captum's ``GuidedBackprop``, ``Deconvolution`` and ``GuidedGradCam`` replace the backward pass of
``nn.ReLU`` *modules* only, and its ``DeepLift`` has rescale rules only for the module types in
``captum.attr._core.deep_lift.SUPPORTED_NON_LINEAR`` and needs each such module to be called once per
forward. On a model outside those assumptions they do not fail: they silently return the plain gradient
(or gradient x input) for the parts they do not understand. Measured on ultralytics YOLOv8 (one shared
``SiLU`` module object for every convolution, no ReLU, an SPPF block calling one ``MaxPool2d`` three times):
the three guided methods returned the plain gradient bit for bit, and DeepLift failed.

Captum's guided rule reads only the gradient reaching the ReLU call at hand, so a ReLU module object called
several times (DAMO-YOLO's ``ResConvBlock`` applies its one ReLU twice) or shared between layers is handled
correctly by ``GuidedBackprop`` and ``GuidedGradCam`` (tested equal to the same network with one module per
use); ``Deconvolution`` keeps one output gradient per module object and ``DeepLift`` one input per module object,
so these two refuse reuse.

So :meth:`check_model` inspects the model, statically (activation types, module objects registered under
several parents) and with one probe forward counting the calls of each module, and refuses with
:class:`~xaiwatch.core.errors.UnsupportedModelError` when the map would not be what the method's name says.
On a network built of one ``nn.ReLU`` module per use they run through Captum unchanged. A guided rule for
SiLU is not implemented: for a non-monotone activation there is no published, agreed definition, and a map
under a home-made one would not be comparable to the literature.

Limitation: activations applied as functions (``F.relu`` in ``forward``) cannot be seen by Captum nor by
these checks; Captum documents the same requirement ("all ReLU operations ... performed using a module").
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import ClassVar

import torch
from torch import nn

from xaiwatch.adapters.base import DetectorAdapter
from xaiwatch.core.errors import ConfigurationError, UnsupportedModelError
from xaiwatch.explain.base import Engine, register
from xaiwatch.explain.captum_methods import check_baseline, freeze_targets, make_baseline
from xaiwatch.targets import Target

__all__ = [
    "GuidedBackpropEngine",
    "DeconvolutionEngine",
    "GuidedGradCamEngine",
    "DeepLiftEngine",
    "ScoreModule",
    "module_calls",
]

#: element-wise activation module types (torch.nn.modules.activation), other than nn.ReLU itself
ACTIVATIONS: tuple[type[nn.Module], ...] = (
    nn.SiLU,
    nn.GELU,
    nn.Hardswish,
    nn.Mish,
    nn.LeakyReLU,
    nn.ELU,
    nn.CELU,
    nn.SELU,
    nn.PReLU,
    nn.RReLU,
    nn.Hardtanh,
    nn.Sigmoid,
    nn.Hardsigmoid,
    nn.LogSigmoid,
    nn.Tanh,
    nn.Softplus,
    nn.Softsign,
    nn.Tanhshrink,
    nn.Threshold,
    nn.GLU,
)

_ALTERNATIVES = "Use `saliency` or `integrated_gradients` instead (they are exact for any differentiable model)."


class ScoreModule(nn.Module):
    """``nn.Module`` whose forward is ``adapter.score(x, targets)``: the model Captum's module-based methods need.

    ``GuidedBackprop``, ``Deconvolution``, ``GuidedGradCam`` and ``DeepLift`` take a module (they hook its
    submodules) rather than a function. The detector is a child, so its activations are reached.
    """

    def __init__(self, adapter: DetectorAdapter, targets: Target | Sequence[Target]) -> None:
        super().__init__()
        self.model = adapter.model
        self._adapter = adapter
        self._targets = targets

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Scores :math:`(B,)` of the targets."""
        return self._adapter.score(images, self._targets)


def module_calls(adapter: DetectorAdapter, side: int) -> Counter:
    """How many times each module of the model is called in one forward of a blank ``side`` x ``side`` image.

    Runs without gradients, in eval mode, with the RNG forked, and removes its hooks.

    Returns:
        a counter from module object to number of calls.
    """
    from xaiwatch.core.context import eval_state, fork_rng

    model = adapter.model
    calls: Counter = Counter()
    hooks = [m.register_forward_pre_hook(lambda mod, _i: calls.update([mod])) for m in model.modules()]
    p = next(model.parameters(), None)
    kwargs = {"device": p.device, "dtype": p.dtype} if p is not None else {}
    try:
        with torch.no_grad(), eval_state(model), fork_rng():
            adapter.raw(torch.zeros(1, 3, side, side, **kwargs))
    finally:
        for h in hooks:
            h.remove()
        adapter.reset_caches()
    return calls


def _shared(model: nn.Module, kinds: tuple[type[nn.Module], ...]) -> list[str]:
    """Module objects of ``kinds`` registered under more than one name, as ``"SiLU at model.0.act, ..."``."""
    names: dict[int, list[str]] = {}
    modules: dict[int, nn.Module] = {}
    for name, m in model.named_modules(remove_duplicate=False):
        if isinstance(m, kinds):
            names.setdefault(id(m), []).append(name)
            modules[id(m)] = m
    return [
        f"{type(modules[k]).__name__} at {', '.join(n[:3])}{', ...' if len(n) > 3 else ''} ({len(n)} places)"
        for k, n in names.items()
        if len(n) > 1
    ]


class _CheckedEngine(Engine):
    """Shared refusal logic: :meth:`handled_types` lists the module types Captum's rule applies to."""

    #: side of the blank image of the probe forward
    probe_side: ClassVar[int] = 64
    #: the Captum class used, for messages
    captum_name: ClassVar[str] = ""
    #: what the method needs of a model, for messages
    requirement: ClassVar[str] = "every activation to be an nn.ReLU module, one module object per use"

    def handled_types(self) -> tuple[type[nn.Module], ...]:
        """Module types whose backward pass Captum replaces for this method."""
        return (nn.ReLU,)

    #: Captum's rule reads only the gradient of the call at hand, so one module object may serve several calls
    per_call_rule: ClassVar[bool] = False
    #: activations Captum has no rule for are accepted with their plain gradient (``other_activations``)
    plain_other_activations: bool = False

    def static_problems(self) -> list[str]:
        """Reasons visible in the module tree: unhandled activation types, shared objects, nothing to modify."""
        model, handled = self.adapter.model, self.handled_types()
        problems = []
        kinds = {type(m).__name__ for m in model.modules() if isinstance(m, ACTIVATIONS + (nn.ReLU,))}
        other = sorted(kinds - {k.__name__ for k in handled})
        if other and not self.plain_other_activations:
            where = [n for n, m in model.named_modules() if type(m).__name__ in other]
            problems.append(
                f"it uses activation modules {', '.join(other)} (at {', '.join(where[:3])}"
                f"{', ...' if len(where) > 3 else ''}), which Captum's {self.captum_name} has no rule for: their "
                "plain gradient would be used silently"
                + (
                    " (if the modified rule at the ReLUs is what you want, accept this explicitly with "
                    "`other_activations='plain_gradient'`)"
                    if isinstance(self, _GuidedEngine)
                    and sum(isinstance(m, handled) for m in model.modules()) >= len(where)
                    else ""
                )
            )
        kinds_checked = (() if self.per_call_rule else handled) + (() if self.plain_other_activations else ACTIVATIONS)
        shared = _shared(model, kinds_checked) if kinds_checked else []
        if shared:
            problems.append(f"one module object is shared by several layers ({'; '.join(shared)})")
        if not any(isinstance(m, handled) for m in model.modules()):
            names = " / ".join(k.__name__ for k in handled[:3])
            problems.append(f"it has no {names} module, so {self.captum_name} would return the plain gradient")
        return problems

    def reuse_problems(self) -> list[str]:
        """Reasons seen in a probe forward: one handled module object called several times."""
        if self.per_call_rule:
            return []
        try:
            calls = module_calls(self.adapter, self.probe_side)
        except Exception as err:  # any failure means the model could not be verified
            return [
                f"it could not be verified with a probe forward of a {self.probe_side}x{self.probe_side} image "
                f"({type(err).__name__}: {err})"
            ]
        handled = self.handled_types()
        reused = sorted(
            {f"{type(m).__name__} ({n} calls)" for m, n in calls.items() if n > 1 and isinstance(m, handled)}
        )
        if not reused:
            return []
        return [
            f"its forward pass reuses one module object several times: {', '.join(reused)} (Captum keeps one "
            "state per module object, so the calls would be mixed up)"
        ]

    def check_model(self) -> None:
        """Refuse a model on which Captum's rule would silently not apply (see the module docstring).

        Raises:
            UnsupportedModelError: naming each reason and the methods to use instead.
        """
        problems = self.static_problems() + self.reuse_problems()
        if problems:
            raise UnsupportedModelError(
                f"`{self.name}` is refused for {type(self.adapter.model).__name__}: {'; '.join(problems)}. "
                f"It needs {self.requirement}. {_ALTERNATIVES}"
            )


class _GuidedEngine(_CheckedEngine):
    """The modified-ReLU-backward methods: refused without ReLU modules, optionally accepting other activations.

    Args:
        adapter, layer, seed, max_memory_mb: see :class:`~xaiwatch.explain.base.Engine`.
        other_activations: ``"refuse"`` (default) refuses a model that also has activation modules Captum has no
            rule for; ``"plain_gradient"`` accepts it, those activations passing their ordinary gradient while the
            rule applies at every ReLU (DAMO-YOLO-T/S: 2 SiLU in the backbone's SPP block, ReLU everywhere else).
            A model without any ReLU is refused either way.
    """

    def __init__(
        self,
        adapter: DetectorAdapter,
        layer: str | None = None,
        seed: int = 0,
        max_memory_mb: float = 2048,
        *,
        other_activations: str = "refuse",
    ) -> None:
        if other_activations not in ("refuse", "plain_gradient"):
            raise ConfigurationError(
                f"`other_activations` can be 'refuse' or 'plain_gradient', got {other_activations!r}."
            )
        self.other_activations = other_activations
        self.plain_other_activations = other_activations == "plain_gradient"
        super().__init__(adapter, layer=layer, seed=seed, max_memory_mb=max_memory_mb)


@register
class GuidedBackpropEngine(_GuidedEngine):
    """Guided backpropagation (Springenberg et al. 2015) through Captum's ``GuidedBackprop``.

    At every ReLU only positive gradients flowing back through positive inputs pass. The map is the absolute
    result maximised over colour channels (as ``saliency``). Refused on models without ``nn.ReLU`` modules
    (YOLOv8: SiLU) and, unless ``other_activations="plain_gradient"``, on models mixing ReLU with activations
    Captum has no rule for; see the module docstring. A ReLU module called several times (DAMO-YOLO's
    ``ResConvBlock``) is fine: Captum's hook rectifies the gradient of each call on its own.
    """

    name = "guided_backprop"
    captum_name = "GuidedBackprop"
    per_call_rule = True
    requirement = "its activations to be nn.ReLU modules (one module object may serve several calls)"

    def _attribute(self, images: torch.Tensor, targets: Target | Sequence[Target]) -> torch.Tensor:
        from captum.attr import GuidedBackprop

        attr = GuidedBackprop(ScoreModule(self.adapter, targets)).attribute(images, target=None)
        return attr.abs().amax(dim=1, keepdim=True)


@register
class DeconvolutionEngine(_GuidedEngine):
    """Deconvolution (Zeiler & Fergus 2014) through Captum's ``Deconvolution``.

    At every ReLU the gradient is replaced by the ReLU of the incoming gradient. Absolute value, maximised
    over colour channels. Refused like :class:`GuidedBackpropEngine`, and also when one ReLU module serves
    several calls: Captum keeps one output gradient per module object, which the calls would share.
    """

    name = "deconvolution"
    captum_name = "Deconvolution"

    def _attribute(self, images: torch.Tensor, targets: Target | Sequence[Target]) -> torch.Tensor:
        from captum.attr import Deconvolution

        attr = Deconvolution(ScoreModule(self.adapter, targets)).attribute(images, target=None)
        return attr.abs().amax(dim=1, keepdim=True)


@register
class GuidedGradCamEngine(_GuidedEngine):
    """Guided Grad-CAM (Selvaraju et al. 2017) on a named layer through Captum's ``GuidedGradCam``.

    Guided backpropagation multiplied by the layer's Grad-CAM upsampled to the image (Captum's nearest
    interpolation); absolute value, maximised over colour channels. Refused like :class:`GuidedBackpropEngine`.
    """

    name = "guided_grad_cam"
    captum_name = "GuidedGradCam"
    needs_layer = True
    per_call_rule = True
    requirement = GuidedBackpropEngine.requirement

    def _attribute(self, images: torch.Tensor, targets: Target | Sequence[Target]) -> torch.Tensor:
        from captum.attr import GuidedGradCam

        attr = GuidedGradCam(ScoreModule(self.adapter, targets), self.layer).attribute(images, target=None)
        return attr.abs().amax(dim=1, keepdim=True)


@register
class DeepLiftEngine(_CheckedEngine):
    """DeepLIFT rescale rule (Shrikumar et al. 2017) through Captum's ``DeepLift``; signed, summed over colours.

    The attributions add up to ``score(image) - score(baseline)``. Targets are fixed on the clean image
    (DeepLift evaluates the image and its baseline in one batch). Refused when the model has activation
    modules Captum has no rule for (YOLOv8's SiLU), a module object shared between layers, or a module called
    several times per forward (YOLOv8's SPPF reuses one MaxPool2d).

    Args:
        adapter, layer, seed, max_memory_mb: see :class:`~xaiwatch.explain.base.Engine`.
        baseline: ``"black"``, ``"grey"``, ``"blur"`` or a constant.
    """

    name = "deep_lift"
    captum_name = "DeepLift"
    requirement = (
        "every non-linearity to be a module of a type DeepLift supports (ReLU, ELU, LeakyReLU, Sigmoid, Tanh, "
        "Softplus, MaxPool, Softmax), one module object per use"
    )
    signed = True

    def __init__(
        self,
        adapter: DetectorAdapter,
        layer: str | None = None,
        seed: int = 0,
        max_memory_mb: float = 2048,
        *,
        baseline: str | float = "black",
    ) -> None:
        self.baseline = check_baseline(baseline)
        super().__init__(adapter, layer=layer, seed=seed, max_memory_mb=max_memory_mb)

    def handled_types(self) -> tuple[type[nn.Module], ...]:
        """The module types of Captum's ``SUPPORTED_NON_LINEAR`` (ReLU, ELU, LeakyReLU, Sigmoid, Tanh, ...)."""
        from captum.attr._core.deep_lift import SUPPORTED_NON_LINEAR

        return tuple(SUPPORTED_NON_LINEAR)

    def _attribute(self, images: torch.Tensor, targets: Target | Sequence[Target]) -> torch.Tensor:
        from captum.attr import DeepLift

        maps = []
        for part, target in freeze_targets(self, images, targets):
            x = images[part]
            attr = DeepLift(ScoreModule(self.adapter, target)).attribute(
                x, baselines=make_baseline(x, self.baseline), target=None
            )
            maps.append(attr.sum(dim=1, keepdim=True))
        return torch.cat(maps)
