"""Every callback on a DAMO-YOLO fit: what TensorBoard contains, counts against a recount, no side effects on
training. The same trainer, events reader and data as the YOLOv8 callback tests (imported from them)."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from test_damo import responsive
from test_projection_callback import _projector

from conftest import tiny_damo_module
from helpers import make_trainer as _trainer
from helpers import read_events as _events
from xaiwatch.adapters import DamoYoloAdapter
from xaiwatch.analysis import COUNT_TYPES, ErrorCounts
from xaiwatch.callbacks import (
    DecisionBoundaryCallback,
    ErrorAnalysisCallback,
    ExplainCallback,
    ProjectionCallback,
    SaliencyGate,
)
from xaiwatch.checks import CheckOptions

METHODS = ["saliency", "grad_cam", "guided_backprop"]


def _callbacks() -> list:
    return [
        ExplainCallback(
            methods=METHODS,
            num_probe=2,
            on_error="raise",
            method_options={"guided_backprop": {"other_activations": "plain_gradient"}},
        ),
        ProjectionCallback(layers=["neck.p3", "neck.p5"], method="pca", on_error="raise"),
        ErrorAnalysisCallback(max_images=6, batch_size=4, conf=0.3, explain_top_k=1, on_error="raise"),
        DecisionBoundaryCallback(num_probe=2, max_objects=1, max_eps=0.2, steps=2, bisection_steps=2, on_error="raise"),
        SaliencyGate(
            checks={"energy_in_box": 0.0, "context_reliance": None, "randomization_ssim": None, "deletion_auc": None},
            methods=["saliency", "grad_cam"],
            num_probe=2,
            options=CheckOptions(steps=2, min_score=0.0),
            on_error="raise",
        ),
    ]


def _module():
    module = tiny_damo_module()
    responsive(module.net).train()  # scores near 0.5 from the start: detections of every error type to count
    return module


def _picture(event) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(event.encoded_image_string)).convert("RGB"))


@pytest.mark.parametrize("inference_mode", [True, pytest.param(False, marks=pytest.mark.slow)])
def test_every_callback_on_a_damo_fit(tmp_path, square_loaders, inference_mode):
    callbacks = _callbacks()
    module = _module()
    trainer = _trainer(tmp_path, callbacks, inference_mode=inference_mode)
    trainer.fit(module, *square_loaders)
    log_dir = Path(trainer.logger.log_dir)
    acc = _events(log_dir)
    images, scalars = acc.Tags()["images"], acc.Tags()["scalars"]
    # explanations: one picture per method, probe and epoch (0 = before training)
    assert {t for t in images if t.startswith("explain/")} == {
        f"explain/{m}/probe_{i:02d}" for m in METHODS for i in (0, 1)
    }
    for method in METHODS:
        events = acc.Images(f"explain/{method}/probe_01")
        assert [e.step for e in events] == [0, 2, 4] and all(_picture(e).std() > 10 for e in events)
    assert len(acc.Scalars("explain_tracked/detected_probe_00")) == 3
    # projections: projector embeddings, pictures and separability scalars every epoch
    assert sorted(e.tensor_name for e in _projector(log_dir)) == sorted(
        [f"projection/{layer}:{step:05d}" for layer in ("neck.p3", "neck.p5") for step in (0, 2)]
        + [f"projection/{layer} (last: step 4)" for layer in ("neck.p3", "neck.p5")]
    )
    assert [e.step for e in acc.Images("projection/neck.p3")] == [0, 2, 4]
    assert [e.step for e in acc.Scalars("projection/neck.p5/silhouette")] == [0, 2, 4]
    # error analysis: the logged counts are those of the final model, recounted here with DAMO's post-processing
    errors = callbacks[2]
    adapter = DamoYoloAdapter(module.net, names=module.names, conf=0.3)
    counts = ErrorCounts(3)
    val = square_loaders[1].dataset
    for i in errors.state_dict()["probe_indices"]:
        counts.update(adapter.detect(val[i]["image"][None])[0], val[i]["boxes"], val[i]["labels"])
    for kind in COUNT_TYPES:
        assert acc.Scalars(f"errors/{kind}/all")[-1].value == counts.totals()[kind], kind
    assert counts.totals()["fp"] > 0 and counts.totals()["tp"] + counts.totals()["fn"] == 6
    assert [e.step for e in acc.Images("errors/confusion")] == [2, 4] and _picture(
        acc.Images("errors/confusion")[-1]
    ).std() > 10
    assert any(t.startswith("errors/explain/saliency/") for t in images)
    # decision boundary: how far each probe object is from flipping, every epoch
    for subject in ("probe_00", "probe_01"):
        assert [e.step for e in acc.Scalars(f"boundary/min_eps/{subject}")] == [0, 2, 4]
        assert [e.step for e in acc.Images(f"boundary/picture/{subject}")] == [0, 2, 4]
    assert {"val/map50", "val/map", "val/loss"} <= set(scalars)
    # the saliency gate: every check of both methods after each epoch, and its decision
    gate = callbacks[4]
    for key in ("energy_in_box/saliency", "randomization_ssim/grad_cam", "deletion_auc/saliency", "context_reliance"):
        assert [e.step for e in acc.Scalars(f"saliency/{key}")] == [2, 4], key
    assert [e.value for e in acc.Scalars("saliency/gate_pass")] == [float(r["passed"]) for r in gate.history]
    assert all(r["passed"] for r in gate.history)  # energy_in_box >= 0 always holds


def _weights_after_fit(tmp_path, square_loaders, callbacks) -> dict:
    module = _module()
    _trainer(tmp_path, callbacks, epochs=1).fit(module, *square_loaders)
    return {k: v.clone() for k, v in module.state_dict().items()}


def test_training_bit_identical_with_and_without_callbacks(tmp_path, square_loaders):
    plain = _weights_after_fit(tmp_path / "a", square_loaders, [])
    explained = _weights_after_fit(tmp_path / "b", square_loaders, _callbacks())
    assert plain.keys() == explained.keys() and any("running_mean" in k for k in plain)
    for k in plain:
        assert torch.equal(plain[k], explained[k]), k


def test_guided_backprop_is_refused_at_setup_without_the_opt_in(tmp_path, square_loaders):
    from xaiwatch.core.errors import UnsupportedModelError

    trainer = _trainer(tmp_path, [ExplainCallback(methods=["saliency", "guided_backprop"], num_probe=2)])
    with pytest.raises(UnsupportedModelError, match="other_activations='plain_gradient'"):
        trainer.fit(_module(), *square_loaders)
    assert trainer.global_step == 0  # refused before any training


@pytest.mark.slow
def test_demo_command_with_damo(tmp_path, capsys):
    """`xaiwatch demo --model damo`: DAMO-YOLO-T with the demo preset's four callbacks (about 30 s)."""
    from test_demo_e2e import _acc

    from xaiwatch.cli import main

    out = tmp_path / "demo"
    argv = ["demo", "--model", "damo", "--out", str(out), "--epochs", "1", "--num-train", "16", "--num-val", "16"]
    main([*argv, "--imgsz", "64", "--batch-size", "8", "--accelerator", "cpu"])
    assert f"tensorboard --logdir {out.resolve()}" in capsys.readouterr().out
    acc = _acc(next((out / "tensorboard").glob("version_*")))
    tags = acc.Tags()
    assert {f"explain/{m}/probe_{i:02d}" for m in ("saliency", "layer_cam") for i in range(8)} <= set(tags["images"])
    assert {"projection/neck.p3", "errors/confusion"} <= set(tags["images"])
    assert {"val/map50", "projection/neck.p4/silhouette", "errors/tp/all"} <= set(tags["scalars"])
    assert any(t.startswith("boundary/min_eps/") for t in tags["scalars"])
    assert len(acc.Scalars("saliency/gate_pass")) == 1 and "saliency/energy_concentration/saliency" in tags["scalars"]


def test_demo_module_choice():
    from xaiwatch.cli import demo_module
    from xaiwatch.core.errors import ConfigurationError
    from xaiwatch.models import DamoYoloModule

    module = demo_module("damo-small", num_classes=2, names=["a", "b"])
    assert isinstance(module, DamoYoloModule) and module.net.config["neck"]["hidden_ratio"] == 0.75
    assert demo_module("DAMO", 2, ["a", "b"]).net.config["neck"]["out_channels"] == [64, 128, 256]  # tiny
    with pytest.raises(ConfigurationError, match="`size` can be tiny, small, medium, got 'xl'"):
        demo_module("damo-xl", 2, ["a", "b"])


@pytest.mark.slow
def test_example_script_runs(tmp_path):
    import subprocess
    import sys

    from test_demo_e2e import _acc

    path = Path(__file__).parents[1] / "examples" / "finetune_damo.py"
    out = tmp_path / "ex"
    argv = ["--epochs", "1", "--num-train", "16", "--num-val", "8", "--imgsz", "64", "--batch-size", "8"]
    result = subprocess.run(
        [sys.executable, str(path), *argv, "--out", str(out)], capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"tensorboard --logdir {out.resolve()}" in result.stdout
    images = _acc(next((out / "tensorboard").glob("version_*"))).Tags()["images"]
    assert {"explain/guided_backprop/probe_07", "projection/neck.p3", "errors/confusion"} <= set(images)
