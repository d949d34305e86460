"""The saliency gate's proof (issue: catch a model that looks in the wrong place before it is saved).

Runs ``examples/shortcut_gate.py`` for one seed: YOLOv8n fine-tuned from scratch (600 images, 160 px, 456
steps) on a planted context shortcut and on clean data, the two in parallel. Asserts the positive control
(the shortcut model really uses the cue: counterfactual flip rate far above the clean model's) and then files
on disk: the shortcut model's last validation fails the gate and its final model is never written; the clean
model passes and its best and last checkpoints exist. About 10 minutes on 2 cores: ``make test-proof`` (CI runs it).
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
            [sys.executable, str(EXAMPLE), "--out", str(tmp_path / kind), "--seeds", "0", "--kinds", kind, "--cpu"],
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
    # positive control: the shortcut model decides from the background
    assert shortcut["flip_rate"] > 0.3 and clean["flip_rate"] < 0.15, (shortcut["flip_rate"], clean["flip_rate"])
    # the gate: the shortcut model's last validation fails on both default checks, the clean one passes
    last_s, last_c = shortcut["gate"][-1], clean["gate"][-1]
    assert not last_s["passed"] and len(last_s["reasons"]) == 2, last_s
    assert last_c["passed"], last_c
    # files on disk: no checkpoint of the shortcut model's final weights; the clean model's best and last exist
    steps = {g["step"] for g in shortcut["gate"] if g["passed"]}  # early epochs may pass before the cue is learned
    for name in shortcut["checkpoints"]:
        path = tmp_path / "shortcut" / "shortcut_s0" / "checkpoints" / name
        assert torch.load(path, weights_only=False)["epoch"] + 1 in steps, name
    final = shortcut["gate"][-1]["step"]
    assert all(torch.load(p, weights_only=False)["epoch"] + 1 != final for p in (tmp_path / "shortcut").rglob("*.ckpt"))
    passed = {g["step"] for g in clean["gate"] if g["passed"]}
    saved = sorted((tmp_path / "clean" / "clean_s0" / "checkpoints").glob("*.ckpt"))
    assert "last.ckpt" in {p.name for p in saved} and len(saved) == 2  # top-1 and last
    assert all(torch.load(p, weights_only=False)["epoch"] + 1 in passed for p in saved)  # every file a passing model
    assert Path(clean["best_model_path"]).is_file()
