"""The explaining context: the one place that makes an explanation free of side effects.

Every engine computes gradients inside :func:`explaining`. Lightning validates under
``torch.inference_mode()``; an explanation needs gradients, must not update BatchNorm statistics, must not
touch ``.grad`` or ``requires_grad`` of parameters, must not consume the global random streams the training
loop uses, and must leave no hook behind. This module guarantees all of that in ``finally`` blocks.
"""

from __future__ import annotations

import contextlib
import random
import threading
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

__all__ = [
    "eval_state",
    "grad_enabled",
    "fork_rng",
    "hooks_restored",
    "explaining",
    "is_explaining",
    "reset_caches",
    "register_cache_reset",
]

_HOOK_DICTS = (
    "_forward_hooks",
    "_forward_pre_hooks",
    "_backward_hooks",
    "_backward_pre_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called",
    "_forward_pre_hooks_with_kwargs",
    "_state_dict_hooks",
    "_load_state_dict_pre_hooks",
)


@contextlib.contextmanager
def eval_state(module: nn.Module) -> Iterator[nn.Module]:
    """Put every submodule in eval mode and restore each one's own ``training`` flag afterwards.

    ``module.train(mode)`` would set one flag for all submodules; a user may deliberately keep some frozen
    parts in eval mode while training, so the flags are saved and restored module by module.
    """
    saved = [(m, m.training) for m in module.modules()]
    try:
        module.eval()
        yield module
    finally:
        for m, flag in saved:
            m.training = flag


@contextlib.contextmanager
def grad_enabled(device_type: str | None = None) -> Iterator[None]:
    """Leave ``inference_mode``/``no_grad`` and autocast, so gradients can be computed in full precision."""
    device_types = {device_type} if device_type else {"cpu"} | ({"cuda"} if torch.cuda.is_available() else set())
    with contextlib.ExitStack() as stack:
        stack.enter_context(torch.inference_mode(False))
        stack.enter_context(torch.enable_grad())
        for dt in sorted(device_types):
            stack.enter_context(torch.autocast(device_type=dt, enabled=False))
        yield


@contextlib.contextmanager
def fork_rng(seed: int | None = None) -> Iterator[None]:
    """Save the torch (CPU and every CUDA device), numpy and python RNG states and restore them afterwards.

    Args:
        seed: when given, every generator is seeded with it inside the context so that stochastic methods
            (SmoothGrad, D-RISE masks) give the same map each epoch for the same model.
    """
    py_state = random.getstate()
    np_state = np.random.get_state()
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices, enabled=True):
        try:
            if seed is not None:
                random.seed(seed)
                np.random.seed(seed % 2**32)
                torch.manual_seed(seed)
            yield
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)


def _hook_snapshot(module: nn.Module) -> list[tuple[Any, str, set[Any]]]:
    snap = []
    for m in module.modules():
        for name in _HOOK_DICTS:
            d = getattr(m, name, None)
            if isinstance(d, dict):
                snap.append((m, name, set(d.keys())))
    return snap


@contextlib.contextmanager
def hooks_restored(module: nn.Module) -> Iterator[None]:
    """Remove, on exit, every module hook registered on ``module`` or its submodules inside the context.

    Captum and our engines remove their own hooks; this is the backstop that makes "no hook left behind"
    true even when a third-party method fails half-way.
    """
    snap = _hook_snapshot(module)
    try:
        yield
    finally:
        for m, name, keys in snap:
            d = getattr(m, name)
            for k in [k for k in d if k not in keys]:
                del d[k]


#: functions ``fn(submodule)`` that invalidate one model family's head caches, registered by the adapters
#: (core knows no model family); see :func:`register_cache_reset`
_CACHE_RESETS: list[Callable[[nn.Module], None]] = []


def register_cache_reset(fn: Callable[[nn.Module], None]) -> Callable[[nn.Module], None]:
    """Register ``fn(submodule)``, called by :func:`reset_caches` on every submodule (adapters do, at import)."""
    if fn not in _CACHE_RESETS:
        _CACHE_RESETS.append(fn)
    return fn


def reset_caches(module: nn.Module) -> None:
    """Invalidate tensors that detection heads cache between calls.

    Each adapter registers what its family caches (:func:`register_cache_reset`: ultralytics' ``Detect`` anchors,
    DAMO-YOLO's ``ZeroHead`` priors); a module may also define ``_xaiwatch_reset_caches()``. A cache built under
    ``inference_mode`` cannot be saved for backward ("Inference tensors cannot be saved for backward"), and one
    built with autograd must not leak into inference either, so they are reset on entry and exit.
    """
    for m in module.modules():
        for fn in _CACHE_RESETS:
            fn(m)
        if hasattr(m, "_xaiwatch_reset_caches"):
            m._xaiwatch_reset_caches()


#: per thread: ``id(model)`` -> how many explaining contexts of that model are open (see :func:`explaining`)
_ACTIVE = threading.local()


def is_explaining(model: nn.Module) -> bool:
    """Whether this thread is inside :func:`explaining` of ``model`` (then a nested entry is cheap).

    Example:
        >>> m = nn.Linear(2, 2)
        >>> with explaining(m):
        ...     inside = is_explaining(m)
        >>> inside, is_explaining(m)
        (True, False)
    """
    return getattr(_ACTIVE, "depth", {}).get(id(model), 0) > 0


@contextlib.contextmanager
def _hooks_since(module: nn.Module) -> Iterator[None]:
    """Remove, on exit, every hook of ``module`` registered inside the context, told by its handle id.

    Every module hook is keyed by its :class:`~torch.utils.hooks.RemovableHandle` id, and ids only grow, so the
    hooks added inside are those with an id from the counter's value at entry on: entering is free, and exit walks
    the modules only when some hook was registered meanwhile. (:func:`hooks_restored` also catches keys put in a
    hook dict by hand; the outermost :func:`explaining` uses it.)
    """
    start = RemovableHandle.next_id
    try:
        yield
    finally:
        if RemovableHandle.next_id != start:
            for m in module.modules():
                for name in _HOOK_DICTS:
                    d = getattr(m, name, None)
                    if d:
                        for k in [k for k in d if isinstance(k, int) and k >= start]:
                            del d[k]


@contextlib.contextmanager
def _counted(model: nn.Module) -> Iterator[None]:
    depth = getattr(_ACTIVE, "depth", None)
    if depth is None:
        depth = _ACTIVE.depth = {}
    key = id(model)
    depth[key] = depth.get(key, 0) + 1
    try:
        yield
    finally:
        depth[key] -= 1
        if not depth[key]:
            del depth[key]


@contextlib.contextmanager
def explaining(model: nn.Module, seed: int | None = 0, device_type: str | None = None) -> Iterator[Callable]:
    """Context in which every explanation runs.

    Inside it: every submodule is in eval mode, gradients are enabled even under an enclosing
    ``inference_mode``, autocast is off, the global RNGs are forked (and seeded with ``seed``), cached
    anchors are reset, and every hook added inside is removed on exit. Parameters keep their
    ``requires_grad``; engines must compute gradients with :func:`torch.autograd.grad` only, so ``.grad``
    is never written. On exit every one of these is restored, also after an exception.

    Entered again for the same model inside itself (a callback enters it once per run and every engine call
    inside enters it too), it costs about 1 ms instead of 10-20 ms on YOLOv8n (measured by bench_explain_run):
    the nested entry enables gradients, forks and seeds the RNGs and removes the hooks added inside, as the
    outermost does, but leaves the eval flags, the full hook snapshot and the head caches to the outermost entry
    (the model is already in eval mode; caches built inside were built with autograd allowed). Do not enter
    ``torch.inference_mode()`` inside it and then explain: a cache built there would be an inference tensor.

    Yields:
        a function ``prepare(x)`` that returns a detached clone of ``x`` usable for autograd (inference
        tensors made by Lightning's validation loop cannot be used directly).

    Example:
        >>> m = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2)).train()
        >>> with torch.inference_mode(), explaining(m) as prepare:
        ...     x = prepare(torch.ones(3, 2)).requires_grad_()
        ...     (g,) = torch.autograd.grad(m(x).sum(), x)
        >>> m.training, g.shape
        (True, torch.Size([3, 2]))
    """
    if device_type is None:
        p = next(model.parameters(), None)
        device_type = p.device.type if p is not None else "cpu"

    def prepare(x: torch.Tensor) -> torch.Tensor:
        return x.detach().clone()

    nested = is_explaining(model)
    with contextlib.ExitStack() as stack:
        stack.enter_context(grad_enabled(device_type))
        stack.enter_context(fork_rng(seed))
        if nested:
            if model.training:  # switched back to training inside the outer context: eval again, restored after
                stack.enter_context(eval_state(model))
            stack.enter_context(_hooks_since(model))
        else:
            stack.enter_context(eval_state(model))
            stack.enter_context(hooks_restored(model))
            reset_caches(model)
            stack.callback(reset_caches, model)
        stack.enter_context(_counted(model))
        yield prepare
