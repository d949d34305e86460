"""YOLOv8Adapter: post-processing equals ultralytics', scores are differentiable raw elements, layers resolve."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from xaiwatch.adapters import YOLOv8Adapter, resolve_adapter
from xaiwatch.core.errors import ConfigurationError, ShapeError, UnsupportedModelError
from xaiwatch.core.types import RawOutput
from xaiwatch.targets import BoxTarget, ClassTarget, MatchedBoxTarget


@pytest.mark.parametrize("conf", [0.001, 0.004])
def test_detect_equals_ultralytics_nms(tiny_net, images, conf):
    from ultralytics.utils.nms import non_max_suppression

    adapter = YOLOv8Adapter(tiny_net, conf=conf, iou=0.7)
    dets = adapter.detect(images)
    tiny_net.eval()
    with torch.no_grad():
        y = tiny_net(images)
    ref, keep = non_max_suppression(y, conf, 0.7, max_det=300, return_idxs=True)
    assert sum(len(d) for d in dets) > 0
    for d, r, k in zip(dets, ref, keep):
        assert torch.equal(d.boxes, r[:, :4]) and torch.equal(d.scores, r[:, 4])
        assert torch.equal(d.labels, r[:, 5].long()) and torch.equal(d.candidates, k.flatten().long())
    # each kept box is its raw candidate
    with torch.no_grad():
        raw = adapter.raw(images)
    assert torch.equal(dets[0].boxes, raw.boxes[0, dets[0].candidates])


def test_detect_cardinality_and_bad_shape(tiny_net):
    adapter = YOLOv8Adapter(tiny_net, conf=0.99)
    dets = adapter.detect(torch.rand(1, 3, 64, 64))
    assert len(dets) == 1 and len(dets[0]) == 0 and dets[0].boxes.shape == (0, 4)
    with pytest.raises(ShapeError, match=r"\(B, 3, H, W\)"):
        adapter.detect(torch.rand(3, 64, 64))


def test_score_gradient_equals_hand_autograd(tiny_net, images):
    adapter = YOLOv8Adapter(tiny_net)
    tiny_net.eval()
    cand, label = 17, 2
    x1 = images.clone().requires_grad_()
    (g_ours,) = torch.autograd.grad(adapter.score(x1, BoxTarget(cand, label)).sum(), x1)
    x2 = images.clone().requires_grad_()
    y, _ = tiny_net(x2)
    (g_ref,) = torch.autograd.grad(y[:, 4 + label, cand].sum(), x2)
    assert torch.allclose(g_ours, g_ref) and g_ref.abs().sum() > 0
    s = adapter.score(images, ClassTarget(1))
    assert s.shape == (2,) and torch.allclose(s, y[:, 5].amax(dim=1))


def test_per_image_targets_and_matched_target_choice():
    boxes = torch.tensor([[[0, 0, 10, 10], [0, 0, 11, 11], [50, 50, 60, 60]]], dtype=torch.float32).repeat(2, 1, 1)
    scores = torch.tensor([[[0.1, 0.2], [0.05, 0.9], [0.3, 0.95]]]).repeat(2, 1, 1)
    raw = RawOutput(boxes, scores)
    t = MatchedBoxTarget([0, 0, 10, 10], label=1)
    out = t(raw)
    assert torch.allclose(out, torch.tensor([0.9, 0.9]))  # the overlapping candidate, not the global best (0.95)
    assert t.match(raw)[0].candidate == 1 and t.match(raw)[0].detected
    assert not hasattr(t, "last_match")  # a call returns scores and changes nothing in the target
    far = MatchedBoxTarget([20, 20, 30, 30], label=1)  # overlaps nothing: not detected, still explains something
    assert not far.match(raw)[0].detected
    from xaiwatch.adapters import apply_targets

    both = apply_targets(raw, [BoxTarget(0, 0), BoxTarget(2, 1)])
    assert torch.allclose(both, torch.tensor([0.1, 0.95]))
    with pytest.raises(ShapeError):
        apply_targets(raw, [BoxTarget(0)])
    with pytest.raises(ConfigurationError, match="out of range"):
        ClassTarget(5)(raw)
    with pytest.raises(ConfigurationError, match="x2 > x1"):
        MatchedBoxTarget([5, 5, 1, 1], 0)


def test_layers_resolve_and_unknown_layer_lists_them(tiny_net):
    adapter = YOLOv8Adapter(tiny_net)
    names = adapter.layer_names()
    assert {"neck.p3", "neck.p4", "neck.p5", "backbone.p3", "backbone.p4", "backbone.p5"} <= set(names)
    assert names["neck.p3"] == "model.15" and names["backbone.p5"] == "model.9"
    assert adapter.layer("neck.p4") is tiny_net.model[18]
    assert adapter.layer("model.2.cv1") is tiny_net.model[2].cv1
    with pytest.raises(ConfigurationError, match=r"neck\.p3.*backbone"):
        adapter.layer("neck.p9")
    assert not any(m._forward_hooks for m in tiny_net.modules())


def test_unsupported_models_and_resolution(tiny_net):
    with pytest.raises(UnsupportedModelError, match="DetectionModel"):
        YOLOv8Adapter(nn.Linear(2, 2))

    class Holder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = tiny_net

    assert isinstance(resolve_adapter(Holder()), YOLOv8Adapter)
    given = YOLOv8Adapter(tiny_net)
    assert resolve_adapter(nn.Linear(2, 2), given) is given

    class WithHook(nn.Module):
        def xai_adapter(self):
            return given

    assert resolve_adapter(WithHook()) is given
    with pytest.raises(UnsupportedModelError, match=r"\(1\).*\(2\).*\(3\)"):
        resolve_adapter(nn.Linear(2, 2))
