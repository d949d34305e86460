"""Every model family under ExplainCallback: pictures in TensorBoard, attention refused at setup where there is none,
training bit-identical with and without the callback."""

from __future__ import annotations

import io

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from PIL import Image
from pytorch_lightning.loggers import TensorBoardLogger

from conftest import tiny_cfg, tiny_rtdetr_cfg
from xaiwatch.callbacks import ExplainCallback
from xaiwatch.core.errors import UnsupportedModelError
from xaiwatch.models import RTDETRModule, YOLOv8Module

FAMILIES = {
    "yolov8": (lambda: YOLOv8Module(tiny_cfg(), num_classes=3, lr=5e-3, warmup_steps=1), ["saliency"]),
    "yolo11": (
        lambda: YOLOv8Module("yolo11n.yaml", num_classes=3, lr=5e-3, warmup_steps=1),
        ["saliency", "attention", "attention_rollout"],
    ),
    "rtdetr-small": (
        lambda: RTDETRModule(tiny_rtdetr_cfg(), num_classes=3, lr=1e-3, warmup_steps=1),
        ["saliency", "attention", "attention_rollout", "deformable_attention"],
    ),
}


def _module(family: str) -> pl.LightningModule:
    pl.seed_everything(0)
    return FAMILIES[family][0]()


def _trainer(tmp_path, callbacks, logger=True) -> pl.Trainer:
    return pl.Trainer(
        max_epochs=1,
        limit_train_batches=2,
        logger=TensorBoardLogger(str(tmp_path), name="tb") if logger else False,
        callbacks=callbacks,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        deterministic=True,
        accelerator="cpu",
    )


@pytest.mark.parametrize("family", ["yolov8", "yolo11"])
def test_attention_refused_at_setup_where_there_is_none(tmp_path, square_loaders, family):
    module = _module(family)
    if family == "yolov8":
        cb = ExplainCallback(methods=["saliency", "attention"], num_probe=2, on_error="raise")
        match = r"has no attention module; these methods apply: .*saliency"
    else:  # YOLO11 has attention, but not RT-DETR's deformable attention
        cb = ExplainCallback(methods=["deformable_attention"], num_probe=2, on_error="raise")
        match = r"deformable attention"
    trainer = _trainer(tmp_path, [cb])
    with pytest.raises(UnsupportedModelError, match=match):
        trainer.fit(module, *square_loaders)
    assert trainer.global_step == 0  # refused before any training step


@pytest.mark.families
@pytest.mark.parametrize("family", list(FAMILIES))
def test_every_family_gets_pictures_for_every_method(tmp_path, square_loaders, family):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    methods = FAMILIES[family][1]
    cb = ExplainCallback(methods=methods, num_probe=2, on_error="raise")
    trainer = _trainer(tmp_path, [cb])
    trainer.fit(_module(family), *square_loaders)
    acc = EventAccumulator(str(trainer.logger.log_dir), size_guidance={"images": 0})
    acc.Reload()
    tags = {t for t in acc.Tags()["images"] if t.startswith("explain/")}
    assert tags == {f"explain/{m}/probe_{i:02d}" for m in methods for i in range(2)}
    for tag in tags:
        events = acc.Images(tag)
        assert [e.step for e in events] == [0, 2]  # before training and after one epoch of 2 steps
        pixels = np.asarray(Image.open(io.BytesIO(events[-1].encoded_image_string)).convert("RGB"))
        assert pixels.std() > 10


@pytest.mark.families
@pytest.mark.parametrize("family", ["yolo11", "rtdetr-small"])
def test_training_bit_identical_with_and_without_attention(tmp_path, square_loaders, family):
    weights = []
    for i, callbacks in enumerate(([], [ExplainCallback(methods=FAMILIES[family][1][1:], num_probe=2)])):
        module = _module(family)
        _trainer(tmp_path / str(i), callbacks).fit(module, *square_loaders)
        weights.append({k: v.clone() for k, v in module.state_dict().items()})
    assert weights[0].keys() == weights[1].keys()
    for k in weights[0]:
        assert torch.equal(weights[0][k], weights[1][k]), k
