"""Helpers shared by the callback tests (Lightning's ``tests/helpers`` pattern): one tiny module, one trainer,
one event reader, instead of a copy per file."""

from __future__ import annotations

import math

import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import TensorBoardLogger

from conftest import tiny_cfg

__all__ = ["tiny_module", "square_sized", "make_trainer", "read_events", "STEPS_PER_EPOCH"]

#: training batches per epoch of :func:`make_trainer` (the TensorBoard step after epoch ``e`` is ``2 * e``)
STEPS_PER_EPOCH = 2


def tiny_module(num_classes: int = 3, **kwargs):
    """A seeded :class:`~xaiwatch.models.YOLOv8Module` of the tiny YOLOv8 (about 0.35 M parameters)."""
    from xaiwatch.models import YOLOv8Module

    pl.seed_everything(0)
    return YOLOv8Module(tiny_cfg(), num_classes=num_classes, **{"lr": 5e-3, "warmup_steps": 1, **kwargs})


def square_sized(module):
    """:func:`tiny_module` ``module`` whose box branch predicts boxes of about the squares' size (21 px at stride 8),
    frozen: untrained, it predicts 120 px boxes that overlap no square, so no tracked object would have a candidate
    and the gate's context checks would be ``nan`` everywhere. The class branch is untouched (and trains)."""
    head = module.net.model[-1]
    with torch.no_grad():
        for branch in head.cv2:
            conv = branch[-1]
            conv.weight.mul_(0.01)
            bias = torch.full((4, head.reg_max), -20.0)
            bias[:, 1], bias[:, 2] = 0.0, math.log(0.3 / 0.7)  # each side 1.3 strides from the anchor
            conv.bias.copy_(bias.flatten())
            conv.requires_grad_(False)  # and stays so while a test trains it
    return module


def make_trainer(tmp_path, callbacks, epochs: int = 2, inference_mode: bool = True, logger: bool = True, **kw):
    """A 2-batch-per-epoch CPU trainer logging to TensorBoard under ``tmp_path/tb``, no checkpoints by default."""
    options = {
        "limit_train_batches": STEPS_PER_EPOCH,
        "enable_checkpointing": False,
        "deterministic": True,
        **kw,
    }
    return pl.Trainer(
        max_epochs=epochs,
        logger=TensorBoardLogger(str(tmp_path), name="tb") if logger else False,
        callbacks=callbacks,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        inference_mode=inference_mode,
        accelerator="cpu",
        **options,
    )


def read_events(log_dir):
    """tensorboard's ``EventAccumulator`` over ``log_dir`` keeping every image, scalar, text and tensor."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir), size_guidance={"images": 0, "scalars": 0, "tensors": 0})
    acc.Reload()
    return acc
