"""Saliency checks against hand computations, scipy and scikit-image references."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from xaiwatch import checks as C
from xaiwatch.core.errors import ConfigurationError, ShapeError
from xaiwatch.core.types import RawOutput


def test_box_masks_use_pixel_centres_and_tolerance():
    m = C.box_masks(torch.tensor([[1.0, 2.0, 3.0, 4.0]]), (6, 5))
    expected = torch.zeros(6, 5, dtype=torch.bool)
    expected[2:4, 1:3] = True  # centres 1.5, 2.5 in x and 2.5, 3.5 in y
    assert torch.equal(m[0], expected)
    grown = C.box_masks(torch.tensor([[1.0, 2.0, 3.0, 4.0]]), (6, 5), tolerance=1)
    assert int(grown.sum()) == 4 * 4


def test_pointing_game_hits_misses_tolerance_and_constant_maps():
    maps = torch.zeros(4, 1, 40, 40)
    maps[0, 0, 10, 10] = 1.0  # inside
    maps[1, 0, 30, 30] = 1.0  # 10 px right and below the box
    maps[2, 0, 30, 30] = 1.0
    boxes = torch.tensor([[5.0, 5, 15, 15], [5, 5, 15, 15], [5, 5, 15, 15], [5, 5, 15, 15]])
    hit = C.pointing_game(maps, boxes, tolerance=0)
    assert hit.tolist() == [True, False, False, False]  # constant map 3 is a miss
    assert C.pointing_game(maps, boxes, tolerance=16).tolist() == [True, True, True, False]
    with pytest.raises(ConfigurationError):
        C.pointing_game(maps, boxes, tolerance=-1)
    with pytest.raises(ShapeError):
        C.pointing_game(maps, boxes[:2])


def test_energy_in_box_and_off_object_energy_by_hand():
    maps = torch.zeros(2, 1, 10, 10)
    maps[0, 0, 0:2, 0:2] = 1.0  # 4 inside
    maps[0, 0, 8, 8] = 4.0  # 4 outside
    maps[0, 0, 5, 5] = -3.0  # negative: ignored
    boxes = torch.tensor([[0.0, 0, 2, 2], [0, 0, 2, 2]])
    e = C.energy_in_box(maps, boxes)
    assert e[0].item() == pytest.approx(0.5) and e[1].item() == 0.0  # no positive energy: 0, not nan
    off = C.off_object_energy(maps, [torch.tensor([[0.0, 0, 2, 2], [8, 8, 9, 9]]), torch.zeros(0, 4)])
    assert off[0].item() == pytest.approx(0.0)
    maps[1, 0, 3, 3] = 2.0
    assert C.off_object_energy(maps, [torch.zeros(0, 4), torch.zeros(0, 4)]).tolist() == [1.0, 1.0]


def test_spearman_equals_scipy_with_ties_and_handles_constant_maps():
    from scipy.stats import spearmanr

    g = torch.Generator().manual_seed(0)
    a = torch.rand(3, 1, 12, 12, generator=g).round(decimals=1)  # many ties
    b = (a + 0.3 * torch.rand(3, 1, 12, 12, generator=g)).clamp(max=0.9)
    got = C.spearman(a, b)
    for i in range(3):
        assert got[i].item() == pytest.approx(spearmanr(a[i].flatten(), b[i].flatten())[0], abs=1e-6)
    zero = torch.zeros(1, 1, 12, 12)
    assert C.spearman(zero, zero).item() == 1.0
    assert C.spearman(zero, a[:1]).item() == 0.0


def test_ssim_matches_scikit_image_on_normalised_magnitudes():
    from skimage.metrics import structural_similarity

    g = torch.Generator().manual_seed(1)
    a = torch.randn(2, 1, 32, 32, generator=g)
    b = a + 0.5 * torch.randn(2, 1, 32, 32, generator=g)
    got = C.ssim(a, b)
    na, nb = C.normalize_magnitude(a), C.normalize_magnitude(b)
    for i in range(2):
        ref = structural_similarity(
            na[i].numpy().astype(np.float64),
            nb[i].numpy().astype(np.float64),
            data_range=1.0,
            gaussian_weights=True,
            sigma=1.5,
            use_sample_covariance=False,
        )
        assert got[i].item() == pytest.approx(ref, abs=0.03)
    assert C.ssim(a, a * 3).tolist() == pytest.approx([1.0, 1.0], abs=1e-6)  # scale does not matter
    assert C.ssim(a, -a).tolist() == pytest.approx([1.0, 1.0], abs=1e-6)  # magnitudes compared
    assert (C.ssim(a, b) < 0.9).all()


def test_deletion_and_insertion_curves_by_hand():
    image = torch.ones(1, 3, 4, 4)
    saliency = torch.zeros(4, 4)
    saliency[0, 0] = 1.0  # the only pixel the score depends on ranks first

    def score(x):
        return x[:, 0, 0, 0]

    auc, curve = C.deletion_insertion(score, image, saliency, mode="deletion", steps=4)
    assert curve.tolist() == [1, 0, 0, 0, 0] and auc.item() == pytest.approx(0.125)
    auc, curve = C.deletion_insertion(score, image, saliency, mode="insertion", steps=4, fill=0.0, batch_size=2)
    assert curve.tolist() == [0, 1, 1, 1, 1] and auc.item() == pytest.approx(0.875)
    bad = torch.ones(4, 4)
    bad[0, 0] = 0.0  # a map pointing everywhere else: the pixel that matters goes last
    auc_bad, curve = C.deletion_insertion(score, image, bad, mode="deletion", steps=4)
    assert curve.tolist() == [1, 1, 1, 1, 0] and auc_bad.item() == pytest.approx(0.875)
    with pytest.raises(ConfigurationError):
        C.deletion_insertion(score, image, saliency, mode="both")
    with pytest.raises(ShapeError):
        C.deletion_insertion(score, image, torch.zeros(3, 3))


def test_context_reliance_by_hand():
    images = torch.full((2, 3, 8, 8), 0.25)
    boxes = torch.tensor([[0.0, 0, 4, 4], [0, 0, 8, 8]])

    def score(x):  # the mean of the image: everything counts
        return x.mean(dim=(1, 2, 3))

    # outside the 4x4 box, 48 of 64 pixels go from 0.25 to 0.5 (grey): the score rises by 0.1875
    absolute = C.context_reliance(score, images, boxes, relative=False)
    assert absolute.tolist() == pytest.approx([-0.1875, 0.0])
    black = C.context_reliance(score, images, boxes, fill="black")
    assert black.tolist() == pytest.approx([0.75, 0.0])  # 48/64 of the score lost
    low = C.context_reliance(score, images, boxes, fill="black", min_score=0.3)
    assert low.isnan().all()
    photo = torch.zeros(3, 8, 8)
    assert C.context_reliance(score, images, boxes, fill=photo).tolist() == pytest.approx([0.75, 0.0])
    with pytest.raises(ConfigurationError, match="fill"):
        C.context_reliance(score, images, boxes, fill="noise")


def test_fill_image_variants():
    x = torch.rand(2, 3, 16, 16)
    assert torch.equal(C.fill_image(x, "grey"), torch.full_like(x, 0.5))
    mean = C.fill_image(x, "mean")
    assert torch.allclose(mean[:, :, 3, 5], x.mean(dim=(2, 3)))
    from xaiwatch.explain.captum_methods import blur

    assert torch.equal(C.fill_image(x, "blur"), blur(x))


def test_stability_is_one_without_noise_and_lower_with_it():
    w = torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(0))

    def map_fn(x):  # a map that depends on the input
        return (x * w).sum(1, keepdim=True) ** 2

    x = torch.rand(2, 3, 16, 16)
    assert C.stability(map_fn, x, noise=0.0).tolist() == pytest.approx([1.0, 1.0], abs=1e-6)
    noisy = C.stability(map_fn, x, noise=0.3, similarity="spearman")
    assert (noisy < 0.99).all()
    assert torch.equal(noisy, C.stability(map_fn, x, noise=0.3, similarity="spearman"))  # seeded


def test_randomize_copies_keeps_frozen_parameters_and_cascades():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Conv2d(4, 2, 1))
    model[2].weight.requires_grad_(False)  # a fixed projection, like YOLOv8's DFL
    model[1].running_mean.fill_(3.0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    copy = C.randomize(model, ["1", "2"], seed=1)
    assert torch.equal(rng, torch.get_rng_state())
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # original untouched
    assert torch.equal(copy[2].weight, model[2].weight)  # frozen kept
    assert not torch.equal(copy[2].bias, model[2].bias)
    assert torch.equal(copy[1].running_mean, torch.zeros(4))
    assert torch.equal(copy[0].weight, model[0].weight)  # not in paths
    stages = [("top", ["2"]), ("bottom", ["0"])]
    seen = [(name, m[0].weight.clone(), m[2].bias.clone()) for name, m in C.cascading_randomization(model, stages)]
    assert [s[0] for s in seen] == ["top", "bottom"]
    assert torch.equal(seen[0][1], model[0].weight) and not torch.equal(seen[1][1], model[0].weight)
    assert torch.equal(seen[0][2], seen[1][2])  # cumulative: the top stays randomised
    with pytest.raises(ConfigurationError, match="not a submodule"):
        C.randomize(model, ["7"])


def test_randomization_similarity_with_the_model_gradient(tiny_net):
    from xaiwatch.adapters import YOLOv8Adapter
    from xaiwatch.explain import get_engine
    from xaiwatch.targets import ClassTarget

    adapter = YOLOv8Adapter(tiny_net.eval())
    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    stages = adapter.randomization_stages()
    assert [s[0] for s in stages] == ["head", "neck", "backbone"]
    assert stages[0][1] == [f"model.{len(tiny_net.model) - 1}"]

    def map_fn(model):
        return get_engine("saliency", adapter.with_model(model)).attribute(x, ClassTarget(0))

    result = C.randomization_similarity(map_fn, tiny_net, stages, C.spearman)
    assert list(result) == ["head", "neck", "backbone"]
    assert all(v.shape == (2,) for v in result.values())
    assert (result["backbone"] < 0.9).all()  # a fully random model explains differently
    same = C.randomization_similarity(map_fn, tiny_net, [("none", [])], C.spearman)
    assert same["none"].tolist() == pytest.approx([1.0, 1.0])


def test_object_classes_and_flip_rate():
    boxes = torch.tensor([[[0.0, 0, 10, 10], [0, 0, 10, 11], [50, 50, 60, 60]]])
    scores = torch.tensor([[[0.9, 0.1], [0.2, 0.95], [0.1, 0.8]]])
    raw = RawOutput(boxes, scores)
    got = C.object_classes(raw, [torch.tensor([[0.0, 0, 10, 10], [100, 100, 110, 110]])])
    assert got[0].tolist() == [1, -1]  # best-scoring overlapping candidate; none overlaps the second


def test_flip_rate_on_a_detector(tiny_net):
    from xaiwatch.adapters import YOLOv8Adapter

    adapter = YOLOv8Adapter(tiny_net.eval())
    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    gt = [torch.tensor([[8.0, 8, 40, 40]]), torch.tensor([[20.0, 20, 60, 60]])]
    assert C.flip_rate(adapter, x, x.clone(), gt, iou=0.01) == 0.0  # an untrained model: loose overlap
    flipped = C.flip_rate(adapter, x, 1 - x, gt, iou=0.01)
    with torch.no_grad():
        a = torch.cat(C.object_classes(adapter.raw(x), gt, iou=0.01))
        b = torch.cat(C.object_classes(adapter.raw(1 - x), gt, iou=0.01))
    assert (a >= 0).all() and (b >= 0).all()
    assert flipped == pytest.approx(float((a != b).float().mean()))


def test_rules_parse_validate_and_decide():
    rules, needed = C.parse_rules(
        {"energy_in_box": 0.3, "context_reliance": 0.2, "pointing_game": None}, ["saliency", "grad_cam"]
    )
    assert needed == {"energy_in_box", "context_reliance", "pointing_game"}
    assert sorted(r.key for r in rules) == ["context_reliance", "energy_in_box/grad_cam", "energy_in_box/saliency"]
    ok, reasons = C.decide(
        {"energy_in_box/saliency": 0.4, "energy_in_box/grad_cam": 0.3, "context_reliance": 0.1}, rules
    )
    assert ok and reasons == []
    ok, reasons = C.decide(
        {"energy_in_box/saliency": 0.2, "energy_in_box/grad_cam": float("nan"), "context_reliance": 0.5}, rules
    )
    assert not ok and len(reasons) == 3
    assert "energy_in_box/saliency = 0.200 (needs >= 0.3)" in reasons
    assert "energy_in_box/grad_cam = n/a (needs >= 0.3)" in reasons
    assert "context_reliance = 0.500 (needs <= 0.2)" in reasons
    one, _ = C.parse_rules({"energy_in_box/grad_cam": 0.1}, ["saliency", "grad_cam"])
    assert [r.key for r in one] == ["energy_in_box/grad_cam"]
    for bad, match in [
        ({"energy": 0.2}, "Unknown check 'energy'"),
        ({"energy_in_box": 1.5}, r"in \[0, 1\]"),
        ({"energy_in_box": True}, r"in \[0, 1\]"),
        ({"energy_concentration": -0.5}, r"in \[0, inf\]"),
        ({"energy_concentration": float("inf")}, r"finite number"),
        ({"context_swap": 1.2}, r"in \[0, 1\]"),
        ({"randomization_spearman": -2}, r"in \[-1, 1\]"),
        ({"energy_in_box/occlusion": 0.2}, "not in `methods`"),
        ({"context_reliance/saliency": 0.2}, "check of the model"),
        ({}, "non-empty"),
    ]:
        with pytest.raises(ConfigurationError, match=match):
            C.parse_rules(bad, ["saliency", "grad_cam"])
    with pytest.raises(ConfigurationError, match="at least one method"):
        C.parse_rules({"pointing_game": 0.5}, [])


def test_evaluate_checks_on_a_detector(tiny_net):
    from xaiwatch.adapters import YOLOv8Adapter
    from xaiwatch.explain import get_engine
    from xaiwatch.targets import MatchedBoxTarget

    adapter = YOLOv8Adapter(tiny_net.eval())
    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    boxes = torch.tensor([[8.0, 8, 40, 40], [20, 20, 60, 60]])
    targets = [MatchedBoxTarget(b, 0) for b in boxes]
    engines = {"saliency": get_engine("saliency", adapter)}
    state = {k: v.clone() for k, v in tiny_net.state_dict().items()}
    values, maps = C.evaluate_checks(
        adapter,
        engines,
        x,
        targets,
        boxes,
        [b[None] for b in boxes],
        set(C.CHECKS) - {"counterfactual_flip"},
        C.CheckOptions(steps=4, min_score=0.0),
    )
    assert all(torch.equal(v, tiny_net.state_dict()[k]) for k, v in state.items())
    from xaiwatch.checks.rule import MAP_CHECKS, MODEL_CHECKS

    expected = {f"{c}/saliency" for c in MAP_CHECKS} | set(MODEL_CHECKS) - {"counterfactual_flip"}
    assert set(values) == expected
    assert maps["saliency"].shape == (2, 1, 64, 64)
    one_by_one = torch.cat([engines["saliency"].attribute_boxes(x[i : i + 1], [t]) for i, t in enumerate(targets)])
    assert torch.allclose(maps["saliency"], one_by_one, atol=1e-6)  # probes explained in one batch: same maps
    _, single = C.evaluate_checks(
        adapter, engines, x, targets, boxes, [b[None] for b in boxes], {"energy_in_box"}, C.CheckOptions(batch_size=1)
    )
    assert torch.allclose(single["saliency"], one_by_one, atol=1e-6)
    assert values["energy_in_box/saliency"] == pytest.approx(float(C.energy_in_box(maps["saliency"], boxes).mean()))
    for key in ("pointing_game/saliency", "energy_in_box/saliency", "off_object_energy/saliency", "stability/saliency"):
        assert 0.0 <= values[key] <= 1.0, key
