"""Read what the validation pass already computes for chosen validation images, instead of a forward of our own.

The validation loop that precedes a scheduled run feeds every validation image through the model once. A callback
that needs only forward results of some of those images (detections, feature maps: the projection, the error
analysis) can take them from that pass: :class:`ValidationCapture` puts a forward hook on the model (and on the
named layers) for one validation epoch, and, for each batch holding chosen images, hands their rows to the
callback's ``consume`` function right away (so no feature map outlives its batch). A batch is used only when it is
a dict with ``"images"``, ``"indices"`` and ``"paths"`` (xaiwatch's :func:`~xaiwatch.data.collate_detection`), each
row's path is the file of that index in the callback's dataset, and the model was called on exactly those images;
the images it never sees are left to the callback's own forward.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from xaiwatch.adapters import DetectorAdapter
from xaiwatch.core.types import RawOutput
from xaiwatch.features.capture import _feature_map

__all__ = ["CapturedBatch", "ValidationCapture"]


@dataclass
class CapturedBatch:
    """The chosen images of one validation batch, as the validation pass saw them.

    Attributes:
        ids: their validation indices.
        images: :math:`(b, 3, H, W)` the images.
        boxes: ground-truth boxes per image (``xyxy`` pixels, CPU).
        labels: ground-truth classes per image (CPU).
        raw: the model's candidates for these images (decoded by the adapter).
        maps: layer name to :math:`(b, C, h, w)` feature map (float).
    """

    ids: list[int]
    images: torch.Tensor
    boxes: list[torch.Tensor]
    labels: list[torch.Tensor]
    raw: RawOutput
    maps: dict[str, torch.Tensor]


class ValidationCapture:
    """Hooks on the model for one validation epoch, handing the chosen images' forward results to ``consume``.

    Args:
        adapter: the callback's adapter (its ``model`` is hooked; ``raw_from_forward`` decodes the output).
        wanted: validation indices to capture.
        consume: called with a :class:`CapturedBatch` inside the model's forward hook (gradients off).
        layers: name to module of the feature maps to capture too.
        paths: the image file of each validation index (the dataset's ``image_paths``): a batch row is used only
            when its ``"paths"`` entry is that file, so that indices of another dataset (a ``Subset``, a
            re-ordered copy) are never taken for ours.
    """

    def __init__(
        self,
        adapter: DetectorAdapter,
        wanted: set[int],
        consume: Callable[[CapturedBatch], None],
        layers: Mapping[str, nn.Module] | None = None,
        paths: Sequence[str] | None = None,
    ) -> None:
        self.adapter, self.wanted, self.consume, self.paths = adapter, set(wanted), consume, paths
        self.layers = dict(layers or {})
        self.seen: set[int] = set()
        self._batch: dict | None = None
        self._rows: list[int] = []
        self._maps: dict[str, torch.Tensor] = {}
        self._handles: list[Any] = []

    def start(self) -> None:
        """Put the hooks on (the model's last, so that its hook finds this call's layer maps)."""
        for name, module in self.layers.items():
            self._handles.append(module.register_forward_hook(self._layer_hook(name)))
        self._handles.append(self.adapter.model.register_forward_hook(self._model_hook))

    def stop(self) -> None:
        """Take every hook off again (idempotent)."""
        for handle in self._handles:
            handle.remove()
        self._handles, self._batch, self._maps = [], None, {}

    def batch_start(self, batch: Any) -> None:
        """Before a validation batch: remember the rows of the chosen images still to be seen (none: idle)."""
        self._batch, self._rows, self._maps = None, [], {}
        if not self._handles or not isinstance(batch, dict):
            return
        images, indices, paths = batch.get("images"), batch.get("indices"), batch.get("paths")
        if not isinstance(images, torch.Tensor) or not isinstance(indices, torch.Tensor) or images.ndim != 4:
            return
        if self.paths is None or not isinstance(paths, (list, tuple)) or len(paths) != len(indices):
            return
        n = len(self.paths)
        rows = [
            j
            for j, i in enumerate(indices.tolist())
            if i in self.wanted and i not in self.seen and 0 <= i < n and str(paths[j]) == str(self.paths[i])
        ]
        if rows and all(k in batch for k in ("boxes", "labels")):
            self._batch, self._rows = batch, rows

    def batch_end(self) -> None:
        """After a validation batch: nothing more is taken from it (other forwards of the model are not ours)."""
        self._batch, self._maps = None, {}

    def _layer_hook(self, name: str) -> Callable[[nn.Module, object, object], None]:
        def record(_module: nn.Module, _inputs: object, output: object) -> None:
            if self._batch is not None:
                self._maps[name] = _feature_map(output, name).detach()

        return record

    def _model_hook(self, _module: nn.Module, args: tuple, output: Any) -> None:
        batch = self._batch
        if batch is None:
            return
        images = args[0] if args else None
        given = batch["images"]
        if not (isinstance(images, torch.Tensor) and images.shape == given.shape):
            return  # another call (or the model fed something else): wait for the one on the batch's images
        if images is not given and not torch.equal(images, given):
            return
        maps, self._maps = self._maps, {}
        if any(name not in maps for name in self.layers):
            return
        raw = self.adapter.raw_from_forward(output, images)
        if raw is None:
            self.stop()  # this adapter cannot read the model's output here: the callback runs its own forward
            return
        rows = self._rows
        index = torch.as_tensor(rows, device=raw.boxes.device)
        ids = [int(batch["indices"][j]) for j in rows]
        with torch.no_grad():
            captured = CapturedBatch(
                ids=ids,
                images=images[rows].detach().float(),
                boxes=[batch["boxes"][j].detach().cpu().float().reshape(-1, 4) for j in rows],
                labels=[batch["labels"][j].detach().cpu().long().reshape(-1) for j in rows],
                raw=RawOutput(raw.boxes[index].float(), raw.scores[index].float(), raw.levels),
                maps={name: m[index.to(m.device)].float() for name, m in maps.items()},
            )
            self.consume(captured)
        self.seen.update(ids)
        self._batch = None  # one call per batch
