"""Engines against references: hand autograd for saliency, Captum called directly for Grad-CAM."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from xaiwatch.adapters import YOLOv8Adapter
from xaiwatch.core.errors import ConfigurationError
from xaiwatch.explain import available_methods, get_engine
from xaiwatch.targets import BoxTarget, ClassTarget


def test_saliency_matches_hand_autograd(tiny_net, images):
    adapter = YOLOv8Adapter(tiny_net)
    target = BoxTarget(30, 1)
    maps = get_engine("saliency", adapter).attribute(images, target)
    tiny_net.eval()
    x = images.clone().requires_grad_()
    y, _ = tiny_net(x)
    (g,) = torch.autograd.grad(y[:, 5, 30].sum(), x)
    assert maps.shape == (2, 1, 64, 64)
    assert torch.allclose(maps, g.abs().amax(dim=1, keepdim=True)) and maps.sum() > 0


def test_grad_cam_matches_captum(tiny_net, images):
    from captum.attr import LayerGradCam

    adapter = YOLOv8Adapter(tiny_net)
    target = ClassTarget(0)
    maps = get_engine("grad_cam", adapter, layer="neck.p3").attribute(images, target)
    tiny_net.eval()
    ref = LayerGradCam(lambda x: adapter.score(x, target), tiny_net.model[15]).attribute(
        images.clone().requires_grad_(), relu_attributions=True
    )
    ref = F.interpolate(ref, size=(64, 64), mode="bilinear", align_corners=False)
    assert maps.shape == (2, 1, 64, 64) and torch.allclose(maps, ref.detach(), atol=1e-7)


@pytest.mark.parametrize("method", ["saliency", "grad_cam"])
def test_batched_per_image_targets_equal_one_at_a_time(tiny_net, images, method):
    adapter = YOLOv8Adapter(tiny_net)
    engine = get_engine(method, adapter)
    targets = [BoxTarget(5, 0), BoxTarget(40, 2)]
    batched = engine.attribute(images, targets)
    single = torch.cat([engine.attribute(images[i : i + 1], targets[i]) for i in range(2)])
    assert torch.allclose(batched, single, atol=1e-6)


@pytest.mark.parametrize("method", ["saliency", "grad_cam"])
def test_no_side_effects_in_inference_mode(tiny_net, images, method):
    adapter = YOLOv8Adapter(tiny_net)
    tiny_net.train()
    state = {k: v.clone() for k, v in tiny_net.state_dict().items()}
    with torch.inference_mode():
        maps = get_engine(method, adapter).attribute(images * 1, ClassTarget(1))
    assert maps.shape == (2, 1, 64, 64) and not maps.is_inference()
    assert all(m.training for m in tiny_net.modules())
    assert all(torch.equal(v, tiny_net.state_dict()[k]) for k, v in state.items())
    assert all(p.grad is None for p in tiny_net.parameters())
    assert not any(m._forward_hooks or m._backward_hooks or m._forward_pre_hooks for m in tiny_net.modules())


def test_unknown_method_and_layer(tiny_net):
    adapter = YOLOv8Adapter(tiny_net)
    assert {"saliency", "grad_cam"} <= set(available_methods())
    with pytest.raises(ConfigurationError, match="Valid methods: .*grad_cam.*saliency"):
        get_engine("guided_magic", adapter)
    with pytest.raises(ConfigurationError, match="Unknown layer 'nope'"):
        get_engine("grad_cam", adapter, layer="nope")


@pytest.mark.parametrize("method", ["saliency", "layer_cam"])
def test_explain_boxes_reads_a_given_raw_output_instead_of_a_forward_of_its_own(tiny_net, images, method):
    """With the image's raw output from a batched forward, the model runs once less, and the maps are those of the
    candidates matched on that output (here a random model's tied candidates, which the batched forward's last
    bits order differently from the engine's own); a raw output of another batch size is refused."""
    from xaiwatch.core.context import explaining
    from xaiwatch.targets import MatchedBoxTarget

    adapter = YOLOv8Adapter(tiny_net)
    engine = get_engine(method, adapter)
    targets = [MatchedBoxTarget([8.0, 8.0, 40.0, 36.0], 1), MatchedBoxTarget([30.0, 20.0, 60.0, 60.0], 0)]
    calls = []
    handle = tiny_net.register_forward_hook(lambda *_: calls.append(1))
    try:
        own = engine.explain_boxes(images[:1], targets)
        forwards_own = len(calls)
        with explaining(tiny_net), torch.no_grad():
            raw = adapter.raw(images)
        calls.clear()
        given = engine.explain_boxes(images[:1], targets, raw=raw[0])
    finally:
        handle.remove()
    assert len(calls) == forwards_own - 1
    expected = [m.match(raw[0])[0] for m in targets]
    assert [m.candidate for m in given.matches] == [m.candidate for m in expected]
    chosen = [BoxTarget(m.candidate, t.label) for m, t in zip(expected, targets)]
    assert torch.equal(given.maps, engine.attribute_boxes(images[:1], chosen))
    assert own.maps.shape == given.maps.shape
    with pytest.raises(ConfigurationError, match="raw output of the one image"):
        engine.explain_boxes(images[:1], targets, raw=raw)
