"""Internal batch sizes of multi-evaluation methods, derived from a measured pass and a memory budget.

Integrated Gradients steps, SmoothGrad / GradientShap samples and occlusion windows are evaluated in
batches. A fixed large batch costs gigabytes on a real detector (Captum's ``internal_batch_size=128`` at
320 px needs about 7.5 GB), so the batch size is derived from the memory one sample really takes: one
forward and backward of a single image is run while :func:`torch.autograd.graph.saved_tensors_hooks`
records every tensor autograd keeps for the backward pass.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Hashable

import torch

from xaiwatch.core.errors import ConfigurationError, check_shape

__all__ = ["MAX_SAMPLES_PER_BATCH", "OVERHEAD", "per_sample_bytes", "samples_per_batch", "fastest_batch", "BatchBudget"]

#: upper bound of a derived batch size: beyond it a batch is no faster on CPU and only costs memory
MAX_SAMPLES_PER_BATCH = 256

#: what a batched forward and backward really holds per sample, relative to the tensors autograd saves: the
#: backward's gradient buffers, convolution workspaces and the allocator's slack come on top (measured as growth
#: of the peak resident set per added sample: 1.35 times the saved tensors for YOLOv8n at 320 px, 2.4 times for a
#: three-convolution network at 256 px)
OVERHEAD = 2.5


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def per_sample_bytes(forward_fn: Callable[[torch.Tensor], torch.Tensor], sample: torch.Tensor) -> int:
    """Bytes one sample costs in a forward and backward pass, measured.

    The sum, over every distinct tensor storage autograd saves for the backward pass, of its size, plus the
    input and the output. Parameters (leaves that require grad, other than the input) are shared by every
    sample of a batch and are not counted. A storage saved by several operations (a convolution's input
    that is also an activation's input) counts once.

    Args:
        forward_fn: images :math:`(B, 3, H, W)` to scores :math:`(B,)`.
        sample: one image :math:`(1, 3, H, W)`.

    Returns:
        the measured number of bytes (at least 1).

    Raises:
        ShapeError: if ``sample`` is not :math:`(1, 3, H, W)`.
    """
    check_shape(sample, [1, 3, "H", "W"], "sample")
    x = sample.detach().clone().requires_grad_()
    saved: dict[tuple[torch.device, int], int] = {}
    x_key = (x.device, x.untyped_storage().data_ptr())

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        key = (t.device, storage.data_ptr())
        if not (t.is_leaf and t.requires_grad and key != x_key):  # parameters are not per sample
            saved[key] = storage.nbytes()
        return t

    with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = forward_fn(x)
    torch.autograd.grad(out.sum(), x, allow_unused=True)
    saved.setdefault(x_key, _nbytes(x))
    return max(1, sum(saved.values()) + _nbytes(out))


def samples_per_batch(
    forward_fn: Callable[[torch.Tensor], torch.Tensor],
    sample: torch.Tensor,
    max_memory_mb: float,
    cap: int = MAX_SAMPLES_PER_BATCH,
) -> int:
    """How many images one batched forward and backward may hold within ``max_memory_mb``.

    ``max(1, min(cap, floor(budget_bytes / (OVERHEAD * per_sample_bytes))))`` with :func:`per_sample_bytes`
    measured on ``sample`` and :data:`OVERHEAD` the measured ratio of a pass's real footprint to what it saves. At least one sample is always allowed, so a budget smaller than one sample still runs.

    Args:
        forward_fn: images :math:`(B, 3, H, W)` to scores :math:`(B,)`.
        sample: one image :math:`(1, 3, H, W)`.
        max_memory_mb: the budget in MiB.
        cap: the largest batch size returned.

    Returns:
        the number of images per batch, in ``[1, cap]``.

    Raises:
        ConfigurationError: if ``max_memory_mb`` or ``cap`` is not positive.

    Example:
        >>> net = torch.nn.Conv2d(3, 4, 3)
        >>> n = samples_per_batch(lambda x: net(x).sum((1, 2, 3)), torch.rand(1, 3, 16, 16), 1.0)
        >>> 1 <= n <= 256
        True
    """
    if not float(max_memory_mb) > 0:
        raise ConfigurationError(f"`max_memory_mb` must be > 0, got {max_memory_mb}.")
    if int(cap) < 1:
        raise ConfigurationError(f"`cap` must be >= 1, got {cap}.")
    budget = float(max_memory_mb) * 2**20
    return max(1, min(int(cap), math.floor(budget / (OVERHEAD * per_sample_bytes(forward_fn, sample)))))


def _seconds_per_sample(forward_fn: Callable[[torch.Tensor], torch.Tensor], sample: torch.Tensor, n: int) -> float:
    """Steady-state wall time per sample of one forward and backward of a batch of ``n`` copies of ``sample``.

    The pass runs three times and the faster of the last two counts: the first pays for page faults of memory
    the process has not touched yet, which a repeated evaluation (the next batch, the next epoch) does not pay
    again, and the minimum of two is less sensitive to other processes than one reading.
    """
    x = sample.detach().expand(n, *sample.shape[1:]).clone()
    times = []
    for _ in range(3):
        xi = x.clone().requires_grad_()
        if xi.device.type == "cuda":
            torch.cuda.synchronize(xi.device)
        start = time.perf_counter()
        torch.autograd.grad(forward_fn(xi).sum(), xi, allow_unused=True)
        if xi.device.type == "cuda":
            torch.cuda.synchronize(xi.device)
        times.append(time.perf_counter() - start)
    return min(times[1:]) / n


def fastest_batch(
    forward_fn: Callable[[torch.Tensor], torch.Tensor], sample: torch.Tensor, limit: int, tolerance: float = 0.1
) -> int:
    """The batch size, at most ``limit``, with the lowest measured time per sample.

    A bigger batch is not always faster: on a CPU the time per sample stops falling at a few images (here
    16 at 320 px for YOLOv8n: Captum's ``internal_batch_size=32`` was no faster than 16 and cost twice the
    memory) and can rise again once tensors no longer fit the allocator's cached blocks. Powers of two
    ``1, 2, 4, ...`` up to ``limit`` (and ``limit`` itself when 1.25 times the largest) are timed in steady state
    (:func:`_seconds_per_sample`), stopping once one is clearly slower (1.5 times) than the best; the largest
    size within ``1 + tolerance`` of the best time per sample wins (fewer passes for the same speed).

    Args:
        forward_fn: images :math:`(B, 3, H, W)` to scores :math:`(B,)`.
        sample: one image :math:`(1, 3, H, W)`.
        limit: the largest batch size allowed (the memory budget's :func:`samples_per_batch`).
        tolerance: how much slower per sample than the best a larger batch may be and still be chosen.

    Returns:
        the chosen batch size, in ``[1, limit]``.

    Raises:
        ConfigurationError: if ``limit < 1`` or ``tolerance < 0``.
    """
    if int(limit) < 1:
        raise ConfigurationError(f"`limit` must be >= 1, got {limit}.")
    if not tolerance >= 0:
        raise ConfigurationError(f"`tolerance` must be >= 0, got {tolerance}.")
    check_shape(sample, [1, 3, "H", "W"], "sample")
    sizes = [2**k for k in range(int(math.log2(limit)) + 1)]
    sizes += [int(limit)] if limit >= 1.25 * sizes[-1] else []  # 17 is not worth timing beside 16
    timed: dict[int, float] = {}
    for n in sizes:
        timed[n] = _seconds_per_sample(forward_fn, sample, n)
        if timed[n] > 1.5 * min(timed.values()):
            break
    best = min(timed.values())
    return max(n for n, t in timed.items() if t <= (1 + tolerance) * best)


class BatchBudget:
    """:func:`samples_per_batch` cached per (key, height, width, dtype, device).

    An engine keeps one; the key names what is evaluated (the engine), so a measured pass runs once per
    image size rather than at every call. :meth:`fastest` further picks, within the budget, the batch size
    that is fastest on this machine (measured once per key, size and number of evaluations).

    Args:
        max_memory_mb: the budget in MiB.
        cap: the largest batch size returned.
    """

    def __init__(self, max_memory_mb: float, cap: int = MAX_SAMPLES_PER_BATCH) -> None:
        if not float(max_memory_mb) > 0:
            raise ConfigurationError(f"`max_memory_mb` must be > 0, got {max_memory_mb}.")
        self.max_memory_mb = float(max_memory_mb)
        self.cap = int(cap)
        self._cache: dict[tuple, int] = {}

    def samples(self, key: Hashable, forward_fn: Callable[[torch.Tensor], torch.Tensor], sample: torch.Tensor) -> int:
        """Images per batch for ``sample``'s size, measured on the first call for this key and size."""
        full_key = (key, *sample.shape[-2:], sample.dtype, sample.device)
        if full_key not in self._cache:
            self._cache[full_key] = samples_per_batch(forward_fn, sample, self.max_memory_mb, self.cap)
        return self._cache[full_key]

    def fastest(
        self, key: Hashable, forward_fn: Callable[[torch.Tensor], torch.Tensor], sample: torch.Tensor, needed: int
    ) -> int:
        """The fastest batch size for ``needed`` evaluations of ``sample``'s size within the budget (cached).

        Batching never changes what is computed, only how many evaluations share one pass, so choosing it
        by speed keeps results the same (up to floating-point summation order).
        """
        limit = min(self.samples(key, forward_fn, sample), max(1, int(needed)))
        full_key = ("fastest", key, *sample.shape[-2:], sample.dtype, sample.device, limit)
        if full_key not in self._cache:
            self._cache[full_key] = fastest_batch(forward_fn, sample, limit)
        return self._cache[full_key]
