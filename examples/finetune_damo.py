"""Fine-tune DAMO-YOLO on an ultralytics-layout dataset with xaiwatch's callbacks, then open TensorBoard.

    python examples/finetune_damo.py                                   # generated shapes data, DAMO-YOLO-T from scratch
    python examples/finetune_damo.py --size small --weights damoyolo_tinynasL25_S.pth --data my/dataset.yaml
    python examples/finetune_damo.py --model-dir path/to/modelscope/damoyolo_dir --names person helmet

The network is built from the classes in the ``modelscope`` wheel (``pip install 'xaiwatch[damo]'``) and the
official T / S / M architectures; nothing is downloaded. ``--weights`` is a local DAMO-YOLO checkpoint, read with
``torch.load(weights_only=True)`` (tensors matching by name and shape are copied, the class layer of another class
count is not). ``--model-dir`` loads an official modelscope directory (damoyolo.py, .pth, structure .txt) without
executing its Python config or unpickling its label map.

Guided backpropagation works on DAMO-YOLO-T/S (ReLU networks); the two SiLUs of the backbone's SPP block keep
their plain gradient, which ``other_activations="plain_gradient"`` accepts explicitly.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pytorch_lightning as pl
from pytorch_lightning.loggers import TensorBoardLogger

from xaiwatch.callbacks import ErrorAnalysisCallback, ExplainCallback, ProjectionCallback
from xaiwatch.data import YoloDataModule, generate
from xaiwatch.models import DamoYoloModule, load_damo_directory


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", help="dataset.yaml (ultralytics layout); default: generate the shapes dataset")
    parser.add_argument("--size", default="tiny", choices=["tiny", "small", "medium"])
    parser.add_argument("--weights", default=None, help="local DAMO-YOLO checkpoint (.pth) to fine-tune from")
    parser.add_argument("--model-dir", default=None, help="official modelscope DAMO-YOLO directory to start from")
    parser.add_argument("--names", nargs="*", default=None, help="class names of --model-dir's model")
    parser.add_argument("--imgsz", type=int, default=160)
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--num-train", type=int, default=600, help="images generated when --data is not given")
    parser.add_argument("--num-val", type=int, default=100, help="validation images generated when --data is not given")
    parser.add_argument("--out", default="runs/finetune_damo")
    args = parser.parse_args()

    data = args.data or generate(
        Path(args.out) / "data", num_train=args.num_train, num_val=args.num_val, imgsz=args.imgsz, overwrite=True
    )
    dm = YoloDataModule(str(data), imgsz=args.imgsz, batch_size=args.batch_size)
    dm.setup("fit")
    if args.model_dir:
        model = load_damo_directory(args.model_dir, names=args.names, lr=args.lr)
        if model.names != dm.names:
            parser.error(f"--model-dir's classes {model.names} are not the dataset's {dm.names}")
    else:
        model = DamoYoloModule(args.size, num_classes=dm.num_classes, names=dm.names, weights=args.weights, lr=args.lr)
    # guided backpropagation is meaningful on ReLU networks (DAMO-YOLO-T/S), not on DAMO-YOLO-M (SiLU)
    relu = model.net.config["backbone"].get("act") == "relu"
    explain = ExplainCallback(
        methods=["saliency", "grad_cam"] + (["guided_backprop"] if relu else []),
        num_probe=8,
        method_options={"guided_backprop": {"other_activations": "plain_gradient"}} if relu else None,
    )
    trainer = pl.Trainer(
        max_epochs=args.epochs,
        logger=TensorBoardLogger(args.out, name="tensorboard"),
        callbacks=[explain, ProjectionCallback(layers=["neck"], method="pca"), ErrorAnalysisCallback()],
    )
    trainer.fit(model, datamodule=dm)
    print(f"tensorboard --logdir {Path(args.out).resolve()}")


if __name__ == "__main__":
    main()
