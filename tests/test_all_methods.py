"""Every registered method, on the tiny YOLOv8: runs inside inference mode without side effects, or is refused
at construction with a message saying why; and the same through ExplainCallback.setup()."""

from __future__ import annotations

import pytest
import torch

from xaiwatch.adapters import YOLOv8Adapter
from xaiwatch.core.errors import UnsupportedModelError
from xaiwatch.explain import available_methods, get_engine
from xaiwatch.targets import MatchedBoxTarget

FAST_OPTIONS = {
    "integrated_gradients": {"n_steps": 4},
    "smoothgrad": {"nt_samples": 2},
    "gradient_shap": {"n_samples": 2},
    "layer_conductance": {"n_steps": 4},
    "layer_integrated_gradients": {"n_steps": 4},
    "d_rise": {"num_masks": 8},
    "occlusion": {"window": 16, "stride": 16},
}


def _engine(method, adapter):
    options = dict(FAST_OPTIONS.get(method, {}))
    try:
        return get_engine(method, adapter, **options)
    except TypeError:  # an engine without the fast option keeps its defaults
        return get_engine(method, adapter)


@pytest.mark.parametrize("method", available_methods())
def test_method_in_inference_mode_without_side_effects(method, tiny_net, images):
    adapter = YOLOv8Adapter(tiny_net)
    try:
        engine = _engine(method, adapter)
    except UnsupportedModelError as err:
        reasons = ("SiLU", "MaxPool", "reuse", "no attention module")  # the last: attention methods (YOLOv8 has none)
        assert len(str(err)) > 40 and any(r in str(err) for r in reasons)
        return
    tiny_net.train()
    tiny_net.model[2].eval()
    modes = [m.training for m in tiny_net.modules()]
    state = {k: v.clone() for k, v in tiny_net.state_dict().items()}
    rng = torch.get_rng_state()
    requires = [p.requires_grad for p in tiny_net.parameters()]
    target = MatchedBoxTarget([8.0, 8.0, 40.0, 40.0], 1)
    with torch.inference_mode():
        maps = engine.attribute(images * 1, target)
        boxes = engine.attribute_boxes(images[:1] * 1, [target, MatchedBoxTarget([30.0, 30.0, 60.0, 60.0], 2)])
    assert maps.shape == (2, 1, 64, 64) and boxes.shape == (2, 1, 64, 64)
    assert torch.isfinite(maps).all() and torch.isfinite(boxes).all()
    assert [m.training for m in tiny_net.modules()] == modes
    assert all(torch.equal(v, tiny_net.state_dict()[k]) for k, v in state.items())
    assert all(p.grad is None for p in tiny_net.parameters())
    assert [p.requires_grad for p in tiny_net.parameters()] == requires
    assert not any(m._forward_hooks or m._backward_hooks or m._forward_pre_hooks for m in tiny_net.modules())
    assert torch.equal(rng, torch.get_rng_state())
