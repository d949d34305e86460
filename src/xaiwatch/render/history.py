"""Keeps the pictures of every explained epoch (PNG-compressed) to build filmstrips and animations at the end."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np

from xaiwatch.render.filmstrip import filmstrip, stack_vertical, write_gif

__all__ = ["PictureHistory", "encode", "decode"]


def encode(picture: np.ndarray) -> bytes:
    """PNG bytes of an :math:`(H, W, 3)` uint8 picture (what travels between ranks and is kept in history)."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(picture).save(buffer, format="PNG")
    return buffer.getvalue()


def decode(data: bytes) -> np.ndarray:
    """The :math:`(H, W, 3)` uint8 picture of PNG bytes."""
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


class PictureHistory:
    """Pictures by subject (e.g. ``"probe_03"``), method and step.

    About 50 kB per picture: 8 probes x 2 methods x 30 epochs stay under 25 MB.
    """

    def __init__(self) -> None:
        self._store: dict[str, dict[str, dict[int, bytes]]] = {}

    def add(self, subject: str, method: str, step: int, picture: np.ndarray) -> None:
        """Remember one picture."""
        self._store.setdefault(subject, {}).setdefault(method, {})[int(step)] = encode(picture)

    def has(self, subject: str, method: str, step: int) -> bool:
        """Whether a picture of ``subject`` by ``method`` at ``step`` is kept."""
        return int(step) in self._store.get(subject, {}).get(method, {})

    def subjects(self) -> list[str]:
        """Subjects with at least one picture."""
        return sorted(self._store)

    def steps(self, subject: str) -> list[int]:
        """Steps at which every method of ``subject`` has a picture."""
        per_method = [set(steps) for steps in self._store[subject].values()]
        return sorted(set.intersection(*per_method)) if per_method else []

    def filmstrip(self, subject: str, crop_right_half: bool = True) -> np.ndarray:
        """Rows = methods, columns = steps (the heat-map half of each explanation panel)."""
        steps = self.steps(subject)
        rows = {}
        for method, pictures in self._store[subject].items():
            frames = [decode(pictures[s]) for s in steps]
            rows[method] = [f[:, f.shape[1] // 2 :] if crop_right_half else f for f in frames]
        return filmstrip(rows, steps, title=subject)

    def animation_frames(self, subject: str) -> list[np.ndarray]:
        """One frame per step: every method's full panel stacked top to bottom."""
        return [
            stack_vertical([decode(pictures[s]) for pictures in self._store[subject].values()])
            for s in self.steps(subject)
        ]

    def write(self, subject: str, folder: str | Path) -> tuple[Path, Path]:
        """Write ``<subject>_filmstrip.png`` and ``<subject>.gif`` into ``folder``; return both paths."""
        from PIL import Image

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        png = folder / f"{subject}_filmstrip.png"
        Image.fromarray(self.filmstrip(subject)).save(png)
        gif = write_gif(self.animation_frames(subject), folder / f"{subject}.gif")
        return png, gif
