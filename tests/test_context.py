"""The explaining context: no side effects on the model, the RNGs, or hooks, even after an error."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from torch import nn

from xaiwatch.core.context import eval_state, explaining, fork_rng, hooks_restored


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
