"""Internal batch sizes of multi-evaluation methods, derived from a measured pass and a memory budget.

Integrated Gradients steps, SmoothGrad / GradientShap samples and occlusion windows are evaluated in
batches. A fixed large batch costs gigabytes on a real detector (Captum's ``internal_batch_size=128`` at
320 px needs about 7.5 GB), so the batch size is derived from the memory one sample really takes: one
forward and backward of a single image is run while :func:`torch.autograd.graph.saved_tensors_hooks`
records every tensor autograd keeps for the backward pass.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable

import torch

from xaiwatch.core.errors import ConfigurationError, check_shape

__all__ = ["MAX_SAMPLES_PER_BATCH", "per_sample_bytes", "samples_per_batch", "BatchBudget"]

#: upper bound of a derived batch size: beyond it a batch is no faster on CPU and only costs memory
MAX_SAMPLES_PER_BATCH = 256


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

    ``max(1, min(cap, floor(budget_bytes / per_sample_bytes)))`` with :func:`per_sample_bytes` measured on
    ``sample``. At least one sample is always allowed, so a budget smaller than one sample still runs.

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
    return max(1, min(int(cap), math.floor(budget / per_sample_bytes(forward_fn, sample))))


class BatchBudget:
    """:func:`samples_per_batch` cached per (key, height, width, dtype, device).

    An engine keeps one; the key names what is evaluated (the engine), so a measured pass runs once per
    image size rather than at every call.

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
