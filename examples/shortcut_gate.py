"""Proof of the saliency gate on one dataset family: a shortcut model is refused, its clean twin is saved.

For each seed, two YOLOv8n models are trained from their yaml (no downloads) on a family of
:data:`xaiwatch.data.shapes.FAMILIES` (default ``tint2``: circles and hexagons, 20-40% of the side, on photographs
tinted with a class colour):

- **shortcut**: in the training images the cue follows the class (``tint2``: class 0's backgrounds are tinted
  red, class 1's green), with blurred objects so that shape is the harder cue;
- **clean**: the same images' kind with the cue drawn at random (the clean twin).

Both are validated on the same held-out images with the cue consistent with the class (where a shortcut hides:
validation mAP looks fine). Each trainer has a ``SaliencyGate()`` with the default checks and a
``GatedModelCheckpoint``. The positive control is the counterfactual flip rate: the share of validation objects
whose predicted class changes when only the cue is made wrong. The defaults were chosen on the other families
(``examples/calibrate_gate.py``), so ``tint2`` is data the gate was not tuned on.

    python examples/shortcut_gate.py                        # seed 0, both twins, about 3 minutes each on a free core
    python examples/shortcut_gate.py --family halo4 --seeds 0 1

Writes ``<out>/report.json`` (per model: flip rate, gate history, checkpoint files) and prints a table.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

os.environ.setdefault("YOLO_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).parent))

import pytorch_lightning as pl
import torch
from calibrate_gate import _dataset, _train_yaml, flip_of, make_data
from pytorch_lightning.loggers import TensorBoardLogger

from xaiwatch.callbacks import GatedModelCheckpoint, SaliencyGate
from xaiwatch.core.outputs import claim_files, prepare_output_folder
from xaiwatch.data import YoloDataModule
from xaiwatch.data.shapes import FAMILIES
from xaiwatch.models import YOLOv8Module


def train(kind: str, yaml: Path, seed: int, args: argparse.Namespace, out: Path, classes: list[str]):
    """Train one twin with the default gate and a gated checkpoint; return the module and its report."""
    pl.seed_everything(seed, verbose=False)
    dm = YoloDataModule(str(yaml), imgsz=args.imgsz, batch_size=16, seed=seed)
    dm.setup("fit")
    module = YOLOv8Module("yolov8n.yaml", num_classes=len(classes), names=classes, lr=1e-2)
    gate = SaliencyGate(num_probe=args.num_probe, seed=seed)
    ckpt = GatedModelCheckpoint(
        dirpath=out / "checkpoints", monitor="val/map50", mode="max", save_top_k=1, save_last=True
    )
    per_epoch = math.ceil(args.num_train / 16)
    epochs = args.val_every * max(1, round(args.steps / per_epoch / args.val_every))  # ends with a validation
    trainer = pl.Trainer(
        max_epochs=epochs,
        check_val_every_n_epoch=args.val_every,
        logger=TensorBoardLogger(str(out), name="tensorboard"),
        callbacks=[gate, ckpt],
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        accelerator="cpu" if args.cpu else "auto",
    )
    trainer.fit(module, datamodule=dm)
    files = sorted(p.name for p in (out / "checkpoints").glob("*.ckpt")) if (out / "checkpoints").exists() else []
    report = {
        "epochs": epochs,
        "val_map50": float(trainer.callback_metrics.get("val/map50", float("nan"))),
        "gate": [
            {k: r.get(k) for k in ("step", "status", "passed", "values", "defined", "reasons", "lines", "seconds")}
            for r in gate.history
        ],
        "checkpoints": files,
        "best_model_path": ckpt.best_model_path,
    }
    return module.cpu(), report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/shortcut_gate")
    parser.add_argument("--family", default="tint2", choices=sorted(FAMILIES))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--steps", type=int, default=180, help="optimiser steps per model (batch 16)")
    parser.add_argument("--num-train", type=int, default=240)
    parser.add_argument("--num-val", type=int, default=64)
    parser.add_argument("--num-probe", type=int, default=16)
    parser.add_argument("--imgsz", type=int, default=96)
    parser.add_argument("--val-every", type=int, default=4, help="validate (and run the gate) every n epochs")
    parser.add_argument("--kinds", nargs="+", default=["shortcut", "clean"], choices=["shortcut", "clean"])
    parser.add_argument("--cpu", action="store_true", help="train on the CPU even when a GPU is present")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    # a new folder or this example's earlier output: nothing of the user's is overwritten
    out = prepare_output_folder(args.out, what="the shortcut-gate example's output (--out)", keep=True)
    prepare_output_folder(out / "data", what="the example's datasets", keep=True)
    claim_files(out, ["report.json"])
    classes = list(FAMILIES[args.family].classes)
    report = {"args": vars(args), "runs": {}}
    for seed in args.seeds:
        data = make_data(out / "data", args.family, seed, args.num_train, args.num_val, args.imgsz)
        for kind in args.kinds:
            name = f"{kind}_s{seed}"
            module, run = train(kind, _train_yaml(data, kind, classes), seed, args, out / name, classes)
            control = flip_of(
                module.xai_adapter(),
                _dataset(data["consistent"], classes, args.imgsz),
                _dataset(data["wrong"], classes, args.imgsz),
            )
            run["flip_rate"] = control["flip"]
            report["runs"][name] = run
            (out / "report.json").write_text(json.dumps(report, indent=1))
            last = run["gate"][-1] if run["gate"] else {"values": {}, "status": None}
            values = ", ".join(f"{k} {v:.3f}" for k, v in last["values"].items())
            print(
                f"{name:12s} flip {run['flip_rate']:.2f}  mAP50 {run['val_map50']:.2f}  gate {last['status']} "
                f"({values})  checkpoints: {run['checkpoints'] or 'none'}"
            )
    print(f"report: {(out / 'report.json').resolve()}")


if __name__ == "__main__":
    main()
