"""Fine-tune a YOLOv8 classifier (yolov8n-cls.yaml) on generated single-object images and watch its heat maps.

    python examples/finetune_classifier.py --epochs 10

The classifier is explained like a detector with one whole-image candidate: ExplainCallback tracks the
ground-truth class of each probe image and logs saliency, Grad-CAM, integrated gradients and Eigen-CAM maps.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

os.environ.setdefault("YOLO_OFFLINE", "1")

import pytorch_lightning as pl
from pytorch_lightning.loggers import TensorBoardLogger

from xaiwatch.callbacks import ExplainCallback
from xaiwatch.data import ClassificationDataModule, generate_classification
from xaiwatch.models import YOLOv8ClsModule


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--imgsz", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--num-train", type=int, default=600)
    parser.add_argument("--out", default="runs/finetune_classifier")
    args = parser.parse_args()

    root = generate_classification(Path(args.out) / "data", num_train=args.num_train, imgsz=args.imgsz, overwrite=True)
    dm = ClassificationDataModule(root, imgsz=args.imgsz, batch_size=32)
    dm.setup("fit")
    model = YOLOv8ClsModule("yolov8n-cls.yaml", num_classes=dm.num_classes, names=dm.names, lr=2e-3)
    methods = ["saliency", "grad_cam", "integrated_gradients", "eigen_cam"]
    trainer = pl.Trainer(
        max_epochs=args.epochs,
        logger=TensorBoardLogger(args.out, name="tensorboard"),
        callbacks=[
            ExplainCallback(methods=methods, num_probe=8, method_options={"integrated_gradients": {"n_steps": 16}})
        ],
    )
    trainer.fit(model, datamodule=dm)
    print(f"tensorboard --logdir {Path(args.out).resolve()}")


if __name__ == "__main__":
    main()
