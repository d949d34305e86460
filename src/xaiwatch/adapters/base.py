"""The adapter contract: what the explainers need to know about one model family."""

from __future__ import annotations

import copy
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from xaiwatch.core.errors import ConfigurationError, ShapeError
from xaiwatch.core.inputs import check_images
from xaiwatch.core.types import Detections, RawOutput

if TYPE_CHECKING:
    from xaiwatch.targets import Target

__all__ = ["DetectorAdapter"]


class DetectorAdapter(ABC):
    """Turns one detector family into the family-independent interface every engine uses.

    A detector's raw output is thousands of candidate boxes; an explanation needs one scalar per image.
    Subclasses implement :meth:`raw` (differentiable candidates) and :meth:`layer_names`; this base class
    builds :meth:`detect` (post-processing) and :meth:`score` (what Captum attributes) on top of it.

    Args:
        model: the ``nn.Module`` to explain. The adapter never changes its state.
        names: class names, index ``i`` names class ``i``.
        conf: confidence threshold of :meth:`detect`.
        iou: IoU threshold of the non-maximum suppression in :meth:`detect`.
        max_det: maximum number of detections per image.
    """

    def __init__(
        self,
        model: nn.Module,
        names: Sequence[str] | None = None,
        conf: float = 0.25,
        iou: float = 0.7,
        max_det: int = 300,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise ConfigurationError(f"`model` must be a torch.nn.Module, got {type(model).__name__}.")
        for arg, value in (("conf", conf), ("iou", iou)):
            if not 0.0 <= float(value) <= 1.0:
                raise ConfigurationError(f"`{arg}` must be in [0, 1], got {value}.")
        if int(max_det) < 1:
            raise ConfigurationError(f"`max_det` must be >= 1, got {max_det}.")
        self.model = model
        self.names = list(names) if names is not None else None
        self.conf = float(conf)
        self.iou = float(iou)
        self.max_det = int(max_det)

    # ----------------------------------------------------------------------------------------------- contract
    @abstractmethod
    def raw(self, images: torch.Tensor) -> RawOutput:
        """Differentiable raw candidates of a batch of images.

        Args:
            images: :math:`(B, 3, H, W)` float images in ``[0, 1]``, RGB.

        Returns:
            the candidates of every image (see :class:`~xaiwatch.core.types.RawOutput`).
        """

    @abstractmethod
    def layer_names(self) -> dict[str, str]:
        """Named feature layers: alias (``"neck.p3"``) to dotted module path in :attr:`model`."""

    @property
    def input_multiple(self) -> int | None:
        """Image sides must be a multiple of this (the largest stride) when the family does not pad; ``None``: any."""
        return None

    @property
    def default_cam_layer(self) -> str:
        """The layer CAM methods use when none is given."""
        return next(iter(self.layer_names()))

    def level_head(self, layer: str) -> Callable[[torch.Tensor], torch.Tensor] | None:
        """The head of the one feature level that reads ``layer`` directly, if there is one.

        When ``layer`` is the feature map that one level of the head reads (a neck output), the function maps
        that feature map :math:`(B, C, h, w)` to the class probabilities of the level's candidates
        :math:`(B, h w, K)`, in the order of :meth:`raw` (whose ``levels`` tell where the level starts). Candidates of
        that level depend on the layer only through it, so gradient CAMs of those candidates back-propagate
        through this small function instead of the whole head. ``None`` (the default) when the family offers
        no such shortcut or ``layer`` is not a level input.
        """
        return None

    def level_head_radius(self, layer: str) -> int | None:
        """How far (in cells of ``layer``) a score of :meth:`level_head` reaches: the class score at cell ``(i, j)``
        depends on the cells within this Chebyshev distance only. Gradient CAMs then differentiate each object's
        score on a small window instead of the whole map. ``None`` (the default): unknown."""
        return None

    def level_inputs(self) -> list[str] | None:
        """The layer each level of the head reads (an alias of :meth:`layer_names`), in the order of ``levels``.

        Candidates of level ``l`` depend on every other layer only through ``level_inputs()[l]`` (the head reads
        nothing else for them): gradient CAMs chain the level's small :meth:`level_head` with one backward from
        that map to the layers explained. ``None`` (the default) when the family has no such structure.
        """
        return None

    def randomization_stages(self) -> list[tuple[str, list[str]]]:
        """Module paths of the model from the top down, in the stages of the cascading randomisation check.

        Each entry is ``(stage name, [dotted module paths])``; the check randomises them cumulatively, head first
        (Adebayo et al., 2018). The default is one stage, the whole model.
        """
        return [("all", [""])]

    def with_model(self, model: nn.Module) -> DetectorAdapter:
        """The same adapter (class names, thresholds) bound to another model of the same family, e.g. a copy."""
        twin = copy.copy(self)
        twin.model = model
        return twin

    def reset_caches(self) -> None:
        """Invalidate caches the model keeps between calls (anchors). The explaining context calls it."""
        from xaiwatch.core.context import reset_caches

        reset_caches(self.model)

    # ------------------------------------------------------------------------------------------------ derived
    @property
    def num_classes(self) -> int:
        """Number of classes of the model."""
        if self.names is None:
            raise ConfigurationError("This adapter was built without class names; pass `names=`.")
        return len(self.names)

    def layer(self, name: str) -> nn.Module:
        """Resolve a layer by alias (``"neck.p3"``) or by dotted module path (``"model.15"``).

        Raises:
            ConfigurationError: if ``name`` is neither; the message lists the aliases.
        """
        path = self.layer_names().get(name, name)
        try:
            return self.model.get_submodule(path)
        except AttributeError:
            known = ", ".join(f"{k} ({v})" for k, v in self.layer_names().items())
            raise ConfigurationError(
                f"Unknown layer {name!r} for {type(self.model).__name__}. Use one of: {known}; "
                "or any dotted module path of the model (see `model.named_modules()`)."
            ) from None

    def layer_group(self, name: str) -> list[str]:
        """The layers ``name`` stands for: the aliases under a group (``"neck"`` -> ``neck.p3``, ``neck.p4``, ...),
        the comma-separated layers of ``"neck.p3,neck.p5"``, or ``[name]``; each resolves (:meth:`layer`).

        Raises:
            ConfigurationError: for an unknown layer; the message lists the aliases.

        Example:
            >>> from xaiwatch.adapters import ClassifierAdapter
            >>> net = nn.Sequential(nn.Conv2d(3, 2, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten())
            >>> ClassifierAdapter(net).layer_group("0")
            ['0']
        """
        names: list[str] = []
        for part in (p.strip() for p in str(name).split(",")):
            group = [a for a in self.layer_names() if a.startswith(f"{part}.")]
            for n in group or [part]:
                self.layer(n)
                if n not in names:
                    names.append(n)
        if not names:
            raise ConfigurationError(f"Empty layer name {name!r}; use one of: {', '.join(self.layer_names())}.")
        return names

    def raw_from_forward(self, output: Any, images: torch.Tensor) -> RawOutput | None:
        """Candidates from the output of a call ``self.model(images)`` made elsewhere (the validation pass), or
        ``None`` when this adapter cannot read one (its caller then runs a forward of its own). Default: ``None``."""
        return None

    def postprocess(self, raw: RawOutput) -> list[Detections]:
        """Class-aware non-maximum suppression of raw candidates, keeping each box's candidate index."""
        from xaiwatch.adapters.postprocess import nms

        return nms(raw, conf=self.conf, iou=self.iou, max_det=self.max_det)

    def detect(self, images: torch.Tensor) -> list[Detections]:
        """Post-processed detections of a batch, computed without gradients and without side effects.

        Args:
            images: :math:`(B, 3, H, W)` float images in ``[0, 1]``.

        Returns:
            one :class:`~xaiwatch.core.types.Detections` per image.
        """
        from xaiwatch.core.context import eval_state

        check_images(images, "images", self.input_multiple)
        with torch.no_grad(), eval_state(self.model):
            return [d.detach() for d in self.postprocess(self.raw(images))]

    def score(self, images: torch.Tensor, targets: Target | Sequence[Target]) -> torch.Tensor:
        """Differentiable scalar per image: what attribution methods explain.

        Args:
            images: :math:`(B, 3, H, W)` float images in ``[0, 1]``.
            targets: one target for the whole batch, or one per image.

        Returns:
            :math:`(B,)` the target's score for each image.
        """
        raw = self.raw(images)
        return apply_targets(raw, targets)


def apply_targets(raw: RawOutput, targets: Target | Sequence[Target]) -> torch.Tensor:
    """Evaluate one target for a whole batch, or one target per image, on raw candidates."""
    batch = raw.scores.shape[0]
    if callable(targets):
        return targets(raw)
    targets = list(targets)
    if len(targets) != batch:
        raise ShapeError("targets", (len(targets),), [batch])
    return torch.cat([t(raw[i]) for i, t in enumerate(targets)])
