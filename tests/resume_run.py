"""A fit that is killed mid-way and resumed, run by ``test_resume.py`` in subprocesses.

``python resume_run.py OUT first`` trains with a checkpoint every epoch and kills its own process (SIGKILL, no
clean-up hooks) at the start of the third epoch; ``python resume_run.py OUT resume`` resumes from ``last.ckpt``.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

os.environ.setdefault("YOLO_OFFLINE", "1")
os.environ.setdefault("MPLBACKEND", "Agg")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import pytorch_lightning as pl  # noqa: E402
from pytorch_lightning.callbacks import Callback, ModelCheckpoint  # noqa: E402
from pytorch_lightning.loggers import TensorBoardLogger  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

from conftest import SquaresDataset, collate  # noqa: E402
from helpers import tiny_module  # noqa: E402
from xaiwatch.callbacks import ExplainCallback, ProjectionCallback  # noqa: E402


class KillAt(Callback):
    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        if trainer.current_epoch == self.epoch:
            os.kill(os.getpid(), signal.SIGKILL)


def main(out: str, phase: str) -> None:
    callbacks = [
        ExplainCallback(methods=["saliency"], num_probe=2, on_error="raise"),
        ProjectionCallback(layers=["neck.p3"], max_points=16, on_error="raise"),
        ModelCheckpoint(dirpath=Path(out, "ckpt"), save_last=True, every_n_epochs=1, save_top_k=-1),
    ]
    if phase == "first":
        callbacks.append(KillAt(2))
    trainer = pl.Trainer(
        max_epochs=4,
        limit_train_batches=2,
        accelerator="cpu",
        logger=TensorBoardLogger(out, name="tb"),
        callbacks=callbacks,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    train = DataLoader(SquaresDataset(16, 0), batch_size=8, collate_fn=collate)
    val = DataLoader(SquaresDataset(8, 1), batch_size=8, collate_fn=collate)
    ckpt = str(Path(out, "ckpt", "last.ckpt")) if phase == "resume" else None
    trainer.fit(tiny_module(), train, val, ckpt_path=ckpt)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
