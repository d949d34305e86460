"""The saliency gate's proof on a held-out family (issue: catch a model that looks in the wrong place).

Runs ``examples/shortcut_gate.py`` for one seed of the ``tint2`` family (circles and hexagons on photographs whose
tint follows the class in the shortcut twin's training set, at random in the clean twin's). The gate's defaults
were chosen on the other families (``examples/calibrate_gate.py``, docs/gate.md), so this is data the gate was
not tuned on. YOLOv8n from its yaml, 240 images, 96 px, 180 steps, the two twins in parallel: about 3-4 minutes
on 2 free cores, ``make test-proof`` (CI runs it).

Asserts the positive control (the shortcut model uses the cue: flip rate >= 0.5; the clean one does not), then
the gate's verdicts and files on disk: the shortcut model's final validation fails and its final weights are never
written; the clean model's final validation is not refused and its checkpoints are passing models.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

EXAMPLE = Path(__file__).parents[1] / "examples" / "shortcut_gate.py"


@pytest.mark.proof
def test_gate_refuses_the_shortcut_model_and_saves_the_clean_one(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg", "YOLO_OFFLINE": "1"}
    runs = {
        kind: subprocess.Popen(
            [
                sys.executable,
                str(EXAMPLE),
                "--out",
                str(tmp_path / kind),
                "--family",
                "tint2",
                "--seeds",
                "0",
                "--kinds",
                kind,
                "--cpu",
            ],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for kind in ("shortcut", "clean")
    }
    reports = {}
    for kind, proc in runs.items():
        out, err = proc.communicate(timeout=3600)
        assert proc.returncode == 0, err[-3000:]
        reports[kind] = json.loads((tmp_path / kind / "report.json").read_text())["runs"][f"{kind}_s0"]
    shortcut, clean = reports["shortcut"], reports["clean"]
    # positive control: the shortcut model decides from the tint, the clean one from the object
    assert shortcut["flip_rate"] >= 0.5 and clean["flip_rate"] < 0.2, (shortcut["flip_rate"], clean["flip_rate"])
    # the gate: the shortcut model's final validation fails, the clean one's is not refused
    last_s, last_c = shortcut["gate"][-1], clean["gate"][-1]
    assert last_s["status"] == "fail", last_s
    assert last_c["status"] in ("pass", "inconclusive"), last_c  # inconclusive is not refused by default
    assert all(line.split(":")[0] in ("pass", "fail", "inconclusive", "logged") for line in last_s["lines"])
    # files on disk: no checkpoint of the shortcut model's final weights; the clean model's final weights exist
    final = last_s["step"]
    assert all(torch.load(p, weights_only=False)["epoch"] + 1 != final for p in (tmp_path / "shortcut").rglob("*.ckpt"))
    kept = {g["step"] for g in clean["gate"] if g["status"] != "fail"}
    saved = sorted((tmp_path / "clean" / "clean_s0" / "checkpoints").glob("*.ckpt"))
    assert "last.ckpt" in {p.name for p in saved}
    epochs = {torch.load(p, weights_only=False)["epoch"] + 1 for p in saved}
    assert epochs <= kept and last_c["step"] in epochs  # every file a model the gate let through; the final one too
    assert Path(clean["best_model_path"]).is_file()
