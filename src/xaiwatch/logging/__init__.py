"""TensorBoard writing: the one place that owns every tag name."""

from __future__ import annotations

from xaiwatch.logging.tensorboard import (
    COMMAND_FILE,
    STORY,
    Tags,
    XaiWriter,
    fast_event_checksums,
    gate_reason_text,
    merge_layouts,
    order_projector_config,
    story_layout,
    tensorboard_command,
    write_tensorboard_command,
)

__all__ = [
    "COMMAND_FILE",
    "STORY",
    "Tags",
    "XaiWriter",
    "fast_event_checksums",
    "gate_reason_text",
    "merge_layouts",
    "order_projector_config",
    "story_layout",
    "tensorboard_command",
    "write_tensorboard_command",
]
