"""D-RISE: black-box saliency of one detection by random masking (Petsiuk et al., CVPR 2021).

"Black-box Explanation of Object Detectors via Saliency Maps": ``N`` random masks (RISE masks: a coarse binary
grid of ``s x s`` cells kept with probability ``p``, upsampled bilinearly and shifted by a random sub-cell
offset) grey out parts of the image; each masked image is detected again, and a mask is weighted by how well
its detections still match the explained detection:

.. math::

    w(M) = \\max_{d \\in D(I \\odot M)} \\mathrm{IoU}(b_t, b_d) \\cdot \\cos(P_t, P_d)
    \\qquad S = \\frac{1}{N \\, p} \\sum_{i=1}^{N} w(M_i) \\, M_i

where ``b`` are boxes and ``P`` class-probability vectors. The paper's third factor, the objectness ``O_d``,
multiplies the weight only for families whose raw output carries a separate ``objectness`` (B, N) tensor:
YOLOv8 (anchor-free, decoupled head) has no objectness, and families that have one fold it into
``RawOutput.scores`` (the cosine is blind to that common scale), so on YOLOv8 the weight is IoU x cosine.

No gradient is computed: the model is only evaluated, under :func:`torch.no_grad`, in batches of masked
images whose size comes from ``max_memory_mb`` and the measured activation volume of one forward.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import box_iou

from xaiwatch.adapters.base import DetectorAdapter
from xaiwatch.core.context import explaining
from xaiwatch.core.errors import ConfigurationError, ShapeError, check_shape
from xaiwatch.core.inputs import check_images
from xaiwatch.core.types import Detections, RawOutput
from xaiwatch.core.validation import in_range, positive_int, probability
from xaiwatch.explain.base import Engine, register
from xaiwatch.explain.budget import MAX_SAMPLES_PER_BATCH
from xaiwatch.targets import BoxTarget, ClassTarget, MatchedBoxTarget, Target

__all__ = [
    "DRiseEngine",
    "mask_grids",
    "upsample_masks",
    "generate_masks",
    "target_reference",
    "drise_weights",
]

TARGET_VECTORS = ("probs", "one_hot")


# ------------------------------------------------------------------------------------------------------ masks
def mask_grids(
    num_masks: int, grid_size: int = 16, p: float = 0.5, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The random part of ``num_masks`` RISE masks, independent of the image size.

    Args:
        num_masks: number of masks :math:`N`.
        grid_size: number of cells :math:`s` along each side of the image.
        p: probability that a cell is kept (1) rather than masked (0).
        generator: CPU random generator (a seeded one makes the masks repeat exactly).

    Returns:
        ``(grids, shifts)``: :math:`(N, 1, s, s)` binary float grids and :math:`(N, 2)` offsets in
        ``[0, 1)`` (fractions of a cell, ``y`` then ``x``), both on the CPU.
    """
    grids = (torch.rand(num_masks, 1, grid_size, grid_size, generator=generator) < p).float()
    shifts = torch.rand(num_masks, 2, generator=generator)
    return grids, shifts


def upsample_masks(grids: torch.Tensor, shifts: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Smooth masks of an image size from binary grids, as in RISE.

    Each :math:`s \\times s` grid is upsampled bilinearly to :math:`(s + 1)` cells of
    ``ceil(H / s) x ceil(W / s)`` pixels and an :math:`H \\times W` window is cut at the mask's offset
    (``floor(shift * cell)`` pixels), so cell borders fall anywhere in the image.

    Args:
        grids: :math:`(n, 1, s, s)` grids from :func:`mask_grids`.
        shifts: :math:`(n, 2)` offsets from :func:`mask_grids`.
        size: ``(H, W)``.

    Returns:
        :math:`(n, 1, H, W)` masks in ``[0, 1]`` on the grids' device and dtype.
    """
    h, w = int(size[0]), int(size[1])
    s = grids.shape[-1]
    ch, cw = math.ceil(h / s), math.ceil(w / s)
    up = F.interpolate(grids, size=((s + 1) * ch, (s + 1) * cw), mode="bilinear", align_corners=False)
    dy = (shifts[:, 0] * ch).long().clamp(0, ch - 1).tolist()
    dx = (shifts[:, 1] * cw).long().clamp(0, cw - 1).tolist()
    if not dy:
        return up[:, :, :h, :w]
    return torch.stack([up[i, :, y : y + h, x : x + w] for i, (y, x) in enumerate(zip(dy, dx))])


def generate_masks(
    num_masks: int, size: Sequence[int], grid_size: int = 16, p: float = 0.5, seed: int = 0
) -> torch.Tensor:
    """All masks :class:`DRiseEngine` uses with the same ``seed`` (it builds them in chunks, identically).

    Args:
        num_masks: number of masks :math:`N`.
        size: ``(H, W)``.
        grid_size: cells per side :math:`s`.
        p: keep probability of a cell.
        seed: seed of the :class:`torch.Generator`.

    Returns:
        :math:`(N, 1, H, W)` float masks on the CPU.
    """
    grids, shifts = mask_grids(num_masks, grid_size, p, torch.Generator().manual_seed(int(seed)))
    return upsample_masks(grids, shifts, size)


# ------------------------------------------------------------------------------------------------- reference
def _best_of_class(target: ClassTarget, raw: RawOutput) -> list[int]:
    return raw.scores[..., target.label].argmax(dim=1).tolist()


def target_reference(target: Target, raw: RawOutput) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The detection D-RISE explains, read from the clean image's raw output: one per image.

    - :class:`~xaiwatch.targets.MatchedBoxTarget`: the candidate it matches;
    - :class:`~xaiwatch.targets.BoxTarget`: its candidate;
    - :class:`~xaiwatch.targets.ClassTarget`: the candidate with the highest score of its class.

    Args:
        target: the target.
        raw: clean images' raw output, :math:`B` images.

    Returns:
        ``B`` pairs ``(box (4,), class_probs (C,))`` (detached).

    Raises:
        ConfigurationError: for a target that names no box (another kind of :class:`Target`), a candidate or
            label out of range.
    """
    if not isinstance(target, (MatchedBoxTarget, BoxTarget, ClassTarget)):
        raise ConfigurationError(
            f"D-RISE explains one detection: use a MatchedBoxTarget, BoxTarget or ClassTarget, got {target!r}."
        )
    with torch.no_grad():
        target(raw)  # validates candidate and label
    if isinstance(target, MatchedBoxTarget):
        cands = [m.candidate for m in target.match(raw)]
    elif isinstance(target, BoxTarget):
        cands = [target.candidate] * raw.scores.shape[0]
    else:
        cands = _best_of_class(target, raw)
    return [(raw.boxes[i, c].detach(), raw.scores[i, c].detach()) for i, c in enumerate(cands)]


def _one_hot(probs: torch.Tensor, label: int | None) -> torch.Tensor:
    out = torch.zeros_like(probs)
    out[int(probs.argmax()) if label is None else label] = 1.0
    return out


# -------------------------------------------------------------------------------------------------- weights
def drise_weights(
    ref_boxes: torch.Tensor, ref_probs: torch.Tensor, raw: RawOutput, detections: Sequence[Detections]
) -> torch.Tensor:
    """D-RISE weight of each masked image for each reference detection.

    ``w[m, k] = max_d IoU(ref_boxes[k], box_d) * cos(ref_probs[k], P_d)`` over the detections ``d`` of masked
    image ``m``, where ``P_d = raw.scores[m, d.candidate]`` (times ``raw.objectness[m, d.candidate]`` when the
    raw output has an ``objectness`` attribute; YOLOv8's has none). An image without detections weighs 0.

    Args:
        ref_boxes: :math:`(K, 4)` reference boxes.
        ref_probs: :math:`(K, C)` reference class-probability vectors.
        raw: raw output of :math:`n` masked images.
        detections: their :math:`n` post-processed detections (``candidates`` index ``raw``).

    Returns:
        :math:`(n, K)` weights.
    """
    n, k = raw.scores.shape[0], ref_boxes.shape[0]
    weights = ref_probs.new_zeros(n, k)
    objectness = getattr(raw, "objectness", None)
    unit_ref = F.normalize(ref_probs.float(), dim=1)
    for m, det in enumerate(detections):
        if len(det) == 0:
            continue
        probs = raw.scores[m, det.candidates].float()
        sim = box_iou(ref_boxes.float(), det.boxes.float()) * (unit_ref @ F.normalize(probs, dim=1).T)
        if objectness is not None:
            sim = sim * objectness[m, det.candidates].float()[None]
        weights[m] = sim.amax(dim=1).to(weights.dtype)
    return weights


# --------------------------------------------------------------------------------------------------- engine
def _tensor_bytes(out: object) -> int:
    if isinstance(out, torch.Tensor):
        return out.numel() * out.element_size()
    if isinstance(out, (tuple, list)):
        return sum(_tensor_bytes(o) for o in out)
    if isinstance(out, dict):
        return sum(_tensor_bytes(o) for o in out.values())
    return 0


def _check_options(num_masks: object, grid_size: object, p: object, fill: object, conf: object) -> None:
    positive_int("num_masks", num_masks)
    positive_int("grid_size", grid_size)
    in_range("p", p, 0.0, 1.0, low_open=True)  # keep probability of a cell
    probability("fill", fill)  # grey level of masked pixels
    if conf is not None:  # None: the adapter's threshold
        probability("conf", conf)


@register
class DRiseEngine(Engine):
    """D-RISE (Petsiuk et al. 2021): random-mask saliency of one detection, model-agnostic and gradient-free.

    The explained detection (box and class-probability vector) is read from the clean image
    (:func:`target_reference`); each of ``num_masks`` masked images (``image * M + fill * (1 - M)``) is detected
    with the adapter's ``raw`` and ``postprocess`` at confidence ``conf``, and weighted by
    :func:`drise_weights`. The masks come from a :class:`torch.Generator` seeded with ``seed``: the same masks
    every call, for every image of a batch and every target (so batched and one-at-a-time maps agree).
    :meth:`attribute_boxes` scores all ``K`` targets of an image on one pass of the masks.

    Args:
        adapter, layer, seed, max_memory_mb: see :class:`~xaiwatch.explain.base.Engine`; the memory budget sets
            how many masked images one forward holds.
        num_masks: number of masks :math:`N` (the paper uses 5000; the map's noise falls as :math:`1/\\sqrt{N}`).
        grid_size: cells per image side :math:`s` (the paper's 16).
        p: keep probability of a cell (0.5).
        fill: grey level of masked pixels.
        conf: detection threshold on masked images, low so that weakened detections still count
            (``None``: the adapter's ``conf``).
        divide_by_p: divide the map by ``p`` as RISE does (a Monte-Carlo estimate of the weight given the pixel
            is kept); ``False`` gives the plain ``sum w M / N``.
        target_vector: ``"probs"`` compares with the clean candidate's class probabilities, ``"one_hot"`` with the
            one-hot vector of the target's label (the candidate's best class when the target has none).
    """

    name = "d_rise"

    def __init__(
        self,
        adapter: DetectorAdapter,
        layer: str | None = None,
        seed: int = 0,
        max_memory_mb: float = 2048,
        *,
        num_masks: int = 1000,
        grid_size: int = 16,
        p: float = 0.5,
        fill: float = 0.5,
        conf: float | None = 0.05,
        divide_by_p: bool = True,
        target_vector: str = "probs",
    ) -> None:
        _check_options(num_masks, grid_size, p, fill, conf)
        if target_vector not in TARGET_VECTORS:
            raise ConfigurationError(f"`target_vector` must be one of {TARGET_VECTORS}, got {target_vector!r}.")
        self.num_masks, self.grid_size, self.p, self.fill = num_masks, grid_size, float(p), float(fill)
        self.conf = None if conf is None else float(conf)
        self.divide_by_p = bool(divide_by_p)
        self.target_vector = target_vector
        self._batch_cache: dict[tuple, int] = {}
        super().__init__(adapter, layer=layer, seed=seed, max_memory_mb=max_memory_mb)

    # ----------------------------------------------------------------------------------------------- public
    def attribute_boxes(self, image: torch.Tensor, targets: Sequence[Target]) -> torch.Tensor:
        """Explain ``K`` targets of one image with one pass of the masks (see :meth:`Engine.attribute_boxes`).

        Args:
            image: :math:`(1, 3, H, W)` image.
            targets: ``K`` targets.

        Returns:
            :math:`(K, 1, H, W)` maps, equal to ``attribute`` called once per target.
        """
        check_images(image, "image", self.adapter.input_multiple, batch=1)
        targets = list(targets)
        if not targets:
            return image.new_zeros(0, 1, *image.shape[-2:])
        with explaining(self.adapter.model, seed=self.seed) as prepare, torch.no_grad():
            x = prepare(image)
            raw = self.adapter.raw(x)
            refs = [self._reference(t, raw)[0] for t in targets]
            return self._saliency(x, refs).detach()

    def batch_size(self, image: torch.Tensor) -> int:
        """Masked images per forward within ``max_memory_mb`` (measured once per image size).

        The cost of one masked image is the total size of every leaf module's output in one measured forward
        of ``image`` without gradients (an upper bound of that forward's peak), plus the raw output, and four
        image-sized tensors for the mask, the masked image and their temporaries.
        """
        check_shape(image, ["B", 3, "H", "W"], "image")
        with explaining(self.adapter.model, seed=self.seed) as prepare:
            return self._batch_size(prepare(image[:1]))

    def _batch_size(self, image: torch.Tensor) -> int:
        key = (*image.shape[-2:], image.dtype, image.device)
        if key not in self._batch_cache:
            per_image = self._forward_bytes(image[:1]) + 4 * image[:1].numel() * image.element_size()
            budget = self.max_memory_mb * 2**20
            self._batch_cache[key] = max(1, min(MAX_SAMPLES_PER_BATCH, math.floor(budget / max(1, per_image))))
        return self._batch_cache[key]

    # ---------------------------------------------------------------------------------------------- private
    def _forward_bytes(self, sample: torch.Tensor) -> int:
        total = [0]
        leaves = [m for m in self.adapter.model.modules() if next(m.children(), None) is None]

        def count(_module: nn.Module, _inputs: object, out: object) -> None:
            total[0] += _tensor_bytes(out)

        handles = [m.register_forward_hook(count) for m in leaves]
        try:
            with torch.no_grad():
                raw = self.adapter.raw(sample)
        finally:
            for h in handles:
                h.remove()
        return total[0] + _tensor_bytes((raw.boxes, raw.scores))

    def _reference(self, target: Target, raw: RawOutput) -> list[tuple[torch.Tensor, torch.Tensor]]:
        refs = target_reference(target, raw)
        if self.target_vector == "one_hot":
            refs = [(box, _one_hot(probs, getattr(target, "label", None))) for box, probs in refs]
        return refs

    def _attribute(self, images: torch.Tensor, targets: Target | Sequence[Target]) -> torch.Tensor:
        batch = images.shape[0]
        with torch.no_grad():
            x = images.detach()
            raw = self.adapter.raw(x)
            if callable(targets):
                refs = self._reference(targets, raw)
            else:
                refs = self._per_image_references(list(targets), raw)
            return torch.cat([self._saliency(x[i : i + 1], [refs[i]]) for i in range(batch)])

    def _per_image_references(self, targets: list[Target], raw: RawOutput) -> list[tuple[torch.Tensor, torch.Tensor]]:
        if len(targets) != raw.scores.shape[0]:
            raise ShapeError("targets", (len(targets),), [raw.scores.shape[0]])
        refs = []
        for i, target in enumerate(targets):
            refs.extend(self._reference(target, raw[i]))
        return refs

    def _low_conf_adapter(self) -> DetectorAdapter:
        if self.conf is None:
            return self.adapter
        low = copy.copy(self.adapter)  # shares the model; the user's adapter keeps its threshold
        low.conf = self.conf
        return low

    def _saliency(self, image: torch.Tensor, refs: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        """:math:`(K, 1, H, W)` D-RISE maps of the ``K`` references of one :math:`(1, 3, H, W)` image."""
        size = image.shape[-2:]
        ref_boxes = torch.stack([b for b, _ in refs]).to(image.device)
        ref_probs = torch.stack([q for _, q in refs]).to(image.device)
        grids, shifts = mask_grids(self.num_masks, self.grid_size, self.p, torch.Generator().manual_seed(self.seed))
        grids = grids.to(image.device, image.dtype)
        per_batch = self._batch_size(image)
        detector = self._low_conf_adapter()
        sal = image.new_zeros(len(refs), *size)
        for start in range(0, self.num_masks, per_batch):
            masks = upsample_masks(grids[start : start + per_batch], shifts[start : start + per_batch], size)
            raw = detector.raw(image * masks + self.fill * (1.0 - masks))
            weights = drise_weights(ref_boxes, ref_probs, raw, detector.postprocess(raw)).to(sal.dtype)
            sal += torch.einsum("nk,nhw->khw", weights, masks[:, 0])
        sal /= self.num_masks * (self.p if self.divide_by_p else 1.0)
        return sal[:, None]
