"""Bad images given to an adapter or an engine, and the instance-specificity check."""

from __future__ import annotations

import math

import pytest
import torch

from xaiwatch.adapters import YOLOv8Adapter
from xaiwatch.checks import instance_specificity, specificity_baseline
from xaiwatch.core.errors import ConfigurationError, ShapeError
from xaiwatch.explain import get_engine
from xaiwatch.targets import BoxTarget, ClassTarget


def _one_nan(x: torch.Tensor) -> torch.Tensor:
    x[0, 1, 5, 7] = float("nan")
    return x


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda x: (x * 255).to(torch.uint8), r"dtype torch.uint8. Convert with `images?.float\(\) / 255`"),
        (lambda x: x * 255, "values up to 2.*looks like 0–255. Divide by 255"),
        (_one_nan, "1 NaN or infinite value"),
        (lambda x: x[..., :60], "64x60 pixels, but this model needs sides that are a multiple of its stride 32"),
    ],
)
def test_bad_input_images(tiny_net, images, make, match):
    adapter = YOLOv8Adapter(tiny_net)
    bad = make(images.clone())
    with pytest.raises(ConfigurationError, match=match):
        adapter.detect(bad)
    for method in ("saliency", "layer_cam", "integrated_gradients"):
        engine = get_engine(method, adapter)
        with pytest.raises(ConfigurationError, match=match):
            engine.attribute(bad, ClassTarget(0))
        with pytest.raises(ConfigurationError, match=match):
            engine.attribute_boxes(bad[:1], [BoxTarget(0, 0)])


def test_bad_input_shape_still_a_shape_error(tiny_net, images):
    with pytest.raises(ShapeError):
        get_engine("saliency", YOLOv8Adapter(tiny_net)).attribute_boxes(images, [BoxTarget(0, 0)])


def test_noisy_inputs_inside_smoothgrad_are_accepted(tiny_net, images):
    maps = get_engine("smoothgrad", YOLOv8Adapter(tiny_net), nt_samples=4, noise_level=0.5).attribute(
        images[:1], ClassTarget(0)
    )
    assert torch.isfinite(maps).all()


def test_specificity_matches_reference():
    # target [0,4)x[0,4); other [2,6)x[0,4) overlaps it on columns 2-3, which count for neither side
    m = torch.zeros(1, 1, 4, 8)
    m[0, 0, :, 0:2] = 2.0  # target only: 8 px * 2 = 16
    m[0, 0, :, 2:4] = 100.0  # overlap: ignored
    m[0, 0, :, 4:6] = 1.0  # other only: 8 px * 1 = 8
    m[0, 0, :, 6:8] = 50.0  # background: ignored
    spec = instance_specificity(m, torch.tensor([[0.0, 0, 4, 4]]), [torch.tensor([[2.0, 0, 6, 4]])])
    torch.testing.assert_close(spec, torch.tensor([16 / 24]))
    # negative values do not count; no other object -> nan; no energy on either side -> 0
    neg = -m
    assert instance_specificity(neg, torch.tensor([[0.0, 0, 4, 4]]), [torch.tensor([[2.0, 0, 6, 4]])]).item() == 0
    assert math.isnan(instance_specificity(m, torch.tensor([[0.0, 0, 4, 4]]), [torch.zeros(0, 4)]).item())
    base = specificity_baseline(torch.tensor([[0.0, 0, 4, 4]]), [torch.tensor([[2.0, 0, 8, 4]])], (4, 8))
    torch.testing.assert_close(base, torch.tensor([8 / (8 + 16)]))
    with pytest.raises(ShapeError):
        instance_specificity(m, torch.tensor([[0.0, 0, 4, 4]]), [])
