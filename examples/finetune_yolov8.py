"""Fine-tune YOLOv8 on an ultralytics-layout dataset with ExplainCallback and ProjectionCallback, then open TensorBoard.

    python examples/finetune_yolov8.py                         # generated shapes data, YOLOv8n from scratch
    python examples/finetune_yolov8.py --data my/dataset.yaml --weights my_yolov8n_state_dict.pt --imgsz 320

Weights are local files only: a state_dict (or Lightning checkpoint) loads safely; an ultralytics ``.pt``
(pickled model) needs ``--trust-pickle`` because loading it runs code from the file.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

os.environ.setdefault("YOLO_OFFLINE", "1")

import pytorch_lightning as pl
from pytorch_lightning.loggers import TensorBoardLogger

from xaiwatch.callbacks import ExplainCallback, ProjectionCallback
from xaiwatch.data import YoloDataModule, generate
from xaiwatch.models import YOLOv8Module


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", help="dataset.yaml (ultralytics layout); default: generate the shapes dataset")
    parser.add_argument("--model", default="yolov8n.yaml")
    parser.add_argument("--weights", default=None)
    parser.add_argument("--trust-pickle", action="store_true")
    parser.add_argument("--imgsz", type=int, default=160)
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--num-train", type=int, default=600, help="images generated when --data is not given")
    parser.add_argument("--out", default="runs/finetune_yolov8")
    parser.add_argument("--projection", default="pca", choices=["pca", "tsne", "umap", "none"], help="feature space")
    args = parser.parse_args()

    data = args.data or generate(Path(args.out) / "data", num_train=args.num_train, imgsz=args.imgsz, overwrite=True)
    dm = YoloDataModule(str(data), imgsz=args.imgsz, batch_size=args.batch_size)
    dm.setup("fit")
    model = YOLOv8Module(
        args.model, num_classes=dm.num_classes, names=dm.names, weights=args.weights, trust_pickle=args.trust_pickle
    )
    trainer = pl.Trainer(
        max_epochs=args.epochs,
        logger=TensorBoardLogger(args.out, name="tensorboard"),
        callbacks=[ExplainCallback(methods=["saliency", "grad_cam"], num_probe=8)]
        + ([ProjectionCallback(layers=["neck"], method=args.projection)] if args.projection != "none" else []),
    )
    trainer.fit(model, datamodule=dm)
    print(f"tensorboard --logdir {Path(args.out).resolve()}")


if __name__ == "__main__":
    main()
