"""swap_class_drop (the class share lost on other validation images' surroundings) and the gate's ``confirm``,
against hand computation."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

import xaiwatch.checks as C
from xaiwatch.checks.context import class_shares
from xaiwatch.core.errors import ConfigurationError
from xaiwatch.core.types import RawOutput

BOXES = torch.tensor([[4.0, 4, 14, 14], [18, 18, 28, 28], [4, 18, 14, 28], [18, 4, 28, 14]])


class _Toy(nn.Module):
    """One candidate per box of ``BOXES``. Two classes (red 0, green 1) decided from the mean colour inside the
    candidate (``uses="object"``) or outside it (``"context"``); ``one_class``: a single class whose score is the
    redness of the surroundings (a detector that finds objects only on a red background)."""

    def __init__(self, uses: str = "context", one_class: bool = False):
        super().__init__()
        self.register_buffer("cand", BOXES.clone())
        self.uses, self.one_class = uses, one_class

    def forward(self, x: torch.Tensor) -> RawOutput:
        masks = C.box_masks(self.cand, x.shape[-2:]).float()
        region = masks if self.uses == "object" else 1 - masks
        mean = torch.einsum("bchw,nhw->bnc", x, region) / region.sum(dim=(1, 2))[None, :, None]
        if self.one_class:
            scores = torch.sigmoid(8 * (mean[..., :1] - 0.3))
        else:
            scores = torch.sigmoid(8 * (mean[..., :2] - mean[..., 2:3]))
        return RawOutput(self.cand[None].expand(x.shape[0], -1, -1), scores)


class _Adapter:
    def __init__(self, model):
        self.model, self.conf = model, 0.25

    def raw(self, images):
        return self.model(images)


def _scene(labels, context):
    """32 px images: object ``i`` (its class colour) in ``BOXES[i]`` on a context of colour ``context[i]`` (a
    channel) and brightness ``context_value[i]``."""
    images = torch.zeros(len(labels), 3, 32, 32)
    for i, (b, c) in enumerate(zip(BOXES.long(), labels)):
        channel, value = context[i]
        images[i, channel] = value
        images[i, :, b[1] : b[3], b[0] : b[2]] = 0.0
        images[i, int(c), b[1] : b[3], b[0] : b[2]] = 1.0
    return images


def _hand_class_drop(model, images, labels, donors):
    """The relative class-share drop of each probe's candidate, pasted (its box alone) onto each donor's image."""
    keep = C.box_masks(BOXES, (32, 32))[:, None]
    with torch.no_grad():
        p0 = model(images).scores[torch.arange(4), torch.arange(4)]  # candidate i speaks for object i
        share0 = p0[torch.arange(4), labels] / p0.sum(1)
        drops = []
        for slot in range(len(donors[0])):
            pasted = torch.where(keep, images, images[[d[slot] for d in donors]])
            p1 = model(pasted).scores[torch.arange(4), torch.arange(4)]
            drops.append((share0 - p1[torch.arange(4), labels] / p1.sum(1)) / share0)
    return torch.stack(drops).mean(0)


def test_class_shares_by_hand():
    raw = RawOutput(
        torch.tensor([[[0.0, 0, 10, 10], [0, 0, 9, 10], [20, 20, 30, 30]]]),
        torch.tensor([[[0.2, 0.6], [0.3, 0.1], [0.9, 0.0]]]),
    )
    # the overlapping candidate with the highest class-0 probability is the 2nd (0.3): 0.3 / (0.3 + 0.1)
    assert class_shares(raw, torch.tensor([[0.0, 0, 10, 10]]), torch.tensor([0])).tolist() == pytest.approx([0.75])
    assert class_shares(raw, torch.tensor([[0.0, 0, 10, 10]]), torch.tensor([1])).tolist() == pytest.approx([0.75])
    assert math.isnan(float(class_shares(raw, torch.tensor([[50.0, 50, 60, 60]]), torch.tensor([0]))[0]))


@pytest.mark.parametrize("uses", ["context", "object"])
def test_swap_class_drop_is_the_class_share_drop_by_hand(uses):
    labels = torch.tensor([0, 1, 0, 1])
    images = _scene(labels, [(int(c), 0.6) for c in labels])  # the context carries the class colour
    model = _Toy(uses)
    gt = [b[None] for b in BOXES]
    out = C.context_swap(
        _Adapter(model), images, BOXES, labels, gt, [lab[None] for lab in labels], fills=("swap",), min_score=0.25
    )
    donors = C.context_donors(BOXES, labels, gt, [lab[None] for lab in labels], donors=2)
    expected = _hand_class_drop(model, images, labels, donors)
    assert torch.allclose(out.class_drop, expected, atol=1e-6)
    if uses == "context":  # on the other class's context the share 0.99 / (0.99 + 0.5) becomes 0.5 / (0.5 + 0.99)
        assert out.class_drop.min() > 0.45 and out.flip.tolist() == [1.0] * 4
    else:
        assert out.class_drop.abs().max() < 1e-6


def test_swap_class_drop_is_zero_on_one_class_data_while_the_score_drops():
    labels = torch.zeros(4, dtype=torch.long)
    images = _scene(labels, [(0, 0.9), (0, 0.9), (0, 0.05), (0, 0.05)])  # two tiles with a faint context
    adapter = _Adapter(_Toy("context", one_class=True))
    gt = [b[None] for b in BOXES]
    values, _ = C.evaluate_probes(
        adapter,
        {},
        images,
        [SimpleNamespace(label=0)] * 4,
        BOXES,
        gt,
        {"swap_class_drop", "context_swap_drop"},
        C.CheckOptions(min_score=0.25, context_margin=0.0),
    )
    # probes 2 and 3 score below the floor (faint context); 0 and 1 lose most of their score on their donors 1..3
    assert values["swap_class_drop"].isnan().tolist() == [False, False, True, True]
    assert values["swap_class_drop"][:2].tolist() == [0.0, 0.0]  # one class: its share is 1 on every candidate
    assert float(values["context_swap_drop"][1]) > 0.5  # pasted onto faint tiles: the objectness is lost
    verdict = C.judge(
        {"relative_context_reliance": [0.6] * 4, "swap_class_drop": values["swap_class_drop"]},
        C.parse_rules({"relative_context_reliance": 0.05, "swap_class_drop": 0.05}, [])[0],
        min_defined=2,
        confirm={"relative_context_reliance": "swap_class_drop"},
    )
    assert verdict.status == "inconclusive" and "not confirmed by swap_class_drop" in verdict.reasons[0]


def test_judge_confirm_refuses_only_when_both_fail():
    rules, _ = C.parse_rules({"relative_context_reliance": 0.05, "swap_class_drop": 0.05}, [])
    confirm = {"relative_context_reliance": "swap_class_drop"}
    high, low = [0.3, 0.35, 0.4, 0.3], [0.0, 0.01, -0.01, 0.0]

    def status(rcr, scd):
        v = C.judge({"relative_context_reliance": rcr, "swap_class_drop": scd}, rules, confirm=confirm)
        return v.status, [r.status for r in v.results], len(v.reasons)

    assert status(high, high) == ("fail", ["fail", "fail"], 1)  # one reason: the confirming check is not one
    assert status(high, low) == ("inconclusive", ["inconclusive", "pass"], 1)
    assert status(low, high) == ("pass", ["pass", "fail"], 0)  # the confirming check never refuses by itself
    assert status(low, low) == ("pass", ["pass", "pass"], 0)
    assert C.judge({"relative_context_reliance": high, "swap_class_drop": high}, rules).status == "fail"
    both = C.judge({"relative_context_reliance": high, "swap_class_drop": high}, rules, confirm=confirm)
    assert both.results[1].confirms == "relative_context_reliance"
    assert "[confirms relative_context_reliance]" in both.lines()[1]
    with pytest.raises(ConfigurationError, match="not gated checks"):
        C.judge({}, rules, confirm={"relative_context_reliance": "context_swap"})


def test_gate_confirm_defaults_and_validation():
    from xaiwatch.callbacks import SaliencyGate
    from xaiwatch.callbacks.gate import DEFAULT_CHECKS, DEFAULT_CONFIRM

    assert SaliencyGate().confirm == DEFAULT_CONFIRM == {"relative_context_reliance": "swap_class_drop"}
    assert all(DEFAULT_CHECKS[k] is not None and DEFAULT_CHECKS[v] is not None for k, v in DEFAULT_CONFIRM.items())
    assert SaliencyGate(checks={"relative_context_reliance": 0.05}).confirm == {}  # own checks: no confirmation
    with pytest.raises(ConfigurationError, match="`confirm` must map a gated check"):
        SaliencyGate(checks={"relative_context_reliance": 0.05, "swap_class_drop": None}, confirm=DEFAULT_CONFIRM)
    with pytest.raises(ConfigurationError, match="`confirm` must map"):
        SaliencyGate(checks={"swap_class_drop": 0.05}, confirm={"swap_class_drop": "swap_class_drop"})
    with pytest.raises(ConfigurationError, match=r"in \[0, 1\]"):
        SaliencyGate(checks={"swap_class_drop": 1.5})
    calibration = json.loads((Path(__file__).parents[1] / "docs" / "calibration" / "calibration.json").read_text())
    margin = C.CheckOptions().context_margin
    chosen = {k.replace(f"@{margin:g}", ""): v.replace(f"@{margin:g}", "") for k, v in calibration["confirm"].items()}
    assert chosen == DEFAULT_CONFIRM
    assert all(r["verdict"] != "fail" for r in calibration["real"].values())  # no real clean model refused
