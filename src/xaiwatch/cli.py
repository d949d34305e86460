"""The ``xaiwatch`` command: ``demo``, ``fit`` (LightningCLI), ``explain`` (post-hoc) and ``report`` (HTML)."""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

__all__ = ["demo_module", "main", "run_demo"]

DEFAULT_PRESET = "demo.yaml"


def _default_preset() -> Path | None:
    here = Path(__file__).resolve()
    for root in (Path.cwd(), *here.parents):
        candidate = root / "callbacks" / DEFAULT_PRESET
        if candidate.is_file():
            return candidate
    return None


def run_demo(
    out: str | Path = "demo_output",
    epochs: int = 12,
    imgsz: int = 160,
    num_train: int = 600,
    num_val: int = 100,
    batch_size: int = 16,
    preset: str | Path | None = None,
    model: str = "yolov8n.yaml",
    seed: int = 0,
    accelerator: str = "auto",
) -> Path:
    """Generate the shapes dataset, fine-tune a detector on it with the explain callbacks, return the log directory.

    ``model`` is an ultralytics architecture yaml (YOLOv8, default ``yolov8n.yaml``) or ``damo`` / ``damo-tiny`` /
    ``damo-small`` / ``damo-medium`` for DAMO-YOLO-T / S / M (modelscope's code, the ``damo`` extra).
    """
    os.environ.setdefault("YOLO_OFFLINE", "1")
    import pytorch_lightning as pl
    from pytorch_lightning.callbacks import ModelCheckpoint
    from pytorch_lightning.loggers import TensorBoardLogger

    from xaiwatch.callbacks import ExplainCallback, load_callbacks
    from xaiwatch.data import YoloDataModule, generate

    out = Path(out)
    start = time.perf_counter()
    data_yaml = generate(out / "data", num_train=num_train, num_val=num_val, imgsz=imgsz, seed=seed, overwrite=True)
    print(f"[xaiwatch] dataset written to {data_yaml.parent} ({time.perf_counter() - start:.1f} s)", flush=True)
    pl.seed_everything(seed, workers=True)
    datamodule = YoloDataModule(str(data_yaml), imgsz=imgsz, batch_size=batch_size, num_workers=0, seed=seed)
    datamodule.setup("fit")
    module = demo_module(model, num_classes=datamodule.num_classes, names=datamodule.names)
    preset = preset if preset is not None else _default_preset()
    callbacks = load_callbacks(preset) if preset else [ExplainCallback()]
    logger = TensorBoardLogger(str(out), name="tensorboard", default_hp_metric=False)
    trainer = pl.Trainer(
        max_epochs=epochs,
        accelerator=accelerator,
        logger=logger,
        callbacks=callbacks,
        log_every_n_steps=10,
        enable_checkpointing=any(isinstance(cb, ModelCheckpoint) for cb in callbacks),
        deterministic=False,
    )
    trainer.fit(module, datamodule=datamodule)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith(("val/", "saliency/gate"))}
    print(f"[xaiwatch] done in {time.perf_counter() - start:.0f} s; final {metrics}")
    for cb in callbacks:
        if isinstance(cb, ModelCheckpoint) and cb.dirpath:
            saved = sorted(p.name for p in Path(cb.dirpath).glob("*.ckpt")) if Path(cb.dirpath).exists() else []
            refused = getattr(cb, "refused", None)
            extra = f"; epochs refused by the saliency gate: {[e + 1 for e in refused]}" if refused else ""
            print(f"[xaiwatch] checkpoints in {cb.dirpath}: {saved or 'none'}{extra}")
    from xaiwatch.logging import write_tensorboard_command
    from xaiwatch.report import write_report

    command = write_tensorboard_command(logger.log_dir, epochs, logdir=out).read_text().strip()
    print(f"[xaiwatch] open the explanations (every epoch's pictures kept) with:\n\n    {command}\n")
    print(f"[xaiwatch] the run on one page: {write_report(logger.log_dir, out / 'report.html')}")
    print(
        "IMAGES: explain/<method>/probe_<NN> (slide the step = epochs trained), projection/<layer>, errors/confusion, "
        "boundary/picture/...; PROJECTOR; SCALARS: val/map50, projection/.../silhouette, errors/..., boundary/min_eps/..."
    )
    return Path(logger.log_dir)


def demo_module(model: str, num_classes: int, names: list[str]) -> object:
    """The LightningModule ``--model`` names: ``damo``/``damo-<size>`` (DAMO-YOLO) or an ultralytics yaml (YOLOv8)."""
    key = str(model).lower()
    if key == "damo" or key.startswith("damo-"):
        from xaiwatch.models import DamoYoloModule

        return DamoYoloModule(key.partition("-")[2] or "tiny", num_classes=num_classes, names=names)
    from xaiwatch.models import YOLOv8Module

    return YOLOv8Module(model, num_classes=num_classes, names=names)


def _fit(argv: Sequence[str]) -> None:
    from pytorch_lightning.cli import LightningCLI

    from xaiwatch.data import YoloDataModule
    from xaiwatch.models import YOLOv8Module

    LightningCLI(YOLOv8Module, YoloDataModule, args=list(argv), save_config_kwargs={"overwrite": True})


def _add_explain_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("explain", help="explain the detections of a saved detector on images (post-hoc)")
    p.add_argument("--weights", required=True, help="ultralytics .pt, Lightning .ckpt, or a DAMO-YOLO directory")
    p.add_argument("--trust-pickle", action="store_true", help="allow .pt files that store pickled objects")
    p.add_argument("--model", default=None, help="architecture yaml, for a plain state_dict file")
    p.add_argument("images", nargs="+", help="image files, folders and/or YOLO dataset yamls (their val split)")
    p.add_argument("--methods", default="layer_cam,saliency", help="comma-separated methods")
    p.add_argument("--out", default="xaiwatch_explain", help="output folder (new, empty, or written by xaiwatch)")
    p.add_argument("--max-objects", type=int, default=None, help="explain at most N detections per image")
    p.add_argument("--imgsz", type=int, default=640)
    p.add_argument("--conf", type=float, default=0.25)
    p.add_argument("--device", default="cpu")
    p.add_argument("--tensorboard", action="store_true", help="also write TensorBoard events to OUT/tensorboard")


def _explain(args: argparse.Namespace) -> int:
    from xaiwatch.posthoc import explain_images

    result = explain_images(
        weights=args.weights,
        images=args.images,
        methods=[m.strip() for m in args.methods.split(",") if m.strip()],
        out=args.out,
        max_objects=args.max_objects,
        imgsz=args.imgsz,
        device=args.device,
        trust_pickle=args.trust_pickle,
        model=args.model,
        conf=args.conf,
        tensorboard=args.tensorboard,
    )
    n = sum(len(r.detections) for r in result.images)
    print(f"[xaiwatch] {n} detections on {len(result.images)} images; {result.json_path}, {result.contact_sheet}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``xaiwatch`` console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "fit":
        _fit(argv)
        return 0
    parser = argparse.ArgumentParser(prog="xaiwatch", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("fit", help="LightningCLI fit with YOLOv8Module and YoloDataModule (takes --config presets)")
    demo = sub.add_parser(
        "demo",
        help="fine-tune YOLOv8n (or DAMO-YOLO: --model damo) on generated data with the callbacks, log to TensorBoard",
    )
    demo.add_argument("--out", default="demo_output", help="output folder (dataset and TensorBoard logs)")
    demo.add_argument("--epochs", type=int, default=12)
    demo.add_argument("--imgsz", type=int, default=160)
    demo.add_argument("--num-train", type=int, default=600)
    demo.add_argument("--num-val", type=int, default=100)
    demo.add_argument("--batch-size", type=int, default=16)
    demo.add_argument(
        "--model",
        default="yolov8n.yaml",
        help="ultralytics architecture yaml (YOLOv8), or damo / damo-tiny / damo-small / damo-medium (DAMO-YOLO)",
    )
    demo.add_argument("--callbacks", default=None, help=f"callback preset YAML (default callbacks/{DEFAULT_PRESET})")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--accelerator", default="auto")
    report = sub.add_parser("report", help="one self-contained HTML page of a run (read from its TensorBoard logs)")
    report.add_argument("logdir", help="a run directory or a folder of runs, e.g. lightning_logs/version_0")
    report.add_argument("-o", "--out", default="report.html", help="the HTML file (never replaces a file of yours)")
    report.add_argument("--all-pictures", action="store_true", help="every epoch's explanation pictures, too")
    _add_explain_parser(sub)
    demo.add_argument("--real", action="store_true", help="real trees and a real checkpoint (xaiwatch.demo_real)")
    demo.add_argument("--real-model", default="yolov8n-abd", help="with --real: yolov8n-abd|yolov8s-fall|yolov8n")
    if "--real" in (sys.argv[1:] if argv is None else list(argv)):
        demo.set_defaults(out="demo_real_output", epochs=8, imgsz=224, batch_size=8)
    args = parser.parse_args(argv)
    if args.command == "explain":
        return _explain(args)
    if args.command == "report":
        from xaiwatch.report import write_report

        print(f"[xaiwatch] report written to {write_report(args.logdir, args.out, args.all_pictures)}")
        return 0
    if args.epochs < 1:
        parser.error(f"--epochs must be >= 1, got {args.epochs}")
    if args.real:
        from xaiwatch.demo_real import run_real_demo

        kw = {k: getattr(args, k) for k in ("out", "epochs", "imgsz", "batch_size", "seed", "accelerator")}
        run_real_demo(model=args.real_model, preset=args.callbacks, **kw)
        return 0
    run_demo(
        out=args.out,
        epochs=args.epochs,
        imgsz=args.imgsz,
        num_train=args.num_train,
        num_val=args.num_val,
        batch_size=args.batch_size,
        preset=args.callbacks,
        model=args.model,
        seed=args.seed,
        accelerator=args.accelerator,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
