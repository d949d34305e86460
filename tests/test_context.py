"""The explaining context: no side effects on the model, the RNGs, or hooks, even after an error."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from torch import nn

from xaiwatch.core.context import eval_state, explaining, fork_rng, hooks_restored, is_explaining


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.SiLU(), nn.Dropout(0.5))


def _snapshot(m: nn.Module):
    return (
        {k: v.clone() for k, v in m.state_dict().items()},
        [x.training for x in m.modules()],
        [p.requires_grad for p in m.parameters()],
        [None if p.grad is None else p.grad.clone() for p in m.parameters()],
    )


def _assert_same(a, b) -> None:
    assert a[0].keys() == b[0].keys()
    for k in a[0]:
        assert torch.equal(a[0][k], b[0][k]), k
    assert a[1] == b[1] and a[2] == b[2]
    assert all((x is None and y is None) or torch.equal(x, y) for x, y in zip(a[3], b[3]))


def test_no_side_effects_inside_inference_mode():
    m = _model().train()
    m[1].eval()  # a user-frozen BN must stay in eval afterwards, the others in train
    m[0].weight.grad = torch.full_like(m[0].weight, 3.0)
    before = _snapshot(m)
    x = torch.rand(2, 3, 8, 8)
    rng = (torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate())
    with torch.inference_mode():
        x = x * 1  # an inference tensor, as Lightning's validation produces
        with explaining(m) as prepare:
            xi = prepare(x).requires_grad_()
            assert torch.is_grad_enabled() and not torch.is_inference_mode_enabled()
            assert not any(mod.training for mod in m.modules())
            (g,) = torch.autograd.grad(m(xi).sum(), xi)
            torch.rand(5), np.random.rand(5), random.random()  # consume the streams inside
    assert g.shape == x.shape and g.abs().sum() > 0
    _assert_same(before, _snapshot(m))
    assert torch.equal(rng[0], torch.get_rng_state())
    assert np.array_equal(rng[1], np.random.get_state()[1]) and rng[2] == random.getstate()


def test_restored_after_error_and_hooks_removed():
    m = _model().train()
    before = _snapshot(m)
    kept = m[0].register_forward_hook(lambda *a: None)  # the user's own hook must survive
    with pytest.raises(RuntimeError, match="boom"), explaining(m):
        m[2].register_forward_hook(lambda *a: None)
        m[1].register_full_backward_hook(lambda *a: None)
        raise RuntimeError("boom")
    _assert_same(before, _snapshot(m))
    assert len(m[0]._forward_hooks) == 1 and kept.id in m[0]._forward_hooks
    assert not m[2]._forward_hooks and not m[1]._backward_hooks


def test_seeded_fork_repeats_and_eval_state_restores_each_flag():
    with fork_rng(seed=3):
        a = torch.rand(3)
    with fork_rng(seed=3):
        b = torch.rand(3)
    assert torch.equal(a, b)
    m = _model().train()
    m[3].eval()
    with eval_state(m):
        pass
    assert [x.training for x in m.modules()] == [True, True, True, True, False]
    with hooks_restored(m):
        m.register_forward_pre_hook(lambda *a: None)
    assert not m._forward_pre_hooks


def test_ultralytics_anchor_cache_reset_between_inference_and_grad(tiny_net, images):
    """A Detect anchor cache built under inference_mode would break backward: the context resets it."""
    from xaiwatch.adapters import YOLOv8Adapter
    from xaiwatch.targets import ClassTarget

    adapter = YOLOv8Adapter(tiny_net)
    tiny_net.eval()
    with torch.inference_mode():
        tiny_net(images)  # caches anchors as inference tensors
        with explaining(tiny_net) as prepare:
            x = prepare(images).requires_grad_()
            (g,) = torch.autograd.grad(adapter.score(x, ClassTarget(0)).sum(), x)
    assert torch.isfinite(g).all() and g.abs().sum() > 0


def _rng_state():
    return torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate()


def _same_rng(a, b) -> bool:
    return torch.equal(a[0], b[0]) and np.array_equal(a[1], b[1]) and a[2] == b[2]


def test_nested_entry_keeps_every_guarantee_of_its_own():
    """Inside an outer context a nested entry is cheap, yet it seeds, forks and removes its hooks as before."""
    m = _model().train()
    m[1].eval()
    before = _snapshot(m)
    outer_rng = _rng_state()
    kept = m[0].register_forward_hook(lambda *a: None)
    with explaining(m, seed=5):
        assert is_explaining(m) and not is_explaining(m[0])
        torch.rand(3)  # the outer stream moves on
        mid = _rng_state()
        with torch.no_grad(), explaining(m, seed=7) as prepare:
            assert torch.is_grad_enabled() and not any(x.training for x in m.modules())
            first = torch.rand(4)
            m[2].register_forward_hook(lambda *a: None)
            m[1].register_forward_pre_hook(lambda *a: None)
            x = prepare(torch.rand(2, 3, 8, 8)).requires_grad_()
            (g,) = torch.autograd.grad(m(x).sum(), x)
        assert not m[2]._forward_hooks and not m[1]._forward_pre_hooks  # removed at the nested exit
        assert kept.id in m[0]._forward_hooks
        assert _same_rng(mid, _rng_state())  # the nested fork restored the outer stream
        with explaining(m, seed=7):
            assert torch.equal(first, torch.rand(4))  # seeded alike at every nested entry
        m.train()  # code inside that switches to training is put back in eval by a nested entry
        with explaining(m):
            assert not any(x.training for x in m.modules())
        assert m[0].training
    assert not is_explaining(m) and g.abs().sum() > 0
    _assert_same(before, _snapshot(m))
    assert _same_rng(outer_rng, _rng_state())
    assert len(m[0]._forward_hooks) == 1


def test_nested_entry_removes_hooks_after_an_error():
    m = _model()
    with explaining(m):
        with pytest.raises(RuntimeError, match="boom"), explaining(m):
            m[3].register_forward_hook(lambda *a: None)
            raise RuntimeError("boom")
        assert not m[3]._forward_hooks and is_explaining(m)
    assert not is_explaining(m)


def test_engines_inside_one_outer_context_give_the_same_maps(tiny_net, images):
    """ExplainCallback enters the context once per run: the maps equal those of engines entering it alone."""
    from xaiwatch.adapters import YOLOv8Adapter
    from xaiwatch.explain import get_engine
    from xaiwatch.targets import ClassTarget

    adapter = YOLOv8Adapter(tiny_net)
    engines = [get_engine("saliency", adapter), get_engine("layer_cam", adapter, layer="neck.p3")]
    with torch.inference_mode():
        x = images * 1
        alone = [e.attribute(x, ClassTarget(1)) for e in engines]
        with explaining(tiny_net):
            adapter.detect(x)  # caches anchors inside the outer context, as the callback's detection does
            inside = [e.attribute(x, ClassTarget(1)) for e in engines]
    for a, b in zip(alone, inside):
        assert a.abs().sum() > 0 and torch.equal(a, b)
