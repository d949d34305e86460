"""Resume continues the story: probes found by content, pictures of the killed run in the end-of-fit outputs."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from conftest import SquaresDataset
from helpers import read_events
from xaiwatch.callbacks import ExplainCallback
from xaiwatch.core.errors import ConfigurationError

SCRIPT = Path(__file__).with_name("resume_run.py")


def _phase(out: Path, phase: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    return subprocess.run(
        [sys.executable, str(SCRIPT), str(out), phase], env=env, capture_output=True, text=True, timeout=600
    )


@pytest.mark.production
def test_killed_run_resumes_with_every_earlier_picture(tmp_path):
    first = _phase(tmp_path, "first")
    assert first.returncode == -signal.SIGKILL, first.stderr[-2000:]  # really killed, no clean-up ran
    assert not list(tmp_path.glob("tb/version_0/xaiwatch/*"))  # the killed run never wrote its filmstrips
    second = _phase(tmp_path, "resume")
    assert second.returncode == 0, second.stderr[-3000:]
    resumed = tmp_path / "tb" / "version_1"
    steps_now = [e.step for e in read_events(resumed).Images("explain/saliency/probe_00")]
    assert steps_now == [6, 8]  # epochs 3 and 4 after the resume at step 4
    with Image.open(resumed / "xaiwatch" / "probe_00.gif") as gif:
        assert gif.n_frames == 5  # steps 0, 2, 4 (killed run, read back from its log folder) and 6, 8
    strip = read_events(resumed).Images("explain_filmstrip/probe_00")
    assert len(strip) == 1 and strip[0].step == 8
    # the PROJECTOR of the resumed folder lists every epoch, those of the killed run copied into it
    from google.protobuf import text_format
    from tensorboard.plugins.projector.projector_config_pb2 import ProjectorConfig

    config = text_format.Parse((resumed / "projector_config.pbtxt").read_text(), ProjectorConfig())
    steps = sorted(int(e.tensor_path.split("/")[0]) for e in config.embeddings)
    assert steps == [0, 2, 4, 6, 8]
    assert all(
        (resumed / e.tensor_path).is_file() and (resumed / e.sprite.image_path).is_file() for e in config.embeddings
    )
    assert max(config.embeddings, key=lambda e: e.tensor_path).tensor_name == "projection/neck.p3 (last: step 8)"


def _setup_on(cb: ExplainCallback, dataset, tmp_path) -> None:
    from unittest.mock import MagicMock

    trainer = MagicMock(fast_dev_run=False, is_global_zero=False, log_dir=str(tmp_path), max_epochs=2)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("xaiwatch.callbacks.base.stage_dataset", lambda *a: dataset)
        mp.setattr("xaiwatch.callbacks.base.resolve_adapter", lambda *a: MagicMock())
        mp.setattr(ExplainCallback, "_setup", lambda *a: None)
        cb.setup(trainer, MagicMock(), "fit")


def test_probes_found_by_content_when_the_validation_set_changes(tmp_path):
    val = SquaresDataset(8, 1)
    cb = ExplainCallback(methods=["saliency"], num_probe=3)
    _setup_on(cb, val, tmp_path)
    state = cb.state_dict()
    chosen = [val.items[i]["image"] for i in state["probe_indices"]]

    grown = SquaresDataset(8, 1)
    grown.items = SquaresDataset(3, 7).items + grown.items  # 3 new images whose names sort first
    resumed = ExplainCallback(methods=["saliency"], num_probe=3)
    resumed.load_state_dict(state)
    with pytest.warns(UserWarning, match="found again by content"):
        _setup_on(resumed, grown, tmp_path)
    assert resumed.indices == [i + 3 for i in state["probe_indices"]]
    assert all(torch.equal(grown.items[i]["image"], im) for i, im in zip(resumed.indices, chosen))

    shrunk = SquaresDataset(8, 1)
    del shrunk.items[state["probe_indices"][0]]
    again = ExplainCallback(methods=["saliency"], num_probe=3)
    again.load_state_dict(state)
    with pytest.raises(ConfigurationError, match="validation set changed since the checkpoint"):
        _setup_on(again, shrunk, tmp_path)
