"""SaliencyGate verdicts: inconclusive epochs, every check written every epoch (nan too), console lines, bad input."""

from __future__ import annotations

import logging
from unittest.mock import patch

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import TensorBoardLogger
from torch.utils.data import DataLoader

from conftest import SquaresDataset, collate, tiny_cfg
from xaiwatch.callbacks import GatedModelCheckpoint, SaliencyGate
from xaiwatch.core.errors import ConfigurationError
from xaiwatch.models import YOLOv8Module

NAN = float("nan")


def _module() -> YOLOv8Module:
    pl.seed_everything(0)
    return YOLOv8Module(tiny_cfg(), num_classes=3, lr=5e-3, warmup_steps=1)


def _trainer(tmp_path, callbacks, epochs) -> pl.Trainer:
    return pl.Trainer(
        max_epochs=epochs,
        limit_train_batches=1,
        logger=TensorBoardLogger(str(tmp_path), name="tb"),
        callbacks=callbacks,
        enable_checkpointing=True,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        accelerator="cpu",
    )


def _scripted(per_epoch):
    calls = iter(per_epoch)
    return patch.object(SaliencyGate, "evaluate", lambda self, pl_module=None: next(calls))


def _events(trainer):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(trainer.logger.log_dir, size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    return acc


@pytest.mark.parametrize("inconclusive, saved", [("warn", 3), ("pass", 3), ("refuse", 1)])
def test_inconclusive_epochs_follow_the_option(tmp_path, square_loaders, inconclusive, saved):
    gate = SaliencyGate(
        checks={"context_swap": 0.3},
        methods=[],
        num_probe=4,
        min_defined=2,
        inconclusive=inconclusive,
        on_error="raise",
    )
    ckpt = GatedModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1)
    values = [
        {"context_swap": torch.tensor([NAN, NAN, NAN, NAN])},  # nothing detected: inconclusive
        {"context_swap": torch.tensor([0.0, 0.1, NAN, 0.0])},  # pass on 3 probes
        {"context_swap": torch.tensor([0.9, NAN, NAN, NAN])},  # one defined probe < min_defined: inconclusive
    ]
    trainer = _trainer(tmp_path, [gate, ckpt], 3)
    if inconclusive == "pass":
        with _scripted(values):
            trainer.fit(_module(), *square_loaders)
    else:
        with _scripted(values), pytest.warns(UserWarning, match="epoch 1 is inconclusive"):
            trainer.fit(_module(), *square_loaders)
    assert [r["status"] for r in gate.history] == ["inconclusive", "pass", "inconclusive"]
    assert len(list((tmp_path / "ckpt").iterdir())) == saved
    assert gate.history[2]["defined"] == {"context_swap": 1}
    assert "on 1/4 probes" in gate.history[2]["reasons"][0] and "too few probes" in gate.history[2]["reasons"][0]
    acc = _events(trainer)
    swap = [e.value for e in acc.Scalars("saliency/context_swap")]
    assert len(swap) == 3 and swap[0] != swap[0] and swap[1:] == pytest.approx([0.1 / 3, 0.9], rel=1e-6)
    assert [e.value for e in acc.Scalars("saliency/defined/context_swap")] == [0, 3, 1]
    assert [e.value for e in acc.Scalars("saliency/gate_inconclusive")] == [1, 0, 1]
    assert [e.value for e in acc.Scalars("saliency/gate_pass")] == [0, 1, 0]
    texts = [e.tensor_proto.string_val[0].decode() for e in acc.Tensors("saliency/gate_reason/text_summary")]
    assert (
        texts[0].startswith("epoch 1 | step ")
        and ": inconclusive" in texts[0].splitlines()[0]
        and "context_swap = n/a on 0/4 probes" in texts[0]
    )


def test_every_check_has_a_line_and_a_refused_epoch_prints_one_console_line(tmp_path, square_loaders, caplog):
    gate = SaliencyGate(
        checks={"energy_concentration": 1.5, "relative_context_reliance": 0.45, "pointing_game": None},
        num_probe=4,
        min_defined=2,
        on_error="raise",
        significant=False,  # the mean decides: 0.4501 fails (the significance rule has its own test)
    )
    ckpt = GatedModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1)
    values = [
        {
            "energy_concentration/saliency": torch.tensor([2.0, 2.5, NAN, 2.0]),
            "relative_context_reliance": torch.tensor([0.45, 0.4497, 0.46, 0.44]),  # mean 0.4499: passes <= 0.45
            "pointing_game/saliency": torch.tensor([NAN] * 4),
        },
        {
            "energy_concentration/saliency": torch.tensor([2.0, 2.5, NAN, 2.0]),
            "relative_context_reliance": torch.tensor([0.45, 0.4504, 0.45, 0.45]),  # mean 0.4501: fails
            "pointing_game/saliency": torch.tensor([1.0, 1.0, 0.0, NAN]),
        },
    ]
    trainer = _trainer(tmp_path, [gate, ckpt], 2)
    with _scripted(values), caplog.at_level(logging.INFO):
        trainer.fit(_module(), *square_loaders)
    assert [r["status"] for r in gate.history] == ["pass", "fail"]
    assert [p.name.startswith("epoch=0") for p in (tmp_path / "ckpt").iterdir()] == [True]
    refused = [r.getMessage() for r in caplog.records if "refused" in r.getMessage()]
    assert len(refused) == 1 and refused[0].startswith("SaliencyGate: epoch 2 refused")
    assert "relative_context_reliance = 0.450100" in refused[0] or "relative_context_reliance = 0.4501" in refused[0]
    lines = gate.history[1]["lines"]
    assert len(lines) == 3 and lines[0].startswith("pass: energy_concentration/saliency = 2.167")
    assert lines[1].startswith("fail: relative_context_reliance = 0.4501") and "(needs <= 0.45)" in lines[1]
    assert lines[2].startswith("logged: pointing_game/saliency = 0.667")
    acc = _events(trainer)
    pg = [e.value for e in acc.Scalars("saliency/pointing_game/saliency")]  # nan at epoch 1 still has a point
    assert len(pg) == 2 and pg[0] != pg[0] and pg[1] == pytest.approx(2 / 3)
    assert [e.value for e in acc.Scalars("saliency/defined/pointing_game/saliency")] == [0, 3]


def test_bad_arguments_fail_in_the_constructor():
    with pytest.raises(ConfigurationError, match="`inconclusive` can be pass, warn, refuse"):
        SaliencyGate(inconclusive="maybe")
    with pytest.raises(ConfigurationError, match="`min_defined=5` is more than `num_probe=4`"):
        SaliencyGate(num_probe=4, min_defined=5)
    with pytest.raises(ConfigurationError, match="`min_defined` must be an integer >= 1"):
        SaliencyGate(min_defined=0)
    with pytest.raises(ConfigurationError, match=r"energy_concentration.*\[0, inf\]"):
        SaliencyGate(checks={"energy_concentration": -1.0})
    assert SaliencyGate(num_probe=2).min_defined == 1 and SaliencyGate(num_probe=16).min_defined == 4


class _FullBoxes(SquaresDataset):
    """Every object covers the whole image: nothing around it to replace."""

    def __init__(self, n, seed):
        super().__init__(n, seed)
        for item in self.items:
            item["boxes"] = torch.tensor([[0.0, 0.0, 64.0, 64.0]])


def test_context_checks_without_context_fail_at_setup(tmp_path, square_loaders):
    gate = SaliencyGate(checks={"context_swap": 0.3}, methods=[], num_probe=2, on_error="raise")
    val = DataLoader(_FullBoxes(4, 1), batch_size=4, collate_fn=collate)
    with pytest.raises(ConfigurationError, match="there is no context"):
        _trainer(tmp_path, [gate], 1).fit(_module(), square_loaders[0], val)


def test_a_mean_over_the_threshold_fails_only_when_it_is_significantly_over():
    from xaiwatch.checks import bootstrap_ci, judge, parse_rules

    rules, _ = parse_rules({"relative_context_reliance": 0.06}, [])
    # per-probe drops of a clean detector on real photos (deepforest tiles, YOLOv8n from ABD.pt, epoch 7): the mean
    # is near 0 with a spread of -0.85 .. 0.69; shifted by +0.1 its mean is over 0.06, but within the noise
    real = torch.tensor([0.626, -0.171, 0.267, 0.685, -0.846, -0.307, 0.281, 0.177, -0.429, -0.13, -0.139, -0.027])
    noisy = judge({"relative_context_reliance": real + 0.1}, rules, min_defined=4)
    low, _ = bootstrap_ci(real + 0.1, level=0.8)  # the one-sided 90% lower bound, computed independently
    (result,) = noisy.results
    assert result.value > 0.06 and low <= 0.06 and result.bound == pytest.approx(low)
    assert noisy.status == "inconclusive" and "not significantly" in result.describe()
    # a systematic drop with little spread (the tint2 shortcut's range) fails
    systematic = torch.linspace(0.10, 0.16, 12)
    assert judge({"relative_context_reliance": systematic}, rules, min_defined=4).status == "fail"
    # the mean alone decides with significant=False, and a passing mean passes either way
    assert judge({"relative_context_reliance": real + 0.1}, rules, min_defined=4, significant=False).status == "fail"
    assert judge({"relative_context_reliance": real}, rules, min_defined=4).status == "pass"


def test_the_default_thresholds_are_the_calibrated_ones():
    """The gate's defaults are what examples/calibrate_gate.py chose on the non-proof families (docs/calibration)."""
    import json
    from pathlib import Path

    from xaiwatch.callbacks.gate import DEFAULT_CHECKS
    from xaiwatch.checks import CheckOptions

    calibration = json.loads((Path(__file__).parents[1] / "docs" / "calibration" / "calibration.json").read_text())
    margin = CheckOptions().context_margin
    chosen = {key.replace(f"@{margin:g}", ""): value for key, value in calibration["defaults"].items()}
    gated = {key: value for key, value in DEFAULT_CHECKS.items() if value is not None}
    assert gated == chosen
    assert calibration["proof_family"] not in calibration["defaults_chosen_on"]
    held = calibration["defaults_on_proof_family"]
    assert held["clean_refused"] == 0 and held["caught"] == held["learned_shortcuts"]
