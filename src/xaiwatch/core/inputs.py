"""The one check of the images a user gives an adapter or an engine: shape, dtype, range, finite values, size."""

from __future__ import annotations

from xaiwatch.core.errors import ConfigurationError, check_shape

__all__ = ["check_images"]

#: Images are in ``[0, 1]``; noise-based methods (SmoothGrad) legitimately go a little outside. Anything above this
#: is an image in ``0–255``.
MAX_PIXEL = 2.0


def check_images(
    images: object, what: str = "images", multiple_of: int | None = None, batch: int | None = None
) -> None:
    """Refuse, with a message saying what to do, images a detector would silently mis-read.

    Checks, in order: a :math:`(B, 3, H, W)` tensor; a floating dtype (``uint8`` images must be divided by 255);
    finite values (a ``NaN`` pixel makes every map ``NaN``); values not above :data:`MAX_PIXEL` (images in
    ``0–255``); sides a multiple of ``multiple_of`` (the model's largest stride: other sizes fail deep inside the
    model, e.g. in ultralytics' ``Concat``).

    Args:
        images: the images.
        what: the argument name used in the messages.
        multiple_of: required divisor of ``H`` and ``W``; ``None`` skips the check.
        batch: required batch size ``B`` (``1`` for one image); ``None`` accepts any.

    Raises:
        ShapeError: if ``images`` is not a :math:`(B, 3, H, W)` tensor.
        ConfigurationError: for an integer dtype, non-finite values, values in ``0–255`` or a bad size.

    Example:
        >>> import torch
        >>> check_images(torch.rand(1, 3, 64, 64), multiple_of=32)
        >>> check_images(torch.rand(1, 3, 64, 64) * 255)
        Traceback (most recent call last):
        ...
        xaiwatch.core.errors.ConfigurationError: `images` must be float RGB in [0, 1], got values up to 25...
    """
    import torch

    check_shape(images, ["B" if batch is None else batch, 3, "H", "W"], what)
    assert isinstance(images, torch.Tensor)  # for the type checker: check_shape raised otherwise
    if not images.is_floating_point():
        raise ConfigurationError(
            f"`{what}` must be a float tensor in [0, 1], got dtype {images.dtype}. Convert with "
            f"`{what}.float() / 255` (8-bit images) before calling the adapter."
        )
    if images.numel():
        finite = torch.isfinite(images)
        if not bool(finite.all()):
            bad = int((~finite).sum())
            raise ConfigurationError(
                f"`{what}` holds {bad} NaN or infinite value(s) (of {images.numel()}); every map would be NaN. "
                "Fix the image loading or replace them, e.g. `torch.nan_to_num(images, nan=0.0)`."
            )
        top = float(images.max())
        if top > MAX_PIXEL:
            raise ConfigurationError(
                f"`{what}` must be float RGB in [0, 1], got values up to {top:g}: it looks like 0–255. Divide by 255."
            )
    if multiple_of:
        h, w = int(images.shape[-2]), int(images.shape[-1])
        if h % multiple_of or w % multiple_of:
            fit = (
                max(multiple_of, round(h / multiple_of) * multiple_of),
                max(multiple_of, round(w / multiple_of) * multiple_of),
            )
            raise ConfigurationError(
                f"`{what}` is {h}x{w} pixels, but this model needs sides that are a multiple of its stride "
                f"{multiple_of}. Resize or pad to e.g. {fit[0]}x{fit[1]} (`xaiwatch.data.letterbox(image, imgsz)` "
                f"with imgsz a multiple of {multiple_of})."
            )
