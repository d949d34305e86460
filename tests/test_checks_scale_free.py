"""Scale-free checks, the automatic context test and the gate's verdicts, against hand computation."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

import xaiwatch.checks as C
from xaiwatch.core.errors import ConfigurationError
from xaiwatch.core.types import RawOutput


def test_energy_concentration_is_energy_over_area_share():
    m = torch.zeros(2, 1, 10, 10)
    m[0, 0, :5, :5] = 3.0  # all energy on a quarter-image box
    m[1] = 1.0  # uniform
    boxes = torch.tensor([[0.0, 0, 5, 5], [0, 0, 5, 5]])
    got = C.energy_concentration(m, boxes)
    assert got.tolist() == pytest.approx([4.0, 1.0])  # 1 / 0.25 and uniform = 1
    # the same map judged on a box twice the size: energy share 1, area share 0.5 -> 2
    assert float(C.energy_concentration(m[:1], torch.tensor([[0.0, 0, 10, 5]]))) == pytest.approx(2.0)
    assert float(C.energy_concentration(torch.zeros(1, 1, 4, 4), torch.tensor([[0.0, 0, 2, 2]]))) == 0.0
    assert math.isnan(float(C.energy_concentration(m[:1], torch.tensor([[3.0, 3, 3.2, 3.2]]))))  # no pixel


def test_rank_accuracy_by_hand():
    m = torch.arange(16, dtype=torch.float32).reshape(1, 1, 4, 4)  # largest values bottom-right
    box = torch.tensor([[2.0, 2, 4, 4]])  # the 4 bottom-right pixels: 10, 11, 14, 15
    assert float(C.rank_accuracy(m, box)) == 0.5  # top 4 = 15, 14, 13, 12 -> 15 and 14 inside
    assert float(C.rank_accuracy(m, torch.tensor([[0.0, 2, 4, 4]]))) == 1.0  # bottom half = top 8
    assert float(C.rank_accuracy(-m, torch.tensor([[0.0, 2, 4, 4]]))) == 0.0
    assert math.isnan(float(C.rank_accuracy(torch.ones(1, 1, 4, 4), box)))  # constant map: no ranking


def test_relative_context_reliance_is_the_drop_over_the_own_score():
    x = torch.zeros(2, 3, 8, 8)
    x[:, :, :4, :4] = 1.0
    x[1, :, 4:, 4:] = 1.0  # image 1 also has bright context
    boxes = torch.tensor([[0.0, 0, 4, 4], [0, 0, 4, 4]])

    def score(images):
        return images.mean(dim=(1, 2, 3))

    # grey fill 0.5: image 0 goes 0.25 -> 0.25 + 0.75 * 0.5 = 0.625, image 1 0.5 -> 0.625
    rel = C.context_reliance(score, x, boxes, fill="grey", relative=True)
    assert rel.tolist() == pytest.approx([max(-1.0, (0.25 - 0.625) / 0.25), (0.5 - 0.625) / 0.5])
    ab = C.context_reliance(score, x, boxes, fill="black", relative=False)
    assert ab.tolist() == pytest.approx([0.0, 0.25])


def test_bootstrap_interval_matches_a_numpy_reference():
    v = torch.tensor([0.0, 0.1, 0.2, 0.9, float("nan"), 0.4])
    lo, hi = C.bootstrap_ci(v, level=0.9, resamples=2000, seed=3)
    gen = torch.Generator().manual_seed(3)
    ok = v[~v.isnan()].double()
    idx = torch.randint(0, 5, (2000, 5), generator=gen).numpy()
    means = ok.numpy()[idx].mean(axis=1)
    assert (lo, hi) == pytest.approx(tuple(np.quantile(means, [0.05, 0.95])))
    assert lo < float(ok.mean()) < hi
    assert C.bootstrap_ci([0.3]) == (0.3, 0.3)
    assert all(math.isnan(x) for x in C.bootstrap_ci([float("nan")]))
    with pytest.raises(ConfigurationError, match="level"):
        C.bootstrap_ci([1.0], level=1.0)


def test_format_value_never_rounds_a_failing_value_into_a_pass():
    assert C.format_value(0.4497, 0.45, "min") == "0.4497"
    assert C.format_value(0.44999991, 0.45, "min") == "0.4499999"
    assert C.format_value(0.05004, 0.05, "max") == "0.05004"
    assert C.format_value(0.4497, 0.40, "min") == "0.450"  # far from the threshold: 3 decimals
    rules, _ = C.parse_rules({"energy_in_box": 0.45}, ["saliency"])
    assert rules[0].describe(0.4497) == "energy_in_box/saliency = 0.4497 (needs >= 0.45)"


def test_judge_statuses_counts_intervals_and_lines():
    rules, _ = C.parse_rules({"context_swap": 0.3, "energy_concentration": 1.5, "pointing_game": None}, ["saliency"])
    nan = float("nan")
    values = {
        "context_swap": torch.tensor([0.0, 0.5, nan, 0.0, 0.25]),
        "energy_concentration/saliency": torch.tensor([2.0, 3.0, nan, 1.0, 2.0]),
        "pointing_game/saliency": torch.tensor([1.0, 0.0, nan, 1.0, 1.0]),
    }
    v = C.judge(values, rules, min_defined=3)
    assert v.status == "pass" and v.passed
    by_key = {r.key: r for r in v.results}
    swap = by_key["context_swap"]
    assert (swap.value, swap.defined, swap.total, swap.status) == (pytest.approx(0.1875), 4, 5, "pass")
    assert swap.ci[0] <= 0.1875 <= swap.ci[1]
    assert by_key["pointing_game/saliency"].status == "logged"
    assert len(v.lines()) == 3 and v.reasons == []
    assert v.lines()[0].startswith("pass: context_swap = 0.188 [") and "on 4/5 probes (needs <= 0.3)" in v.lines()[0]
    failing = C.judge({**values, "context_swap": torch.tensor([0.5, 0.5, 0.5, nan, nan])}, rules, min_defined=3)
    assert failing.status == "fail" and failing.reasons == [
        "context_swap = 0.500 [0.500, 0.500] on 3/5 probes (needs <= 0.3)"
    ]
    few = C.judge({**values, "context_swap": torch.tensor([0.9, nan, nan, nan, nan])}, rules, min_defined=3)
    assert few.status == "inconclusive" and "too few probes" in few.reasons[0] and "on 1/5 probes" in few.reasons[0]
    # a failing check outweighs an inconclusive one
    both = C.judge({**values, "context_swap": torch.full((5,), nan), "energy_concentration/saliency": [1.0] * 5}, rules)
    assert both.status == "fail"
    missing = C.judge({}, rules)
    assert missing.status == "inconclusive" and {r.key for r in missing.results} == {r.key for r in rules}
    assert C.Verdict("fail", v.results).to_dict()["results"][0]["key"] == "context_swap"


# ------------------------------------------------------------------------------------------------- context_swap
class _Toy(nn.Module):
    """A toy detector with one candidate per box of a fixed list; its class comes from the object or the context.

    Class 0 is red, class 1 green. ``uses="object"`` decides from the mean colour inside the candidate's box,
    ``uses="context"`` from the mean colour outside it (a context shortcut).
    """

    def __init__(self, boxes: torch.Tensor, uses: str):
        super().__init__()
        self.register_buffer("cand", boxes)
        self.uses = uses

    def forward(self, x: torch.Tensor) -> RawOutput:
        masks = C.box_masks(self.cand, x.shape[-2:]).float()  # (N, H, W)
        region = masks if self.uses == "object" else 1 - masks
        mean = torch.einsum("bchw,nhw->bnc", x, region) / region.sum(dim=(1, 2))[None, :, None]
        logits = 8 * (mean[..., :2] - mean[..., 2:3])  # red and green against blue
        scores = torch.sigmoid(logits)
        return RawOutput(self.cand[None].expand(x.shape[0], -1, -1), scores)


class _ToyAdapter:
    def __init__(self, model):
        self.model = model
        self.conf = 0.25

    def raw(self, images):
        return self.model(images)


def _toy_scene():
    """Four 32 px images: a red (0) or green (1) square object on a context of the same colour (cue consistent)."""
    boxes = torch.tensor([[4.0, 4, 14, 14], [18, 18, 28, 28], [4, 18, 14, 28], [18, 4, 28, 14]])
    labels = torch.tensor([0, 1, 0, 1])
    images = torch.zeros(4, 3, 32, 32)
    for i, (b, c) in enumerate(zip(boxes.long(), labels)):
        images[i, int(c)] = 0.6  # context of the class colour
        images[i, :, b[1] : b[3], b[0] : b[2]] = 0.0
        images[i, int(c), b[1] : b[3], b[0] : b[2]] = 1.0  # the object
    return images, boxes, labels


@pytest.mark.parametrize("uses", ["object", "context"])
def test_context_swap_on_a_toy_detector_with_a_known_answer(uses):
    images, boxes, labels = _toy_scene()
    adapter = _ToyAdapter(_Toy(boxes, uses))
    gt = [b[None] for b in boxes]
    out = C.context_swap(adapter, images, boxes, labels, gt, [lab[None] for lab in labels], min_score=0.25)
    assert out.defined.all()
    flip_swap, drop_swap = out.by_fill["swap"]
    if uses == "object":  # the object alone decides: nothing flips whatever the surroundings
        assert out.flip.tolist() == [0.0] * 4 and out.drop.abs().max() < 1e-6
    else:  # pasted on another class's context every swap flips; grey surroundings (no red/green) lose the score
        assert flip_swap.tolist() == [1.0] * 4
        assert out.by_fill["grey"][1].min() > 0.45  # grey context: red = green = blue, score 0.5 of ~1
        assert out.flip.min() >= 2 / 4  # the two swaps of the four variants at least
    # donors: the other class's images first, never overlapping the pasted box
    donors = C.context_donors(boxes, labels, gt, [lab[None] for lab in labels], donors=2)
    assert donors == [[1, 3], [2, 0], [3, 1], [0, 2]]  # cyclic order, other class first


def test_context_swap_undefined_probes_and_bad_input():
    images, boxes, labels = _toy_scene()
    adapter = _ToyAdapter(_Toy(boxes, "object"))
    gt = [b[None] for b in boxes]
    dim = images.clone()
    dim[0] *= 0.1  # probe 0's object scores below the floor: undefined, nan
    out = C.context_swap(adapter, dim, boxes, labels, gt, min_score=0.9)
    assert out.defined.tolist() == [False, True, True, True]
    assert math.isnan(float(out.flip[0])) and math.isnan(float(out.drop[0]))
    with pytest.raises(ConfigurationError, match="fills"):
        C.context_swap(adapter, images, boxes, labels, gt, fills=("noise",))
    C.check_context_source(boxes, (32, 32))
    with pytest.raises(ConfigurationError, match="no context"):
        C.check_context_source(torch.tensor([[0.0, 0, 32, 32]]), (32, 32))


def test_evaluate_probes_marks_undetected_probes_undefined(tiny_net):
    from xaiwatch.adapters import YOLOv8Adapter
    from xaiwatch.explain import get_engine
    from xaiwatch.targets import MatchedBoxTarget

    adapter = YOLOv8Adapter(tiny_net.eval())
    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    boxes = torch.tensor([[8.0, 8, 40, 40], [20, 20, 60, 60]])
    targets = [MatchedBoxTarget(b, 0) for b in boxes]
    engines = {"saliency": get_engine("saliency", adapter)}
    checks = {"energy_concentration", "rank_accuracy", "relative_context_reliance", "context_swap"}
    gt = [b[None] for b in boxes]
    every, maps = C.evaluate_probes(adapter, engines, x, targets, boxes, gt, checks, C.CheckOptions(min_score=0.0))
    assert set(every) == {
        "energy_concentration/saliency",
        "rank_accuracy/saliency",
        "relative_context_reliance",
        "context_swap",
    }
    ref = C.energy_concentration(maps["saliency"], boxes)
    assert torch.allclose(every["energy_concentration/saliency"], ref)
    assert not every["relative_context_reliance"].isnan().any()
    none, _ = C.evaluate_probes(adapter, engines, x, targets, boxes, gt, checks, C.CheckOptions(min_score=1.01))
    assert all(bool(v.isnan().all()) for v in none.values())  # no object scores above 1: nothing is defined
    means, _ = C.evaluate_checks(
        adapter, engines, x, targets, boxes, gt, {"energy_concentration"}, C.CheckOptions(min_score=0.0)
    )
    assert means["energy_concentration/saliency"] == pytest.approx(float(ref.mean()))


def test_evaluate_probes_context_swap_on_the_toy_with_one_probe_undetected():
    images, boxes, labels = _toy_scene()
    adapter = _ToyAdapter(_Toy(boxes, "context"))
    images[2] *= 0.05  # probe 2: its object (and context) almost black, score below the floor
    targets = [SimpleNamespace(label=int(c)) for c in labels]
    values, _ = C.evaluate_probes(
        adapter,
        {},
        images,
        targets,
        boxes,
        [b[None] for b in boxes],
        {"context_swap", "context_swap_drop"},
        C.CheckOptions(min_score=0.9),
    )
    assert values["context_swap"].isnan().tolist() == [False, False, True, False]
    assert values["context_swap_drop"].isnan().tolist() == [False, False, True, False]
    verdict = C.judge(values, C.parse_rules({"context_swap": 0.3}, [])[0], min_defined=3)
    assert verdict.status == "fail" and verdict.results[0].defined == 3


def test_relative_context_reliance_shares_the_grey_variant_of_context_swap():
    images, boxes, labels = _toy_scene()
    adapter = _ToyAdapter(_Toy(boxes, "context"))
    targets = [SimpleNamespace(label=int(c)) for c in labels]
    gt = [b[None] for b in boxes]
    values, _ = C.evaluate_probes(
        adapter,
        {},
        images,
        targets,
        boxes,
        gt,
        {"relative_context_reliance"},
        C.CheckOptions(min_score=0.0, context_margin=0.0),
    )
    grey = torch.where(C.box_masks(boxes, (32, 32))[:, None], images, torch.full_like(images, 0.5))
    with torch.no_grad():
        s0, _ = C.object_scores(adapter.raw(images), boxes, labels)
        s1, _ = C.object_scores(adapter.raw(grey), boxes, labels)
    assert torch.allclose(values["relative_context_reliance"], ((s0 - s1) / s0).clamp(-1, 1))


def test_context_margin_keeps_the_immediate_surroundings():
    images, boxes, labels = _toy_scene()
    adapter = _ToyAdapter(_Toy(boxes, "context"))
    gt = [b[None] for b in boxes]
    tight = C.context_swap(adapter, images, boxes, labels, gt, fills=("grey",))
    wide = C.context_swap(adapter, images, boxes, labels, gt, fills=("grey",), margin=0.5)
    grown = boxes + 5.0 * torch.tensor([-1.0, -1, 1, 1])  # half the 10 px side on every side
    grey = torch.where(C.box_masks(grown, (32, 32))[:, None], images, torch.full_like(images, 0.5))
    with torch.no_grad():
        s0, _ = C.object_scores(adapter.raw(images), boxes, labels)
        s1, _ = C.object_scores(adapter.raw(grey), boxes, labels)
    assert torch.allclose(wide.drop, ((s0 - s1) / s0).clamp(-1, 1))
    assert (wide.drop < tight.drop).all()  # the kept band of context colour holds part of the score
    with pytest.raises(ConfigurationError, match="margin"):
        C.context_swap(adapter, images, boxes, labels, gt, margin=-0.1)
