"""Explanation and gate wall time per scheduled step with 1 and 2 gloo ranks (CPU): the probes are shared across ranks.

Two rows: ``ExplainCallback`` (saliency and LayerCAM) and ``SaliencyGate`` with its default checks, 16 probes each
(4 in the smoke run), each alone in its own fit. Each configuration is a separate
``python bench_distributed.py --worker DEVICES OUT WHAT`` process (Lightning's ``ddp`` launcher re-runs this file
for rank 1). One thread per rank, so 2 ranks use 2 cores where 1 rank uses one: the
ratio is how the explanation time scales with the hardware, as it would with more GPUs. The time measured is what
training waits for at each scheduled step (``ProbeCallback._scheduled``: the rank's share, the gather, the merge;
rank zero draws on its writer thread afterwards; for the gate: the share, the gather, the merge and the verdict).

Run: ``python benchmarks/bench_distributed.py [OUT] [--quick]`` (or through ``benchmarks/run.py``).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def _worker(devices: int, out: str, what: str = "explain") -> None:
    sys.path.insert(0, str(HERE.parent / "tests"))
    os.environ.setdefault("YOLO_OFFLINE", "1")
    import pytorch_lightning as pl
    import torch
    from pytorch_lightning.loggers import TensorBoardLogger
    from torch.utils.data import DataLoader

    from conftest import SquaresDataset, collate
    from helpers import tiny_module
    from xaiwatch.callbacks import ExplainCallback, SaliencyGate

    torch.set_num_threads(1)
    smoke = os.environ.get("XAIWATCH_BENCH_SMOKE") == "1"

    base = SaliencyGate if what == "gate" else ExplainCallback

    class Timed(base):
        seconds: list[float] = []

        def _scheduled(self, *args, **kwargs):
            start = time.perf_counter()
            super()._scheduled(*args, **kwargs)
            type(self).seconds.append(time.perf_counter() - start)

    num_probe = 4 if smoke else 16
    if what == "gate":  # the default checks (context_swap, relative_context_reliance, two logged map checks)
        cb = Timed(num_probe=num_probe, on_error="raise")
    else:
        cb = Timed(methods=["saliency", "layer_cam"], num_probe=num_probe, on_error="raise")
    trainer = pl.Trainer(
        max_epochs=1 if smoke else 3,
        limit_train_batches=2,
        accelerator="cpu",
        devices=devices,
        strategy="ddp" if devices > 1 else "auto",
        logger=TensorBoardLogger(out, name=f"{what}_d{devices}"),
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
        # the gate's own record: the slowest rank's share plus the verdict (the rest is the gather and the writing)
        checks = [r["seconds"] for r in cb.history] if what == "gate" else []
        Path(out, f"{what}_d{devices}.json").write_text(json.dumps({"scheduled": Timed.seconds, "checks": checks}))


def run(quick: bool, out: Path) -> dict:
    """Median seconds per scheduled explanation (``1_rank_seconds``, ...) and per gate evaluation
    (``gate_1_rank_seconds``, ...) with 1 and 2 ranks, and their ratios; ``quick``: the smoke run."""
    results = {}
    env = {**os.environ, "OMP_NUM_THREADS": "1", **({"XAIWATCH_BENCH_SMOKE": "1"} if quick else {})}
    for what, prefix in (("explain", ""), ("gate", "gate_")):
        for devices in (1, 2):
            subprocess.run(
                [sys.executable, __file__, "--worker", str(devices), str(out), what], env=env, check=True, timeout=1800
            )
            times = json.loads(Path(out, f"{what}_d{devices}.json").read_text())
            results[f"{prefix}{devices}_rank_seconds"] = statistics.median(times["scheduled"])
            if times["checks"]:
                results[f"{prefix}{devices}_rank_check_seconds"] = statistics.median(times["checks"])
        results[f"{prefix}2_vs_1_ratio"] = results[f"{prefix}2_rank_seconds"] / results[f"{prefix}1_rank_seconds"]
    return results


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        _worker(int(sys.argv[2]), sys.argv[3], sys.argv[4] if len(sys.argv) > 4 else "explain")
    else:
        folders = [a for a in sys.argv[1:] if not a.startswith("--")]
        base = Path(folders[0] if folders else "bench_output")
        base.mkdir(parents=True, exist_ok=True)
        out = Path(tempfile.mkdtemp(prefix="distributed_", dir=base))  # a fresh folder: nothing is overwritten
        print(json.dumps(run("--quick" in sys.argv, out), indent=1))
