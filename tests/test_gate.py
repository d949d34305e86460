"""SaliencyGate and GatedModelCheckpoint: decisions, files on disk, TensorBoard, ranks, resume, bad input."""

from __future__ import annotations

from types import SimpleNamespace
from unittest.mock import patch

import pytest
import pytorch_lightning as pl
import torch

from helpers import make_trainer as _trainer
from helpers import tiny_module as _module
from xaiwatch.callbacks import GatedModelCheckpoint, SaliencyGate
from xaiwatch.checks import CheckOptions
from xaiwatch.core.errors import ConfigurationError


def _scripted(values_per_epoch):
    """Patch SaliencyGate.evaluate to return the given values at successive calls."""
    calls = iter(values_per_epoch)
    return patch.object(SaliencyGate, "evaluate", lambda self, pl_module=None: next(calls))


def test_checkpoints_only_for_passing_epochs_and_best_is_passing(tmp_path, square_loaders):
    gate = SaliencyGate(checks={"energy_in_box": 0.3}, num_probe=2, on_error="raise")
    ckpt = GatedModelCheckpoint(
        dirpath=tmp_path / "ckpt", monitor="val/map50", mode="max", save_top_k=3, save_last=True
    )
    values = [{"energy_in_box/saliency": v} for v in (0.1, 0.5, 0.2, 0.4)]
    with _scripted(values):
        _trainer(tmp_path, [gate, ckpt], epochs=4, enable_checkpointing=True).fit(_module(), *square_loaders)
    files = sorted(p.name for p in (tmp_path / "ckpt").iterdir())
    assert [f for f in files if f != "last.ckpt"] == [f for f in files if f.startswith(("epoch=1", "epoch=3"))]
    assert len(files) == 3 and "last.ckpt" in files  # epochs 1 and 3 (0-based) passed
    assert "epoch=1" in ckpt.best_model_path or "epoch=3" in ckpt.best_model_path
    assert torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=False)["epoch"] == 3
    assert ckpt.refused == [0, 2]
    assert [r["passed"] for r in gate.history] == [False, True, False, True]
    assert gate.history[0]["reasons"] == ["energy_in_box/saliency = 0.100 (needs >= 0.3)"]


def test_no_passing_epoch_writes_nothing_even_with_save_last(tmp_path, square_loaders):
    gate = SaliencyGate(checks={"context_reliance": 0.2}, methods=[], num_probe=2, on_error="raise")
    ckpt = GatedModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    with _scripted([{"context_reliance": 0.6}] * 2):
        trainer = _trainer(tmp_path, [gate, ckpt], epochs=2, enable_checkpointing=True)
        trainer.fit(_module(), *square_loaders)
    assert not (tmp_path / "ckpt").exists() or not any((tmp_path / "ckpt").iterdir())
    assert ckpt.best_model_path == ""
    assert float(trainer.callback_metrics["saliency/gate_pass"]) == 0.0


def test_warn_mode_never_refuses_and_stop_mode_stops_after_patience(tmp_path, square_loaders):
    gate = SaliencyGate(checks={"energy_in_box": 0.3}, num_probe=2, mode="warn", on_error="raise")
    ckpt = GatedModelCheckpoint(dirpath=tmp_path / "warn", save_top_k=-1)
    with (
        _scripted([{"energy_in_box/saliency": 0.0}] * 2),
        pytest.warns(UserWarning, match="failed the saliency checks"),
    ):
        _trainer(tmp_path, [gate, ckpt], epochs=2, enable_checkpointing=True).fit(_module(), *square_loaders)
    assert len(list((tmp_path / "warn").iterdir())) == 2
    stop = SaliencyGate(checks={"energy_in_box": 0.3}, num_probe=2, mode="stop", patience=2, on_error="raise")
    with _scripted([{"energy_in_box/saliency": v} for v in (0.1, 0.5, 0.1, 0.1, 0.9)]):
        trainer = _trainer(tmp_path, [stop], epochs=5)
        with pytest.warns(UserWarning, match="stopping training after 2"):
            trainer.fit(_module(), *square_loaders)
    assert trainer.current_epoch == 4 and len(stop.history) == 4  # stopped after epochs 3 and 4 failed


def test_real_checks_write_tensorboard_scalars_text_and_layout(tmp_path, square_loaders):
    gate = SaliencyGate(
        checks={"energy_in_box": 0.0, "pointing_game": None, "context_reliance": 1.0},
        methods=["saliency", "grad_cam"],
        num_probe=3,
        options=CheckOptions(min_score=0.0),
        on_error="raise",
    )
    trainer = _trainer(tmp_path, [gate], epochs=2)
    trainer.fit(_module(), *square_loaders)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(trainer.logger.log_dir, size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    scalars = set(acc.Tags()["scalars"])
    for tag in (
        "saliency/energy_in_box/saliency",
        "saliency/energy_in_box/grad_cam",
        "saliency/pointing_game/saliency",
        "saliency/context_reliance",
        "saliency/gate_pass",
        "saliency/seconds",
    ):
        assert tag in scalars, tag
        assert [e.step for e in acc.Scalars(tag)] == [2, 4]
    logged = {e.step: e.value for e in acc.Scalars("saliency/energy_in_box/saliency")}
    for record in gate.history:  # logged at the global step of the weights it judged
        assert logged[record["global_step"]] == pytest.approx(record["values"]["energy_in_box/saliency"])
    assert [e.value for e in acc.Scalars("saliency/gate_pass")] == [float(r["passed"]) for r in gate.history]
    assert 0 <= gate.history[0]["values"]["pointing_game/saliency"] <= 1
    assert "saliency/gate_reason/text_summary" in acc.Tags()["tensors"]
    assert "custom_scalars__config__" in acc.Tags()["tensors"]
    assert float(trainer.callback_metrics["saliency/gate_pass"]) == float(gate.history[-1]["passed"])


def test_training_bit_identical_with_and_without_gate(tmp_path, square_loaders):
    def fit(callbacks):
        module = _module()
        _trainer(tmp_path, callbacks, epochs=2, deterministic=True).fit(module, *square_loaders)
        return module.state_dict()

    plain = fit([])
    gated = fit(
        [
            SaliencyGate(
                checks={
                    c: None
                    for c in ("energy_in_box", "deletion_auc", "randomization_ssim", "stability", "context_reliance")
                },
                methods=["saliency"],
                num_probe=2,
                options=CheckOptions(steps=2),
                on_error="raise",
            )
        ]
    )
    assert all(torch.equal(plain[k], gated[k]) for k in plain)


def test_errors_fail_the_gate_and_training_continues(tmp_path, square_loaders):
    gate = SaliencyGate(checks={"energy_in_box": 0.0}, num_probe=2)
    ckpt = GatedModelCheckpoint(dirpath=tmp_path / "ckpt")

    def boom(self, pl_module=None):
        raise RuntimeError("probe exploded")

    with patch.object(SaliencyGate, "evaluate", boom), pytest.warns(UserWarning, match="probe exploded"):
        _trainer(tmp_path, [gate, ckpt], epochs=1, enable_checkpointing=True).fit(_module(), *square_loaders)
    assert gate.history[0]["passed"] is False and "probe exploded" in gate.history[0]["reasons"][0]
    assert not (tmp_path / "ckpt").exists() or not any((tmp_path / "ckpt").iterdir())


def test_every_rank_decides_alike_without_a_broadcast():
    """Each rank evaluates the probes in the same deterministic way and records the same decision, so no rank
    waits on another's broadcast (a rank-1 trainer, no process group)."""
    gate = SaliencyGate(checks={"energy_in_box": 0.3}, num_probe=2)
    gate._adapter, gate._indices = object(), [0, 1]  # as after setup() on rank 1 (no writer there)
    values = {"energy_in_box/saliency": 0.4}
    trainer = SimpleNamespace(
        sanity_checking=False,
        fast_dev_run=False,
        state=SimpleNamespace(fn="fit"),
        current_epoch=0,
        global_step=2,
        global_rank=1,
        world_size=2,
        is_global_zero=False,
        strategy=SimpleNamespace(broadcast=lambda *a, **k: pytest.fail("no broadcast is needed")),
        callback_metrics={},
        should_stop=False,
    )
    with patch.object(SaliencyGate, "evaluate", return_value=values):
        gate.on_validation_epoch_end(trainer, SimpleNamespace(device="cpu"))
    assert gate.last["passed"] and gate.last["global_step"] == 2 and gate.last["values"] == values
    assert gate.allows_checkpoint(2) and not gate.allows_checkpoint(3)
    assert float(trainer.callback_metrics["saliency/gate_pass"]) == 1.0


def test_state_survives_resume(tmp_path, square_loaders):
    gate = SaliencyGate(checks={"energy_in_box": 0.3}, num_probe=2, mode="stop", patience=3, on_error="raise")
    ckpt = pl.callbacks.ModelCheckpoint(dirpath=tmp_path / "all", save_last=True)
    with _scripted([{"energy_in_box/saliency": 0.1}] * 2):
        _trainer(tmp_path, [gate, ckpt], epochs=2, enable_checkpointing=True).fit(_module(), *square_loaders)
    resumed = SaliencyGate(
        checks={"energy_in_box": 0.3}, num_probe=2, mode="stop", patience=3, seed=7, on_error="raise"
    )
    with _scripted([{"energy_in_box/saliency": 0.1}] * 3), pytest.warns(UserWarning, match="stopping training after 3"):
        trainer = _trainer(tmp_path, [resumed], epochs=6)
        trainer.fit(_module(), *square_loaders, ckpt_path=str(tmp_path / "all" / "last.ckpt"))
    assert [r["step"] for r in resumed.history] == [1, 2, 3]
    assert resumed.indices == gate.indices  # the same probes despite another seed
    assert trainer.current_epoch == 3  # the streak carried over: one more failure stopped it


def test_bad_input_fails_early(tmp_path, square_loaders):
    with pytest.raises(ConfigurationError, match="Unknown check"):
        SaliencyGate(checks={"pointing": 0.5})
    with pytest.raises(ConfigurationError, match=r"in \[0, 1\]"):
        SaliencyGate(checks={"energy_in_box": 2.0})
    with pytest.raises(ConfigurationError, match="Valid methods"):
        SaliencyGate(methods=["saliency", "nope"])
    with pytest.raises(ConfigurationError, match="mode"):
        SaliencyGate(mode="refuse")
    with pytest.raises(ConfigurationError, match="needs `counterfactual=`"):
        SaliencyGate(checks={"counterfactual_flip": 0.3})
    with pytest.raises(ConfigurationError, match="patience"):
        SaliencyGate(patience=0)
    with pytest.raises(ConfigurationError, match="every_n_train_steps"):
        GatedModelCheckpoint(every_n_train_steps=10)
    with pytest.raises(ConfigurationError, match="needs a SaliencyGate"):
        _trainer(tmp_path, [GatedModelCheckpoint(dirpath=tmp_path)], enable_checkpointing=True).fit(
            _module(), *square_loaders
        )
    from torch.utils.data import DataLoader

    from conftest import SquaresDataset, collate

    no_boxes = SquaresDataset(4, 1)
    for item in no_boxes.items:
        item["boxes"], item["labels"] = torch.zeros(0, 4), torch.zeros(0, dtype=torch.long)
    with pytest.raises(ConfigurationError, match="have no ground-truth boxes"):
        _trainer(tmp_path, [SaliencyGate(num_probe=2)]).fit(
            _module(), square_loaders[0], DataLoader(no_boxes, batch_size=4, collate_fn=collate)
        )
    with pytest.raises(ConfigurationError, match="must return images of shape"):
        gate = SaliencyGate(
            checks={"counterfactual_flip": 0.3}, methods=[], num_probe=2, counterfactual=lambda x, b, labels: x[:1]
        )
        _trainer(tmp_path, [gate]).fit(_module(), *square_loaders)


def test_counterfactual_function_feeds_the_flip_check(tmp_path, square_loaders):
    gate = SaliencyGate(
        checks={"counterfactual_flip": 1.0},
        methods=[],
        num_probe=3,
        counterfactual=lambda x, b, labels: x.flip(1),
        on_error="raise",
    )
    trainer = _trainer(tmp_path, [gate], epochs=1)
    trainer.fit(_module(), *square_loaders)
    value = gate.history[0]["values"].get("counterfactual_flip")
    assert value is None or value != value or 0.0 <= value <= 1.0
    assert torch.equal(gate._counterfactuals, gate.probes.images.flip(1))


def test_counterfactual_dataset_in_the_validation_order(tmp_path):
    from xaiwatch.data import YoloDataModule, generate, write_counterfactual

    data = generate(tmp_path / "d", num_train=8, num_val=8, imgsz=64, shortcut="context", seed=3)
    wrong = write_counterfactual(data, "wrong")
    dm = YoloDataModule(str(data), imgsz=64, batch_size=8)
    gate = SaliencyGate(
        checks={"counterfactual_flip": None}, methods=[], num_probe=4, counterfactual=wrong, on_error="raise"
    )
    _trainer(tmp_path, [gate], epochs=1).fit(_module(), datamodule=dm)
    assert gate._counterfactuals.shape == gate.probes.images.shape
    assert not torch.equal(gate._counterfactuals, gate.probes.images)  # other backgrounds, same objects
    value = gate.history[0]["values"]["counterfactual_flip"]
    assert value != value or 0.0 <= value <= 1.0
    other = generate(tmp_path / "other", num_train=8, num_val=8, imgsz=64, shortcut="context", seed=4)
    mismatched = SaliencyGate(checks={"counterfactual_flip": 0.5}, methods=[], num_probe=4, counterfactual=other)
    with pytest.raises(ConfigurationError, match="does not match the validation set"):
        _trainer(tmp_path, [mismatched], epochs=1).fit(_module(), datamodule=dm)
    with pytest.raises(ConfigurationError, match="neither a function nor a dataset.yaml"):
        bad = SaliencyGate(checks={"counterfactual_flip": 0.5}, methods=[], num_probe=4, counterfactual=tmp_path / "x")
        _trainer(tmp_path, [bad], epochs=1).fit(_module(), datamodule=dm)


def test_reason_text_flags_methods_insensitive_to_the_weights():
    from unittest.mock import Mock

    gate = SaliencyGate(checks={"randomization_spearman": 0.5}, methods=["saliency", "layer_cam"], mode="warn")
    gate._writer = Mock()
    results = [
        {"key": "randomization_spearman/saliency", "status": "pass"},
        {"key": "randomization_spearman/layer_cam", "status": "fail"},
    ]
    record = {
        "step": 1,
        "global_step": 2,
        "status": "fail",
        "passed": False,
        "reasons": ["x"],
        "values": {},
        "seconds": 0.1,
        "lines": ["fail: randomization_spearman/layer_cam = 0.72 (needs <= 0.5)"],
        "verdict": {"results": results},
    }
    trainer = SimpleNamespace(callback_metrics={}, should_stop=False)
    with pytest.warns(UserWarning, match="failed the saliency checks"):
        gate._record(trainer, record)
    (text,) = [c.args[1] for c in gate._writer.text.call_args_list]
    assert "insensitive to the model's weights (maps barely change when randomised): ['layer_cam']" in text
    assert "epoch 1 | step 2: fail" in text
