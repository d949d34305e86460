"""Every TensorBoard tag xaiwatch writes is built here, so names stay consistent across callbacks."""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Any

import numpy as np

from xaiwatch.core.errors import ConfigurationError

__all__ = [
    "Tags",
    "XaiWriter",
    "COMMAND_FILE",
    "STORY",
    "story_layout",
    "merge_layouts",
    "tensorboard_command",
    "write_tensorboard_command",
    "order_projector_config",
    "gate_reason_text",
    "fast_event_checksums",
]

#: the file, in the run's log directory, holding the command that opens the run with every picture kept
COMMAND_FILE = "tensorboard_command.txt"
#: the PROJECTOR's config file, in the run's log directory
PROJECTOR_CONFIG = "projector_config.pbtxt"
#: the first CUSTOM SCALARS category: what a person should see first
STORY = "xaiwatch: the story"
_SAMPLED_PLUGINS = ("images", "text", "tensors")  # TensorBoard keeps 10 of each per tag by default


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

    #: 0/1 series: TensorBoard's default smoothing (0.6) bends them into ramps; read them with smoothing 0
    BINARY_PATTERNS = (r"^saliency/gate_pass$", r"^explain_tracked/detected_.*", r"^boundary/flipped/.*")
    #: the cost of each callback, seconds per run
    SECONDS_PATTERNS = (r"^xaiwatch/.*_seconds$", r"^saliency/seconds$", r"^errors/seconds$", r"^boundary/seconds$")

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


#: zlib level of the PNGs xaiwatch writes: 1 encodes a 1160 x 630 panel in about half the time of PIL's default 6
PNG_COMPRESS_LEVEL = 1


def _add_picture(writer: Any, tag: str, picture: np.ndarray, step: int, png: bytes | None = None) -> None:
    """Write an :math:`(H, W, 3)` uint8 picture as a PNG of :data:`PNG_COMPRESS_LEVEL` (``png``: its bytes, already
    encoded by the caller, who keeps them too).

    ``SummaryWriter.add_image`` converts the picture to float and back, resizes it by 1 and encodes it at PIL's
    default level 6; the same image summary is written here straight from the bytes (through the writer's file
    writer, as ``add_image`` does). Other writers get ``add_image``.
    """
    from torch.utils.tensorboard import SummaryWriter

    picture = np.asarray(picture)
    if (
        not isinstance(writer, SummaryWriter)
        or picture.dtype != np.uint8
        or picture.ndim != 3
        or picture.shape[2] not in (1, 3, 4)
    ):
        writer.add_image(tag, picture, global_step=step, dataformats="HWC")
        return
    import io

    from PIL import Image
    from tensorboard.compat.proto.summary_pb2 import Summary

    if png is None:
        buffer = io.BytesIO()
        Image.fromarray(picture[..., 0] if picture.shape[2] == 1 else picture).save(
            buffer, format="PNG", compress_level=PNG_COMPRESS_LEVEL
        )
        png = buffer.getvalue()
    height, width, channels = picture.shape
    image = Summary.Image(height=height, width=width, colorspace=channels, encoded_image_string=png)
    writer._get_file_writer().add_summary(Summary(value=[Summary.Value(tag=tag, image=image)]), step)


def _masked_crc32c_c(data: bytes) -> int:
    """TensorBoard's masked CRC-32C of ``data`` (the record framing of an event file), computed in C."""
    import google_crc32c

    crc = google_crc32c.value(bytes(data))
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def fast_event_checksums() -> bool:
    """Let TensorBoard's event-file writer checksum its records in C; ``True`` when it does.

    Without TensorFlow, ``tensorboard`` frames every record with a CRC-32C computed byte by byte in Python
    (``tensorboard.compat.tensorflow_stub.pywrap_tensorflow.crc_update``): about 50 ms per 200 KB picture, on the
    logger's writer thread and holding the GIL, so the training thread waits for it between its own operations
    (measured: 12 s of the demo's 6 epochs). This swaps the record writer's ``masked_crc32c`` for google-crc32c's C
    implementation once it gives the same value on a test record; the files written are byte-identical. Every
    ``SummaryWriter`` of the process benefits (Lightning's own scalars included). Nothing changes when the C
    extension is missing or disagrees.

    Example:
        >>> fast_event_checksums()
        True
    """
    try:
        import google_crc32c
        from tensorboard.compat.tensorflow_stub import pywrap_tensorflow
        from tensorboard.summary.writer import record_writer
    except ImportError:
        return False
    if record_writer.masked_crc32c is _masked_crc32c_c:
        return True
    if google_crc32c.implementation != "c":
        return False
    sample = bytes(range(256)) * 3 + b"xaiwatch"
    if _masked_crc32c_c(sample) != pywrap_tensorflow.masked_crc32c(sample):
        return False
    record_writer.masked_crc32c = _masked_crc32c_c
    return True


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
        fast_event_checksums()

    def explanation(self, method: str, subject: str, picture: np.ndarray, step: int, png: bytes | None = None) -> None:
        """Write one overlay picture, :math:`(H, W, 3)` uint8 (``png``: its PNG bytes, when already encoded)."""
        _add_picture(self.writer, Tags.explain(method, subject), picture, step, png)

    def filmstrip(self, subject: str, picture: np.ndarray, step: int) -> None:
        """Write the filmstrip of one tracked object."""
        _add_picture(self.writer, Tags.filmstrip(subject), picture, step)

    def explain_seconds(self, seconds: float, step: int) -> None:
        """Write the wall time the callback spent this epoch."""
        self.writer.add_scalar(Tags.EXPLAIN_SECONDS, seconds, global_step=step)

    def tracked(self, subject: str, detected: bool, score: float, step: int) -> None:
        """Write whether a tracked object is detected, and its score."""
        self.writer.add_scalar(Tags.detected(subject), float(detected), global_step=step)
        self.writer.add_scalar(Tags.tracked_score(subject), score, global_step=step)

    def projection(self, layer: str, picture: np.ndarray, step: int) -> None:
        """Write the scatter picture of one layer's projection, :math:`(H, W, 3)` uint8."""
        _add_picture(self.writer, Tags.projection(layer), picture, step)

    def embedding(
        self, layer: str, features: Any, metadata: list, header: list[str], thumbnails: Any, step: int
    ) -> None:
        """Write one layer's embeddings to the PROJECTOR: vectors, metadata columns and a sprite of thumbnails.

        The files are those of ``add_embedding``, written by :func:`~xaiwatch.logging.projector.write_embedding`
        (faster, and the config on disk keeps the entries of earlier fits); a writer without a log directory gets
        ``add_embedding``.
        """
        run_dir = self.log_dir()
        if run_dir is None:
            self.writer.add_embedding(
                features,
                metadata=metadata,
                label_img=thumbnails,
                global_step=step,
                tag=Tags.projection(layer),
                metadata_header=header,
            )
            return
        from torch.utils.tensorboard import SummaryWriter

        from xaiwatch.logging.projector import read_config, write_embedding

        write_embedding(run_dir, Tags.projection(layer), step, features, metadata, header, thumbnails)
        if isinstance(self.writer, SummaryWriter):  # its own add_embedding rewrites the config from this copy
            self.writer._projector_config = read_config(run_dir)

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
        _add_picture(self.writer, tag, picture, step)

    def text(self, tag: str, text: str, step: int) -> None:
        """Write markdown text under a tag built by :class:`Tags`."""
        self.writer.add_text(tag, text, global_step=step)

    def custom_scalars(self, layout: dict | None = None) -> None:
        """Register a CUSTOM SCALARS layout, merged with every layout registered before on the same writer.

        TensorBoard shows only the last layout a run wrote, so each call writes the union: the story category
        (:func:`story_layout`) first, then the categories of every callback in the order they registered.

        Args:
            layout: ``{category: {chart title: ["Multiline" | "Margin", [tag regexes]]}}`` (torch's format).
        """
        if not callable(getattr(self.writer, "add_custom_scalars", None)):
            return
        known = getattr(self.writer, "_xaiwatch_layout", None) or story_layout()
        merged = merge_layouts(known, layout or {})
        try:
            self.writer._xaiwatch_layout = merged
        except AttributeError:  # a writer with __slots__: nothing to merge with next time
            pass
        self.writer.add_custom_scalars(merged)

    def log_dir(self) -> Path | None:
        """The directory the underlying writer writes to (``None`` when it does not say)."""
        get = getattr(self.writer, "get_logdir", None)
        return Path(get()) if callable(get) else None

    def setup_run(self, max_epochs: int | None, logdir: str | Path | None = None) -> Path | None:
        """Once per run, at setup: the story layout and the ``tensorboard`` command file (:func:`write_tensorboard_command`).

        Args:
            max_epochs: ``trainer.max_epochs`` (``None`` or ``-1``: unknown, a generous number of samples is kept).
            logdir: the folder the command opens (default: this run's log directory).

        Returns:
            The command file, or ``None`` when the writer does not say where it writes.
        """
        self.custom_scalars()
        run_dir = self.log_dir()
        if run_dir is None:
            return None
        return write_tensorboard_command(run_dir, max_epochs, logdir=logdir)

    def flush(self) -> None:
        """Flush the underlying writer."""
        if callable(getattr(self.writer, "flush", None)):
            self.writer.flush()


def gate_reason_text(step: int, values: dict[str, float], rules: list, passed: bool) -> str:
    """The gate's verdict as a markdown table: every check with its value, threshold and result.

    Args:
        step: the step.
        values: check key to value.
        rules: objects with ``key``, ``threshold`` and ``direction`` (``"min"``: value >= threshold passes).
        passed: the verdict.

    Returns:
        Markdown; checks without a rule are listed with threshold ``-`` (logged only).

    Example:
        >>> from xaiwatch.checks.rule import Rule
        >>> print(gate_reason_text(2, {"energy_in_box/saliency": 0.5}, [Rule("energy_in_box/saliency", "energy_in_box", 0.45, "min")], True))
        epoch 2: passed
        <BLANKLINE>
        | check | value | threshold | result |
        |---|---|---|---|
        | energy_in_box/saliency | 0.500 | >= 0.45 | pass |
    """
    by_key = {r.key: r for r in rules}
    lines = [f"epoch {step}: {'passed' if passed else 'failed'}", "", "| check | value | threshold | result |"]
    lines.append("|---|---|---|---|")
    for key in sorted(set(values) | set(by_key)):
        value = values.get(key)
        shown = "n/a" if value is None or value != value else f"{value:.3f}"
        rule = by_key.get(key)
        if rule is None:
            lines.append(f"| {key} | {shown} | - | logged |")
            continue
        sign = ">=" if rule.direction == "min" else "<="
        ok = rule.passes(value) if hasattr(rule, "passes") else None
        lines.append(f"| {key} | {shown} | {sign} {rule.threshold:g} | {'pass' if ok else 'FAIL'} |")
    return "\n".join(lines)


def story_layout() -> dict:
    """The first CUSTOM SCALARS category: detection quality, the gate, the tracked objects, the cost.

    Returns:
        ``{STORY: {chart: ["Multiline", [regexes]]}}``. 0/1 series (gate verdict, detected) have their own charts,
        titled so that a reader sets smoothing to 0 (TensorBoard smooths every chart by 0.6 by default).

    Example:
        >>> list(story_layout()[STORY])[0]
        'detection: val/map50, val/map'
    """
    return {
        STORY: {
            "detection: val/map50, val/map": ["Multiline", [r"^val/map50$", r"^val/map$"]],
            "losses": ["Multiline", [r"^train/loss$", r"^val/loss$"]],
            "saliency checks (mean over probes)": ["Multiline", [r"^saliency/(?!gate_pass$|seconds$|gate_reason).+"]],
            "gate verdict, 1 = passed (0/1: smoothing 0)": ["Multiline", [r"^saliency/gate_pass$"]],
            "tracked objects: class score": ["Multiline", [r"^explain_tracked/score_.*"]],
            "tracked objects: detected (0/1: smoothing 0)": ["Multiline", [r"^explain_tracked/detected_.*"]],
            "cost of each callback, seconds": ["Multiline", list(Tags.SECONDS_PATTERNS)],
        }
    }


def merge_layouts(first: dict, second: dict) -> dict:
    """Categories of ``first`` then the new ones of ``second``; charts of a shared category are merged.

    Example:
        >>> merge_layouts({"a": {"x": 1}}, {"b": {"y": 2}, "a": {"z": 3}})
        {'a': {'x': 1, 'z': 3}, 'b': {'y': 2}}
    """
    out = {category: dict(charts) for category, charts in first.items()}
    for category, charts in second.items():
        out.setdefault(category, {}).update(charts)
    return out


def tensorboard_command(logdir: str | Path, samples: int) -> str:
    """The command that opens ``logdir`` keeping ``samples`` pictures (and texts) per tag.

    Example:
        >>> tensorboard_command("/runs/demo", 13)
        'tensorboard --logdir /runs/demo --samples_per_plugin images=13,text=13,tensors=13'
    """
    keep = ",".join(f"{plugin}={int(samples)}" for plugin in _SAMPLED_PLUGINS)
    return f"tensorboard --logdir {shlex.quote(str(logdir))} --samples_per_plugin {keep}"


def write_tensorboard_command(
    run_dir: str | Path, max_epochs: int | None, logdir: str | Path | None = None, margin: int = 2
) -> Path:
    """Write :data:`COMMAND_FILE` into ``run_dir``: the exact ``tensorboard`` command that keeps every step.

    TensorBoard keeps 10 pictures per tag unless told otherwise, so the "before training" picture (step 0) and
    others disappear. The command asks for ``max_epochs + 1 + margin`` samples (step 0 and one per epoch, plus
    a margin for end-of-fit pictures); 10000 when ``max_epochs`` is unknown.

    Args:
        run_dir: the run's log directory (``trainer.log_dir``).
        max_epochs: epochs the run will train (``None`` / ``-1``: unknown).
        logdir: the folder the command opens (default ``run_dir``; the parent shows several runs side by side).
        margin: extra samples.

    Returns:
        The file written.

    Raises:
        ConfigurationError: if a file of that name exists and was not written by xaiwatch (it is never replaced).
    """
    run_dir = Path(run_dir)
    path = run_dir / COMMAND_FILE
    if path.exists() and not path.read_text(errors="replace").startswith("tensorboard --logdir "):
        raise ConfigurationError(
            f"{path} exists and was not written by xaiwatch; it is left as it is. Move it away or log to another folder."
        )
    samples = 10000 if max_epochs is None or int(max_epochs) < 0 else int(max_epochs) + 1 + int(margin)
    run_dir.mkdir(parents=True, exist_ok=True)
    path.write_text(tensorboard_command(Path(logdir or run_dir).resolve(), samples) + "\n")
    return path


def _projector_entry(embedding) -> tuple[str, int]:
    """``(tag, step)`` of an entry torch's writer made: its tensors live in ``<step:05d>/<quoted tag>/``."""
    from urllib.parse import unquote

    parts = embedding.tensor_path.split("/")
    if len(parts) >= 3 and parts[0].isdigit():
        return unquote(parts[1]), int(parts[0])
    name, _, step = embedding.tensor_name.rpartition(":")
    return (name, int(step)) if step.isdigit() else (embedding.tensor_name, -1)


def order_projector_config(run_dir: str | Path) -> Path | None:
    """Make TensorBoard's PROJECTOR open on the last epoch.

    The PROJECTOR lists tensors sorted (metadata first, more points first, then by name) and opens the first, so
    ``tag:00000`` wins over ``tag:00011``. This rewrites ``projector_config.pbtxt`` with the last epoch of each tag
    first and named ``<tag> (last: step N)`` (a space sorts before ``:``); the other epochs keep ``<tag>:<step>``.
    With box-level embeddings an older epoch with more points can still be listed first.

    Args:
        run_dir: the folder holding the config (the writer's log directory).

    Returns:
        The config's path, or ``None`` when there is none.
    """
    from google.protobuf import text_format
    from tensorboard.plugins.projector.projector_config_pb2 import ProjectorConfig

    path = Path(run_dir) / PROJECTOR_CONFIG
    if not path.is_file():
        return None
    config = text_format.Parse(path.read_text(), ProjectorConfig())
    _order_embeddings(config)
    path.write_text(text_format.MessageToString(config))
    return path


def _order_embeddings(config) -> None:
    """Reorder a ``ProjectorConfig``'s entries in place as :func:`order_projector_config` writes them."""
    entries = [(_projector_entry(e), e) for e in config.embeddings]
    last = {}
    for (tag, step), _ in entries:
        last[tag] = max(step, last.get(tag, step))
    entries.sort(key=lambda item: (-item[0][1], item[0][0]))
    copies = []
    for (tag, step), e in entries:
        copy = type(e)()
        copy.CopyFrom(e)
        copy.tensor_name = f"{tag} (last: step {step})" if step == last[tag] else f"{tag}:{step:05d}"
        copies.append(copy)
    del config.embeddings[:]
    config.embeddings.extend(copies)
