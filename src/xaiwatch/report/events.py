"""Everything a report needs, read back from a run's TensorBoard event files with TensorBoard's own reader."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path

from xaiwatch.core.errors import ConfigurationError

__all__ = ["RunData", "find_runs", "load_run", "parse_thresholds"]

_EVENTS = "events.out.tfevents"
_TABLE_ROW = re.compile(r"^\|\s*(?P<key>[\w/.-]+)\s*\|\s*(?P<value>[^|]*)\|\s*(?P<thr>(>=|<=)\s*[-\d.eE+]+)\s*\|")
_OLD_REASON = re.compile(r"(?P<key>[\w/.-]+) = [^(]*\(needs (?P<thr>(>=|<=) [-\d.eE+]+)\)")


@dataclass
class RunData:
    """The content of one run directory.

    Attributes:
        path: the run directory.
        scalars: tag to ``[(step, value), ...]`` in step order.
        images: tag to ``[(step, png bytes, width, height), ...]`` in step order.
        texts: tag (without TensorBoard's ``/text_summary`` suffix) to ``[(step, text), ...]``.
        hparams: the run's settings (Lightning's ``hparams.yaml``), empty when absent.
    """

    path: Path
    scalars: dict[str, list[tuple[int, float]]] = field(default_factory=dict)
    images: dict[str, list[tuple[int, bytes, int, int]]] = field(default_factory=dict)
    texts: dict[str, list[tuple[int, str]]] = field(default_factory=dict)
    hparams: dict = field(default_factory=dict)

    def scalar(self, tag: str) -> list[tuple[int, float]]:
        """The ``(step, value)`` pairs of ``tag`` (empty when not logged)."""
        return self.scalars.get(tag, [])

    def tags(self, prefix: str) -> list[str]:
        """Scalar tags starting with ``prefix``, sorted."""
        return sorted(t for t in self.scalars if t.startswith(prefix))

    def image_tags(self, prefix: str) -> list[str]:
        """Image tags starting with ``prefix``, sorted."""
        return sorted(t for t in self.images if t.startswith(prefix))

    def epoch_of_step(self) -> dict[int, int]:
        """Lightning's ``epoch`` scalar: global step to epochs trained (completed epochs, 1-based)."""
        out: dict[int, int] = {}
        for step, value in self.scalar("epoch"):  # a validation end and the next epoch's first log share a step
            out[step] = min(out.get(step, 10**9), int(round(value)) + 1)
        return out

    def epoch(self, step: int) -> int:
        """Epochs trained at global ``step`` (xaiwatch and Lightning both log on the global step): 0 before
        training, else Lightning's ``epoch`` at that step, or at the last step logged before it."""
        if step <= 0:
            return 0
        validations = sorted({s for s, _ in self.scalar("val/map50")})
        if validations:  # Lightning logs an epoch-end validation at global step - 1; xaiwatch at the global step
            return sum(1 for s in validations if s < step)
        known = self.epoch_of_step()
        if step in known:
            return known[step]
        earlier = [s for s in known if s <= step]
        return known[max(earlier)] if earlier else int(step)


def find_runs(logdir: str | Path) -> list[Path]:
    """Directories under ``logdir`` (itself included) holding TensorBoard event files, sorted.

    Raises:
        ConfigurationError: when ``logdir`` does not exist or holds no event file.
    """
    root = Path(logdir)
    if not root.is_dir():
        raise ConfigurationError(f"`logdir` {str(root)!r} is not a directory; give a TensorBoard log directory.")
    runs = sorted({p.parent for p in root.rglob(f"{_EVENTS}*") if p.is_file()})
    if not runs:
        raise ConfigurationError(
            f"No TensorBoard event file ({_EVENTS}*) under {str(root)!r}; give the folder a run logged to, e.g. "
            "lightning_logs/version_0."
        )
    return runs


def _hparams(run: Path) -> dict:
    path = run / "hparams.yaml"
    if not path.is_file():
        return {}
    import yaml

    try:
        loaded = yaml.safe_load(path.read_text())
    except yaml.YAMLError:
        return {"hparams.yaml": "(not readable as plain YAML)"}
    return loaded if isinstance(loaded, dict) else {}


def load_run(run: str | Path) -> RunData:
    """Read every scalar, image and text of one run directory (nothing is downsampled).

    Args:
        run: a directory holding event files.

    Returns:
        The run's :class:`RunData`.
    """
    from tensorboard.backend.event_processing.event_accumulator import DEFAULT_SIZE_GUIDANCE, EventAccumulator

    run = Path(run)
    acc = EventAccumulator(str(run), size_guidance={kind: 0 for kind in DEFAULT_SIZE_GUIDANCE})
    acc.Reload()
    tags = acc.Tags()
    data = RunData(path=run, hparams=_hparams(run))
    for tag in tags.get("scalars", []):
        events = sorted(acc.Scalars(tag), key=lambda e: (e.step, e.wall_time))
        data.scalars[tag] = [(int(e.step), float(e.value)) for e in events]
    for tag in tags.get("images", []):
        events = sorted(acc.Images(tag), key=lambda e: (e.step, e.wall_time))
        data.images[tag] = [(int(e.step), e.encoded_image_string, int(e.width), int(e.height)) for e in events]
    for tag in tags.get("tensors", []):
        meta = acc.SummaryMetadata(tag)
        if meta.plugin_data.plugin_name != "text":
            continue
        name = tag[: -len("/text_summary")] if tag.endswith("/text_summary") else tag
        rows = []
        for e in sorted(acc.Tensors(tag), key=lambda e: (e.step, e.wall_time)):
            values = e.tensor_proto.string_val
            rows.append((int(e.step), values[0].decode("utf-8", "replace") if values else ""))
        data.texts[name] = rows
    return data


def parse_thresholds(texts: list[tuple[int, str]]) -> dict[str, str]:
    """Thresholds of the gate's checks, read from its ``saliency/gate_reason`` texts.

    Both formats are understood: the table of :func:`~xaiwatch.logging.tensorboard.gate_reason_text`
    (``| key | value | >= 0.45 | pass |``) and the failure lines ``key = 0.312 (needs >= 0.45)``.

    Args:
        texts: ``(step, text)`` pairs.

    Returns:
        Check key to its condition, e.g. ``{"energy_in_box/saliency": ">= 0.45"}``.

    Example:
        >>> parse_thresholds([(1, "failed:\\n\\n- context_reliance = 0.300 (needs <= 0.05)")])
        {'context_reliance': '<= 0.05'}
    """
    out: dict[str, str] = {}
    for _, text in texts:
        for line in text.splitlines():
            match = _TABLE_ROW.match(line.strip()) or _OLD_REASON.search(line)
            if match:
                out[match.group("key")] = " ".join(match.group("thr").split())
    return out


def passes(value: float, condition: str) -> bool:
    """Whether ``value`` meets ``condition`` (``">= 0.45"`` / ``"<= 0.05"``); ``nan`` never does."""
    if value is None or math.isnan(value):
        return False
    sign, _, number = condition.partition(" ")
    return value >= float(number) if sign == ">=" else value <= float(number)
