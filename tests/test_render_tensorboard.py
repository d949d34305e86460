"""What TensorBoard keeps and shows first: the command file, the CUSTOM SCALARS story, projector order, gate text."""

from __future__ import annotations

import pytest
import torch
from torch.utils.tensorboard import SummaryWriter

from xaiwatch.checks.rule import parse_rules
from xaiwatch.core.errors import ConfigurationError
from xaiwatch.logging import (
    COMMAND_FILE,
    STORY,
    XaiWriter,
    gate_reason_text,
    story_layout,
    write_tensorboard_command,
)


def test_command_file_keeps_every_step(tmp_path):
    run = tmp_path / "tb" / "version_0"
    path = write_tensorboard_command(run, max_epochs=12, logdir=tmp_path / "tb")
    assert path == run / COMMAND_FILE
    assert path.read_text() == (
        f"tensorboard --logdir {(tmp_path / 'tb').resolve()} --samples_per_plugin images=15,text=15,tensors=15\n"
    )
    assert "images=10000" in write_tensorboard_command(run, max_epochs=-1).read_text()  # ours: rewritten
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / COMMAND_FILE).write_text("my notes\n")
    with pytest.raises(ConfigurationError, match="was not written by xaiwatch"):
        write_tensorboard_command(foreign, 3)
    assert (foreign / COMMAND_FILE).read_text() == "my notes\n"


def _layout_of(log_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.custom_scalar import layout_pb2, metadata

    acc = EventAccumulator(str(log_dir), size_guidance={"tensors": 0})
    acc.Reload()
    events = acc.Tensors(metadata.CONFIG_SUMMARY_TAG)
    layout = layout_pb2.Layout()
    layout.ParseFromString(events[-1].tensor_proto.string_val[0])
    return layout


def test_custom_scalars_story_first_and_merged(tmp_path):
    sw = SummaryWriter(str(tmp_path))
    first, second = XaiWriter(sw), XaiWriter(sw)  # two callbacks, one TensorBoard writer
    command = first.setup_run(max_epochs=4)
    assert command.read_text().startswith("tensorboard --logdir ") and "images=7" in command.read_text()
    second.custom_scalars({"xaiwatch saliency gate": {"gate_pass": ["Multiline", ["saliency/gate_pass"]]}})
    sw.close()
    layout = _layout_of(tmp_path)
    assert [c.title for c in layout.category] == [STORY, "xaiwatch saliency gate"]
    story = layout.category[0]
    assert [c.title for c in story.chart] == list(story_layout()[STORY])
    assert list(story.chart[0].multiline.tag) == ["^val/map50$", "^val/map$"]


def test_story_regexes_pick_the_right_tags():
    import re

    charts = story_layout()[STORY]
    tags = ["saliency/energy_in_box/saliency", "saliency/context_reliance", "saliency/gate_pass", "saliency/seconds"]
    checks = charts["saliency checks (mean over probes)"][1][0]
    assert [t for t in tags if re.match(checks, t)] == tags[:2]
    cost = charts["cost of each callback, seconds"][1]
    seconds = ["xaiwatch/explain_seconds", "saliency/seconds", "errors/seconds", "boundary/seconds", "val/map50"]
    assert [t for t in seconds if any(re.match(p, t) for p in cost)] == seconds[:4]


def test_projector_lists_the_last_epoch_first(tmp_path):
    sw = SummaryWriter(str(tmp_path))
    writer = XaiWriter(sw)
    for step in (0, 1, 2):
        for layer in ("neck", "backbone"):
            writer.embedding(layer, torch.rand(5, 3), [[str(i), "a"] for i in range(5)], ["i", "c"], None, step)
    sw.close()
    text = (tmp_path / "projector_config.pbtxt").read_text()
    names = [line.split('"')[1] for line in text.splitlines() if "tensor_name" in line]
    assert names == [
        "projection/backbone (last: step 2)",
        "projection/neck (last: step 2)",
        "projection/backbone:00001",
        "projection/neck:00001",
        "projection/backbone:00000",
        "projection/neck:00000",
    ]
    # the PROJECTOR sorts equal-sized tensors by name and opens the first: the last epoch's name sorts first
    assert sorted(names)[0] == "projection/backbone (last: step 2)"


def test_gate_reason_lists_every_check_every_epoch():
    rules, _ = parse_rules({"energy_in_box": 0.45, "context_reliance": 0.05, "pointing_game": None}, ["saliency"])
    values = {"energy_in_box/saliency": 0.61, "context_reliance": 0.2, "pointing_game/saliency": 0.75}
    text = gate_reason_text(3, values, rules, passed=False)
    assert text.splitlines()[0] == "epoch 3: failed"
    assert "| context_reliance | 0.200 | <= 0.05 | FAIL |" in text
    assert "| energy_in_box/saliency | 0.610 | >= 0.45 | pass |" in text
    assert "| pointing_game/saliency | 0.750 | - | logged |" in text


def test_pictures_are_written_as_fast_pngs_that_read_back_exactly(tmp_path):
    """XaiWriter encodes its PNGs itself (zlib level 1): the same pixels, tag and step as ``add_image`` writes."""
    import numpy as np

    from xaiwatch.logging import Tags, XaiWriter
    from xaiwatch.logging.reader import read_pictures

    rng = np.random.default_rng(0)
    picture = (rng.random((63, 116, 3)) * 255).astype(np.uint8)
    ours, theirs = tmp_path / "ours", tmp_path / "theirs"
    with SummaryWriter(str(ours)) as sw:
        XaiWriter(sw).explanation("saliency", "probe_00", picture, 40)
    with SummaryWriter(str(theirs)) as sw:
        sw.add_image(Tags.explain("saliency", "probe_00"), picture, global_step=40, dataformats="HWC")
    got, expected = read_pictures(ours, "explain/"), read_pictures(theirs, "explain/")
    assert got.keys() == expected.keys() == {Tags.explain("saliency", "probe_00")}
    (tag,) = got
    assert list(got[tag]) == [40] and np.array_equal(got[tag][40], picture)
    assert np.array_equal(expected[tag][40], picture)


def test_event_records_are_checksummed_in_c_and_frame_exactly_as_tensorboards_own(tmp_path):
    """After ``XaiWriter`` exists, every record of an event file carries the masked CRC-32C that TensorBoard's own
    pure-Python code computes (recomputed here from the file's bytes), and the record writer no longer runs it."""
    import struct

    import numpy as np
    from tensorboard.compat.tensorflow_stub import pywrap_tensorflow
    from tensorboard.summary.writer import record_writer

    from xaiwatch.logging import fast_event_checksums

    rng = np.random.default_rng(1)
    picture = (rng.random((90, 120, 3)) * 255).astype(np.uint8)
    with SummaryWriter(str(tmp_path)) as sw:
        writer = XaiWriter(sw)
        writer.explanation("saliency", "probe_00", picture, 3)
        writer.scalar("xaiwatch/explain_seconds", 0.25, 3)
    assert fast_event_checksums() and record_writer.masked_crc32c is not pywrap_tensorflow.masked_crc32c
    (events,) = tmp_path.glob("events.out.tfevents.*")
    data, pos, records = events.read_bytes(), 0, 0
    while pos < len(data):
        header = data[pos : pos + 8]
        (length,) = struct.unpack("<Q", header)
        (header_crc,) = struct.unpack("<I", data[pos + 8 : pos + 12])
        body = data[pos + 12 : pos + 12 + length]
        (body_crc,) = struct.unpack("<I", data[pos + 12 + length : pos + 16 + length])
        assert header_crc == pywrap_tensorflow.masked_crc32c(header)
        assert body_crc == pywrap_tensorflow.masked_crc32c(body)
        pos, records = pos + 16 + length, records + 1
    assert pos == len(data) and records >= 3  # the file version record, the picture and the scalar
