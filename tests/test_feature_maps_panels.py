"""Feature maps and confidence heat maps against hand tensors / a hand forward hook; panels' pictures and margins."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from xaiwatch.adapters import YOLOv8Adapter
from xaiwatch.core.errors import ConfigurationError, ShapeError
from xaiwatch.core.types import Detections
from xaiwatch.explain import get_engine
from xaiwatch.explain.feature_maps import ConfidenceHeatmapEngine, FeatureMapsEngine, confidence_heatmap, top_channels
from xaiwatch.render.dispatch import draws_heat_map, per_image
from xaiwatch.render.panels import box_decision_panel, crop_box, decision_margin, feature_grid
from xaiwatch.targets import BoxTarget, ClassTarget, MatchedBoxTarget


# ---------------------------------------------------------------------------------------------- top channels
def test_top_channels_by_hand():
    act = torch.zeros(2, 4, 2, 2)
    act[0, 0] = 1.0  # energy 1
    act[0, 1] = torch.tensor([[3.0, 0.0], [0.0, 0.0]])  # energy 9/4
    act[0, 2] = -2.0  # energy 4 (sign does not matter)
    act[0, 3] = 0.5  # energy 1/4
    act[1] = act[0].flip(0)  # image 1: channel c of image 0 is channel 3 - c
    values, indices = top_channels(act, 2)
    assert indices.tolist() == [[2, 1], [1, 2]]
    assert torch.equal(values[0], act[0, [2, 1]]) and torch.equal(values[1], act[1, [1, 2]])
    values, indices = top_channels(act, 10)  # at most C
    assert values.shape == (2, 4, 2, 2) and indices[0].tolist() == [2, 1, 0, 3]
    with pytest.raises(ConfigurationError, match="`k` must be an integer >= 1, got 0"):
        top_channels(act, 0)
    with pytest.raises(ShapeError, match="activation"):
        top_channels(act[0], 2)


def _hooked_activation(net, layer_index, images):
    seen = []
    handle = net.model[layer_index].register_forward_hook(lambda _m, _i, o: seen.append(o.detach()))
    net.eval()
    with torch.no_grad():
        net(images)
    handle.remove()
    return seen[0]


def test_feature_maps_engine_matches_hand_hook(tiny_net, images):
    adapter = YOLOv8Adapter(tiny_net)
    engine = get_engine("feature_maps", adapter, layer="neck.p3", top_k=4)
    assert isinstance(engine, FeatureMapsEngine) and per_image("feature_maps") and not draws_heat_map("feature_maps")
    found = engine.explain_boxes(images[:1], [ClassTarget(0)])
    assert [t.shape for t in found.extras["channels"]] == [t.shape for t in engine.channels(images[:1])]
    maps = engine.attribute(images, ClassTarget(0))
    values, indices = engine.channels(images, k=3)
    act = _hooked_activation(tiny_net, 15, images)  # neck.p3 is model.15 on YOLOv8
    energy = (act**2).mean(dim=(2, 3)).numpy()
    hand_idx = np.argsort(-energy, axis=1, kind="stable")
    assert indices.tolist() == hand_idx[:, :3].tolist()
    assert torch.equal(values, torch.stack([act[b, hand_idx[b, :3].tolist()] for b in range(2)]))
    hand_mean = torch.stack([act[b, hand_idx[b, :4].tolist()].mean(dim=0) for b in range(2)])[:, None]
    ref = F.interpolate(hand_mean, size=(64, 64), mode="bilinear", align_corners=False)
    assert maps.shape == (2, 1, 64, 64) and torch.allclose(maps, ref, atol=1e-6)
    assert engine.channels(images)[0].shape == (2, 4, *act.shape[-2:])  # top_k by default


def test_feature_maps_no_side_effects_and_bad_options(tiny_net, images):
    adapter = YOLOv8Adapter(tiny_net)
    tiny_net.train()
    state = {k: v.clone() for k, v in tiny_net.state_dict().items()}
    with torch.inference_mode():
        engine = get_engine("feature_maps", adapter)
        maps = engine.attribute(images * 1, MatchedBoxTarget([8.0, 8.0, 40.0, 40.0], 1))
        values, _ = engine.channels(images * 1)
    assert maps.shape == (2, 1, 64, 64) and values.shape[:2] == (2, 16) and not maps.is_inference()
    assert all(m.training for m in tiny_net.modules())
    assert all(torch.equal(v, tiny_net.state_dict()[k]) for k, v in state.items())
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in tiny_net.modules())
    with pytest.raises(ConfigurationError, match="`top_k` must be an integer >= 1, got 0"):
        get_engine("feature_maps", adapter, top_k=0)
    head = f"model.{len(tiny_net.model) - 1}"  # the Detect head returns a tuple, not (B, C, h, w)
    with pytest.raises(ConfigurationError, match="convolutional layer with a \\(B, C, h, w\\) output"):
        get_engine("feature_maps", adapter, layer=head).attribute(images, ClassTarget(0))
    assert not any(m._forward_hooks for m in tiny_net.modules())


# --------------------------------------------------------------------------------------- confidence heat map
def _dets(boxes, scores, labels):
    n = len(scores)
    return Detections(torch.tensor(boxes).reshape(n, 4), torch.tensor(scores), torch.tensor(labels), torch.arange(n))


def test_confidence_heatmap_by_hand():
    dets = [
        _dets([[0.0, 0.0, 4.0, 4.0], [2.0, 2.0, 6.0, 6.0], [1.2, 0.6, 3.4, 2.5]], [0.5, 0.25, 0.9], [0, 0, 2]),
        Detections.empty(),
    ]
    heat = confidence_heatmap(dets, 3, (8, 10))
    expected = np.zeros((2, 3, 8, 10), dtype=np.float32)
    expected[0, 0, 0:4, 0:4] += 0.5
    expected[0, 0, 2:6, 2:6] += 0.25
    expected[0, 2, 1:3, 1:3] += 0.9  # pixel centres 1.5, 2.5 lie in [1.2, 3.4] and [0.6, 2.5]
    assert heat.shape == (2, 3, 8, 10) and np.allclose(heat.numpy(), expected)
    with pytest.raises(ConfigurationError, match=r"labels must be in \[0, 3\)"):
        confidence_heatmap([_dets([[0.0, 0.0, 1.0, 1.0]], [0.3], [3])], 3, (4, 4))


def test_confidence_heatmap_engine_follows_target_class(tiny_net, images):
    adapter = YOLOv8Adapter(tiny_net, conf=0.001)
    engine = get_engine("confidence_heatmap", adapter)
    assert isinstance(engine, ConfidenceHeatmapEngine)
    heat = confidence_heatmap(adapter.detect(images), 3, (64, 64))
    assert float(heat.sum()) > 0
    maps = engine.attribute(images, [ClassTarget(1), BoxTarget(3)])
    assert maps.shape == (2, 1, 64, 64)
    assert torch.allclose(maps[0, 0], heat[0, 1]) and torch.allclose(maps[1, 0], heat[1].sum(dim=0))
    matched = engine.attribute(images, MatchedBoxTarget([8.0, 8.0, 40.0, 40.0], 2))
    assert torch.allclose(matched[:, 0], heat[:, 2])
    with pytest.raises(ConfigurationError, match="Target label 5 is out of range"):
        engine.attribute(images, BoxTarget(0, 5))


# ----------------------------------------------------------------------------------------------------- panels
def test_decision_margin_by_hand():
    top, runner_up, margin = decision_margin(torch.tensor([0.1, 0.7, 0.4]))
    assert (top, runner_up) == (1, 2) and margin == pytest.approx(0.3)
    assert decision_margin([0.5, 0.5, 0.1]) == (0, 1, 0.0)
    assert decision_margin([0.3]) == (0, None, pytest.approx(0.3))
    with pytest.raises(ConfigurationError, match="empty"):
        decision_margin([])


def test_crop_box_clips():
    assert crop_box([1.5, 2.2, 10.1, 12.0], (20, 30)) == (1, 2, 11, 12)
    assert crop_box([-5.0, -5.0, 100.0, 100.0], (20, 30)) == (0, 0, 30, 20)
    assert crop_box([40.0, 3.0, 50.0, 3.0], (20, 30)) == (29, 3, 30, 4)


def _not_blank(pic):
    return pic.dtype == np.uint8 and pic.ndim == 3 and pic.shape[2] == 3 and pic.std() > 10 and (pic < 200).any()


def test_feature_grid_picture():
    values = torch.rand(5, 8, 8)
    pic = feature_grid(values, torch.tensor([7, 3, 12, 0, 9]), "neck.p3")
    assert _not_blank(pic) and pic.shape[0] > 150 and pic.shape[1] > 200
    with pytest.raises(ConfigurationError, match="one entry per map"):
        feature_grid(values, [1, 2], "x")


def test_box_decision_panel_picture():
    image = torch.rand(3, 64, 64)
    saliency = torch.zeros(1, 64, 64)
    saliency[0, 20:30, 20:30] = 1.0
    pic = box_decision_panel(image, saliency, [10.0, 12.0, 40.0, 50.0], [0.1, 0.7, 0.4], ["a", "b", "c"], "box 0")
    assert _not_blank(pic) and pic.shape == (480, 1280, 3)  # 2x the first version (readable text)
    red = (pic[..., 0] > 230) & (pic[..., 1] < 80) & (pic[..., 2] < 80)  # the highlighted bar (#ff3b30)
    assert red.sum() > 50
    with pytest.raises(ConfigurationError, match="empty"):
        box_decision_panel(image, saliency, [0, 0, 5, 5], [], None)


def test_rendering_panels_does_not_load_pyplot():
    code = (
        "import sys, torch\n"
        "from xaiwatch.render.panels import box_decision_panel, feature_grid\n"
        "a = feature_grid(torch.rand(4, 6, 6), [0, 1, 2, 3], 't')\n"
        "b = box_decision_panel(torch.rand(3, 32, 32), torch.rand(1, 32, 32), [2, 2, 20, 20], [0.2, 0.5], None, 't')\n"
        "assert a.dtype.name == b.dtype.name == 'uint8'\n"
        "assert 'matplotlib.pyplot' not in sys.modules, 'pyplot loaded'\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
