"""The CAM family against pytorch-grad-cam's formulas and an SVD, and all boxes at once == one at a time."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from xaiwatch.adapters import YOLOv8Adapter
from xaiwatch.explain import get_engine
from xaiwatch.targets import BoxTarget, ClassTarget


@pytest.fixture
def adapter(tiny_net):
    torch.manual_seed(0)
    tiny_net.model[-1].cv3[0][-1].bias.data.normal_(0, 1)  # an untrained head barely reacts: give it some signal
    return YOLOv8Adapter(tiny_net)


def _activation_and_grad(adapter, images, target):
    layer = adapter.layer("neck.p3")
    adapter.model.eval()
    store = []
    h = layer.register_forward_hook(lambda m, i, o: store.append(o))
    try:
        x = images.clone().requires_grad_()
        score = adapter.score(x, target)
    finally:
        h.remove()
    (g,) = torch.autograd.grad(score.sum(), store[0])
    return store[0].detach(), g


@pytest.mark.parametrize(
    "method, peer", [("grad_cam_pp", "GradCAMPlusPlus"), ("hires_cam", "HiResCAM"), ("layer_cam", "LayerCAM")]
)
def test_gradient_cams_match_pytorch_grad_cam_formula(adapter, images, method, peer):
    import pytorch_grad_cam

    target = ClassTarget(1)
    maps = get_engine(method, adapter, layer="neck.p3").attribute(images, target)
    a, g = _activation_and_grad(adapter, images, target)
    cam_obj = getattr(pytorch_grad_cam, peer)(model=adapter.model, target_layers=[adapter.layer("neck.p3")])
    ref = cam_obj.get_cam_image(images, adapter.layer("neck.p3"), None, a.numpy(), g.numpy(), False)
    ref = torch.relu(torch.from_numpy(np.asarray(ref, dtype=np.float32))[:, None])
    ref = F.interpolate(ref, size=(64, 64), mode="bilinear", align_corners=False)
    assert ref.abs().sum() > 0
    assert torch.allclose(maps, ref, rtol=1e-4, atol=1e-6 * float(ref.abs().max()))


def test_eigen_cam_matches_svd(adapter, images):
    maps = get_engine("eigen_cam", adapter, layer="neck.p3").attribute(images, ClassTarget(0))
    a, _ = _activation_and_grad(adapter, images, ClassTarget(0))
    expected = []
    for act in a.numpy():
        m = act.reshape(act.shape[0], -1).T
        m = m - m.mean(axis=0)
        _, _, vt = np.linalg.svd(m, full_matrices=True)
        p = m @ vt[0]
        p = p if p[np.abs(p).argmax()] >= 0 else -p
        expected.append(np.maximum(p, 0).reshape(act.shape[1:]))
    ref = F.interpolate(torch.from_numpy(np.stack(expected))[:, None].float(), size=(64, 64), mode="bilinear")
    assert torch.allclose(maps, ref, atol=1e-4 * float(ref.max()))
    assert maps.sum() > 0


@pytest.mark.parametrize("method", ["grad_cam", "saliency", "grad_cam_pp", "hires_cam", "layer_cam", "eigen_cam"])
@pytest.mark.parametrize("k", [0, 1, 3])
def test_all_boxes_at_once_equal_one_at_a_time(adapter, images, method, k):
    engine = get_engine(method, adapter)
    targets = [BoxTarget(10 + 30 * i, i % 3) for i in range(k)]  # 84 candidates at 64 px
    image = images[:1]
    batched = engine.attribute_boxes(image, targets)
    assert batched.shape == (k, 1, 64, 64)
    if k:
        single = torch.cat([engine.attribute(image, t) for t in targets])
        assert torch.allclose(batched, single, rtol=1e-4, atol=1e-6 * float(single.abs().max() or 1))


def test_cam_on_a_layer_without_feature_map(adapter, images):
    from xaiwatch.core.errors import UnsupportedModelError

    with pytest.raises(UnsupportedModelError, match="feature map"):
        get_engine("hires_cam", adapter, layer="model.22").attribute(images, ClassTarget(0))


def _full_path(engine, monkeypatch):
    monkeypatch.setattr(engine.adapter, "level_head", lambda layer: None)


@pytest.mark.parametrize("method", ["grad_cam", "grad_cam_pp", "hires_cam", "layer_cam"])
@pytest.mark.parametrize("layer, candidates", [("neck.p3", [3, 20, 41, 63]), ("neck.p4", [64, 70, 79])])
def test_level_head_shortcut_equals_the_full_backward(adapter, images, monkeypatch, method, layer, candidates):
    engine = get_engine(method, adapter, layer=layer)
    targets = [BoxTarget(c, i % 3) for i, c in enumerate(candidates)]
    head = adapter.level_head(layer)
    calls = []
    monkeypatch.setattr(adapter, "level_head", lambda name: lambda f: calls.append(f.shape) or head(f))
    fast = engine.attribute_boxes(images[:1], targets)
    # the shortcut ran: the level's class branch alone, on each target's 5 x 5 window (cut at the border)
    assert sum(shape[0] for shape in calls) == len(targets)
    assert all(shape[-2] <= 5 and shape[-1] <= 5 for shape in calls)
    monkeypatch.undo()
    _full_path(engine, monkeypatch)
    full = engine.attribute_boxes(images[:1], targets)
    assert float(full.abs().amax()) > 0
    assert torch.allclose(fast, full, rtol=1e-4, atol=1e-6 * float(full.abs().amax()))


@pytest.mark.parametrize(
    "targets",
    [
        [BoxTarget(3, 0), BoxTarget(70, 1)],  # candidates of two levels
        [BoxTarget(70, 1)],  # a P4 candidate explained at P3: its score reaches P3 through the neck
        [ClassTarget(1)],  # a max over candidates, not one candidate's score
        [BoxTarget(5)],  # the best class: a max over classes
    ],
)
def test_level_head_shortcut_falls_back_when_it_does_not_apply(adapter, images, monkeypatch, targets):
    engine = get_engine("grad_cam", adapter, layer="neck.p3")
    got = engine.attribute_boxes(images[:1], targets)
    single = torch.cat([engine.attribute(images[:1], t) for t in targets])
    assert torch.allclose(got, single, rtol=1e-4, atol=1e-6 * float(single.abs().max() or 1))


def test_level_head_reproduces_the_raw_scores_and_matched_targets_record_their_match(adapter, images):
    from xaiwatch.targets import MatchedBoxTarget

    adapter.model.eval()
    with torch.no_grad():
        raw = adapter.raw(images)
        feats = []
        for name, (lo, hi) in {"neck.p3": (0, 64), "neck.p4": (64, 80), "neck.p5": (80, 84)}.items():
            h = adapter.layer(name).register_forward_hook(lambda m, i, o: feats.append(o))
            adapter.raw(images)
            h.remove()
            assert torch.allclose(adapter.level_head(name)(feats[-1]), raw.scores[:, lo:hi], rtol=1e-5, atol=1e-7)
    assert adapter.level_head("backbone.p3") is None and adapter.level_head("model.2") is None
    target = MatchedBoxTarget([8.0, 8.0, 40.0, 40.0], 2)
    engine = get_engine("grad_cam", adapter, layer="neck.p3")
    match = engine.explain_boxes(images[:1], [target]).matches
    assert len(match) == 1 and 0 <= match[0].candidate < 84
    assert torch.allclose(engine.attribute_boxes(images[:1], [target]), engine.attribute(images[:1], target))


def _reference_cam(adapter, image, target, layers, method):
    """One target's map from one full backward to each layer (hooks), each upsampled, divided by its maximum and
    max-merged when there are several layers: ultralytics' per-box rule, computed here independently."""
    adapter.model.eval()
    store = {}
    hooks = [adapter.layer(n).register_forward_hook(lambda m, i, o, n=n: store.__setitem__(n, o)) for n in layers]
    try:
        score = adapter.score(image.clone().requires_grad_(), target)
    finally:
        for h in hooks:
            h.remove()
    grads = torch.autograd.grad(score.sum(), [store[n] for n in layers], allow_unused=True)
    maps = []
    for n, g in zip(layers, grads):
        a = store[n].detach()
        g = torch.zeros_like(a) if g is None else g
        cam = (torch.relu(g) * a if method == "layer_cam" else g * a).sum(dim=1, keepdim=True).clamp(min=0)
        maps.append(F.interpolate(cam, size=image.shape[-2:], mode="bilinear", align_corners=False))
    if len(maps) == 1:
        return maps[0]
    return torch.stack([m / m.amax() if m.amax() > 0 else m for m in maps]).amax(dim=0)


@pytest.mark.parametrize("method", ["layer_cam", "hires_cam"])
@pytest.mark.parametrize(
    "layer, layers",
    [
        ("neck", ["neck.p3", "neck.p4", "neck.p5"]),  # a group: the three maps the head reads
        ("neck.p5,neck.p3", ["neck.p5", "neck.p3"]),
        ("neck.p3", ["neck.p3"]),
        ("model.12", ["model.12"]),  # a layer no level reads directly: the chain goes on from the level's map
    ],
)
def test_chained_level_gradients_equal_one_full_backward_per_box(adapter, images, method, layer, layers):
    # P3 cells 0..63 of the 8 x 8 map at 64 px: corners and border cells (windows cut at the border), an inner
    # one; P4 64..79; P5 80..83
    targets = [BoxTarget(c, i % 3) for i, c in enumerate([0, 7, 27, 56, 63, 64, 70, 79, 81, 83])]
    engine = get_engine(method, adapter, layer=layer)
    assert engine.layer_group == layers
    got = engine.attribute_boxes(images[:1], targets)
    ref = torch.cat([_reference_cam(adapter, images[:1], t, layers, method) for t in targets])
    assert float(ref.amax(dim=(1, 2, 3)).min()) > 0  # every box has a map
    for g, r in zip(got, ref):
        assert torch.allclose(g, r, rtol=1e-4, atol=1e-5 * float(r.abs().max()))
    if len(layers) > 1:
        assert torch.allclose(got.amax(dim=(1, 2, 3)), torch.ones(len(targets)))


def test_a_group_of_layers_and_the_methods_that_read_one(adapter, images):
    from xaiwatch.core.errors import ConfigurationError

    assert adapter.layer_group("neck") == ["neck.p3", "neck.p4", "neck.p5"]
    assert adapter.layer_group("backbone.p4, neck.p3") == ["backbone.p4", "neck.p3"]
    assert adapter.level_inputs() == ["neck.p3", "neck.p4", "neck.p5"]
    assert adapter.level_head_radius("neck.p3") == 2 and adapter.level_head_radius("backbone.p3") is None
    with pytest.raises(ConfigurationError, match="reads one layer"):
        get_engine("feature_maps", adapter, layer="neck")
    with pytest.raises(ConfigurationError, match="Unknown layer 'neck.p9'"):
        get_engine("layer_cam", adapter, layer="neck.p3,neck.p9")
    # Grad-CAM over a group: the same formula per layer, merged, in attribute() and attribute_boxes()
    engine = get_engine("grad_cam", adapter, layer="neck")
    targets = [BoxTarget(5, 0), BoxTarget(75, 1)]
    assert torch.allclose(
        engine.attribute_boxes(images[:1], targets),
        torch.cat([engine.attribute(images[:1], t) for t in targets]),
        rtol=1e-4,
        atol=1e-6,
    )
