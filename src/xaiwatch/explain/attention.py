"""Attention maps of the detectors that have attention: RT-DETR, YOLO11, YOLOv10, YOLO12.

Three engines, all gradient-free (one forward pass, no backward):

- ``attention``: the attention of one module from the token under the target box's centre to every image position,
  per head or averaged over heads, upsampled to the image. Modules: RT-DETR's AIFI encoder layer
  (``nn.MultiheadAttention``), YOLO11's C2PSA and YOLOv10's PSA ``Attention``, YOLO12's area attention ``AAttn``.
- ``attention_rollout`` (Abnar & Zuidema, ACL 2020): attention propagated through a chain of layers, each layer's
  head-averaged matrix mixed half and half with the identity for the residual connection, rows renormalised, and
  multiplied. For YOLO11/YOLOv10/YOLO12 the chain is the attention modules of one layer (e.g. YOLO12's four
  ``AAttn`` in ``model.8``); for RT-DETR it is the decoder: each decoder layer's deformable cross-attention of every
  query, weighted by how much the box's query depends on that query through the later decoder self-attentions.
- ``deformable_attention`` (RT-DETR): where the box's own query samples the encoder features in every decoder
  layer (``MSDeformAttn``: 4 points per head and level, weights softmaxed over the 12 level-point entries of a head),
  each point's weight spread on its four feature cells exactly as the bilinear sampling reads them, per level; the
  points themselves come from :meth:`DeformableAttentionEngine.points` to be drawn as dots.

Weights are read by hooks that are removed in ``finally``, inside :func:`~xaiwatch.core.context.explaining`:
``nn.MultiheadAttention`` returns its per-head weights to a forward hook (a pre-hook asks for them); ``Attention``
and ``AAttn`` keep theirs in a local variable, so they are recomputed from the output of their ``qkv`` convolution
exactly as their ``forward`` computes them; ``MSDeformAttn``'s come from its ``sampling_offsets`` and
``attention_weights`` layers and the reference boxes its forward receives.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from xaiwatch.adapters.base import DetectorAdapter
from xaiwatch.core.context import explaining
from xaiwatch.core.errors import ConfigurationError, UnsupportedModelError, check_shape
from xaiwatch.core.types import RawOutput
from xaiwatch.explain.base import Engine, available_methods, register
from xaiwatch.targets import BoxTarget, ClassTarget, Target

__all__ = [
    "ATTENTION_METHODS",
    "AttentionEngine",
    "AttentionRolloutEngine",
    "DeformableAttentionEngine",
    "AttentionRecord",
    "DeformableRecord",
    "capture_attention",
    "find_attention",
    "rollout",
    "splat_points",
]

#: the engines of this module (a model without attention refuses them all)
ATTENTION_METHODS = ("attention", "attention_rollout", "deformable_attention")


# ------------------------------------------------------------------------------------------------------ discovery
def _kind(module: nn.Module, parent: nn.Module | None) -> str | None:
    name, origin = type(module).__name__, type(module).__module__
    if isinstance(module, nn.MultiheadAttention):
        parent_name = type(parent).__name__ if parent is not None else ""
        if parent_name == "AIFI":
            return "grid"
        if parent_name == "DeformableTransformerDecoderLayer":
            return "query"
        return None
    if origin.startswith("ultralytics"):
        if name in {"Attention", "AAttn"}:
            return "grid"
        if name == "MSDeformAttn":
            return "deformable"
    return None


def find_attention(model: nn.Module) -> dict[str, str]:
    """The attention modules of ``model`` that xaiwatch reads, in module order.

    Args:
        model: any ``nn.Module``.

    Returns:
        dotted path to kind: ``"grid"`` (keys are positions of a feature map: AIFI, ``Attention``, ``AAttn``),
        ``"query"`` (RT-DETR decoder self-attention between object queries) or ``"deformable"`` (``MSDeformAttn``).

    Example:
        >>> find_attention(nn.Sequential(nn.Conv2d(3, 3, 1)))
        {}
    """
    parents = {id(c): m for m in model.modules() for c in m.children()}
    out = {}
    for path, m in model.named_modules():
        kind = _kind(m, parents.get(id(m)))
        if kind is not None:
            out[path] = kind
    return out


# ------------------------------------------------------------------------------------------------------- capture
@dataclass
class AttentionRecord:
    """One call of an attention module.

    Attributes:
        weights: :math:`(B, heads, L_q, L_k)` attention probabilities (rows sum to 1).
        grid: ``(h, w)`` of the feature map whose positions are the tokens (row-major), or ``None`` for queries.
    """

    weights: torch.Tensor
    grid: tuple[int, int] | None


@dataclass
class DeformableRecord:
    """One call of an ``MSDeformAttn`` module.

    Attributes:
        locations: :math:`(B, L_q, heads, L P, 2)` sampling points ``x, y`` in ``[0, 1]`` of the image.
        weights: :math:`(B, L_q, heads, L P)` their attention (softmax over the ``L P`` entries of each head).
        shapes: ``(h, w)`` of each of the ``L`` levels.
        n_points: ``P``, points per head and level (entry ``t`` is of level ``t // P``).
    """

    locations: torch.Tensor
    weights: torch.Tensor
    shapes: list[tuple[int, int]]
    n_points: int


def _psa_weights(module: nn.Module, qkv: torch.Tensor) -> AttentionRecord:
    """ultralytics ``Attention.forward``'s matrix from its ``qkv`` output."""
    b, _, h, w = qkv.shape
    q, k, _ = qkv.view(b, module.num_heads, module.key_dim * 2 + module.head_dim, h * w).split(
        [module.key_dim, module.key_dim, module.head_dim], dim=2
    )
    return AttentionRecord(((q * module.scale).transpose(-2, -1) @ k).softmax(dim=-1), (h, w))


def _area_weights(module: nn.Module, qkv: torch.Tensor) -> AttentionRecord:
    """ultralytics ``AAttn.forward``'s matrices from its ``qkv`` output, as one block-diagonal (N, N) per head."""
    b, _, h, w = qkv.shape
    n, area, heads, hd = h * w, max(int(module.area), 1), module.num_heads, module.head_dim
    t = qkv.flatten(2).transpose(1, 2).reshape(b * area, n // area, heads * hd * 3)
    q, k, _ = t.view(b * area, n // area, heads, hd * 3).permute(0, 2, 3, 1).split([hd, hd, hd], dim=2)
    blocks = ((q * hd**-0.5).transpose(-2, -1) @ k).softmax(dim=-1).view(b, area, heads, n // area, n // area)
    full = qkv.new_zeros(b, heads, n, n)
    s = n // area
    for j in range(area):
        full[:, :, j * s : (j + 1) * s, j * s : (j + 1) * s] = blocks[:, j]
    return AttentionRecord(full, (h, w))


def _deformable_record(module: nn.Module, seen: dict) -> DeformableRecord:
    """Sampling locations and weights of ``MSDeformAttn.forward`` from its inputs and two linear layers."""
    ref, shapes = seen["refer_bbox"], [tuple(int(v) for v in s) for s in seen["shapes"]]
    b, lq = ref.shape[:2]
    heads, total, p = module.n_heads, module.n_levels * module.n_points, module.n_points
    offsets = seen["offsets"].view(b, lq, heads, total, 2)
    weights = seen["weights"].view(b, lq, heads, total).softmax(dim=-1)
    if ref.shape[-1] == 4:
        loc = ref[:, :, None, :, :2] + offsets / p * ref[:, :, None, :, 2:] * 0.5
    else:
        norm = torch.as_tensor(shapes, dtype=ref.dtype, device=ref.device).flip(-1)
        loc = ref[:, :, None, :, :] + offsets / norm[:, None, :].expand(-1, p, -1).reshape(total, 2)
    return DeformableRecord(loc, weights, shapes, p)


@contextlib.contextmanager
def capture_attention(model: nn.Module, paths: Sequence[str]) -> Iterator[dict[str, list]]:
    """Record the attention of the modules at ``paths`` during the forward passes run inside the context.

    Args:
        model: the model.
        paths: dotted paths of modules :func:`find_attention` lists.

    Yields:
        ``{path: [record per call]}`` (:class:`AttentionRecord` or :class:`DeformableRecord`), filled as the
        model runs. Every hook is removed on exit, also after an exception.

    Raises:
        ConfigurationError: for a path that is not an attention module.
    """
    kinds = find_attention(model)
    bad = [p for p in paths if p not in kinds]
    if bad:
        raise ConfigurationError(f"Not attention modules: {bad}. Attention modules of this model: {list(kinds)}.")
    records: dict[str, list] = {p: [] for p in paths}
    handles = []
    try:
        for path in paths:
            module, kind = model.get_submodule(path), kinds[path]
            handles += _register(model, path, module, kind, records[path])
        yield records
    finally:
        for h in handles:
            h.remove()


def _register(model: nn.Module, path: str, module: nn.Module, kind: str, out: list) -> list:
    if isinstance(module, nn.MultiheadAttention):
        parent = model.get_submodule(path.rpartition(".")[0])
        grid: list = []

        def ask(_m, args, kwargs):
            return args, {**kwargs, "need_weights": True, "average_attn_weights": False}

        def take(_m, _args, output):
            out.append(AttentionRecord(output[1].detach(), grid[-1] if grid else None))

        handles = [module.register_forward_pre_hook(ask, with_kwargs=True), module.register_forward_hook(take)]
        if kind == "grid":  # AIFI flattens a (B, C, h, w) map
            handles.append(parent.register_forward_pre_hook(lambda _m, a: grid.append(tuple(a[0].shape[-2:]))))
        return handles
    if type(module).__name__ in {"Attention", "AAttn"}:
        compute = _psa_weights if type(module).__name__ == "Attention" else _area_weights
        return [module.qkv.register_forward_hook(lambda _m, _i, o, mod=module: out.append(compute(mod, o.detach())))]
    seen: dict = {}

    def inputs(_m, args):
        seen["refer_bbox"], seen["shapes"] = args[1].detach(), args[3]

    return [
        module.register_forward_pre_hook(inputs),
        module.sampling_offsets.register_forward_hook(lambda _m, _i, o: seen.__setitem__("offsets", o.detach())),
        module.attention_weights.register_forward_hook(lambda _m, _i, o: seen.__setitem__("weights", o.detach())),
        module.register_forward_hook(lambda m, _i, _o: out.append(_deformable_record(m, seen))),
    ]


# ------------------------------------------------------------------------------------------------------ maths
def rollout(matrices: Sequence[torch.Tensor], residual: float = 0.5) -> torch.Tensor:
    """Attention rollout (Abnar & Zuidema 2020) of head-averaged matrices applied in order.

    Args:
        matrices: per layer :math:`(..., N, N)` row-stochastic attention, first layer first.
        residual: weight of the identity (the residual connection) mixed into each layer.

    Returns:
        :math:`(..., N, N)`: row ``i`` is how much the last layer's token ``i`` draws on each input token.

    Example:
        >>> a = torch.tensor([[0.0, 1.0], [1.0, 0.0]])
        >>> rollout([a])
        tensor([[0.5000, 0.5000],
                [0.5000, 0.5000]])
    """
    out = None
    for a in matrices:
        eye = torch.eye(a.shape[-1], dtype=a.dtype, device=a.device)
        mixed = (1 - residual) * a + residual * eye
        mixed = mixed / mixed.sum(dim=-1, keepdim=True)
        out = mixed if out is None else mixed @ out
    if out is None:
        raise ConfigurationError("`matrices` is empty: rollout needs at least one attention layer.")
    return out


def splat_points(
    locations: torch.Tensor, weights: torch.Tensor, shapes: Sequence[tuple[int, int]], levels: torch.Tensor
) -> list[torch.Tensor]:
    """Spread each sampling point's weight on the feature cells its bilinear sampling reads, level by level.

    ``grid_sample(align_corners=False, padding_mode="zeros")`` reads a point at ``x, y`` in ``[0, 1]`` from the four
    cells around ``(x w - 0.5, y h - 0.5)`` with bilinear weights; a cell outside the map reads zero. The returned
    weight of a cell is therefore exactly the coefficient of its value vector in the module's output.

    Args:
        locations: :math:`(..., N, 2)` points ``x, y`` in ``[0, 1]``.
        weights: :math:`(..., N)` their attention.
        shapes: ``(h, w)`` of the levels.
        levels: :math:`(N,)` the level each point samples.

    Returns:
        per level :math:`(..., h, w)` cell weights (summed over the points).

    Example:
        >>> cells = splat_points(torch.tensor([[0.5, 0.5]]), torch.tensor([1.0]), [(2, 2)], torch.tensor([0]))
        >>> cells[0]
        tensor([[0.2500, 0.2500],
                [0.2500, 0.2500]])
    """
    lead = weights.shape[:-1]
    out = []
    for lvl, (h, w) in enumerate(shapes):
        sel = torch.nonzero(levels == lvl).flatten()
        x = locations[..., sel, 0] * w - 0.5
        y = locations[..., sel, 1] * h - 0.5
        wt = weights[..., sel]
        x0, y0 = x.floor(), y.floor()
        fx, fy = x - x0, y - y0
        flat = weights.new_zeros(max(lead.numel(), 1), h * w)
        for dx, dy, c in ((0, 0, (1 - fx) * (1 - fy)), (1, 0, fx * (1 - fy)), (0, 1, (1 - fx) * fy), (1, 1, fx * fy)):
            xi, yi = x0 + dx, y0 + dy
            valid = (xi >= 0) & (xi < w) & (yi >= 0) & (yi < h)
            index = (yi.clamp(0, h - 1) * w + xi.clamp(0, w - 1)).long()
            flat.scatter_add_(1, index.reshape(flat.shape[0], -1), (wt * c * valid).reshape(flat.shape[0], -1))
        out.append(flat.view(*lead, h, w))
    return out


def _to_image(cells: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Cell weights :math:`(K, C, h, w)` to a per-pixel density on the image (each cell's weight over its area)."""
    h, w = cells.shape[-2:]
    area = (size[0] / h) * (size[1] / w)
    return F.interpolate(cells / area, size=tuple(size), mode="bilinear", align_corners=False)


def _candidate(target: Target, raw: RawOutput) -> int:
    """The candidate (query) a target explains on the one image of ``raw``."""
    pair = target.resolve(raw) if isinstance(target, Target) else None
    if pair is not None:
        return int(pair[0])
    if isinstance(target, BoxTarget):
        target(raw)  # range checks
        return target.candidate
    if isinstance(target, ClassTarget):
        target(raw)
        return int(raw.scores[0, :, target.label].argmax())
    raise ConfigurationError(
        f"Attention engines explain one box: the target must name a candidate (BoxTarget, MatchedBoxTarget, "
        f"MissedTarget) or a class (ClassTarget: its best candidate), got {type(target).__name__}."
    )


def _token(box: torch.Tensor, grid: tuple[int, int], size: Sequence[int]) -> int:
    """Index (row-major) of the grid cell under the centre of an ``xyxy`` pixel box."""
    h, w = grid
    cx, cy = float(box[0] + box[2]) / 2, float(box[1] + box[3]) / 2
    col = min(max(int(cx / size[1] * w), 0), w - 1)
    row = min(max(int(cy / size[0] * h), 0), h - 1)
    return row * w + col


# ------------------------------------------------------------------------------------------------------ engines
class _AttentionBase(Engine):
    """Gradient-free engine reading attention through hooks; subclasses compute per-head maps."""

    #: the module kinds the engine needs (see :func:`find_attention`)
    needs_kinds: ClassVar[tuple[str, ...]] = ("grid",)
    signed = False

    def __init__(
        self,
        adapter: DetectorAdapter,
        layer: str | None = None,
        seed: int = 0,
        max_memory_mb: float = 2048,
        module: str | None = None,
    ) -> None:
        if not isinstance(adapter, DetectorAdapter):
            raise ConfigurationError(f"`adapter` must be a DetectorAdapter, got {type(adapter).__name__}.")
        self._found = find_attention(adapter.model)
        self._requested = module
        self._layer_hint = layer
        super().__init__(adapter, layer=layer, seed=seed, max_memory_mb=max_memory_mb)

    def check_model(self) -> None:
        """Refuse a model without the attention this method reads (YOLOv8, DAMO-YOLO have none).

        Raises:
            UnsupportedModelError: naming the methods that do apply.
        """
        if not any(k in self.needs_kinds for k in self._found.values()):
            if not self._found:
                others = [m for m in available_methods() if m not in ATTENTION_METHODS]
                raise UnsupportedModelError(
                    f"`{self.name}`: this model ({type(self.adapter.model).__name__}) has no attention module; "
                    f"these methods apply: {', '.join(others)}."
                )
            usable = [m for m in ATTENTION_METHODS if m != self.name]
            raise UnsupportedModelError(
                f"`{self.name}` needs {self._needs_text()}, which this model does not have (its attention modules: "
                f"{list(self._found)}); use {' or '.join(usable[:2])} instead."
            )
        self._resolve_modules()

    def _needs_text(self) -> str:
        return "an attention module over feature-map positions"

    def _resolve(self, name: str, kinds: Sequence[str]) -> list[str]:
        """Attention modules of ``kinds`` at ``name`` or under it (an adapter alias, a path, or ``"decoder"``)."""
        path = self.adapter.layer_names().get(name, name)
        if path == "decoder":
            path = next((p.rpartition(".layers.")[0] for p, k in self._found.items() if k == "query"), path)
        return [p for p, k in self._found.items() if k in kinds and (p == path or p.startswith(path + "."))]

    def _module_choice(self, kinds: Sequence[str]) -> list[str]:
        if self._requested is not None:
            chosen = self._resolve(self._requested, kinds)
            if not chosen:
                raise ConfigurationError(
                    f"`module={self._requested!r}` is not (and does not contain) an attention module {self.name} "
                    f"reads. Choose one of: {[p for p, k in self._found.items() if k in kinds]}."
                )
            return chosen
        if self._layer_hint is not None:  # a callback passes its CAM layer to every engine: use it if it fits
            chosen = self._resolve(self._layer_hint, kinds)
            if chosen:
                return chosen
        return []

    def _resolve_modules(self) -> None:
        chosen = self._module_choice(("grid",)) or [p for p, k in self._found.items() if k == "grid"][-1:]
        self.modules = chosen[-1:]
        self.layer_name = self.modules[0]

    # ------------------------------------------------------------------------------------------------ running
    def _run(self, image: torch.Tensor, targets: Sequence[Target], mean_heads: bool) -> torch.Tensor:
        """:math:`(K, heads, H, W)` maps of ``K`` targets on one image (inside the explaining context); with
        ``mean_heads`` their mean over heads, :math:`(K, 1, H, W)`, averaged before upsampling (linear, so equal)."""
        with capture_attention(self.adapter.model, self.modules) as records, torch.no_grad():
            raw = self.adapter.raw(image)
        candidates = [_candidate(t, raw) for t in targets]
        return self._maps(records, raw, candidates, image.shape[-2:], mean_heads)

    def _maps(
        self, records: dict, raw: RawOutput, candidates: list[int], size: Sequence[int], mean_heads: bool
    ) -> torch.Tensor:
        raise NotImplementedError

    def _compute(self, image: torch.Tensor, targets: Sequence[Target], mean_heads: bool) -> torch.Tensor:
        check_shape(image, [1, 3, "H", "W"], "image")
        targets = list(targets)
        with explaining(self.adapter.model, seed=self.seed) as prepare:
            if not targets:
                return image.new_zeros(0, 1, *image.shape[-2:])
            return self._run(prepare(image), targets, mean_heads).detach()

    def heads(self, image: torch.Tensor, targets: Sequence[Target]) -> torch.Tensor:
        """Per-head maps of ``K`` targets of one image.

        Args:
            image: :math:`(1, 3, H, W)`.
            targets: ``K`` targets.

        Returns:
            :math:`(K, heads, H, W)`; :meth:`attribute_boxes` is their mean over heads.
        """
        return self._compute(image, targets, mean_heads=False)

    def attribute_boxes(self, image: torch.Tensor, targets: Sequence[Target]) -> torch.Tensor:
        """The head-averaged maps of ``K`` targets of one image from one forward pass: :math:`(K, 1, H, W)`."""
        return self._compute(image, targets, mean_heads=True)

    def _explain_maps(self, image: torch.Tensor, targets: list[Target]) -> tuple[torch.Tensor, dict]:
        """One forward for both: the per-head maps (``extras["heads"]``, drawn as a heads grid) and their mean."""
        if not targets:
            return self.attribute_boxes(image, targets), {}
        heads = self.heads(image, targets)
        return heads.mean(dim=1, keepdim=True), {"heads": heads}

    def attribute(self, images: torch.Tensor, targets: Target | Sequence[Target]) -> torch.Tensor:
        """Head-averaged maps :math:`(B, 1, H, W)`, one target for the batch or one per image."""
        check_shape(images, ["B", 3, "H", "W"], "images")
        per_image = [targets] * images.shape[0] if isinstance(targets, Target) else list(targets)
        if len(per_image) != images.shape[0]:
            raise ConfigurationError(f"Got {len(per_image)} targets for {images.shape[0]} images: give one per image.")
        return torch.cat([self.attribute_boxes(images[i : i + 1], [t]) for i, t in enumerate(per_image)])

    def _attribute(self, images: torch.Tensor, targets: Target | Sequence[Target]) -> torch.Tensor:
        raise NotImplementedError  # attribute() is overridden: no gradient, no input copy with requires_grad


@register
class AttentionEngine(_AttentionBase):
    """The attention of one module from the target box's centre token to every position of its feature map.

    The query token is the cell of the module's grid under the centre of the box the target resolves to (the
    tracked object's candidate). Maps are attention probabilities spread over each cell's pixels (a map sums to 1
    over the image for global attention; YOLO12's area attention covers only the query's area).

    Args:
        adapter: the model adapter.
        layer: a CAM layer a callback passes to every engine; used only when it is (or contains) an attention module.
        seed: unused (deterministic).
        max_memory_mb: unused.
        module: the attention module (dotted path, or an adapter alias such as ``"encoder.aifi"``, or a layer
            containing one, e.g. ``"model.10"``); default: the last one in the model (RT-DETR's AIFI, YOLO11's
            C2PSA, YOLOv10's PSA, YOLO12's last ``AAttn``).

    Raises:
        UnsupportedModelError: on a model without attention ("this model has no attention module; these methods
            apply: ...").
        ConfigurationError: for a ``module`` that is not an attention module.

    Example:
        >>> from xaiwatch.adapters import YOLOv8Adapter  # doctest: +SKIP
        >>> engine = AttentionEngine(YOLOv8Adapter(DetectionModel("yolo11n.yaml", nc=3)))  # doctest: +SKIP
        >>> engine.heads(image, [BoxTarget(40, 0)]).shape  # doctest: +SKIP
        torch.Size([1, 2, 64, 64])
    """

    name = "attention"

    def _maps(
        self, records: dict, raw: RawOutput, candidates: list[int], size: Sequence[int], mean_heads: bool
    ) -> torch.Tensor:
        rec: AttentionRecord = records[self.modules[0]][-1]
        h, w = rec.grid
        rows = torch.stack([rec.weights[0, :, _token(raw.boxes[0, c], rec.grid, size)] for c in candidates])
        rows = rows.mean(dim=1, keepdim=True) if mean_heads else rows
        return _to_image(rows.reshape(len(candidates), -1, h, w), size)


@register
class AttentionRolloutEngine(_AttentionBase):
    """Attention rollout (Abnar & Zuidema 2020) through a chain of layers, for the target box.

    Feature-map attention (YOLO11, YOLOv10, YOLO12, RT-DETR's AIFI): the chain is every attention module of one
    layer, applied in order on the same grid; the map is the rolled-out row of the box's centre token.

    RT-DETR's decoder (the default on RT-DETR): the box is its query ``i``. In decoder layer ``l`` every query ``q``
    reads the image through its deformable cross-attention ``D_l[q]`` (see :class:`DeformableAttentionEngine`), and
    the final query ``i`` depends on query ``q`` after layer ``l`` through the self-attentions of the later layers,
    rolled out: ``m_l = e_i Â_{L-1} ... Â_{l+1}``. The map is ``(1/L) Σ_l Σ_q m_l[q] D_l[q]``; with the
    self-attention weights of the identity it is the box's own deformable attention.

    Args:
        adapter: the model adapter.
        layer: a CAM layer a callback passes to every engine; used only when it contains attention modules.
        seed: unused.
        max_memory_mb: unused.
        module: the chain: a layer holding attention modules (``"model.8"``), ``"decoder"`` on RT-DETR, or one module.
        residual: the identity's share in each layer (0.5 in the paper).

    Raises:
        UnsupportedModelError: on a model without attention.
    """

    name = "attention_rollout"
    needs_kinds = ("grid", "query")

    def __init__(
        self,
        adapter: DetectorAdapter,
        layer: str | None = None,
        seed: int = 0,
        max_memory_mb: float = 2048,
        module: str | None = None,
        residual: float = 0.5,
    ) -> None:
        if not 0.0 <= float(residual) < 1.0:
            raise ConfigurationError(f"`residual` must be in [0, 1), got {residual}.")
        self.residual = float(residual)
        super().__init__(adapter, layer=layer, seed=seed, max_memory_mb=max_memory_mb, module=module)

    def _resolve_modules(self) -> None:
        chosen = self._module_choice(("grid", "query"))
        if not chosen:
            query = [p for p, k in self._found.items() if k == "query"]
            if query:
                chosen = query
            else:
                last = [p for p, k in self._found.items() if k == "grid"][-1]
                top = ".".join(last.split(".")[:2])  # the layer holding it, e.g. model.8
                chosen = [p for p, k in self._found.items() if k == "grid" and p.startswith(top + ".")]
        kinds = {self._found[p] for p in chosen}
        if len(kinds) > 1:
            raise ConfigurationError(f"`module` selects both decoder and feature-map attention: {chosen}.")
        self.decoder = kinds == {"query"}
        self.modules = chosen
        if self.decoder:  # each decoder layer's cross-attention too
            self.modules = chosen + [p for p, k in self._found.items() if k == "deformable"]
        self.layer_name = chosen[0].rpartition(".")[0] if len(chosen) > 1 else chosen[0]

    def _maps(
        self, records: dict, raw: RawOutput, candidates: list[int], size: Sequence[int], mean_heads: bool
    ) -> torch.Tensor:
        if self.decoder:
            return self._decoder_maps(records, candidates, size)
        recs = [records[p][-1] for p in self.modules]
        grids = {r.grid for r in recs}
        if len(grids) != 1:
            raise UnsupportedModelError(
                f"`attention_rollout`: the chain {self.modules} mixes grids {sorted(grids)}; choose modules of one "
                "layer with `module=`."
            )
        (grid,) = grids
        rolled = rollout([r.weights[0].mean(dim=0) for r in recs], self.residual)
        rows = torch.stack([rolled[_token(raw.boxes[0, c], grid, size)] for c in candidates])
        return _to_image(rows.reshape(len(candidates), 1, *grid), size)

    def _decoder_maps(self, records: dict, candidates: list[int], size: Sequence[int]) -> torch.Tensor:
        self_attn = [records[p][-1] for p in self.modules if self._found[p] == "query" and records[p]]
        cross = [records[p][-1] for p in self.modules if self._found[p] == "deformable" and records[p]]
        n_layers = min(len(self_attn), len(cross))  # eval stops at the decoder's eval_idx
        k, n_q = len(candidates), cross[0].weights.shape[1]
        m = torch.zeros(k, n_q, dtype=cross[0].weights.dtype, device=cross[0].weights.device)
        m[torch.arange(k, device=m.device), torch.tensor(candidates, device=m.device)] = 1.0
        total: list[torch.Tensor] | None = None  # per level, (K, 1, h, w) summed over layers
        for layer in reversed(range(n_layers)):
            rec = cross[layer]
            heads, lp = rec.weights.shape[2:]
            # every query's points at once: (K, heads, Q * LP), weighted by the box's dependence on the query
            weights = (m[:, :, None, None] * rec.weights[0][None]).permute(0, 2, 1, 3).reshape(k, heads, n_q * lp)
            locations = rec.locations[0].permute(1, 0, 2, 3).reshape(1, heads, n_q * lp, 2).expand(k, -1, -1, -1)
            levels = (torch.arange(lp, device=m.device) // rec.n_points).repeat(n_q)
            cells = [c.mean(dim=1, keepdim=True) for c in splat_points(locations, weights, rec.shapes, levels)]
            total = cells if total is None else [t + c for t, c in zip(total, cells)]
            a = self_attn[layer].weights[0].mean(dim=0)
            eye = torch.eye(a.shape[-1], dtype=a.dtype, device=a.device)
            mixed = (1 - self.residual) * a + self.residual * eye
            m = m @ (mixed / mixed.sum(dim=-1, keepdim=True))
        return sum(_to_image(t, size) for t in total) / n_layers


@register
class DeformableAttentionEngine(_AttentionBase):
    """Where RT-DETR's query of the target box looks: its deformable cross-attention in every decoder layer.

    Each ``MSDeformAttn`` point of the box's query (per head, level and point) has a location and an attention
    weight; the weight is spread on the four cells of its level that the bilinear sampling reads (exactly the
    coefficients of their values in the output, :func:`splat_points`), each cell's weight divided over its pixels,
    and the levels added. :meth:`attribute_boxes` averages heads and decoder layers (each head's weights sum to 1,
    so a map sums to about 1 over the image); :meth:`heads` keeps heads, :meth:`levels` keeps levels, and
    :meth:`points` returns the points to draw as dots.

    Args:
        adapter: an :class:`~xaiwatch.adapters.RTDETRAdapter` (a model with ``MSDeformAttn``).
        layer: unused (a callback passes its CAM layer to every engine).
        seed: unused.
        max_memory_mb: unused.
        module: the decoder layers to read (``"decoder"``, the default: all; or ``"model.27.decoder.layers.5"``).

    Raises:
        UnsupportedModelError: on a model without deformable attention.
    """

    name = "deformable_attention"
    needs_kinds = ("deformable",)

    def _needs_text(self) -> str:
        return "deformable attention (RT-DETR's MSDeformAttn)"

    def _resolve_modules(self) -> None:
        chosen = self._module_choice(("deformable",)) if self._requested is not None else []
        self.modules = chosen or [p for p, k in self._found.items() if k == "deformable"]
        self.layer_name = "decoder" if len(self.modules) > 1 else self.modules[0]

    def _cells(self, records: dict, candidates: list[int]) -> list[list[torch.Tensor]]:
        """Per decoder layer, per level: :math:`(K, heads, h, w)` cell weights of the candidates' queries."""
        out = []
        for p in self.modules:
            for rec in records[p]:
                idx = torch.tensor(candidates, device=rec.weights.device)
                levels = torch.arange(rec.weights.shape[-1], device=idx.device) // rec.n_points
                out.append(splat_points(rec.locations[0, idx], rec.weights[0, idx], rec.shapes, levels))
        return out

    def _maps(
        self, records: dict, raw: RawOutput, candidates: list[int], size: Sequence[int], mean_heads: bool
    ) -> torch.Tensor:
        layers = self._cells(records, candidates)
        per_level = [sum(lv[i] for lv in layers) for i in range(len(layers[0]))]  # summed over layers, (K, heads, ...)
        if mean_heads:
            per_level = [c.mean(dim=1, keepdim=True) for c in per_level]
        return sum(_to_image(c, size) for c in per_level) / len(layers)

    def levels(self, image: torch.Tensor, targets: Sequence[Target]) -> torch.Tensor:
        """Head- and layer-averaged maps per feature level: :math:`(K, L, H, W)` for ``K`` targets of one image."""
        check_shape(image, [1, 3, "H", "W"], "image")
        with explaining(self.adapter.model, seed=self.seed) as prepare:
            x = prepare(image)
            with capture_attention(self.adapter.model, self.modules) as records, torch.no_grad():
                raw = self.adapter.raw(x)
            layers = self._cells(records, [_candidate(t, raw) for t in targets])
            per_level = [
                _to_image(sum(lv[i] for lv in layers).mean(dim=1, keepdim=True), x.shape[-2:])[:, 0] / len(layers)
                for i in range(len(layers[0]))
            ]
        return torch.stack(per_level, dim=1)

    def points(self, image: torch.Tensor, targets: Sequence[Target]) -> list[DeformablePoints]:
        """The sampling points of each target's query, for drawing.

        Returns:
            one :class:`DeformablePoints` per target.
        """
        check_shape(image, [1, 3, "H", "W"], "image")
        with explaining(self.adapter.model, seed=self.seed) as prepare:
            x = prepare(image)
            with capture_attention(self.adapter.model, self.modules) as records, torch.no_grad():
                raw = self.adapter.raw(x)
            candidates = [_candidate(t, raw) for t in targets]
        recs = [r for p in self.modules for r in records[p]]
        h, w = image.shape[-2:]
        scale = torch.tensor([w, h], dtype=recs[0].locations.dtype, device=recs[0].locations.device)
        out = []
        for c in candidates:
            xy = torch.stack([r.locations[0, c] for r in recs]) * scale  # (layers, heads, LP, 2)
            weights = torch.stack([r.weights[0, c] for r in recs])
            levels = torch.arange(xy.shape[2], device=xy.device) // recs[0].n_points
            out.append(DeformablePoints(c, xy.cpu(), weights.cpu(), levels.cpu(), raw.boxes[0, c].cpu()))
        return out


@dataclass
class DeformablePoints:
    """The deformable sampling points of one query.

    Attributes:
        candidate: the query index.
        xy: :math:`(layers, heads, L P, 2)` points in input pixels.
        weights: :math:`(layers, heads, L P)` their attention (each head's sums to 1).
        levels: :math:`(L P,)` the feature level of each entry.
        box: the query's final box ``xyxy`` in pixels.
    """

    candidate: int
    xy: torch.Tensor
    weights: torch.Tensor
    levels: torch.Tensor
    box: torch.Tensor = field(default_factory=lambda: torch.zeros(4))
