"""Proof of the saliency gate: a detector trained on a planted context shortcut is refused, a clean one is saved.

For each seed, two YOLOv8n models are fine-tuned from scratch on generated data:

- **shortcut**: in the training images every class sits on its own background photograph (circles on grass,
  squares on brick, triangles on the Hubble deep field), with blurred objects so that shape is the harder cue;
- **clean**: the same kind of objects on backgrounds chosen at random.

Both are validated on the same held-out images, whose backgrounds agree with the class as in training (the
situation in which a shortcut hides: validation mAP looks fine). Each trainer has a ``SaliencyGate`` with the
default thresholds and a ``GatedModelCheckpoint``. The positive control is the counterfactual flip rate: the
share of objects whose predicted class changes when only the background is swapped to another class's.

    python examples/shortcut_gate.py                       # 3 seeds, about 6 minutes per model on 2 CPU cores
    python examples/shortcut_gate.py --seeds 0 --steps 240 --num-train 300   # smaller

Writes ``<out>/report.json`` (per model: flip rate, gate history, checkpoint files) and prints a table.
"""

from __future__ import annotations

import argparse
import json
import math
import os
from pathlib import Path

os.environ.setdefault("YOLO_OFFLINE", "1")

import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import TensorBoardLogger

from xaiwatch.callbacks import GatedModelCheckpoint, SaliencyGate
from xaiwatch.callbacks.probes import probe_item
from xaiwatch.checks import flip_rate
from xaiwatch.core.outputs import claim_files, prepare_output_folder
from xaiwatch.data import YoloDataModule, generate, write_counterfactual
from xaiwatch.data.yolo import YoloDataset
from xaiwatch.models import YOLOv8Module

CLASSES = ("circle", "square", "triangle")


def make_data(
    root: Path, seed: int, num_train: int, num_val: int, imgsz: int, shortcut_blur: float = 2.5
) -> dict[str, Path]:
    """The shortcut and clean training sets, the shared validation set (cue consistent) and its cue-swapped twin."""
    shortcut = root / f"shortcut_s{seed}"
    generate(
        shortcut,
        num_train=num_train,
        num_val=num_val,
        imgsz=imgsz,
        shortcut="context",
        blur=shortcut_blur,
        seed=seed,
        overwrite=True,
    )
    consistent = Path(write_counterfactual(shortcut, "consistent")).parent
    wrong = Path(write_counterfactual(shortcut, "wrong")).parent
    scale = imgsz / 160
    clean = root / f"clean_s{seed}"
    generate(
        clean,
        num_train=num_train,
        num_val=8,
        imgsz=imgsz,
        object_size=(round(18 * scale), round(24 * scale)),
        blur=2.5,
        seed=seed,
        overwrite=True,
    )
    out = {}
    for kind, train in (("shortcut", shortcut), ("clean", clean)):
        (yaml,) = claim_files(root, [f"{kind}_s{seed}.yaml"])  # never a file xaiwatch did not write
        names = "\n".join(f"  {i}: {n}" for i, n in enumerate(CLASSES))
        yaml.write_text(f"train: {train / 'images' / 'train'}\nval: {consistent / 'images' / 'val'}\nnames:\n{names}\n")
        out[kind] = yaml
    out["consistent"], out["wrong"] = consistent, wrong
    return out


def counterfactual_flip(module: YOLOv8Module, consistent: Path, wrong: Path, imgsz: int) -> float:
    """Share of validation objects whose class changes when the background is swapped to another class's."""
    a = YoloDataset(consistent / "images" / "val", names=list(CLASSES), imgsz=imgsz)
    b = YoloDataset(wrong / "images" / "val", names=list(CLASSES), imgsz=imgsz)
    items = [probe_item(a[i]) for i in range(len(a))]
    images = torch.stack([im for im, _, _ in items])
    swapped = torch.stack([probe_item(b[i])[0] for i in range(len(b))])
    adapter = module.xai_adapter()
    rates = [
        flip_rate(adapter, images[i : i + 16], swapped[i : i + 16], [bx for _, bx, _ in items[i : i + 16]])
        for i in range(0, len(items), 16)
    ]
    counts = [len(torch.cat([bx for _, bx, _ in items[i : i + 16]])) for i in range(0, len(items), 16)]
    valid = [(r, c) for r, c in zip(rates, counts) if not math.isnan(r)]
    return sum(r * c for r, c in valid) / max(sum(c for _, c in valid), 1)


def train(kind: str, yaml: Path, seed: int, args: argparse.Namespace, out: Path) -> tuple[YOLOv8Module, dict]:
    pl.seed_everything(seed, verbose=False)
    dm = YoloDataModule(str(yaml), imgsz=args.imgsz, batch_size=16, seed=seed)
    dm.setup("fit")
    module = YOLOv8Module("yolov8n.yaml", num_classes=dm.num_classes, names=dm.names, lr=1e-2)
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
        "gate": [{k: r[k] for k in ("step", "passed", "values", "reasons")} for r in gate.history],
        "checkpoints": files,
        "best_model_path": ckpt.best_model_path,
    }
    return module.cpu(), report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/shortcut_gate")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=480, help="optimiser steps per model (batch 16)")
    parser.add_argument("--num-train", type=int, default=600)
    parser.add_argument("--num-val", type=int, default=64)
    parser.add_argument("--num-probe", type=int, default=16)
    parser.add_argument("--imgsz", type=int, default=160)
    parser.add_argument("--val-every", type=int, default=4, help="validate (and run the gate) every n epochs")
    parser.add_argument(
        "--shortcut-blur",
        type=float,
        default=2.5,
        help="blur of the shortcut set's objects (clean: 2.5); 5 hides their shape, so the context is the only cue",
    )
    parser.add_argument("--kinds", nargs="+", default=["shortcut", "clean"], choices=["shortcut", "clean"])
    parser.add_argument("--cpu", action="store_true", help="train on the CPU even when a GPU is present")
    args = parser.parse_args()
    # a new folder or this example's earlier output: nothing of the user's is overwritten
    out = prepare_output_folder(args.out, what="the shortcut-gate example's output (--out)", keep=True)
    prepare_output_folder(out / "data", what="the example's datasets", keep=True)
    claim_files(out, ["report.json"])
    report = {"args": vars(args), "runs": {}}
    for seed in args.seeds:
        data = make_data(out / "data", seed, args.num_train, args.num_val, args.imgsz, args.shortcut_blur)
        for kind in args.kinds:
            name = f"{kind}_s{seed}"
            module, run = train(kind, data[kind], seed, args, out / name)
            run["flip_rate"] = counterfactual_flip(module, data["consistent"], data["wrong"], args.imgsz)
            report["runs"][name] = run
            (out / "report.json").write_text(json.dumps(report, indent=1))
            last = run["gate"][-1] if run["gate"] else {"values": {}, "passed": None}
            values = ", ".join(f"{k} {v:.3f}" for k, v in last["values"].items())
            print(
                f"{name:12s} flip {run['flip_rate']:.2f}  mAP50 {run['val_map50']:.2f}  gate "
                f"{'PASS' if last['passed'] else 'FAIL'} ({values})  checkpoints: {run['checkpoints'] or 'none'}"
            )
    print(f"report: {(out / 'report.json').resolve()}")


if __name__ == "__main__":
    main()
