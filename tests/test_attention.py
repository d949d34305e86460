"""Attention engines: maps equal attention recomputed by hand from each module's q, k, v (or offsets and weights)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from conftest import tiny_rtdetr_cfg
from xaiwatch.adapters import RTDETRAdapter, YOLOv8Adapter
from xaiwatch.core.errors import ConfigurationError, UnsupportedModelError
from xaiwatch.explain import get_engine
from xaiwatch.explain.attention import capture_attention, find_attention, rollout, splat_points
from xaiwatch.targets import BoxTarget, ClassTarget, MatchedBoxTarget

SIZE = 128


def _yolo(cfg: str):
    from xaiwatch.models.yolov8 import build_detection_model

    torch.manual_seed(0)
    return build_detection_model(cfg, 3).eval()


@pytest.fixture(scope="module")
def yolo11():
    return YOLOv8Adapter(_yolo("yolo11n.yaml"))


@pytest.fixture(scope="module")
def yolo12():
    return YOLOv8Adapter(_yolo("yolo12n.yaml"))


@pytest.fixture(scope="module")
def rtdetr():
    from ultralytics.nn.tasks import RTDETRDetectionModel

    torch.manual_seed(0)
    return RTDETRAdapter(RTDETRDetectionModel(tiny_rtdetr_cfg(), nc=3, verbose=False).eval())


@pytest.fixture(scope="module")
def image():
    torch.manual_seed(5)
    return torch.rand(1, 3, SIZE, SIZE)


def _inputs(model, path, image):
    """The input of the module at ``path`` during one forward."""
    seen = []
    h = model.get_submodule(path).register_forward_pre_hook(lambda _m, a: seen.append(a))
    try:
        with torch.no_grad():
            model(image)
    finally:
        h.remove()
    return seen[-1]


def _token(box, grid):
    h, w = grid
    cx, cy = float(box[0] + box[2]) / 2, float(box[1] + box[3]) / 2
    return min(int(cy / SIZE * h), h - 1) * w + min(int(cx / SIZE * w), w - 1)


def _upsample(rows, grid):
    """Token weights (K, heads, h*w) to the image as the engines do: a density over each cell's pixels."""
    h, w = grid
    return F.interpolate(rows.reshape(*rows.shape[:2], h, w) / ((SIZE / h) * (SIZE / w)), size=(SIZE, SIZE),
                         mode="bilinear", align_corners=False)  # fmt: skip


def _raw_boxes(adapter, image):
    with torch.no_grad():
        return adapter.raw(image).boxes[0]


def test_psa_attention_equals_hand_computation(yolo11, image):
    """YOLO11's C2PSA Attention: q, k, v from its qkv conv, softmax(q^T k * scale); reproduces the module output."""
    path = "model.10.m.0.attn"
    mod = yolo11.model.get_submodule(path)
    (x,) = _inputs(yolo11.model, path, image)
    with torch.no_grad():
        b, c, h, w = x.shape
        q, k, v = (
            mod.qkv(x)
            .view(b, mod.num_heads, 2 * mod.key_dim + mod.head_dim, h * w)
            .split([mod.key_dim, mod.key_dim, mod.head_dim], dim=2)
        )
        attn = torch.softmax(torch.einsum("bhdi,bhdj->bhij", q, k) / math.sqrt(mod.key_dim), dim=-1)
        out = mod.proj((v @ attn.transpose(-2, -1)).view(b, c, h, w) + mod.pe(v.reshape(b, c, h, w)))
        assert torch.allclose(out, mod(x), atol=1e-5)  # this matrix is the one the module uses
    engine = get_engine("attention", yolo11)
    assert engine.modules == [path]
    cands = [3, 40, 70]
    maps = engine.heads(image, [BoxTarget(c, 0) for c in cands])
    boxes = _raw_boxes(yolo11, image)
    rows = torch.stack([attn[0, :, _token(boxes[c], (h, w))] for c in cands])
    assert maps.shape == (3, mod.num_heads, SIZE, SIZE) and mod.num_heads == 2
    assert torch.allclose(maps, _upsample(rows, (h, w)), atol=1e-7)
    assert torch.allclose(maps.sum(dim=(2, 3)), torch.ones(3, 2), atol=1e-4)  # probabilities over the image
    assert torch.allclose(engine.attribute_boxes(image, [BoxTarget(40, 0)]), maps[1:2].mean(1, keepdim=True))


def test_area_attention_equals_hand_computation(yolo12, image):
    """YOLO12's AAttn with area 4: attention only inside the query's horizontal strip, softmax(q^T k / sqrt(d))."""
    path = "model.6.m.0.0.attn"
    mod = yolo12.model.get_submodule(path)
    assert mod.area == 4
    (x,) = _inputs(yolo12.model, path, image)
    with torch.no_grad():
        b, _, h, w = x.shape
        n, a, nh, hd = h * w, mod.area, mod.num_heads, mod.head_dim
        qkv = mod.qkv(x).flatten(2).transpose(1, 2)  # (B, N, 3 * heads * hd)
        full = torch.zeros(nh, n, n)
        s = n // a
        for j in range(a):
            t = qkv[0, j * s : (j + 1) * s].view(s, nh, 3 * hd)
            q, k = t[..., :hd], t[..., hd : 2 * hd]
            full[:, j * s : (j + 1) * s, j * s : (j + 1) * s] = torch.softmax(
                torch.einsum("ihd,jhd->hij", q, k) / math.sqrt(hd), dim=-1
            )
    engine = get_engine("attention", yolo12, module=path)
    boxes = _raw_boxes(yolo12, image)
    cands = [0, 100, 250]
    maps = engine.heads(image, [BoxTarget(c, 1) for c in cands])
    rows = torch.stack([full[:, _token(boxes[c], (h, w))] for c in cands])
    assert torch.allclose(maps, _upsample(rows, (h, w)), atol=1e-7)
    strip = torch.zeros(h, w, dtype=torch.bool)  # the query's area is a quarter of the rows
    tok = _token(boxes[0], (h, w))
    strip.view(-1)[(tok // s) * s : (tok // s + 1) * s] = True
    assert float(rows[0][:, ~strip.view(-1)].abs().sum()) == 0.0


def test_aifi_attention_equals_hand_computation(rtdetr, image):
    """RT-DETR's AIFI nn.MultiheadAttention per head, from its in_proj weights and the 2D sin-cos embedding."""
    model = rtdetr.model
    aifi = model.get_submodule("model.10")
    (x,) = _inputs(model, "model.10", image)
    with torch.no_grad():
        b, c, h, w = x.shape
        src = x.flatten(2).permute(0, 2, 1)
        pos = aifi.build_2d_sincos_position_embedding(w, h, c, like=x)
        ma = aifi.ma
        wq, wk, _ = ma.in_proj_weight.chunk(3)
        bq, bk, _ = ma.in_proj_bias.chunk(3)
        nh, hd = ma.num_heads, c // ma.num_heads
        q = ((src + pos) @ wq.T + bq).view(b, -1, nh, hd).transpose(1, 2)
        k = ((src + pos) @ wk.T + bk).view(b, -1, nh, hd).transpose(1, 2)
        attn = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(hd), dim=-1)
    engine = get_engine("attention", rtdetr)  # default: the AIFI layer
    assert engine.modules == ["model.10.ma"]
    boxes = _raw_boxes(rtdetr, image)
    maps = engine.heads(image, [BoxTarget(7, 0), BoxTarget(200, 2)])
    rows = torch.stack([attn[0, :, _token(boxes[i], (h, w))] for i in (7, 200)])
    assert torch.allclose(maps, _upsample(rows, (h, w)), atol=1e-6)
    assert get_engine("attention", rtdetr, module="encoder.aifi").modules == ["model.10.ma"]


def _deformable_by_hand(model, layer, image):
    """Query, reference boxes and value of one MSDeformAttn call, and its output before output_proj."""
    mod = model.get_submodule(layer)
    seen = {}
    hooks = [
        mod.register_forward_pre_hook(lambda _m, a: seen.__setitem__("args", a)),
        mod.output_proj.register_forward_pre_hook(lambda _m, a: seen.__setitem__("sampled", a[0])),
    ]
    try:
        with torch.no_grad():
            model(image)
    finally:
        for hk in hooks:
            hk.remove()
    return mod, seen


def test_deformable_attention_equals_hand_computation(rtdetr, image):
    """Each cell's weight from the hand-computed sampling points, times the projected values, is the module's output."""
    layer = "model.27.decoder.layers.1.cross_attn"
    mod, seen = _deformable_by_hand(rtdetr.model, layer, image)
    query, ref, value, shapes = seen["args"][:4]
    nh, nl, p = mod.n_heads, mod.n_levels, mod.n_points
    with torch.no_grad():
        off = (query @ mod.sampling_offsets.weight.T + mod.sampling_offsets.bias).view(1, -1, nh, nl * p, 2)
        wts = (query @ mod.attention_weights.weight.T + mod.attention_weights.bias).view(1, -1, nh, nl * p)
        wts = torch.softmax(wts, dim=-1)
        loc = ref[:, :, None, :, :2] + off / p * ref[:, :, None, :, 2:] * 0.5
        vproj = mod.value_proj(value).view(1, value.shape[1], nh, -1)  # (1, tokens, heads, d)
    engine = get_engine("deformable_attention", rtdetr, module="model.27.decoder.layers.1")
    assert engine.modules == [layer]
    q = 11
    levels = torch.arange(nl * p) // p
    cells = splat_points(loc[0, q], wts[0, q], shapes, levels)  # per level (heads, h, w)
    tokens = torch.cat([c.flatten(1) for c in cells], dim=1)  # (heads, all tokens)
    rebuilt = torch.einsum("ht,thd->hd", tokens, vproj[0]).reshape(-1)
    assert torch.allclose(rebuilt, seen["sampled"][0, q], atol=1e-5)  # exactly what grid_sample read
    # the engine: the same cells on the image, per head
    maps = engine.heads(image, [BoxTarget(q, 0)])
    expected = sum(
        F.interpolate(
            c[None] / ((SIZE / c.shape[-2]) * (SIZE / c.shape[-1])),
            size=(SIZE, SIZE),
            mode="bilinear",
            align_corners=False,
        )[0]  # fmt: skip
        for c in cells
    )
    assert torch.allclose(maps[0], expected, atol=1e-7)
    pts = engine.points(image, [BoxTarget(q, 0)])[0]
    assert pts.xy.shape == (1, nh, nl * p, 2) and torch.allclose(pts.xy[0], loc[0, q] * SIZE, atol=1e-4)
    assert torch.allclose(pts.weights.sum(-1), torch.ones(1, nh))


def test_deformable_all_layers_levels_and_points(rtdetr, image):
    engine = get_engine("deformable_attention", rtdetr)
    assert len(engine.modules) == 2  # both decoder layers of the tiny model
    t = [BoxTarget(4, 0), BoxTarget(30, 1)]
    maps = engine.attribute_boxes(image, t)
    per_level = engine.levels(image, t)
    assert per_level.shape == (2, 3, SIZE, SIZE)
    assert torch.allclose(per_level.sum(dim=1, keepdim=True), maps, atol=1e-6)
    single = [get_engine("deformable_attention", rtdetr, module=f"model.27.decoder.layers.{i}") for i in (0, 1)]
    assert torch.allclose(maps, sum(e.attribute_boxes(image, t) for e in single) / 2, atol=1e-7)
    assert not torch.allclose(maps[0], maps[1])  # per box
    assert len(engine.points(image, t)) == 2


def test_rollout_function_and_yolo12_chain(yolo12, image):
    a1 = torch.softmax(torch.randn(5, 5), -1)
    a2 = torch.softmax(torch.randn(5, 5), -1)
    eye = torch.eye(5)
    assert torch.allclose(rollout([a1, a2]), (0.5 * a2 + 0.5 * eye) @ (0.5 * a1 + 0.5 * eye))
    assert torch.allclose(rollout([a1, a2]).sum(-1), torch.ones(5))
    engine = get_engine("attention_rollout", yolo12)
    assert engine.modules == [f"model.8.m.{i}.{j}.attn" for i in (0, 1) for j in (0, 1)]
    with capture_attention(yolo12.model, engine.modules) as rec, torch.no_grad():
        yolo12.model(image)
    mats = [rec[p][-1].weights[0].mean(0) for p in engine.modules]
    grid = rec[engine.modules[0]][-1].grid
    boxes = _raw_boxes(yolo12, image)
    maps = engine.attribute_boxes(image, [BoxTarget(9, 0)])
    expected = _upsample(rollout(mats)[_token(boxes[9], grid)][None, None], grid)
    assert torch.allclose(maps, expected, atol=1e-7)


def test_decoder_rollout_equals_hand_computation(rtdetr, image):
    """map = (D_1[i] + sum_q (e_i Â_1)[q] D_0[q]) / 2 with Â = 0.5 (head-mean self-attention) + 0.5 I."""
    engine = get_engine("attention_rollout", rtdetr)
    assert engine.decoder
    paths = list(find_attention(rtdetr.model))
    with capture_attention(rtdetr.model, [p for p in paths if "decoder" in p]) as rec, torch.no_grad():
        rtdetr.model(image)
    sa = [rec[f"model.27.decoder.layers.{i}.self_attn"][-1].weights[0].mean(0) for i in (0, 1)]
    ca = [rec[f"model.27.decoder.layers.{i}.cross_attn"][-1] for i in (0, 1)]
    i = 17
    a1 = 0.5 * sa[1] + 0.5 * torch.eye(sa[1].shape[0])
    m0 = a1[i] / a1[i].sum()

    def d(layer, weights):  # the head-averaged image map of the queries' cross-attention, weighted per query
        r = ca[layer]
        levels = torch.arange(r.weights.shape[-1]) // r.n_points
        cells = splat_points(r.locations[0], r.weights[0], r.shapes, levels)  # per level (Q, heads, h, w)
        return sum(
            _upsample((weights[:, None, None, None] * c).sum(0).flatten(1)[None], c.shape[-2:])[0] for c in cells
        ).mean(0)

    one_hot = torch.zeros(m0.shape[0])
    one_hot[i] = 1.0
    expected = d(1, one_hot) + d(0, m0)
    maps = engine.attribute_boxes(image, [BoxTarget(i, 0)])
    assert torch.allclose(maps[0, 0], expected / 2, atol=1e-6)


def test_targets_resolve_to_candidates(rtdetr, image):
    engine = get_engine("deformable_attention", rtdetr)
    with torch.no_grad():
        raw = rtdetr.raw(image)
    best = int(raw.scores[0, :, 2].argmax())
    box = raw.boxes[0, best].tolist()
    a = engine.attribute_boxes(image, [ClassTarget(2), MatchedBoxTarget(box, 2, iou_threshold=0.99), BoxTarget(best)])
    assert torch.allclose(a[0], a[1]) and torch.allclose(a[0], a[2])
    batch = engine.attribute(torch.cat([image, image]), BoxTarget(best))
    assert batch.shape == (2, 1, SIZE, SIZE) and torch.allclose(batch[0], a[0])


def test_models_without_attention_are_refused(tiny_net, tiny_damo_net, yolo11):
    for adapter in (YOLOv8Adapter(tiny_net), _damo_adapter(tiny_damo_net)):
        for method in ("attention", "attention_rollout", "deformable_attention"):
            with pytest.raises(
                UnsupportedModelError, match=r"has no attention module; these methods apply: .*saliency"
            ):
                get_engine(method, adapter)
    with pytest.raises(UnsupportedModelError, match="deformable attention.*MSDeformAttn.*use attention"):
        get_engine("deformable_attention", yolo11)
    with pytest.raises(ConfigurationError, match="model.10.m.0.attn"):
        get_engine("attention", yolo11, module="model.3")
    # a CAM layer passed by a callback is ignored when it holds no attention
    assert get_engine("attention", yolo11, layer="neck.p3").modules == ["model.10.m.0.attn"]


def _damo_adapter(net):
    from xaiwatch.adapters import DamoYoloAdapter

    return DamoYoloAdapter(net)


def test_no_side_effects(rtdetr, image):
    model = rtdetr.model.train()
    flags = [m.training for m in model.modules()]
    engines = [get_engine(m, rtdetr) for m in ("attention", "attention_rollout", "deformable_attention")]
    with torch.inference_mode():
        for e in engines:
            e.attribute_boxes(image, [BoxTarget(1, 0)])
    assert [m.training for m in model.modules()] == flags
    hooks = ("_forward_hooks", "_forward_pre_hooks", "_forward_hooks_with_kwargs", "_forward_pre_hooks_with_kwargs")
    assert not any(getattr(m, h) for m in model.modules() for h in hooks)
    assert all(p.grad is None for p in model.parameters())
    model.eval()
    with pytest.raises(ConfigurationError, match="out of range"):  # hooks gone after an error too
        engines[2].attribute_boxes(image, [BoxTarget(1, 7)])
    assert not any(getattr(m, h) for m in model.modules() for h in hooks)
