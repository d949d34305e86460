"""Explanation wall time per scheduled step with 1 and 2 gloo ranks (CPU): the probes are shared across ranks.

Each configuration is a separate ``python bench_distributed.py --worker DEVICES OUT`` process (Lightning's ``ddp``
launcher re-runs this file for rank 1). One thread per rank, so 2 ranks use 2 cores where 1 rank uses one: the
ratio is how the explanation time scales with the hardware, as it would with more GPUs. The time measured is what
training waits for at each scheduled step (``ProbeCallback._scheduled``: the rank's share, the gather, the merge;
rank zero draws on its writer thread afterwards).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def _worker(devices: int, out: str) -> None:
    sys.path.insert(0, str(HERE.parent / "tests"))
    os.environ.setdefault("YOLO_OFFLINE", "1")
    import pytorch_lightning as pl
    import torch
    from pytorch_lightning.loggers import TensorBoardLogger
    from torch.utils.data import DataLoader

    from conftest import SquaresDataset, collate
    from helpers import tiny_module
    from xaiwatch.callbacks import ExplainCallback

    torch.set_num_threads(1)
    smoke = os.environ.get("XAIWATCH_BENCH_SMOKE") == "1"

    class Timed(ExplainCallback):
        seconds: list[float] = []

        def _scheduled(self, *args, **kwargs):
            start = time.perf_counter()
            super()._scheduled(*args, **kwargs)
            type(self).seconds.append(time.perf_counter() - start)

    cb = Timed(methods=["saliency", "layer_cam"], num_probe=4 if smoke else 16, on_error="raise")
    trainer = pl.Trainer(
        max_epochs=1 if smoke else 3,
        limit_train_batches=2,
        accelerator="cpu",
        devices=devices,
        strategy="ddp" if devices > 1 else "auto",
        logger=TensorBoardLogger(out, name=f"d{devices}"),
        callbacks=[cb],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    size = 64 if smoke else 160
    train = DataLoader(SquaresDataset(16, 0, size=size), batch_size=4, collate_fn=collate)
    val = DataLoader(SquaresDataset(16, 1, size=size), batch_size=4, collate_fn=collate)
    trainer.fit(tiny_module(), train, val)
    if trainer.is_global_zero:
        Path(out, f"d{devices}.json").write_text(json.dumps(Timed.seconds))


def run(quick: bool, out: Path) -> dict:
    """Median seconds per scheduled explanation with 1 and 2 ranks, and their ratio."""
    results = {}
    for devices in (1, 2):
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        subprocess.run(
            [sys.executable, __file__, "--worker", str(devices), str(out)], env=env, check=True, timeout=1800
        )
        results[f"{devices}_rank_seconds"] = statistics.median(json.loads(Path(out, f"d{devices}.json").read_text()))
    results["2_vs_1_ratio"] = results["2_rank_seconds"] / results["1_rank_seconds"]
    return results


if __name__ == "__main__":
    if sys.argv[1] == "--worker":
        _worker(int(sys.argv[2]), sys.argv[3])
    else:
        out = Path(sys.argv[1] if len(sys.argv) > 1 else "bench_output")
        out.mkdir(parents=True, exist_ok=True)
        print(json.dumps(run("--quick" in sys.argv, out), indent=1))
