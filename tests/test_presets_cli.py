"""Every preset in callbacks/ loads (our loader and LightningCLI --config) and runs; the CLI's demo path works."""

from __future__ import annotations

from pathlib import Path

import pytest
import pytorch_lightning as pl
import yaml
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.loggers import TensorBoardLogger

from conftest import tiny_cfg
from xaiwatch.callbacks import ExplainCallback, SaliencyGate, load_callbacks
from xaiwatch.core.errors import ConfigurationError
from xaiwatch.models import YOLOv8Module

PRESETS = sorted((Path(__file__).parents[1] / "callbacks").glob("*.yaml"))


def test_presets_exist():
    assert {p.name for p in PRESETS} >= {"explain-default.yaml", "demo.yaml"}


@pytest.mark.parametrize("preset", PRESETS, ids=lambda p: p.name)
def test_preset_loads_and_runs(preset, tmp_path, square_loaders):
    callbacks = load_callbacks(preset)
    declared = yaml.safe_load(preset.read_text())["trainer"]["callbacks"]
    assert [type(c).__name__ for c in callbacks] == [d["class_path"].rsplit(".", 1)[1] for d in declared]
    for cb, d in zip(callbacks, declared):
        for key, value in (d.get("init_args") or {}).items():
            assert getattr(cb, key) == value, key
        if isinstance(cb, (ExplainCallback, SaliencyGate)):
            cb.on_error = "raise"
            cb.num_probe = min(cb.num_probe, 4)
            cb.every_n_epochs = 1
    pl.seed_everything(0)
    trainer = pl.Trainer(
        max_epochs=1,
        limit_train_batches=1,
        num_sanity_val_steps=0,
        enable_progress_bar=False,
        enable_checkpointing=any(isinstance(c, ModelCheckpoint) for c in callbacks),
        enable_model_summary=False,
        callbacks=callbacks,
        accelerator="cpu",
        logger=TensorBoardLogger(str(tmp_path), name="tb"),
    )
    trainer.fit(YOLOv8Module(tiny_cfg(), num_classes=3), *square_loaders)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(trainer.logger.log_dir, size_guidance={"images": 0, "scalars": 0})
    acc.Reload()
    if any(isinstance(c, SaliencyGate) for c in callbacks):
        assert len(acc.Scalars("saliency/gate_pass")) == 1
        assert "saliency/energy_concentration/saliency" in acc.Tags()["scalars"]
    methods = [m for c in callbacks if isinstance(c, ExplainCallback) for m in c.methods]
    assert {t.split("/")[1] for t in acc.Tags()["images"] if t.startswith("explain/")} == set(methods)


@pytest.mark.parametrize("preset", PRESETS, ids=lambda p: p.name)
def test_preset_parses_with_lightning_cli(preset, tmp_path):
    from pytorch_lightning.cli import LightningCLI

    from xaiwatch.data import YoloDataModule, generate

    data = generate(tmp_path / "d", num_train=4, num_val=4, imgsz=64)
    cli = LightningCLI(
        YOLOv8Module,
        YoloDataModule,
        run=False,
        args=[
            "--config",
            str(preset),
            "--data.dataset_yaml",
            str(data),
            "--model.num_classes",
            "3",
            "--trainer.default_root_dir",
            str(tmp_path),
            "--trainer.accelerator",
            "cpu",
        ],
    )
    declared = {d["class_path"].rsplit(".", 1)[1] for d in yaml.safe_load(preset.read_text())["trainer"]["callbacks"]}
    assert declared <= {type(c).__name__ for c in cli.trainer.callbacks}  # every preset's callbacks, not only Explain


def test_bad_presets(tmp_path):
    with pytest.raises(ConfigurationError, match="does not exist"):
        load_callbacks(tmp_path / "none.yaml")
    (tmp_path / "a.yaml").write_text("trainer:\n  max_epochs: 3\n")
    with pytest.raises(ConfigurationError, match="trainer: callbacks:"):
        load_callbacks(tmp_path / "a.yaml")
    (tmp_path / "b.yaml").write_text("trainer:\n  callbacks:\n    - class_path: torch.nn.Linear\n")
    with pytest.raises(ConfigurationError, match="not a Lightning Callback"):
        load_callbacks(tmp_path / "b.yaml")
    (tmp_path / "c.yaml").write_text(
        "trainer:\n  callbacks:\n    - class_path: xaiwatch.callbacks.ExplainCallback\n      init_args: {methods: [x]}\n"
    )
    with pytest.raises(ConfigurationError, match="Valid methods"):
        load_callbacks(tmp_path / "c.yaml")


def test_cli_rejects_bad_epochs(capsys):
    from xaiwatch.cli import main

    with pytest.raises(SystemExit):
        main(["demo", "--epochs", "0"])
    assert "argument --epochs: must be an integer >= 1, got 0" in capsys.readouterr().err
