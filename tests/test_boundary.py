"""Decision boundaries: attacks against Captum, minimal epsilon against a hand computation, monotone in the attack's
strength, the perturbed image really flips the detection, no side effects; the callback end to end."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from torch import nn

from xaiwatch.adapters import DetectorAdapter, YOLOv8Adapter
from xaiwatch.analysis import attack_object, min_epsilon
from xaiwatch.analysis.boundary import survives
from xaiwatch.core.context import explaining
from xaiwatch.core.errors import ConfigurationError
from xaiwatch.core.types import RawOutput
from xaiwatch.targets import MatchedBoxTarget


class GridNet(nn.Module):
    """Candidates: 16 px boxes at stride 8; class ``c``'s score is ``sigmoid(10 * mean of channel c - 5)``."""

    def __init__(self) -> None:
        super().__init__()
        self.pool = nn.AvgPool2d(16, stride=8)
        self.gain = nn.Parameter(torch.tensor(10.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.gain * self.pool(x) - 5.0)


class GridAdapter(DetectorAdapter):
    def raw(self, images: torch.Tensor) -> RawOutput:
        s = self.model(images)
        n = s.shape[-1]
        ys, xs = torch.meshgrid(torch.arange(n) * 8.0, torch.arange(n) * 8.0, indexing="ij")
        boxes = torch.stack([xs, ys, xs + 16, ys + 16], -1).reshape(-1, 4)
        return RawOutput(boxes.expand(s.shape[0], -1, -1), s.flatten(2).transpose(1, 2))

    def layer_names(self) -> dict[str, str]:
        return {"pool": "pool"}


BOX = [16.0, 16.0, 32.0, 32.0]


def _grid():
    image = torch.full((1, 3, 64, 64), 0.2)
    image[0, 0, 16:32, 16:32] = 1.0  # a red square exactly on one candidate: class 0 score sigmoid(5)
    return GridAdapter(GridNet(), names=["red", "green", "blue"], conf=0.5), image


def test_min_eps_matches_hand_computation():
    adapter, image = _grid()
    # score after an attack at eps: sigmoid(10 * (1 - eps) - 5); detected while > 0.5, i.e. flipped for eps >= 0.5
    for attack in ("fgsm", "pgd"):
        r = min_epsilon(adapter, image, BOX, 0, attack=attack, max_eps=0.8, steps=3, bisection_steps=6)
        assert r.lower < 0.5 <= r.min_eps and r.min_eps - r.lower == pytest.approx(0.8 / 2**6)
        assert r.clean_score == pytest.approx(1 / (1 + math.exp(-5)), abs=1e-6)
        for eps, score in r.curve:
            assert score == pytest.approx(1 / (1 + math.exp(-(10 * (1 - eps) - 5))), abs=1e-5)
        delta = r.adversarial.image - image
        assert float(delta.abs().max()) <= r.min_eps + 1e-6  # inside the L-inf ball
        assert float(delta[0, 0, 16:32, 16:32].max()) == pytest.approx(-r.min_eps, abs=1e-6)
    held = min_epsilon(adapter, image, BOX, 0, attack="fgsm", max_eps=0.3)  # too small a ball: censored
    assert held.min_eps is None and held.lower == 0.3 and held.adversarial is not None
    absent = min_epsilon(adapter, image, [40.0, 40, 56, 56], 0)  # nothing detected there: eps 0, no attack
    assert absent.min_eps == 0.0 and absent.steps == 0
    capped = min_epsilon(adapter, image, BOX, 0, attack="pgd", steps=3, max_eps=0.8, bisection_steps=6, max_steps=7)
    assert capped.steps <= 7 and capped.lower < 0.5 <= capped.min_eps


def test_perturbed_image_flips_the_detection_through_the_adapter():
    adapter, image = _grid()
    r = min_epsilon(adapter, image, BOX, 0, attack="pgd", max_eps=0.8)
    assert survives(adapter.detect(image)[0], torch.tensor(BOX), 0, 0.5)
    after = adapter.detect(r.adversarial.image)[0]
    assert not survives(after, torch.tensor(BOX), 0, 0.5)
    assert len(r.adversarial.detections) == len(after)  # the recorded detections are the adapter's own
    assert torch.equal(r.adversarial.detections.boxes, after.boxes)


def _responsive_yolo(tiny_net) -> YOLOv8Adapter:
    from test_error_analysis import make_responsive

    return YOLOv8Adapter(make_responsive(tiny_net).eval(), conf=0.5)


def test_fgsm_equals_captum(tiny_net, images):
    from captum.robust import FGSM

    adapter = _responsive_yolo(tiny_net)
    image = images[:1]
    dets = adapter.detect(image)[0]
    box, label = dets.boxes[0], int(dets.labels[0])
    ours = attack_object(adapter, image, box, label, eps=0.05, attack="fgsm")
    target = MatchedBoxTarget(box, label, conf=adapter.conf)
    with explaining(adapter.model) as prepare:
        fgsm = FGSM(lambda x: target(adapter.raw(x)), loss_func=lambda out, _: out, lower_bound=0, upper_bound=1)
        fgsm.zero_thresh = 0.0
        theirs = fgsm.perturb(prepare(image), 0.05, target=None, targeted=True)
    assert torch.allclose(ours.image, theirs, atol=1e-6)
    assert float((ours.image - image).abs().amax()) == pytest.approx(0.05, abs=1e-6)


def test_min_eps_monotone_in_attack_strength_on_yolo(tiny_net, images):
    adapter = _responsive_yolo(tiny_net)
    image = images[:1]
    dets = adapter.detect(image)[0]
    box, label = dets.boxes[0], int(dets.labels[0])
    attacks = [("fgsm", 1), ("pgd", 2), ("pgd", 5)]
    found = [
        min_epsilon(adapter, image, box, label, attack=a, steps=s, max_eps=0.3, bisection_steps=5) for a, s in attacks
    ]
    values = [math.inf if r.min_eps is None else r.min_eps for r in found]
    assert values == sorted(values, reverse=True), values
    assert math.isfinite(values[-1])  # the strongest attack does flip it
    for eps in np.linspace(0.005, 0.03, 4):  # pointwise: a weaker attack never flips where a stronger one does not
        flipped = [attack_object(adapter, image, box, label, float(eps), attack=a, steps=s).flipped for a, s in attacks]
        assert flipped == sorted(flipped), (eps, flipped)
    strongest = found[-1]
    assert not survives(adapter.detect(strongest.adversarial.image)[0], box, label, 0.5)


def test_no_side_effects(tiny_net, images):
    adapter = _responsive_yolo(tiny_net)
    tiny_net.train()
    tiny_net.model[2].eval()
    modes = [m.training for m in tiny_net.modules()]
    state = {k: v.clone() for k, v in tiny_net.state_dict().items()}
    tiny_net.model[0].conv.weight.grad = torch.ones_like(tiny_net.model[0].conv.weight)
    rng = torch.get_rng_state()
    with torch.inference_mode():  # as inside Lightning's validation
        min_epsilon(adapter, images[:1], [8.0, 8, 40, 40], 0, attack="pgd", max_eps=0.3, bisection_steps=2)
    assert [m.training for m in tiny_net.modules()] == modes
    assert all(torch.equal(v, tiny_net.state_dict()[k]) for k, v in state.items())
    assert torch.equal(tiny_net.model[0].conv.weight.grad, torch.ones_like(tiny_net.model[0].conv.weight))
    assert all(p.grad is None for n, p in tiny_net.named_parameters() if n != "model.0.conv.weight")
    assert torch.equal(rng, torch.get_rng_state())
    assert sum(len(m._forward_hooks) + len(m._backward_hooks) for m in tiny_net.modules()) == 0


def test_bad_input():
    from xaiwatch.callbacks import DecisionBoundaryCallback

    adapter, image = _grid()
    with pytest.raises(ConfigurationError, match="Unknown attack 'cw'.*fgsm or pgd"):
        min_epsilon(adapter, image, BOX, 0, attack="cw")
    with pytest.raises(ConfigurationError, match="Unknown attack"):
        DecisionBoundaryCallback(attack="deepfool")
    with pytest.raises(ConfigurationError, match="max_eps"):
        DecisionBoundaryCallback(max_eps=2.0)
    with pytest.raises(ConfigurationError, match="steps"):
        DecisionBoundaryCallback(steps=0)
    with pytest.raises(ConfigurationError, match="iou_threshold"):
        DecisionBoundaryCallback(iou_threshold=0.0)
    with pytest.raises(ConfigurationError, match="budget_seconds"):
        DecisionBoundaryCallback(budget_seconds=0)
    with pytest.raises(ConfigurationError, match="eps"):
        attack_object(adapter, image, BOX, 0, eps=-0.1)


def test_callback_logs_min_eps_and_pictures(tmp_path, square_loaders):
    from test_error_analysis import _events, _module, _trainer

    from xaiwatch.callbacks import DecisionBoundaryCallback

    cb = DecisionBoundaryCallback(num_probe=2, max_objects=1, max_eps=0.2, steps=2, bisection_steps=2, on_error="raise")
    trainer = _trainer(tmp_path, [cb])
    trainer.fit(_module(), *square_loaders)
    acc = _events(trainer.logger.log_dir)
    for subject in ("probe_00", "probe_01"):
        values = acc.Scalars(f"boundary/min_eps/{subject}")
        assert [e.step for e in values] == [0, 2, 4]
        flipped = [e.value for e in acc.Scalars(f"boundary/flipped/{subject}")]
        for v, f in zip(values, flipped):
            assert 0.0 <= v.value <= 0.2
            if v.value == 0.0:  # not detected at all: nothing was flipped (the picture says "not detected")
                assert f == 0.0
            elif v.value < 0.2:  # flipped at that epsilon
                assert f == 1.0
        pictures = acc.Images(f"boundary/picture/{subject}")
        assert [e.step for e in pictures] == [0, 2, 4] and pictures[0].width > 3 * pictures[0].height
    last = cb.last_results["probe_00"]
    assert last.min_eps == 0.0 or last.steps > 0
    state = cb.state_dict()
    assert len(state["probe_indices"]) == 2 and len(state["tracked"]) == 2
    restored = DecisionBoundaryCallback(num_probe=2, seed=7)
    restored.load_state_dict(state)
    assert restored.state_dict() == state
    assert DecisionBoundaryCallback(attack="fgsm").state_key != DecisionBoundaryCallback(attack="pgd").state_key


def test_budget_skips_objects_with_a_warning(tmp_path, square_loaders):
    from test_error_analysis import _events, _module, _trainer

    from xaiwatch.callbacks import DecisionBoundaryCallback

    cb = DecisionBoundaryCallback(num_probe=2, budget_seconds=1e-9, on_error="raise", probe_at_start=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer = _trainer(tmp_path, [cb], epochs=1)
        trainer.fit(_module(), *square_loaders)
    assert any("budget_seconds" in str(w.message) and "2 of 2 objects" in str(w.message) for w in caught)
    assert "boundary/min_eps/probe_00" not in _events(trainer.logger.log_dir).Tags()["scalars"]
