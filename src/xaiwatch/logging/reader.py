"""Reading back what xaiwatch wrote: pictures of earlier steps from a log folder (tensorboard's own reader)."""

from __future__ import annotations

import io
from collections.abc import Callable
from pathlib import Path

import numpy as np

__all__ = ["read_pictures"]


def read_pictures(
    log_dir: str | Path, prefix: str, wanted: Callable[[str, int], bool] | None = None
) -> dict[str, dict[int, np.ndarray]]:
    """Every picture under tags starting with ``prefix`` in ``log_dir``'s event files: ``{tag: {step: image}}``.

    Uses tensorboard's ``EventAccumulator`` keeping every image (``size_guidance`` 0); a later event at the same
    step wins. A folder without event files gives ``{}``. ``wanted(tag, step)``: decode only those pictures.
    """
    from PIL import Image
    from tensorboard.backend.event_processing.event_accumulator import IMAGES, EventAccumulator

    folder = Path(log_dir)
    if not folder.is_dir() or not any(folder.glob("events.out.tfevents.*")):
        return {}
    acc = EventAccumulator(str(folder), size_guidance={IMAGES: 0})
    acc.Reload()
    out: dict[str, dict[int, np.ndarray]] = {}
    for tag in acc.Tags().get(IMAGES, []):
        if tag.startswith(prefix):
            for event in acc.Images(tag):
                if wanted is not None and not wanted(tag, int(event.step)):
                    continue
                picture = np.asarray(Image.open(io.BytesIO(event.encoded_image_string)).convert("RGB"))
                out.setdefault(tag, {})[int(event.step)] = picture
    return out
