"""Engines: an explanation method bound to a model adapter, free of Lightning."""

from __future__ import annotations

import functools
import importlib
import pkgutil
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from typing import ClassVar

import torch
from torch import nn

from xaiwatch.adapters.base import DetectorAdapter
from xaiwatch.core.arguments import unknown_arguments
from xaiwatch.core.context import explaining
from xaiwatch.core.errors import ConfigurationError
from xaiwatch.core.inputs import check_images
from xaiwatch.core.types import Explanation, Match, RawOutput
from xaiwatch.targets import BoxTarget, MatchedBoxTarget, Target

__all__ = ["Engine", "register", "available_methods", "get_engine"]

_REGISTRY: dict[str, type[Engine]] = {}


class Engine(ABC):
    """An explanation method: ``Engine(adapter).attribute(images, targets)`` gives :math:`(B, 1, H, W)` maps.

    Every call runs inside :func:`~xaiwatch.core.context.explaining`, so it works under Lightning's
    ``inference_mode`` validation and leaves the model exactly as it was.

    Args:
        adapter: the model adapter.
        layer: layer alias or dotted path, for methods that read a layer (``needs_layer``); CAM methods also take
            a group (``"neck"``: every ``neck.*`` alias) or comma-separated layers and merge their maps.
        seed: seed of the random streams inside the explanation (stochastic methods repeat exactly).
        max_memory_mb: memory budget of methods that evaluate the model many times (IG steps, SmoothGrad
            samples, masks, occlusion windows); their internal batch size is derived from it.

    Raises:
        ConfigurationError: for an unknown layer or a bad argument.
        UnsupportedModelError: when the method cannot be right on this model (see :meth:`check_model`).
    """

    name: ClassVar[str] = ""
    needs_layer: ClassVar[bool] = False
    #: whether ``layer`` may stand for several layers (a group such as ``"neck"``, or ``"neck.p3,neck.p5"``)
    multi_layer: ClassVar[bool] = False
    signed: ClassVar[bool] = False

    def __init__(
        self, adapter: DetectorAdapter, layer: str | None = None, seed: int = 0, max_memory_mb: float = 2048
    ) -> None:
        if not isinstance(adapter, DetectorAdapter):
            raise ConfigurationError(f"`adapter` must be a DetectorAdapter, got {type(adapter).__name__}.")
        if float(max_memory_mb) <= 0:
            raise ConfigurationError(f"`max_memory_mb` must be > 0, got {max_memory_mb}.")
        self.adapter = adapter
        self.seed = int(seed)
        self.max_memory_mb = float(max_memory_mb)
        self.layer_name = (layer or adapter.default_cam_layer) if self.needs_layer else layer
        #: the layers ``layer`` stands for (:meth:`~xaiwatch.adapters.base.DetectorAdapter.layer_group`)
        self.layer_group: list[str] = adapter.layer_group(self.layer_name) if self.needs_layer else []
        if len(self.layer_group) > 1 and not self.multi_layer:
            raise ConfigurationError(
                f"Method {self.name!r} reads one layer; {self.layer_name!r} stands for {self.layer_group}. Pass one "
                "of them, or use a CAM method (grad_cam_pp, hires_cam, layer_cam, eigen_cam), which merges layers."
            )
        self.layers: list[nn.Module] = [adapter.layer(n) for n in self.layer_group]
        self.layer: nn.Module | None = self.layers[0] if self.layers else None
        self.check_model()

    def check_model(self) -> None:
        """Refuse, with a message saying why, a model on which this method cannot give a correct map.

        Called by ``__init__`` so that a callback fails at ``setup()``. The default accepts every model.
        """
        return None

    def forward_func(self, targets: Target | Sequence[Target]) -> Callable[[torch.Tensor], torch.Tensor]:
        """The scalar function Captum attributes: images to the targets' scores, :math:`(B,)`."""
        return functools.partial(self.adapter.score, targets=targets)

    def attribute(self, images: torch.Tensor, targets: Target | Sequence[Target]) -> torch.Tensor:
        """Explain ``targets`` on ``images`` (Captum's convention: maps shaped like the input, one channel).

        Args:
            images: :math:`(B, 3, H, W)` float images in ``[0, 1]``.
            targets: one target for the batch or one per image.

        Returns:
            :math:`(B, 1, H, W)` attribution maps, detached, on the images' device.

        Raises:
            ShapeError: if ``images`` is not :math:`(B, 3, H, W)`.
        """
        check_images(images, "images", self.adapter.input_multiple)
        with explaining(self.adapter.model, seed=self.seed) as prepare:
            maps = self._attribute(prepare(images).requires_grad_(), targets)
        return maps.detach()

    def attribute_boxes(self, image: torch.Tensor, targets: Sequence[Target]) -> torch.Tensor:
        """Explain ``K`` targets (e.g. the ``K`` tracked objects) of one image.

        The default evaluates the image once per target; gradient and CAM engines override it with one
        forward and one batched backward. Both give the same maps.

        Args:
            image: :math:`(1, 3, H, W)` image.
            targets: ``K`` targets.

        Returns:
            :math:`(K, 1, H, W)` maps.
        """
        check_images(image, "image", self.adapter.input_multiple, batch=1)
        return (
            torch.cat([self.attribute(image, t) for t in targets])
            if targets
            else image.new_zeros(0, 1, *image.shape[-2:])
        )

    def explain_boxes(
        self, image: torch.Tensor, targets: Sequence[Target], raw: RawOutput | None = None
    ) -> Explanation:
        """Explain ``K`` targets of one image and say what each resolved to.

        Args:
            image: :math:`(1, 3, H, W)` image.
            targets: ``K`` targets.
            raw: the image's raw output (``adapter.raw(image)`` of the model being explained), when the caller
                already has it, e.g. from one batched forward over several images: the matches and the method's
                extras are read from it instead of from a forward of their own.

        Returns:
            An :class:`~xaiwatch.core.types.Explanation`: the :math:`(K, 1, H, W)` maps of
            :meth:`attribute_boxes`, the :class:`~xaiwatch.core.types.Match` of each box target on this image
            (``None`` for other targets) and the method's extras. The targets are not changed.

        Example:
            >>> from xaiwatch.adapters import ClassifierAdapter
            >>> from xaiwatch.targets import MatchedBoxTarget
            >>> net = nn.Sequential(nn.Conv2d(3, 2, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten())
            >>> engine = get_engine("saliency", ClassifierAdapter(net))
            >>> e = engine.explain_boxes(torch.rand(1, 3, 16, 16), [MatchedBoxTarget([0, 0, 16, 16], 1)])
            >>> e.maps.shape, e.matches[0].candidate, e.method
            (torch.Size([1, 1, 16, 16]), 0, 'saliency')
        """
        targets = list(targets)
        if raw is not None and raw.scores.shape[0] != 1:
            raise ConfigurationError(
                f"`raw` must be the raw output of the one image, got {raw.scores.shape[0]} images."
            )
        given = raw is not None
        if not given:
            maps, extras = self._explain_maps(image, targets)
            if self.needs_raw or any(isinstance(t, MatchedBoxTarget) for t in targets):
                with explaining(self.adapter.model, seed=self.seed), torch.no_grad():
                    raw = self.adapter.raw(image.detach())
        matches: list[Match | None] = [t.match(raw)[0] if isinstance(t, MatchedBoxTarget) else None for t in targets]
        if given:
            # the candidates chosen on the given output are the ones explained (a batched forward can differ from
            # the engine's own in the last bits, and so break a tie between two candidates the other way)
            chosen = [BoxTarget(m.candidate, t.label) if m is not None else t for t, m in zip(targets, matches)]
            maps, extras = self._explain_maps(image, chosen)
        return Explanation(self.name, maps.detach(), matches, {**extras, **self._extras(image, targets, matches, raw)})

    def _explain_maps(self, image: torch.Tensor, targets: list[Target]) -> tuple[torch.Tensor, dict]:
        """The maps of :meth:`explain_boxes` and extras computed with them (default: :meth:`attribute_boxes`)."""
        return self.attribute_boxes(image, targets), {}

    #: whether :meth:`_extras` needs the image's raw output
    needs_raw: ClassVar[bool] = False

    def _extras(
        self, image: torch.Tensor, targets: list[Target], matches: list[Match | None], raw: RawOutput | None
    ) -> dict:
        """Method-specific results of :meth:`explain_boxes` (default: none)."""
        return {}

    @abstractmethod
    def _attribute(self, images: torch.Tensor, targets: Target | Sequence[Target]) -> torch.Tensor:
        """Compute the maps; runs inside the explaining context on a cloned input."""


def register(cls: type[Engine]) -> type[Engine]:
    """Class decorator adding an engine to the registry under ``cls.name``."""
    _REGISTRY[cls.name] = cls
    return cls


def _load_engine_modules() -> None:
    """Import every module of ``xaiwatch.explain`` once, so that each registers its engines."""
    package = importlib.import_module("xaiwatch.explain")
    for info in pkgutil.iter_modules(package.__path__):
        importlib.import_module(f"xaiwatch.explain.{info.name}")


def available_methods() -> list[str]:
    """Names accepted by :func:`get_engine` and ``ExplainCallback(methods=...)``."""
    _load_engine_modules()
    return sorted(_REGISTRY)


def engine_class(name: str) -> type[Engine]:
    """The engine class registered as ``name``.

    Raises:
        ConfigurationError: for an unknown name; the message lists the valid ones.
    """
    if name not in _REGISTRY:
        _load_engine_modules()
    if name not in _REGISTRY:
        raise ConfigurationError(
            f"Unknown explanation method {name!r}. Valid methods: {', '.join(available_methods())}."
        )
    return _REGISTRY[name]


def get_engine(name: str, adapter: DetectorAdapter, **options: object) -> Engine:
    """Build the engine registered as ``name`` for ``adapter``.

    Args:
        name: a name of :func:`available_methods`.
        adapter: the model adapter.
        **options: the engine's options (``layer``, ``seed``, ``max_memory_mb`` and the method's own).

    Returns:
        The engine.

    Raises:
        ConfigurationError: for an unknown method or an option the method does not take (the message lists its
            valid options).
        UnsupportedModelError: when the method cannot be right on this model.

    Example:
        >>> from xaiwatch.adapters import ClassifierAdapter
        >>> net = nn.Sequential(nn.Conv2d(3, 2, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        >>> engine = get_engine("integrated_gradients", ClassifierAdapter(net), n_steps=8)
        >>> engine.name, engine.n_steps
        ('integrated_gradients', 8)
    """
    cls = engine_class(name)
    unknown, valid = unknown_arguments(cls, options, exclude=("adapter",))
    if unknown:
        raise ConfigurationError(
            f"Method {name!r} has no option {', '.join(map(repr, unknown))} (in `method_options`). "
            f"Valid options of {name!r}: {', '.join(valid)}."
        )
    return cls(adapter, **options)
