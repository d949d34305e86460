"""Two gloo ranks: every collective on every rank, the probes shared, rank zero writing, the ranks agreeing."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import read_events

SCRIPT = Path(__file__).with_name("ddp_run.py")


def _run(tmp_path: Path, strategy: str, devices: int = 2) -> list[dict]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), str(tmp_path), strategy, str(devices)],
        env=env,
        capture_output=True,
        text=True,
        timeout=420,  # a collective issued by one rank alone would hang: the hard timeout turns it into a failure
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "failed at" not in proc.stderr, proc.stderr[-3000:]  # no callback warned about an error
    return [json.loads(Path(tmp_path, f"rank{r}.json").read_text()) for r in range(devices)]


@pytest.mark.production
@pytest.mark.parametrize("strategy", ["ddp", "ddp_spawn"])
def test_two_ranks_share_probes_agree_and_rank_zero_writes(tmp_path, strategy):
    ranks = _run(tmp_path, strategy)
    assert ranks[0]["seen"] == [0, 2] and ranks[1]["seen"] == [1, 3]  # each rank explained its share only
    assert json.dumps(ranks[0]["gate"]) == json.dumps(ranks[1]["gate"])  # the same decisions everywhere (nan too)
    assert len(ranks[0]["gate"]) == 2
    # the gate's probes were shared too: at each of its 2 decisions each rank evaluated its 2 of the 4 probes
    assert ranks[0]["gate_evaluated"] == [[0, 2], [0, 2]] and ranks[1]["gate_evaluated"] == [[1, 3], [1, 3]]
    # and the shared decision is the one a single call on every probe gives on the same weights (each rank)
    for rank in ranks:
        assert json.dumps(rank["gate_last_verdict"]) == json.dumps(rank["gate_reference"])
    results = {r["key"]: r for r in ranks[0]["gate_reference"]["results"]}
    assert results["context_swap"]["defined"] >= 1  # objects pasted onto other probes' images, whichever rank's
    assert results["relative_context_reliance"]["defined"] == 4
    assert ranks[0]["tracked"] == ranks[1]["tracked"]
    assert ranks[0]["wrote"] and not ranks[1]["wrote"]
    log_dir = Path(ranks[0]["log_dir"])
    assert ranks[1]["log_dir"] == str(log_dir)
    assert len(list(log_dir.glob("events.out.tfevents.*"))) == 1  # one writer
    acc = read_events(log_dir)
    for p in range(4):  # every probe's pictures at every step, whichever rank drew them
        assert [e.step for e in acc.Images(f"explain/saliency/probe_{p:02d}")] == [0, 2, 4]
        assert (log_dir / "xaiwatch" / f"probe_{p:02d}_filmstrip.png").is_file()
        assert (log_dir / "xaiwatch" / f"probe_{p:02d}.gif").is_file()
    assert len(acc.Images("explain_filmstrip/probe_03")) == 1
