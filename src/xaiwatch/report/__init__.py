"""``xaiwatch report``: a run's story as one self-contained HTML page, read back from its TensorBoard events."""

from __future__ import annotations

from xaiwatch.report.build import MARKER, build_report, write_report
from xaiwatch.report.events import RunData, find_runs, load_run, parse_thresholds

__all__ = ["MARKER", "RunData", "build_report", "find_runs", "load_run", "parse_thresholds", "write_report"]
