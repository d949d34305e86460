"""How alike two sets of maps are: Spearman rank correlation and SSIM, with constant maps handled."""

from __future__ import annotations

import numpy as np
import torch

from xaiwatch.checks.localization import as_maps
from xaiwatch.core.errors import ShapeError

__all__ = ["spearman", "ssim", "normalize_magnitude"]


def _pair(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    a, b = as_maps(a), as_maps(b)
    if a.shape != b.shape:
        raise ShapeError("b", tuple(b.shape), list(a.shape))
    return a.detach().cpu(), b.detach().cpu()


def _constant(m: torch.Tensor) -> torch.Tensor:
    flat = m.reshape(m.shape[0], -1)
    return flat.amax(dim=1) <= flat.amin(dim=1)


def spearman(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Spearman rank correlation of each pair of maps (``scipy.stats.spearmanr``, ties get average ranks).

    Pairs where a map is constant have no rank correlation: two constant maps count as identical (1), one
    constant map against a varying one as unrelated (0) — never NaN.

    Args:
        a, b: :math:`(N, 1, H, W)` maps of the same shape.

    Returns:
        :math:`(N,)` in ``[-1, 1]``.
    """
    from scipy.stats import spearmanr

    a, b = _pair(a, b)
    ca, cb = _constant(a), _constant(b)
    out = []
    for i in range(a.shape[0]):
        if ca[i] or cb[i]:
            out.append(1.0 if ca[i] and cb[i] else 0.0)
        else:
            out.append(float(spearmanr(a[i].reshape(-1).double().numpy(), b[i].reshape(-1).double().numpy())[0]))
    return torch.tensor(out, dtype=torch.float32)


def normalize_magnitude(maps: torch.Tensor) -> torch.Tensor:
    """``|map|`` scaled by its own maximum to ``[0, 1]`` (all-zero maps stay zero)."""
    m = as_maps(maps).abs()
    peak = m.reshape(m.shape[0], -1).amax(dim=1).clamp(min=torch.finfo(m.dtype).tiny)
    return m / peak[:, None, None]


def ssim(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Structural similarity of each pair of maps' magnitudes, each scaled to ``[0, 1]`` by its own maximum.

    torchmetrics' SSIM (Gaussian window 11, sigma 1.5, data range 1). Scaling each map by its own maximum makes
    the comparison about *where* the evidence is, not how strong.

    Args:
        a, b: :math:`(N, 1, H, W)` maps of the same shape (at least 11 px a side).

    Returns:
        :math:`(N,)`, 1 for identical maps.
    """
    from torchmetrics.functional.image import structural_similarity_index_measure

    a, b = _pair(a, b)
    if min(a.shape[-2:]) < 11:
        raise ShapeError("maps", tuple(a.shape), ["N", ">=11", ">=11"])
    na, nb = normalize_magnitude(a)[:, None].double(), normalize_magnitude(b)[:, None].double()
    out = structural_similarity_index_measure(na, nb, data_range=1.0, reduction="none")
    return torch.as_tensor(np.asarray(out), dtype=torch.float32).reshape(-1)
