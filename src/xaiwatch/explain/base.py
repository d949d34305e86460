"""Engines: an explanation method bound to a model adapter, free of Lightning."""

from __future__ import annotations

import functools
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from typing import ClassVar

import torch
from torch import nn

from xaiwatch.adapters.base import DetectorAdapter
from xaiwatch.core.context import explaining
from xaiwatch.core.errors import ConfigurationError, check_shape
from xaiwatch.targets import Target

__all__ = ["Engine", "register", "available_methods", "get_engine"]

_REGISTRY: dict[str, type[Engine]] = {}


class Engine(ABC):
    """An explanation method: ``Engine(adapter).attribute(images, targets)`` gives :math:`(B, 1, H, W)` maps.

    Every call runs inside :func:`~xaiwatch.core.context.explaining`, so it works under Lightning's
    ``inference_mode`` validation and leaves the model exactly as it was.

    Args:
        adapter: the model adapter.
        layer: layer alias or dotted path, for methods that read a layer (``needs_layer``).
        seed: seed of the random streams inside the explanation (stochastic methods repeat exactly).
    """

    name: ClassVar[str] = ""
    needs_layer: ClassVar[bool] = False
    signed: ClassVar[bool] = False

    def __init__(self, adapter: DetectorAdapter, layer: str | None = None, seed: int = 0) -> None:
        if not isinstance(adapter, DetectorAdapter):
            raise ConfigurationError(f"`adapter` must be a DetectorAdapter, got {type(adapter).__name__}.")
        self.adapter = adapter
        self.seed = int(seed)
        self.layer_name = (layer or adapter.default_cam_layer) if self.needs_layer else layer
        self.layer: nn.Module | None = adapter.layer(self.layer_name) if self.needs_layer else None

    def forward_func(self, targets: Target | Sequence[Target]) -> Callable[[torch.Tensor], torch.Tensor]:
        """The scalar function Captum attributes: images to the targets' scores, :math:`(B,)`."""
        return functools.partial(self.adapter.score, targets=targets)

    def attribute(self, images: torch.Tensor, targets: Target | Sequence[Target]) -> torch.Tensor:
        """Explain ``targets`` on ``images``.

        Args:
            images: :math:`(B, 3, H, W)` float images in ``[0, 1]``.
            targets: one target for the batch or one per image.

        Returns:
            :math:`(B, 1, H, W)` attribution maps, detached, on the images' device.

        Raises:
            ShapeError: if ``images`` is not :math:`(B, 3, H, W)`.
        """
        check_shape(images, ["B", 3, "H", "W"], "images")
        with explaining(self.adapter.model, seed=self.seed) as prepare:
            maps = self._attribute(prepare(images).requires_grad_(), targets)
        return maps.detach()

    @abstractmethod
    def _attribute(self, images: torch.Tensor, targets: Target | Sequence[Target]) -> torch.Tensor:
        """Compute the maps; runs inside the explaining context on a cloned input."""


def register(cls: type[Engine]) -> type[Engine]:
    """Class decorator adding an engine to the registry under ``cls.name``."""
    _REGISTRY[cls.name] = cls
    return cls


def available_methods() -> list[str]:
    """Names accepted by :func:`get_engine` and ``ExplainCallback(methods=...)``."""
    return sorted(_REGISTRY)


def engine_class(name: str) -> type[Engine]:
    """The engine class registered as ``name``.

    Raises:
        ConfigurationError: for an unknown name; the message lists the valid ones.
    """
    if name not in _REGISTRY:
        raise ConfigurationError(
            f"Unknown explanation method {name!r}. Valid methods: {', '.join(available_methods())}."
        )
    return _REGISTRY[name]


def get_engine(name: str, adapter: DetectorAdapter, **options: object) -> Engine:
    """Build the engine registered as ``name`` for ``adapter``."""
    return engine_class(name)(adapter, **options)
