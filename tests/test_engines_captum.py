"""Budgeted Captum engines against Captum called directly with the same arguments; the memory budget measured."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from xaiwatch.adapters import YOLOv8Adapter
from xaiwatch.adapters.base import DetectorAdapter
from xaiwatch.core.context import explaining
from xaiwatch.core.errors import ConfigurationError
from xaiwatch.core.types import RawOutput
from xaiwatch.explain import get_engine
from xaiwatch.explain.budget import OVERHEAD, BatchBudget, per_sample_bytes, samples_per_batch
from xaiwatch.explain.captum_methods import blur, gradient_shap_baselines, make_baseline
from xaiwatch.targets import BoxTarget, ClassTarget, MatchedBoxTarget


class ToyAdapter(DetectorAdapter):
    """A 3-conv SiLU "detector": one candidate per stride-4 cell (a 3-cell box around it), 3 classes.

    Small and input-sensitive, so engine-against-Captum comparisons are fast and far from float underflow
    (a freshly initialised YOLOv8's scores hardly depend on the image).
    """

    def __init__(self) -> None:
        torch.manual_seed(0)
        body = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1),
            nn.SiLU(),
            nn.Conv2d(8, 8, 3, stride=2, padding=1),
            nn.SiLU(),
            nn.Conv2d(8, 3, 3, stride=2, padding=1),
        )
        super().__init__(nn.Sequential(body), names=["a", "b", "c"])

    def raw(self, images: torch.Tensor) -> RawOutput:
        logits = self.model(images)
        b, _, h, w = logits.shape
        s = images.shape[-1] // w
        ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
        boxes = torch.stack([xs - 1, ys - 1, xs + 2, ys + 2], -1).reshape(1, -1, 4).to(images) * s
        return RawOutput(boxes.expand(b, -1, -1), logits.flatten(2).transpose(1, 2).sigmoid())

    def layer_names(self) -> dict[str, str]:
        return {"feat": "0.2"}


@pytest.fixture
def toy():
    return ToyAdapter()


@pytest.fixture
def x():
    torch.manual_seed(1)
    return torch.rand(2, 3, 32, 32)


@pytest.fixture
def adapter(tiny_net):
    """The tiny YOLOv8 with class biases at 0: scores near 0.5, so gradients are far from float underflow."""
    for branch in tiny_net.model[-1].cv3:
        nn.init.zeros_(branch[-1].bias)
    return YOLOv8Adapter(tiny_net)


def _f(adapter, target):
    return lambda x: adapter.score(x, target)


def _seed(seed: int = 0) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _close(a: torch.Tensor, b: torch.Tensor, rtol: float = 1e-4) -> bool:
    a, b = a.detach(), b.detach()
    scale = float(b.abs().amax())
    return scale > 0 and torch.allclose(a, b, rtol=rtol, atol=rtol * scale)


# ------------------------------------------------------------------------------------------------ budget
class _Toy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 16, 3, padding=1), nn.Conv2d(16, 4, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.relu(self.a(x))).mean(dim=(1, 2, 3))


def _saved_bytes_of_batch(fn, x: torch.Tensor) -> int:
    """What the test measures: distinct storages autograd saves in the batched pass, plus input and output."""
    params = {p.untyped_storage().data_ptr() for p in fn.parameters()}
    saved = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            saved[ptr] = t.untyped_storage().nbytes()
        return t

    x = x.clone().requires_grad_()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn(x)
    torch.autograd.grad(out.sum(), x)
    saved.setdefault(x.untyped_storage().data_ptr(), x.numel() * x.element_size())
    return sum(saved.values()) + out.numel() * out.element_size()


def test_budget_scales_inversely_and_batched_pass_stays_within_it():
    toy, sample = _Toy(), torch.rand(1, 3, 32, 32)
    per = per_sample_bytes(toy, sample)
    # conv a saves its input (12 KiB), relu saves its output (64 KiB), conv b its input (same storage as relu's)
    assert per == 3 * 32 * 32 * 4 + 16 * 32 * 32 * 4 + 4
    n1, n2, n4 = (samples_per_batch(toy, sample, mb, cap=10_000) for mb in (1.0, 2.0, 4.0))
    assert n1 == int(2**20 // (OVERHEAD * per)) and abs(n2 - 2 * n1) <= 1 and abs(n4 - 4 * n1) <= 3
    assert samples_per_batch(toy, sample, 1e-6) == 1 and samples_per_batch(toy, sample, 1e6) == 256
    for mb, n in ((1.0, n1), (4.0, n4)):  # the derived batch, with the overhead, fits; 1.2 times as many would not
        assert OVERHEAD * _saved_bytes_of_batch(toy, torch.rand(n, 3, 32, 32)) <= mb * 2**20
        assert OVERHEAD * _saved_bytes_of_batch(toy, torch.rand(int(1.2 * n) + 1, 3, 32, 32)) > mb * 2**20


_PEAK = """
import resource, sys, torch
sys.path.insert(0, {tests!r})
import captum.attr  # its import alone grows the resident set: not part of what is measured
from test_engines_captum import ToyAdapter
from xaiwatch.explain import get_engine
from xaiwatch.targets import ClassTarget
torch.set_num_threads(1)
toy, x, target = ToyAdapter(), torch.rand(1, 3, 256, 256), ClassTarget(0)
x1 = x.clone().requires_grad_()
torch.autograd.grad(toy.score(x1, target).sum(), x1)  # a warm process: one pass of one image done
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
if {ours}:
    get_engine("integrated_gradients", toy, n_steps=128, max_memory_mb={budget}).attribute(x, target)
else:
    captum.attr.IntegratedGradients(lambda i: toy.score(i, target)).attribute(
        x, baselines=0.0, n_steps=128, internal_batch_size=128)
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024)
"""


def _peak_growth_mb(ours: bool, budget: float = 0) -> float:
    """Growth of the peak resident set (MiB) while Integrated Gradients runs once, in a fresh process."""
    import os
    import subprocess
    import sys

    code = _PEAK.format(tests=os.path.dirname(__file__), ours=ours, budget=budget)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def test_budgeted_integrated_gradients_stays_within_its_memory_budget():
    # 128 steps at 256 px on a 3-convolution network: all steps at once (Captum, internal_batch_size=128) grow the
    # process by about 1.5 GB; with a 256 MiB budget the engine's batches keep the peak under it (80-160 MiB here).
    assert _peak_growth_mb(ours=False) > 256 >= _peak_growth_mb(ours=True, budget=256)


def test_budget_cached_per_key_and_size():
    toy, calls = _Toy(), []

    def fn(x):
        calls.append(x.shape[0])
        return toy(x)

    budget = BatchBudget(1.0)
    a = budget.samples("ig", fn, torch.rand(1, 3, 32, 32))
    assert budget.samples("ig", fn, torch.rand(1, 3, 32, 32)) == a and calls == [1]
    assert budget.samples("ig", fn, torch.rand(1, 3, 16, 16)) > a and calls == [1, 1]
    budget.samples("sg", fn, torch.rand(1, 3, 32, 32))
    assert calls == [1, 1, 1]
    with pytest.raises(ConfigurationError, match="`max_memory_mb` must be > 0, got 0"):
        BatchBudget(0)


def test_budget_on_tiny_yolo_is_measured(adapter, images):
    f = _f(adapter, ClassTarget(0))
    with explaining(adapter.model):
        per = per_sample_bytes(f, images[:1])
        small = samples_per_batch(f, images[:1], OVERHEAD * 4 * per / 2**20)
    assert 100_000 < per < 10_000_000 and small == 4


# ------------------------------------------------------------------------------------------------ engines
def test_integrated_gradients_on_yolo_matches_captum(adapter, images):
    from captum.attr import IntegratedGradients

    target = BoxTarget(30, 1)
    maps = get_engine("integrated_gradients", adapter, n_steps=4).attribute(images, target)
    adapter.model.eval()
    ref = IntegratedGradients(_f(adapter, target)).attribute(images.clone(), baselines=0.0, n_steps=4)
    assert maps.shape == (2, 1, 64, 64) and _close(maps, ref.sum(1, keepdim=True))


@pytest.mark.parametrize("baseline", ["black", "grey", "blur", 0.2])
def test_integrated_gradients_matches_captum(toy, x, baseline):
    from captum.attr import IntegratedGradients

    target = BoxTarget(30, 1)
    maps = get_engine("integrated_gradients", toy, n_steps=8, baseline=baseline).attribute(x, target)
    ref = IntegratedGradients(_f(toy, target)).attribute(
        x.clone(), baselines=make_baseline(x, baseline), n_steps=8, method="gausslegendre"
    )
    assert maps.shape == (2, 1, 32, 32) and _close(maps, ref.sum(1, keepdim=True))


def test_integrated_gradients_completeness(toy, x):
    toy.model.double()
    x, target = x.double(), BoxTarget(30, 1)
    maps = get_engine("integrated_gradients", toy, n_steps=64).attribute(x, target)
    with torch.no_grad():
        delta = toy.score(x, target) - toy.score(torch.zeros_like(x), target)
    assert float(delta.abs().min()) > 1e-3
    assert torch.allclose(maps.sum(dim=(1, 2, 3)), delta, rtol=1e-4, atol=1e-8)


def test_budget_changes_batching_not_the_map(toy, x):
    target = ClassTarget(2)
    big = get_engine("integrated_gradients", toy, n_steps=8)
    small = get_engine("integrated_gradients", toy, n_steps=8, max_memory_mb=0.01)
    a, b = big.attribute(x, target), small.attribute(x, target)
    f = _f(toy, target)
    assert big.samples_per_batch(f, x) == 256 and small.samples_per_batch(f, x) == 1
    assert _close(a, b)


def test_input_x_gradient_matches_captum(toy, x):
    from captum.attr import InputXGradient

    target = ClassTarget(1)
    maps = get_engine("input_x_gradient", toy).attribute(x, target)
    ref = InputXGradient(_f(toy, target)).attribute(x.clone().requires_grad_())
    assert _close(maps, ref.sum(1, keepdim=True).detach()) and float(maps.min()) < 0 < float(maps.max())


def test_smoothgrad_matches_captum_and_is_seeded(toy, x):
    from captum.attr import NoiseTunnel, Saliency

    target = BoxTarget(30, 1)
    mb = OVERHEAD * 4.5 * per_sample_bytes(_f(toy, target), x[:1]) / 2**20
    engine = get_engine("smoothgrad", toy, nt_samples=6, max_memory_mb=mb)
    maps = engine.attribute(x, target)
    assert engine.samples_per_batch(_f(toy, target), x) == 4  # the budget: four noisy copies per pass
    assert torch.equal(maps, engine.attribute(x, target))
    assert not torch.equal(maps, get_engine("smoothgrad", toy, nt_samples=6, seed=1).attribute(x, target))
    # images are explained one after the other (the noise of one image does not depend on the batch), each
    # with its noisy copies batched as the engine chose; the batching does not change the map
    assert _close(maps, get_engine("smoothgrad", toy, nt_samples=6, max_memory_mb=1e-6).attribute(x, target))
    _seed(0)
    ref = [
        NoiseTunnel(Saliency(_f(toy, target))).attribute(
            x[i : i + 1].clone(), nt_type="smoothgrad", nt_samples=6, nt_samples_batch_size=3, stdevs=0.15, abs=True
        )
        for i in range(2)
    ]
    assert _close(maps, torch.cat(ref).amax(1, keepdim=True))


def test_fastest_batch_is_within_the_limit_and_measured(toy, x):
    from xaiwatch.explain.budget import fastest_batch

    calls = []

    def f(images):
        calls.append(images.shape[0])
        return toy.score(images, ClassTarget(0))

    n = fastest_batch(f, x[:1], 6)
    sizes = sorted(set(calls))
    assert 1 <= n <= 6 and n in sizes and set(sizes) <= {1, 2, 4, 6}
    assert all(calls.count(s) == 3 for s in sizes)  # each candidate once to warm up, twice timed
    assert fastest_batch(f, x[:1], 1) == 1
    with pytest.raises(ConfigurationError, match="`limit` must be >= 1"):
        fastest_batch(f, x[:1], 0)


def test_engine_batch_is_the_fastest_within_budget_and_cached(toy, x):
    target = ClassTarget(0)
    engine = get_engine("integrated_gradients", toy, n_steps=8)
    engine.attribute(x, target)
    keys = [k for k in engine.budget._cache if k[0] == "fastest"]
    assert len(keys) == 1 and keys[0][-1] == 16  # 8 steps x 2 images: no bigger batch is ever needed
    assert 1 <= engine.budget._cache[keys[0]] <= 16
    engine.attribute(x, target)
    assert len([k for k in engine.budget._cache if k[0] == "fastest"]) == 1


def test_gradient_shap_matches_captum_and_is_seeded(toy, x):
    from captum.attr import GradientShap

    target = ClassTarget(0)
    engine = get_engine("gradient_shap", toy, n_samples=4)
    maps = engine.attribute(x, target)
    assert torch.equal(maps, engine.attribute(x, target))
    _seed(0)
    ref = torch.cat(
        [
            GradientShap(_f(toy, target)).attribute(
                x[i : i + 1].clone(), baselines=gradient_shap_baselines(x[i : i + 1]), n_samples=4, stdevs=0.09
            )
            for i in range(2)
        ]
    )
    assert _close(maps, ref.sum(1, keepdim=True))


@pytest.mark.parametrize("size", [(64, 64), (48, 80), (3, 5)])
def test_blur_equals_torchvision_gaussian_blur(size):
    import math

    from torchvision.transforms.functional import gaussian_blur

    x = torch.rand(2, 3, *size)
    side = min(size)
    sigma = max(side / 16.0, 0.5)
    kernel = min(2 * math.ceil(3 * sigma) + 1, 2 * ((side - 1) // 2) + 1)
    ref = gaussian_blur(x, [kernel, kernel], [sigma, sigma]) if kernel > 1 else x
    assert torch.allclose(blur(x), ref, atol=1e-5)


def test_gradient_shap_baselines_are_black_grey_blur(images):
    b = gradient_shap_baselines(images[:1])
    assert b.shape == (3, 3, 64, 64) and float(b[0].abs().max()) == 0 and bool((b[1] == 0.5).all())
    assert torch.equal(b[2:], blur(images[:1])) and float(blur(images[:1]).std()) < float(images[:1].std())


def test_occlusion_matches_captum(toy, x):
    from captum.attr import Occlusion

    target = BoxTarget(30, 1)
    engine = get_engine(
        "occlusion", toy, max_memory_mb=OVERHEAD * 40.5 * per_sample_bytes(_f(toy, target), x[:1]) / 2**20
    )
    assert engine.window_and_stride(32, 32) == (4, 2) and engine.window_and_stride(64, 48) == (6, 3)
    maps = engine.attribute(x, target)
    assert engine.samples_per_batch(_f(toy, target), x) == 40  # 20 windows of each image per pass
    ref = Occlusion(_f(toy, target)).attribute(
        x.clone(), sliding_window_shapes=(3, 4, 4), strides=(3, 2, 2), baselines=0.5
    )
    assert _close(maps, ref.sum(1, keepdim=True)) and float(maps.abs().amax()) > 1e-3


@pytest.mark.parametrize("method", ["layer_conductance", "layer_integrated_gradients"])
def test_layer_methods_match_captum(toy, x, method):
    from captum.attr import LayerConductance, LayerIntegratedGradients

    target = BoxTarget(30, 1)
    maps = get_engine(method, toy, layer="feat", n_steps=4).attribute(x, target)
    cls = LayerConductance if method == "layer_conductance" else LayerIntegratedGradients
    ref = cls(_f(toy, target), toy.model[0][2]).attribute(
        x.clone(), baselines=torch.zeros_like(x), n_steps=4, method="gausslegendre"
    )
    ref = F.interpolate(ref.sum(1, keepdim=True), size=(32, 32), mode="bilinear", align_corners=False)
    assert maps.shape == (2, 1, 32, 32) and _close(maps, ref.detach())
    assert float(maps.min()) < 0 < float(maps.max())


def test_matched_target_is_frozen_on_the_clean_image(toy, x):
    target = MatchedBoxTarget([4.0, 4.0, 16.0, 16.0], 1, iou_threshold=0.3)
    engine = get_engine("integrated_gradients", toy, n_steps=4)
    maps = engine.attribute(x, target)
    with torch.no_grad():
        expected = MatchedBoxTarget([4.0, 4.0, 16.0, 16.0], 1, iou_threshold=0.3).match(toy.raw(x))
    assert not hasattr(target, "last_match")  # engines return what they found, never write into targets
    assert _close(maps, engine.attribute(x, [BoxTarget(m.candidate, 1) for m in expected]))
    # re-matching at every interpolation step (Captum given the matched target itself) gives another map
    from captum.attr import IntegratedGradients

    rematched = IntegratedGradients(_f(toy, target)).attribute(x.clone(), baselines=0.0, n_steps=4)
    assert not _close(maps, rematched.sum(1, keepdim=True))


@pytest.mark.parametrize("method", ["integrated_gradients", "smoothgrad", "occlusion"])
def test_per_image_targets_equal_one_at_a_time(toy, x, method):
    engine = get_engine(method, toy, **({"n_steps": 4} if method == "integrated_gradients" else {}))
    targets = [BoxTarget(5, 0), BoxTarget(40, 2)]
    batched = engine.attribute(x, targets)
    assert _close(batched[:1], engine.attribute(x[:1], targets[0]))
    if method != "smoothgrad":  # the second image's noise comes after the first one's in the seeded stream
        assert _close(batched[1:], engine.attribute(x[1:], targets[1]))


@pytest.mark.parametrize(
    ("method", "options", "message"),
    [
        ("integrated_gradients", {"n_steps": 0}, "`n_steps` must be an integer >= 1, got 0"),
        ("integrated_gradients", {"baseline": "white"}, "`baseline` can be black, grey, blur or a number, got 'white'"),
        ("integrated_gradients", {"method": "simpson"}, "`method` can be gausslegendre.*got 'simpson'"),
        ("smoothgrad", {"nt_samples": 2.5}, "`nt_samples` must be an integer >= 1, got 2.5"),
        ("smoothgrad", {"noise_level": -0.1}, "`noise_level` must be a number > 0, got -0.1"),
        ("gradient_shap", {"stdevs": -1}, "`stdevs` must be a number >= 0, got -1"),
        ("occlusion", {"window": 0}, "`window` must be an integer >= 1, got 0"),
        ("layer_conductance", {"baseline": None}, "`baseline` can be .* got None"),
    ],
)
def test_bad_options(toy, method, options, message):
    with pytest.raises(ConfigurationError, match=message):
        get_engine(method, toy, **options)


def test_occlusion_window_larger_than_image(toy, x):
    with pytest.raises(ConfigurationError, match=r"`window` \(40\) is larger than the image \(32x32\)"):
        get_engine("occlusion", toy, window=40).attribute(x, ClassTarget(0))
