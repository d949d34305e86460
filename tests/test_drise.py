"""D-RISE against the formula computed by hand on a toy detector whose answer is known, and on the tiny YOLOv8."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from xaiwatch.adapters import YOLOv8Adapter
from xaiwatch.adapters.base import DetectorAdapter
from xaiwatch.core.errors import ConfigurationError
from xaiwatch.core.types import Detections, RawOutput
from xaiwatch.explain import get_engine
from xaiwatch.explain.drise import (
    DRiseEngine,
    drise_weights,
    generate_masks,
    mask_grids,
    target_reference,
    upsample_masks,
)
from xaiwatch.targets import BoxTarget, ClassTarget, MatchedBoxTarget, Target

ROWS, COLS = slice(16, 24), slice(40, 48)  # the region R the toy detector looks at
BOX = [8.0, 8.0, 56.0, 40.0]


class ToyAdapter(DetectorAdapter):
    """One candidate with a fixed box; class 0 scores the mean intensity of R, class 1 its complement."""

    def __init__(self) -> None:
        super().__init__(nn.Identity(), names=["thing", "other"], conf=0.25)

    def raw(self, images: torch.Tensor) -> RawOutput:
        a = images[:, :, ROWS, COLS].mean(dim=(1, 2, 3))
        scores = torch.stack([a, 1 - a], dim=-1)[:, None]
        return RawOutput(torch.tensor(BOX).expand(images.shape[0], 1, 4).clone(), scores)

    def layer_names(self) -> dict[str, str]:
        return {"identity": ""}


def toy_image() -> torch.Tensor:
    x = torch.zeros(1, 3, 64, 64)
    x[:, :, ROWS, COLS] = 1.0
    return x


def hand_drise(image, masks, p, conf, fill=0.5):
    """sum_m w_m M_m / (N p) with w = IoU (1: the box never moves) x cosine to the clean vector (1, 0)."""
    sal = torch.zeros(64, 64)
    for m in masks:
        masked = image[0] * m + fill * (1 - m)
        a = float(masked[:, ROWS, COLS].mean())
        if max(a, 1 - a) > conf:  # the detection survives post-processing
            w = a / (a**2 + (1 - a) ** 2) ** 0.5  # cos((a, 1 - a), (1, 0)); IoU(BOX, BOX) = 1
            sal += w * m[0]
    return sal / (len(masks) * p)


def test_toy_map_equals_hand_formula_and_highlights_region():
    p, conf, n = 0.25, 0.75, 400
    engine = DRiseEngine(ToyAdapter(), seed=3, num_masks=n, grid_size=8, p=p, conf=conf)
    image = toy_image()
    sal = engine.attribute(image, BoxTarget(0))
    masks = generate_masks(n, (64, 64), grid_size=8, p=p, seed=3)
    ref = hand_drise(image, masks, p, conf)
    assert sal.shape == (1, 1, 64, 64)
    assert torch.allclose(sal[0, 0], ref, atol=1e-5)
    inside = torch.zeros(64, 64, dtype=torch.bool)
    inside[ROWS, COLS] = True
    mean_in, mean_out = float(sal[0, 0][inside].mean()), float(sal[0, 0][~inside].mean())
    # Outside R a pixel's mask is (nearly) independent of the weight, so the ratio is bounded by 1 / p = 4.
    assert mean_in > 2 * mean_out > 0


def test_keep_probability_one_half_still_highlights_region():
    """At the paper's p = 0.5 the inside/outside ratio cannot exceed 1 / p = 2; it approaches it."""
    engine = DRiseEngine(ToyAdapter(), num_masks=300, grid_size=8, p=0.5, conf=0.8)
    sal = engine.attribute(toy_image(), ClassTarget(0))[0, 0]
    inside = torch.zeros(64, 64, dtype=torch.bool)
    inside[ROWS, COLS] = True
    assert float(sal[inside].mean()) > 1.4 * float(sal[~inside].mean())


def test_batch_size_does_not_change_the_map():
    image = toy_image()
    big = DRiseEngine(ToyAdapter(), num_masks=50, grid_size=8, conf=0.6)
    small = DRiseEngine(ToyAdapter(), num_masks=50, grid_size=8, conf=0.6, max_memory_mb=1e-3)
    assert small.batch_size(image) == 1 and big.batch_size(image) > 1
    assert torch.allclose(big.attribute(image, BoxTarget(0)), small.attribute(image, BoxTarget(0)), atol=1e-6)


def test_masks_chunked_equal_whole_and_have_keep_probability():
    masks = generate_masks(200, (48, 64), grid_size=16, p=0.5, seed=7)
    grids, shifts = mask_grids(200, 16, 0.5, torch.Generator().manual_seed(7))
    chunks = torch.cat([upsample_masks(grids[i : i + 64], shifts[i : i + 64], (48, 64)) for i in range(0, 200, 64)])
    assert masks.shape == (200, 1, 48, 64) and torch.equal(masks, chunks)
    assert float(masks.min()) >= 0 and float(masks.max()) <= 1
    assert abs(float(masks.mean()) - 0.5) < 0.03
    assert not torch.equal(masks, generate_masks(200, (48, 64), grid_size=16, p=0.5, seed=8))


def test_weights_by_hand():
    ref_boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0]])
    ref_probs = torch.tensor([[0.6, 0.8]])  # unit norm
    raw = RawOutput(
        torch.tensor([[[0.0, 0.0, 10.0, 20.0], [0.0, 0.0, 10.0, 10.0]]] * 2),
        torch.tensor([[[0.6, 0.8], [1.0, 0.0]]] * 2),
    )
    dets = [
        Detections(raw.boxes[0], torch.tensor([0.8, 1.0]), torch.tensor([1, 0]), torch.tensor([0, 1])),
        Detections.empty(),
    ]
    w = drise_weights(ref_boxes, ref_probs, raw, dets)
    # candidate 0: IoU 0.5 x cos 1 = 0.5; candidate 1: IoU 1 x cos 0.6 = 0.6; max 0.6. No detection: 0.
    assert torch.allclose(w, torch.tensor([[0.6], [0.0]]))


def test_target_reference(tiny_net, images):
    adapter = YOLOv8Adapter(tiny_net)
    tiny_net.eval()
    with torch.no_grad():
        raw = adapter.raw(images)
    (box, probs), _ = target_reference(BoxTarget(7), raw)
    assert torch.equal(box, raw.boxes[0, 7]) and torch.equal(probs, raw.scores[0, 7])
    best = raw.scores[1, :, 2].argmax()
    assert torch.equal(target_reference(ClassTarget(2), raw)[1][1], raw.scores[1, best])
    target = MatchedBoxTarget([8.0, 8.0, 40.0, 40.0], 1)
    refs = target_reference(target, raw)
    matches = target.match(raw)
    assert all(torch.equal(b, raw.boxes[i, m.candidate]) for i, (m, (b, _)) in enumerate(zip(matches, refs)))
    assert len(matches) == 2


def test_tiny_net_deterministic_batched_and_boxes(tiny_net, images):
    adapter = YOLOv8Adapter(tiny_net)
    engine = get_engine("d_rise", adapter, num_masks=16, conf=0.0)
    targets = [BoxTarget(5), ClassTarget(2)]
    batched = engine.attribute(images, targets)
    assert batched.shape == (2, 1, 64, 64) and bool((batched >= 0).all()) and float(batched.sum()) > 0
    assert torch.equal(batched, engine.attribute(images, targets))
    single = torch.cat([engine.attribute(images[i : i + 1], targets[i]) for i in range(2)])
    assert torch.allclose(batched, single, atol=1e-6)
    boxes = engine.attribute_boxes(images[:1], targets)
    assert torch.allclose(boxes, torch.cat([engine.attribute(images[:1], t) for t in targets]), atol=1e-6)
    other_seed = get_engine("d_rise", adapter, num_masks=16, conf=0.0, seed=1).attribute(images, targets)
    assert not torch.equal(batched, other_seed)
    assert adapter.conf == 0.25  # the low masked-image threshold did not leak into the user's adapter


def test_tiny_net_no_side_effects_under_inference_mode(tiny_net, images):
    adapter = YOLOv8Adapter(tiny_net)
    tiny_net.train()
    state = {k: v.clone() for k, v in tiny_net.state_dict().items()}
    rng = torch.get_rng_state()
    target = MatchedBoxTarget([8.0, 8.0, 40.0, 40.0], 1)
    with torch.inference_mode():
        maps = get_engine("d_rise", adapter, num_masks=8, conf=0.0).attribute(images * 1, target)
    assert maps.shape == (2, 1, 64, 64) and not maps.is_inference() and torch.isfinite(maps).all()
    assert not hasattr(target, "last_match")  # the target is not written into
    assert all(m.training for m in tiny_net.modules())
    assert all(torch.equal(v, tiny_net.state_dict()[k]) for k, v in state.items())
    assert all(p.grad is None for p in tiny_net.parameters())
    assert not any(m._forward_hooks or m._backward_hooks or m._forward_pre_hooks for m in tiny_net.modules())
    assert torch.equal(rng, torch.get_rng_state())


class _SumTarget(Target):
    def __call__(self, raw: RawOutput) -> torch.Tensor:
        return raw.scores.sum(dim=(1, 2))


@pytest.mark.parametrize(
    ("option", "value", "match"),
    [
        ("num_masks", 0, "num_masks"),
        ("num_masks", 2.5, "num_masks"),
        ("grid_size", 0, "grid_size"),
        ("p", 0.0, r"`p`.*\(0, 1\]"),
        ("p", 1.5, r"`p`"),
        ("fill", -0.1, "fill"),
        ("conf", 2.0, "conf"),
        ("target_vector", "logits", "target_vector"),
        ("max_memory_mb", 0, "max_memory_mb"),
    ],
)
def test_bad_options(option, value, match):
    with pytest.raises(ConfigurationError, match=match):
        DRiseEngine(ToyAdapter(), **{option: value})


def test_target_without_box_is_refused():
    engine = DRiseEngine(ToyAdapter(), num_masks=2)
    with pytest.raises(ConfigurationError, match="D-RISE explains one detection"):
        engine.attribute(toy_image(), _SumTarget())
    with pytest.raises(ConfigurationError, match="Candidate 3 does not exist"):
        engine.attribute(toy_image(), BoxTarget(3))


def test_one_hot_target_vector():
    """With a one-hot (1, 0) reference the toy's clean vector is already (1, 0): same map as "probs"."""
    image = toy_image()
    probs = DRiseEngine(ToyAdapter(), num_masks=40, grid_size=8, conf=0.6).attribute(image, ClassTarget(0))
    onehot = DRiseEngine(ToyAdapter(), num_masks=40, grid_size=8, conf=0.6, target_vector="one_hot")
    assert torch.allclose(probs, onehot.attribute(image, ClassTarget(0)), atol=1e-6)
    other = onehot.attribute(image, ClassTarget(1))  # reference (0, 1): cosine (1 - a) / |(a, 1 - a)|
    assert not torch.allclose(probs, other)
