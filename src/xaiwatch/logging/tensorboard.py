"""Every TensorBoard tag xaiwatch writes is built here, so names stay consistent across callbacks."""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["Tags", "XaiWriter"]


class Tags:
    """Tag names. The step of explanation tags is the number of completed training epochs (0 = before)."""

    EXPLAIN_SECONDS = "xaiwatch/explain_seconds"
    PROBES = "xaiwatch/probes"
    PROJECTION_SECONDS = "xaiwatch/projection_seconds"

    @staticmethod
    def explain(method: str, subject: str) -> str:
        """``explain/<method>/<subject>``: the overlay of one tracked object (``probe_03``, ``probe_03_obj1``)."""
        return f"explain/{method}/{subject}"

    @staticmethod
    def detected(subject: str) -> str:
        """``explain_tracked/detected_<subject>``: 1 when the tracked object is detected, else 0."""
        return f"explain_tracked/detected_{subject}"

    @staticmethod
    def tracked_score(subject: str) -> str:
        """``explain_tracked/score_<subject>``: the tracked object's class score."""
        return f"explain_tracked/score_{subject}"

    @staticmethod
    def filmstrip(subject: str) -> str:
        """``explain_filmstrip/<subject>``: rows = methods, columns = epochs, written at the end of fit."""
        return f"explain_filmstrip/{subject}"

    @staticmethod
    def projection(layer: str) -> str:
        """``projection/<layer>``: the scatter picture (IMAGES) and the embedding (PROJECTOR) of one layer."""
        return f"projection/{layer}"

    @staticmethod
    def projection_metric(layer: str, metric: str) -> str:
        """``projection/<layer>/<metric>``: class separability (``silhouette``, ``knn_accuracy``) or ``displacement``."""
        return f"projection/{layer}/{metric}"

    # ---- error analysis and decision boundaries (ErrorAnalysisCallback, DecisionBoundaryCallback)
    ERRORS_CONFUSION = "errors/confusion"
    ERRORS_SECONDS = "errors/seconds"
    BOUNDARY_SECONDS = "boundary/seconds"

    # ---- saliency checks and the gate (SaliencyGate)
    GATE_PASS = "saliency/gate_pass"
    GATE_REASON = "saliency/gate_reason"
    GATE_SECONDS = "saliency/seconds"

    @staticmethod
    def check(key: str) -> str:
        """``saliency/<check>/<method>`` (map checks) or ``saliency/<check>`` (model checks): the mean over probes."""
        return f"saliency/{key}"

    @staticmethod
    def errors(kind: str, cls: str) -> str:
        """``errors/<kind>/<class>``: a count per epoch; ``kind`` is tp, fp, fn or a TIDE type, class ``all`` sums."""
        return f"errors/{kind}/{cls}"

    @staticmethod
    def errors_explain(method: str, subject: str) -> str:
        """``errors/explain/<method>/<subject>``: an error explained (``fp_00`` highest-scoring FP, ``miss_00``)."""
        return f"errors/explain/{method}/{subject}"

    @staticmethod
    def min_eps(subject: str) -> str:
        """``boundary/min_eps/<subject>``: the smallest epsilon that flips a tracked object (0: not detected)."""
        return f"boundary/min_eps/{subject}"

    @staticmethod
    def boundary_flipped(subject: str) -> str:
        """``boundary/flipped/<subject>``: 1 when an epsilon up to ``max_eps`` flips the object, else 0."""
        return f"boundary/flipped/{subject}"

    @staticmethod
    def boundary_picture(subject: str) -> str:
        """``boundary/picture/<subject>``: original, perturbation, perturbed image and score-vs-epsilon curve."""
        return f"boundary/picture/{subject}"


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

    def explanation(self, method: str, subject: str, picture: np.ndarray, step: int) -> None:
        """Write one overlay picture, :math:`(H, W, 3)` uint8."""
        self.writer.add_image(Tags.explain(method, subject), picture, global_step=step, dataformats="HWC")

    def filmstrip(self, subject: str, picture: np.ndarray, step: int) -> None:
        """Write the filmstrip of one tracked object."""
        self.writer.add_image(Tags.filmstrip(subject), picture, global_step=step, dataformats="HWC")

    def explain_seconds(self, seconds: float, step: int) -> None:
        """Write the wall time the callback spent this epoch."""
        self.writer.add_scalar(Tags.EXPLAIN_SECONDS, seconds, global_step=step)

    def tracked(self, subject: str, detected: bool, score: float, step: int) -> None:
        """Write whether a tracked object is detected, and its score."""
        self.writer.add_scalar(Tags.detected(subject), float(detected), global_step=step)
        self.writer.add_scalar(Tags.tracked_score(subject), score, global_step=step)

    def projection(self, layer: str, picture: np.ndarray, step: int) -> None:
        """Write the scatter picture of one layer's projection, :math:`(H, W, 3)` uint8."""
        self.writer.add_image(Tags.projection(layer), picture, global_step=step, dataformats="HWC")

    def embedding(
        self, layer: str, features: Any, metadata: list, header: list[str], thumbnails: Any, step: int
    ) -> None:
        """Write one layer's embeddings to the PROJECTOR: vectors, metadata columns and a sprite of thumbnails."""
        self.writer.add_embedding(
            features,
            metadata=metadata,
            label_img=thumbnails,
            global_step=step,
            tag=Tags.projection(layer),
            metadata_header=header,
        )

    def projection_metrics(self, layer: str, values: dict[str, float], step: int) -> None:
        """Write per-layer scalars (separability, displacement); ``nan`` values are skipped."""
        for metric, value in values.items():
            if value == value:
                self.writer.add_scalar(Tags.projection_metric(layer, metric), value, global_step=step)

    def projection_seconds(self, seconds: float, step: int) -> None:
        """Write the wall time the projection callback spent this epoch."""
        self.writer.add_scalar(Tags.PROJECTION_SECONDS, seconds, global_step=step)

    def probes(self, text: str) -> None:
        """Describe the probe set once, as markdown text."""
        self.writer.add_text(Tags.PROBES, text, global_step=0)

    def scalar(self, tag: str, value: float, step: int) -> None:
        """Write one scalar under a tag built by :class:`Tags`."""
        self.writer.add_scalar(tag, float(value), global_step=step)

    def picture(self, tag: str, picture: np.ndarray, step: int) -> None:
        """Write one :math:`(H, W, 3)` uint8 picture under a tag built by :class:`Tags`."""
        self.writer.add_image(tag, picture, global_step=step, dataformats="HWC")

    def text(self, tag: str, text: str, step: int) -> None:
        """Write markdown text under a tag built by :class:`Tags`."""
        self.writer.add_text(tag, text, global_step=step)

    def custom_scalars(self, layout: dict) -> None:
        """Register a custom-scalars layout (the CUSTOM SCALARS dashboard), once."""
        if callable(getattr(self.writer, "add_custom_scalars", None)):
            self.writer.add_custom_scalars(layout)

    def flush(self) -> None:
        """Flush the underlying writer."""
        if callable(getattr(self.writer, "flush", None)):
            self.writer.flush()
