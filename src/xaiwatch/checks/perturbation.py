"""How a box's score responds when the image is changed: deletion / insertion, context reliance, stability."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from xaiwatch.checks.localization import _as_boxes, as_maps, box_masks
from xaiwatch.core.errors import ConfigurationError, ShapeError, check_shape

__all__ = ["deletion_insertion", "fill_image", "context_reliance", "stability", "FILLS"]

#: Named fills of :func:`fill_image` (a number is a constant grey level, a tensor another photograph).
FILLS = ("grey", "black", "mean", "blur")

ScoreFn = Callable[[torch.Tensor], torch.Tensor]


def fill_image(images: torch.Tensor, fill: str | float | torch.Tensor) -> torch.Tensor:
    """What replaces removed pixels.

    Args:
        images: :math:`(B, 3, H, W)` images in ``[0, 1]``.
        fill: ``"grey"`` (0.5), ``"black"`` (0), ``"mean"`` (each image's mean colour), ``"blur"`` (a Gaussian blur
            of each image, sigma = 1/16 of the shorter side), a constant, or a :math:`(3, H, W)` /
            :math:`(B, 3, H, W)` image (e.g. another photograph).

    Returns:
        :math:`(B, 3, H, W)` fill images.
    """
    images = images.detach()
    if isinstance(fill, torch.Tensor):
        fill = fill.to(images)
        if fill.shape[-3:] != images.shape[-3:] or fill.dim() not in (3, 4):
            raise ShapeError("fill", tuple(fill.shape), ["(B)", *images.shape[-3:]])
        return fill.expand_as(images).clone()
    if fill == "mean":
        return images.mean(dim=(2, 3), keepdim=True).expand_as(images).clone()
    if fill == "blur":
        from xaiwatch.explain.captum_methods import blur

        return blur(images)
    if isinstance(fill, str):
        if fill not in FILLS:
            raise ConfigurationError(f"`fill` can be one of {FILLS}, a number or an image tensor, got {fill!r}.")
        fill = {"grey": 0.5, "black": 0.0}[fill]
    if isinstance(fill, bool) or not isinstance(fill, (int, float)):
        raise ConfigurationError(f"`fill` can be one of {FILLS}, a number or an image tensor, got {fill!r}.")
    return torch.full_like(images, float(fill))


def _batched(score_fn: ScoreFn, images: torch.Tensor, batch_size: int | None) -> torch.Tensor:
    size = images.shape[0] if batch_size is None else max(1, int(batch_size))
    with torch.no_grad():
        return torch.cat([score_fn(chunk).detach().reshape(-1) for chunk in images.split(size)])


def deletion_insertion(
    score_fn: ScoreFn,
    image: torch.Tensor,
    saliency: torch.Tensor,
    mode: str = "deletion",
    steps: int = 16,
    fill: str | float | torch.Tensor | None = None,
    batch_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Petsiuk et al. (RISE, 2018): the score as the most salient pixels are removed (deletion) or revealed (insertion).

    Pixels are ranked by ``saliency`` (largest first). Step ``j`` of ``steps`` changes the top ``round(j / steps *
    H * W)`` pixels: deletion replaces them by ``fill`` (default black, as RISE), insertion starts from ``fill``
    (default a blur of the image, as RISE) and puts them back. The ``steps + 1`` images are scored in batches.
    A good map gives a low deletion AUC (the score falls fast) and a high insertion AUC.

    Args:
        score_fn: images :math:`(b, 3, H, W)` to the explained box's score :math:`(b,)`.
        image: :math:`(1, 3, H, W)` or :math:`(3, H, W)` image in ``[0, 1]``.
        saliency: :math:`(H, W)` / :math:`(1, H, W)` / :math:`(1, 1, H, W)` map.
        mode: ``"deletion"`` or ``"insertion"``.
        steps: number of steps (the curve has ``steps + 1`` points).
        fill: see :func:`fill_image`.
        batch_size: images per ``score_fn`` call (default: all at once).

    Returns:
        ``(auc, curve)``: the trapezoidal area under the curve over the fraction of pixels in ``[0, 1]`` (a
        0-d tensor) and the :math:`(steps + 1,)` scores.
    """
    if mode not in ("deletion", "insertion"):
        raise ConfigurationError(f"`mode` must be 'deletion' or 'insertion', got {mode!r}.")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ConfigurationError(f"`steps` must be an integer >= 1, got {steps!r}.")
    image = image[None] if image.dim() == 3 else image
    check_shape(image, [1, 3, "H", "W"], "image")
    h, w = image.shape[-2:]
    saliency = saliency.reshape(-1, *saliency.shape[-2:])
    if saliency.shape != (1, h, w):
        raise ShapeError("saliency", tuple(saliency.shape), [1, h, w])
    order = saliency.reshape(-1).float().argsort(descending=True, stable=True)
    rank = torch.empty_like(order)
    rank[order] = torch.arange(order.numel(), device=order.device)
    counts = torch.round(torch.linspace(0, h * w, steps + 1, device=image.device)).long()
    changed = (rank.to(image.device)[None] < counts[:, None]).reshape(steps + 1, 1, h, w)
    base = fill_image(image, ("black" if mode == "deletion" else "blur") if fill is None else fill)
    if mode == "deletion":
        variants = torch.where(changed, base, image)
    else:
        variants = torch.where(changed, image, base)
    curve = _batched(score_fn, variants, batch_size)
    auc = torch.trapezoid(curve, dx=1.0 / steps)
    return auc, curve


def context_reliance(
    score_fn: ScoreFn,
    images: torch.Tensor,
    boxes: torch.Tensor | Sequence[Sequence[float]],
    fill: str | float | torch.Tensor = "grey",
    margin: float = 0.0,
    relative: bool = True,
    min_score: float = 0.0,
) -> torch.Tensor:
    """The tracked box's score drop when everything outside the box is replaced: reliance on context.

    A detector that recognises the object itself keeps its score with the background gone; one that learned
    the background (a context shortcut) loses it. Constant grey separates best on generated data; a fill with
    the image's own colours (``"mean"``, ``"blur"``) leaks the context it should remove.

    Args:
        score_fn: images :math:`(N, 3, H, W)` to each image's tracked-box score :math:`(N,)` (image ``i``'s target).
        images: :math:`(N, 3, H, W)` in ``[0, 1]``.
        boxes: :math:`(N, 4)` ``xyxy`` box kept in each image.
        fill: see :func:`fill_image` (default ``"grey"``).
        margin: pixels kept around the box.
        relative: drop as a share of the original score ``(s - s') / s`` (else the absolute ``s - s'``).
        min_score: images whose original score is below this give ``nan`` (nothing to rely on).

    Returns:
        :math:`(N,)` drops, clipped to ``[-1, 1]``; ``nan`` where the original score is below ``min_score``.
    """
    check_shape(images, ["N", 3, "H", "W"], "images")
    boxes = _as_boxes(boxes, images.shape[0]).to(images.device)
    keep = box_masks(boxes, images.shape[-2:], tolerance=float(margin))[:, None]
    filled = torch.where(keep, images, fill_image(images, fill))
    with torch.no_grad():
        before = score_fn(images.detach()).detach().reshape(-1).float()
        after = score_fn(filled).detach().reshape(-1).float()
    drop = before - after
    if relative:
        drop = drop / before.clamp(min=1e-6)
    drop = drop.clamp(-1.0, 1.0)
    return torch.where(before >= float(min_score), drop, torch.full_like(drop, float("nan")))


def stability(
    map_fn: Callable[[torch.Tensor], torch.Tensor],
    images: torch.Tensor,
    noise: float = 0.02,
    seed: int = 0,
    similarity: str = "ssim",
) -> torch.Tensor:
    """Similarity of each image's map with the map of the same image plus small Gaussian noise.

    Args:
        map_fn: images :math:`(N, 3, H, W)` to maps :math:`(N, 1, H, W)`.
        images: :math:`(N, 3, H, W)` in ``[0, 1]``.
        noise: standard deviation of the noise (images are clipped to ``[0, 1]`` after adding it).
        seed: seed of the noise (a local generator; global RNGs are untouched).
        similarity: ``"ssim"`` or ``"spearman"`` (see :mod:`xaiwatch.checks.similarity`).

    Returns:
        :math:`(N,)` similarities.
    """
    from xaiwatch.checks import similarity as sim

    if similarity not in ("ssim", "spearman"):
        raise ConfigurationError(f"`similarity` must be 'ssim' or 'spearman', got {similarity!r}.")
    if not float(noise) >= 0:
        raise ConfigurationError(f"`noise` must be >= 0, got {noise}.")
    check_shape(images, ["N", 3, "H", "W"], "images")
    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    eps = torch.randn(images.shape, generator=gen, dtype=images.dtype).to(images.device) * float(noise)
    clean = as_maps(map_fn(images))
    noisy = as_maps(map_fn((images + eps).clamp(0, 1)))
    return getattr(sim, similarity)(clean, noisy)
