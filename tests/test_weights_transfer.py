"""Fine-tuning from a checkpoint of another class count: what is kept and re-initialised, other architectures are
refused, files that are not checkpoints are named as such, and data with more classes than the model fails at
``setup()`` naming the label file."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from PIL import Image

from conftest import tiny_cfg
from xaiwatch.core.errors import ConfigurationError
from xaiwatch.data import YoloDataModule
from xaiwatch.models import WeightsReport, YOLOv8Module, class_branch_names, load_matching_weights
from xaiwatch.models.yolov8 import _check_batch_labels, build_detection_model


def _ultralytics_ckpt(tmp_path: Path, cfg: dict, nc: int, name: str = "src.pt") -> tuple[Path, torch.nn.Module]:
    """A pickled checkpoint in ultralytics' layout ({"model": DetectionModel, ...}) of a seeded model."""
    torch.manual_seed(1)
    net = build_detection_model(cfg, nc)
    net.names = {i: f"c{i}" for i in range(nc)}
    path = tmp_path / name
    torch.save({"model": net, "ema": None, "epoch": 3}, path)
    return path, net


def test_class_branch_reinitialised_rest_kept(tmp_path: Path) -> None:
    path, src = _ultralytics_ckpt(tmp_path, tiny_cfg(), 80)
    module = YOLOv8Module(tiny_cfg(), num_classes=3, weights=str(path), trust_pickle=True)
    report = module.weights_report
    assert isinstance(report, WeightsReport)
    own = module.net.state_dict()
    head = len(module.net.model) - 1
    assert report.class_branch == [k for k in own if k.startswith(f"model.{head}.cv3.")]
    # the hidden width of the class branch is max(c0, min(nc, 100)): 80 vs 4, so the whole branch changes shape
    assert report.reinitialised == report.class_branch and report.unexpected == []
    assert len(report.kept) + len(report.reinitialised) == report.total == len(own)
    assert report.source_classes == 80 and report.source_names[:2] == ["c0", "c1"]
    src_state = src.state_dict()
    assert all(torch.equal(own[k], src_state[k]) for k in report.kept)
    assert set(report.skipped) == {k for k in src_state if k.startswith(f"model.{head}.cv3.")}
    assert module.net.model[-1].cv3[0][-1].weight.shape[0] == 3
    assert report.summary() == (
        f"kept {len(report.kept)} of {len(own)} tensors from {str(path)!r}; re-initialised "
        f"{len(report.class_branch)} (all in the class branch; the file has 80 classes)"
    )
    assert report["loaded"] == report.kept and report["missing"] == report.reinitialised  # the old dict keys


def test_wide_head_keeps_hidden_class_convs(tmp_path: Path) -> None:
    """With c0 >= 100 (YOLOv8s and larger) the hidden width is fixed: only the last 1x1 conv per level changes."""
    cfg = tiny_cfg()
    path, _ = _ultralytics_ckpt(tmp_path, cfg, 2)
    net = build_detection_model(cfg, 1)
    report = load_matching_weights(net, path, trust_pickle=True, strict=True)
    head = len(net.model) - 1
    # hidden width max(4, min(2, 100)) = max(4, min(1, 100)) = 4: only the 3 output convs (weight + bias) differ
    assert report.reinitialised == [f"model.{head}.cv3.{lvl}.2.{p}" for lvl in range(3) for p in ("weight", "bias")]


def test_other_architecture_refused_unless_not_strict(tmp_path: Path) -> None:
    other = tiny_cfg()
    other["scales"] = {"t": [0.33, 0.25, 1024]}  # first conv 16 channels instead of 8
    path, _ = _ultralytics_ckpt(tmp_path, other, 3)
    with pytest.raises(
        ConfigurationError, match=r"fits this model only in part: kept \d+ of \d+.*another architecture"
    ):
        YOLOv8Module(tiny_cfg(), num_classes=3, weights=str(path), trust_pickle=True)
    with pytest.raises(ConfigurationError, match="first convolution has 16 output channels, the model's 8"):
        YOLOv8Module(tiny_cfg(), num_classes=3, weights=str(path), trust_pickle=True)
    module = YOLOv8Module(tiny_cfg(), num_classes=3, weights=str(path), trust_pickle=True, strict=False)
    report = module.weights_report
    assert report.unexpected and "model.0.conv.weight" in report.unexpected
    assert "outside the class branch" in report.summary()


def test_not_a_checkpoint(tmp_path: Path) -> None:
    png = tmp_path / "photo.pt"
    Image.new("RGB", (4, 4)).save(png, format="PNG")
    net = build_detection_model(tiny_cfg(), 3)
    with pytest.raises(ConfigurationError, match=r"photo\.pt' is not a checkpoint"):
        load_matching_weights(net, png, trust_pickle=True)
    text = tmp_path / "notes.pt"
    text.write_text("hello")
    with pytest.raises(ConfigurationError, match="is not a checkpoint"):
        YOLOv8Module(tiny_cfg(), num_classes=3, weights=str(text))


def _dataset(tmp_path: Path, names: list[str], classes: list[int]) -> Path:
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        (tmp_path / "images" / split).mkdir(parents=True)
        (tmp_path / "labels" / split).mkdir(parents=True)
        for i, c in enumerate(classes):
            Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(
                tmp_path / f"images/{split}/{i}.png"
            )
            (tmp_path / f"labels/{split}/{i}.txt").write_text(f"{c} 0.5 0.5 0.25 0.25\n")
    yaml_path = tmp_path / "dataset.yaml"
    yaml_path.write_text(f"path: .\ntrain: images/train\nval: images/val\nnames: {names}\n")
    return yaml_path


def _fit(module: YOLOv8Module, dm: YoloDataModule) -> None:
    trainer = pl.Trainer(max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False)
    trainer.fit(module, datamodule=dm)


def test_labels_beyond_num_classes_fail_at_setup(tmp_path: Path) -> None:
    yaml_path = _dataset(tmp_path, ["a", "b", "c", "d"], [0, 3])
    module = YOLOv8Module(tiny_cfg(), num_classes=2)
    before = {k: v.clone() for k, v in module.state_dict().items()}
    dm = YoloDataModule(str(yaml_path), imgsz=64, batch_size=2)
    with pytest.raises(ConfigurationError, match=r"labels/train/1\.txt has class 3 \('d'\).*`num_classes`=2"):
        _fit(module, dm)
    assert all(torch.equal(v, before[k]) for k, v in module.state_dict().items())  # no step was taken


def test_imgsz_not_multiple_of_stride_fails_at_setup(tmp_path: Path) -> None:
    yaml_path = _dataset(tmp_path, ["a"], [0, 0])
    with pytest.raises(ConfigurationError, match=r"`imgsz` of the data is 80, not a multiple of .* 32.*64 or 96"):
        _fit(YOLOv8Module(tiny_cfg(), num_classes=1), YoloDataModule(str(yaml_path), imgsz=80, batch_size=2))


def test_batch_label_check() -> None:
    batch = {"labels": [torch.tensor([0, 1]), torch.tensor([4])], "paths": ["a.png", "b.png"]}
    with pytest.raises(ConfigurationError, match=r"class 4 \(image b\.png\).*`num_classes`=3"):
        _check_batch_labels(batch, 3)
    _check_batch_labels(batch, 5)


def test_class_branch_names_of_other_modules() -> None:
    assert class_branch_names(torch.nn.Linear(2, 2)) == []
