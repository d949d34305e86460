"""RTDETRAdapter: candidates are the decoder queries; detect equals ultralytics' RT-DETR post-processing."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from xaiwatch.adapters import RTDETRAdapter, YOLOv8Adapter, resolve_adapter
from xaiwatch.core.errors import UnsupportedModelError
from xaiwatch.targets import BoxTarget


@pytest.fixture
def rt_images():
    torch.manual_seed(2)
    return torch.rand(2, 3, 128, 128)


def _reference(net, images, conf, max_det=300):
    """ultralytics: RTDETRDecoder.postprocess (in the forward) then RTDETRPredictor.postprocess, plus query indices."""
    from ultralytics.nn.modules.head import Detect
    from ultralytics.utils import ops

    with torch.no_grad():
        y, x = net(images)
    h, w = images.shape[-2:]
    scores = x[1][-1].sigmoid()
    _, index = Detect._grouped_topk(scores.flatten(1), y.shape[1], 1)
    out = []
    for pred, idx in zip(y, index):
        keep = pred[:, 4] > conf
        bbox = ops.xywh2xyxy(pred[:, :4])
        bbox[:, [0, 2]] *= w
        bbox[:, [1, 3]] *= h
        out.append((bbox[keep][:max_det], pred[keep, 4][:max_det], pred[keep, 5][:max_det], (idx // 3)[keep][:max_det]))
    return out


@pytest.mark.parametrize("conf", [0.02, 0.03])
def test_detect_equals_ultralytics_postprocessing(tiny_rtdetr_net, rt_images, conf):
    adapter = RTDETRAdapter(tiny_rtdetr_net, conf=conf, max_det=50)
    dets = adapter.detect(rt_images)
    ref = _reference(tiny_rtdetr_net, rt_images, conf, max_det=50)
    assert sum(len(d) for d in dets) > 0
    for d, (boxes, scores, labels, queries) in zip(dets, ref):
        assert torch.allclose(d.boxes, boxes, atol=1e-4) and torch.equal(d.scores, scores)
        assert torch.equal(d.labels, labels.long()) and torch.equal(d.candidates, queries)
    with torch.no_grad():
        raw = adapter.raw(rt_images)
    assert raw.boxes.shape == (2, 300, 4) and raw.scores.shape == (2, 300, 3)
    assert torch.equal(dets[0].boxes, raw.boxes[0, dets[0].candidates])
    assert torch.equal(dets[0].scores, raw.scores[0, dets[0].candidates, dets[0].labels])


def test_score_is_differentiable_and_training_mode_refused(tiny_rtdetr_net, rt_images):
    adapter = RTDETRAdapter(tiny_rtdetr_net)
    x = rt_images[:1].clone().requires_grad_()
    (g,) = torch.autograd.grad(adapter.score(x, BoxTarget(5, 1)).sum(), x)
    assert g.abs().sum() > 0
    tiny_rtdetr_net.train()
    with pytest.raises(UnsupportedModelError, match="training mode"):
        adapter.raw(rt_images)


def test_cache_built_under_inference_mode_is_reset(tiny_rtdetr_net, rt_images):
    from xaiwatch.explain import get_engine

    adapter = RTDETRAdapter(tiny_rtdetr_net)
    with torch.inference_mode():
        adapter.detect(rt_images)  # caches anchors as inference tensors
        maps = get_engine("saliency", adapter).attribute(rt_images[:1], BoxTarget(3, 0))
    assert maps.shape == (1, 1, 128, 128) and maps.abs().sum() > 0


def test_layers_resolution_and_refusals(tiny_rtdetr_net):
    adapter = RTDETRAdapter(tiny_rtdetr_net)
    names = adapter.layer_names()
    assert names["neck.p3"] == "model.20" and names["neck.p5"] == "model.26"
    assert names["encoder.aifi"] == "model.10" and names["backbone.p5"] == "model.8"
    assert [s for s, _ in adapter.randomization_stages()] == ["head", "neck", "backbone"]

    class Holder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = tiny_rtdetr_net

    assert isinstance(resolve_adapter(Holder()), RTDETRAdapter)
    with pytest.raises(UnsupportedModelError, match="RTDETRAdapter"):
        YOLOv8Adapter(tiny_rtdetr_net)
    with pytest.raises(UnsupportedModelError, match="RTDETRDetectionModel"):
        RTDETRAdapter(nn.Linear(2, 2))
