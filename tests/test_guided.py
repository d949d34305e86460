"""Guided backprop, deconvolution, Guided Grad-CAM and DeepLift: equal to Captum on a ReLU network, refused
(with the reason) on YOLOv8 and on networks whose activations Captum's rules would silently skip."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from xaiwatch.adapters import YOLOv8Adapter
from xaiwatch.adapters.base import DetectorAdapter
from xaiwatch.core.errors import ConfigurationError, UnsupportedModelError
from xaiwatch.core.types import RawOutput
from xaiwatch.explain import get_engine
from xaiwatch.targets import BoxTarget, ClassTarget, MatchedBoxTarget

GUIDED = ["guided_backprop", "deconvolution", "guided_grad_cam"]
ALL = [*GUIDED, "deep_lift"]


def relu_net(reuse_relu: bool = False, share_relu: bool = False, reuse_pool: bool = False) -> nn.Module:
    """A small conv net with one nn.ReLU module per use (or, on request, a reused / shared one)."""

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.c1, self.c2 = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)
            self.r1, self.r2 = nn.ReLU(), nn.ReLU()
            if share_relu:
                self.r2 = self.r1
            self.p1, self.p2 = nn.MaxPool2d(2), nn.MaxPool2d(2)
            self.c3 = nn.Conv2d(8, 3, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = self.p1(self.r1(self.c1(x)))
            x = (self.r1 if reuse_relu else self.r2)(self.c2(x))
            return self.c3((self.p1 if reuse_pool else self.p2)(x))

    torch.manual_seed(0)
    return Net()


class ReluAdapter(DetectorAdapter):
    """One candidate per stride-4 cell; its class scores are the net's logits (no functional non-linearity)."""

    def raw(self, images: torch.Tensor) -> RawOutput:
        logits = self.model(images)
        b, _, h, w = logits.shape
        s = images.shape[-1] // w
        ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
        boxes = torch.stack([xs - 1, ys - 1, xs + 2, ys + 2], -1).reshape(1, -1, 4).to(images) * s
        return RawOutput(boxes.expand(b, -1, -1), logits.flatten(2).transpose(1, 2))

    def layer_names(self) -> dict[str, str]:
        return {"c2": "c2"}


class Scorer(nn.Module):
    """The test's own module around a target score, for Captum's module-based methods."""

    def __init__(self, adapter: DetectorAdapter, target) -> None:
        super().__init__()
        self.net, self.adapter, self.target = adapter.model, adapter, target

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.target(self.adapter.raw(x))


@pytest.fixture
def relu():
    return ReluAdapter(relu_net(), names=["a", "b", "c"])


@pytest.fixture
def x():
    torch.manual_seed(1)
    return torch.rand(2, 3, 32, 32)


def _no_hooks(model: nn.Module) -> bool:
    return not any(m._forward_hooks or m._backward_hooks or m._forward_pre_hooks for m in model.modules())


def _captum(method: str, adapter: ReluAdapter, target, x: torch.Tensor) -> torch.Tensor:
    from captum.attr import Deconvolution, DeepLift, GuidedBackprop, GuidedGradCam

    scorer = Scorer(adapter, target)
    if method == "guided_backprop":
        return GuidedBackprop(scorer).attribute(x.clone()).abs().amax(1, keepdim=True)
    if method == "deconvolution":
        return Deconvolution(scorer).attribute(x.clone()).abs().amax(1, keepdim=True)
    if method == "guided_grad_cam":
        return GuidedGradCam(scorer, adapter.model.c2).attribute(x.clone()).abs().amax(1, keepdim=True)
    return DeepLift(scorer).attribute(x.clone(), baselines=torch.zeros_like(x)).sum(1, keepdim=True)


@pytest.mark.parametrize("method", ALL)
def test_equal_to_captum_on_a_relu_network(relu, x, method):
    target = BoxTarget(20, 1)
    maps = get_engine(method, relu).attribute(x, target)
    ref = _captum(method, relu, target, x).detach()
    assert maps.shape == (2, 1, 32, 32) and float(maps.abs().amax()) > 0
    assert torch.allclose(maps, ref, rtol=1e-5, atol=1e-6 * float(ref.abs().amax()))
    assert _no_hooks(relu.model)


@pytest.mark.parametrize("method", ["guided_backprop", "deconvolution"])
def test_guided_rules_really_apply_on_the_relu_network(relu, x, method):
    """Captum's rule is active: the map is not the plain gradient (which YOLOv8 would silently get)."""
    target = BoxTarget(20, 1)
    maps = get_engine(method, relu).attribute(x, target)
    xg = x.clone().requires_grad_()
    (g,) = torch.autograd.grad(target(relu.raw(xg)).sum(), xg)
    assert not torch.allclose(maps, g.abs().amax(1, keepdim=True), rtol=1e-2)


def test_guided_backprop_hand_computed_on_one_relu():
    """score = w2 . relu(w1 x): guided gradient is w1^T (relu(w2) * [w1 x > 0]), the plain one w1^T (w2 * [w1 x > 0])."""
    w1, w2 = torch.tensor([[1.0, -2.0], [0.5, 1.0], [2.0, 1.0]]), torch.tensor([[1.0, -1.0, 1.0]])

    class Lin(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.relu, self.b = nn.Linear(2, 3, bias=False), nn.ReLU(), nn.Linear(3, 1, bias=False)
            self.a.weight.data, self.b.weight.data = w1.clone(), w2.clone()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.b(self.relu(self.a(x))).squeeze(1)

    from captum.attr import GuidedBackprop

    x = torch.tensor([[1.0, 0.2]])
    active = (x @ w1.T > 0).float()
    expected = (w2.clamp(min=0) * active) @ w1
    assert torch.allclose(GuidedBackprop(Lin()).attribute(x.clone()), expected)
    assert not torch.allclose(expected, (w2 * active) @ w1)


def test_deep_lift_completeness_on_the_relu_network(relu, x):
    target = BoxTarget(20, 1)
    maps = get_engine("deep_lift", relu, baseline="grey").attribute(x, target)
    with torch.no_grad():
        delta = target(relu.raw(x)) - target(relu.raw(torch.full_like(x, 0.5)))
    assert torch.allclose(maps.sum(dim=(1, 2, 3)), delta, rtol=1e-4, atol=1e-6)


def test_deep_lift_freezes_a_matched_target(relu, x):
    target = MatchedBoxTarget([4.0, 4.0, 16.0, 16.0], 1, iou_threshold=0.3)
    maps = get_engine("deep_lift", relu).attribute(x, target)
    with torch.no_grad():
        expected = MatchedBoxTarget([4.0, 4.0, 16.0, 16.0], 1, iou_threshold=0.3).match(relu.raw(x))
    assert not hasattr(target, "last_match")  # engines return what they found, never write into targets
    frozen = get_engine("deep_lift", relu).attribute(x, [BoxTarget(m.candidate, 1) for m in expected])
    assert torch.allclose(maps, frozen)


def test_no_side_effects_in_inference_mode(relu, x):
    relu.model.train()
    with torch.inference_mode():
        maps = {m: get_engine(m, relu).attribute(x * 1, ClassTarget(0)) for m in ALL}
    assert all(v.shape == (2, 1, 32, 32) and not v.is_inference() for v in maps.values())
    assert all(m.training for m in relu.model.modules()) and _no_hooks(relu.model)
    assert all(p.grad is None for p in relu.model.parameters())


# ------------------------------------------------------------------------------------------------ refusals
@pytest.mark.parametrize("method", ALL)
def test_refused_on_yolov8_with_the_reason(tiny_net, method):
    with pytest.raises(UnsupportedModelError) as info:
        get_engine(method, YOLOv8Adapter(tiny_net))
    message = str(info.value)
    assert f"`{method}` is refused for DetectionModel" in message
    assert "activation modules SiLU" in message and "Use `saliency` or `integrated_gradients` instead" in message
    assert "one module object is shared by several layers (SiLU at model.0.act" in message
    if method == "deep_lift":
        assert "reuses one module object several times: MaxPool2d (3 calls)" in message
    else:
        assert "has no ReLU module" in message
    assert _no_hooks(tiny_net)


REUSED_OR_SHARED = [
    (relu_net(reuse_relu=True), r"reuses one module object several times: ReLU \(2 calls\)"),
    (relu_net(share_relu=True), r"shared by several layers \(ReLU at r1, r2 \(2 places\)\)"),
]


@pytest.mark.parametrize(("net", "reason"), REUSED_OR_SHARED)
def test_deconvolution_refuses_a_reused_or_shared_relu(net, reason):
    with pytest.raises(UnsupportedModelError, match=reason):
        get_engine("deconvolution", ReluAdapter(net))
    assert _no_hooks(net)


@pytest.mark.parametrize("method", ["guided_backprop", "guided_grad_cam"])
@pytest.mark.parametrize(("net", "reason"), REUSED_OR_SHARED)
def test_guided_rule_is_per_call_so_a_reused_or_shared_relu_is_exact(method, net, reason, x):
    """Captum's guided hook rectifies the gradient of each call: reuse gives the map of one module per use."""
    target = BoxTarget(20, 1)
    got = get_engine(method, ReluAdapter(net), layer="c2").attribute(x, target)
    separate = get_engine(method, ReluAdapter(relu_net()), layer="c2").attribute(x, target)
    assert float(separate.abs().amax()) > 0 and torch.allclose(got, separate, rtol=1e-6, atol=0)
    assert _no_hooks(net)


def test_deep_lift_refuses_a_reused_maxpool_that_guided_backprop_accepts():
    adapter = ReluAdapter(relu_net(reuse_pool=True))
    with pytest.raises(UnsupportedModelError, match=r"MaxPool2d \(2 calls\)"):
        get_engine("deep_lift", adapter)
    get_engine("guided_backprop", adapter)


def test_refuses_other_activations_unless_accepted_and_bad_baseline(relu, x):
    net = relu_net()
    net.r2 = nn.GELU()
    with pytest.raises(
        UnsupportedModelError, match=r"activation modules GELU \(at r2\).*other_activations='plain_gradient'"
    ):
        get_engine("guided_backprop", ReluAdapter(net))
    adapter = ReluAdapter(net)
    mixed = get_engine("guided_backprop", adapter, other_activations="plain_gradient").attribute(x, BoxTarget(20, 1))
    ref = _captum("guided_backprop", adapter, BoxTarget(20, 1), x).detach()  # the rule at r1, GELU's gradient at r2
    assert float(mixed.abs().amax()) > 0 and torch.allclose(mixed, ref, rtol=1e-5, atol=1e-6 * float(ref.abs().amax()))
    with pytest.raises(ConfigurationError, match="`other_activations` can be 'refuse' or 'plain_gradient'"):
        get_engine("guided_backprop", relu, other_activations="ignore")
    with pytest.raises(ConfigurationError, match="`baseline` can be black, grey, blur or a number, got 'white'"):
        get_engine("deep_lift", relu, baseline="white")
