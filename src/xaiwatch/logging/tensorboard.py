"""Every TensorBoard tag xaiwatch writes is built here, so names stay consistent across callbacks."""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["Tags", "XaiWriter"]


class Tags:
    """Tag names. The step of explanation tags is the number of completed training epochs (0 = before)."""

    EXPLAIN_SECONDS = "xaiwatch/explain_seconds"
    PROBES = "xaiwatch/probes"

    @staticmethod
    def explain(method: str, probe: int) -> str:
        """``explain/<method>/probe_<NN>``: the overlay of one probe image for one method."""
        return f"explain/{method}/probe_{probe:02d}"

    @staticmethod
    def detected(probe: int) -> str:
        """``explain_tracked/probe_<NN>``: 1 when the tracked object is detected, else 0."""
        return f"explain_tracked/detected_probe_{probe:02d}"

    @staticmethod
    def tracked_score(probe: int) -> str:
        """``explain_tracked/score_probe_<NN>``: the tracked object's class score."""
        return f"explain_tracked/score_probe_{probe:02d}"


class XaiWriter:
    """Thin wrapper of a ``SummaryWriter`` (torch's or tensorboardX's) writing xaiwatch's records.

    Args:
        writer: any object with ``add_image``, ``add_scalar``, ``add_text`` and ``flush``.
    """

    def __init__(self, writer: Any) -> None:
        for name in ("add_image", "add_scalar", "add_text"):
            if not callable(getattr(writer, name, None)):
                raise TypeError(f"`writer` must be a TensorBoard SummaryWriter, got {type(writer).__name__}.")
        self.writer = writer

    def explanation(self, method: str, probe: int, picture: np.ndarray, step: int) -> None:
        """Write one overlay picture, :math:`(H, W, 3)` uint8."""
        self.writer.add_image(Tags.explain(method, probe), picture, global_step=step, dataformats="HWC")

    def explain_seconds(self, seconds: float, step: int) -> None:
        """Write the wall time the callback spent this epoch."""
        self.writer.add_scalar(Tags.EXPLAIN_SECONDS, seconds, global_step=step)

    def tracked(self, probe: int, detected: bool, score: float, step: int) -> None:
        """Write whether a tracked object is detected, and its score."""
        self.writer.add_scalar(Tags.detected(probe), float(detected), global_step=step)
        self.writer.add_scalar(Tags.tracked_score(probe), score, global_step=step)

    def probes(self, text: str) -> None:
        """Describe the probe set once, as markdown text."""
        self.writer.add_text(Tags.PROBES, text, global_step=0)

    def flush(self) -> None:
        """Flush the underlying writer."""
        if callable(getattr(self.writer, "flush", None)):
            self.writer.flush()
