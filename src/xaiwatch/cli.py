"""The ``xaiwatch`` command: ``demo``, ``fit`` (LightningCLI), ``explain`` (post-hoc) and ``report`` (HTML).

Each subcommand is one ``_add_<name>(subparsers)`` function that adds its parser and sets ``run`` to the function
running it; ``fit`` hands its arguments to LightningCLI (see :func:`xaiwatch_cli_class`).
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

__all__ = ["build_parser", "demo_module", "main", "merge_config_callbacks", "run_demo", "xaiwatch_cli_class"]

DEFAULT_PRESET = "demo.yaml"


def _default_preset() -> Path | None:
    from xaiwatch.callbacks.presets import default_preset

    return default_preset(DEFAULT_PRESET)


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

    ``out`` must be a new or empty folder, or one an earlier demo wrote (it holds a ``.xaiwatch-output`` marker):
    the demo never overwrites or deletes a file it did not write. It writes ``out/data`` (the dataset, replaced on a
    re-run) and ``out/tensorboard/version_<N>`` (a new version each run, with the checkpoints).

    Raises:
        ConfigurationError: if ``out`` (or ``out/data``) holds files xaiwatch did not write, before anything is
            written.
    """
    os.environ.setdefault("YOLO_OFFLINE", "1")
    import pytorch_lightning as pl
    from pytorch_lightning.callbacks import ModelCheckpoint
    from pytorch_lightning.loggers import TensorBoardLogger

    from xaiwatch.callbacks import ExplainCallback, load_callbacks
    from xaiwatch.core.outputs import prepare_output_folder
    from xaiwatch.data import YoloDataModule, generate

    preset = preset if preset is not None else _default_preset()
    callbacks = load_callbacks(preset) if preset else [ExplainCallback()]  # a bad preset stops before any write
    out = prepare_output_folder(out, what="the demo's output (choose it with --out)", keep=True)
    start = time.perf_counter()
    data_yaml = generate(out / "data", num_train=num_train, num_val=num_val, imgsz=imgsz, seed=seed, overwrite=True)
    print(f"[xaiwatch] dataset written to {data_yaml.parent} ({time.perf_counter() - start:.1f} s)", flush=True)
    pl.seed_everything(seed, workers=True)
    datamodule = YoloDataModule(str(data_yaml), imgsz=imgsz, batch_size=batch_size, num_workers=0, seed=seed)
    datamodule.setup("fit")
    module = demo_module(model, num_classes=datamodule.num_classes, names=datamodule.names)
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


@functools.cache
def xaiwatch_cli_class() -> type:
    """The LightningCLI subclass of ``xaiwatch fit`` (built on first use: ``import xaiwatch.cli`` stays light).

    Returns:
        A ``LightningCLI`` subclass whose model takes ``num_classes`` and ``names`` from ``--data.dataset_yaml``
        when they are not given.
    """
    from pytorch_lightning.cli import LightningCLI

    from xaiwatch.core.errors import ConfigurationError

    class _XaiwatchCLI(LightningCLI):
        """LightningCLI whose model takes ``num_classes`` and ``names`` from the dataset yaml when not given.

        ``--model.num_classes`` defaults to the number of classes of ``--data.dataset_yaml`` (a different explicit
        value is an error before anything is built), ``--model.names`` to its ``names``.
        """

        def add_arguments_to_parser(self, parser: Any) -> None:
            parser.set_defaults({"model.num_classes": 0})  # 0 = "from the dataset yaml", filled in below

        def before_instantiate_classes(self) -> None:
            from xaiwatch.data.yolo import _load_dataset_yaml, _parse_names

            config = self.config[self.subcommand] if self.subcommand else self.config
            model, data = config.get("model"), config.get("data")
            if model is None or data is None or not data.get("dataset_yaml"):
                return
            yaml_path = Path(data["dataset_yaml"])
            names = _parse_names(yaml_path, _load_dataset_yaml(yaml_path))
            given = model.get("num_classes")
            if given in (0, None):
                model["num_classes"] = len(names)
            elif given != len(names):
                raise ConfigurationError(
                    f"`--model.num_classes` is {given} but {yaml_path} names {len(names)} classes ({names}); "
                    "leave `--model.num_classes` out (it is read from the dataset yaml) or fix the yaml"
                )
            if model.get("names") is None:
                model["names"] = names

    _XaiwatchCLI.__name__ = _XaiwatchCLI.__qualname__ = "XaiwatchCLI"
    return _XaiwatchCLI


def _config_files(argv: list[str]) -> list[tuple[int, str]]:
    """``(index in argv of the value, value)`` of every ``--config`` argument."""
    found = []
    for i, arg in enumerate(argv):
        if arg in ("--config", "-c") and i + 1 < len(argv):
            found.append((i + 1, argv[i + 1]))
        elif arg.startswith("--config="):
            found.append((i, arg.partition("=")[2]))
    return found


def merge_config_callbacks(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """Make later ``--config`` files add to ``trainer.callbacks`` instead of replacing it.

    LightningCLI (jsonargparse) replaces a list given by an earlier config file with the later one, so with
    ``--config explain.yaml --config gate.yaml`` the explain callbacks would be silently dropped. Every config file
    after the first that defines ``trainer.callbacks`` is passed as its YAML text with the key ``callbacks+``
    (jsonargparse's "append to the list").

    Args:
        argv: the ``fit`` arguments.

    Returns:
        The arguments to give LightningCLI, and one note per merged file (empty when nothing was merged).

    Example:
        >>> merge_config_callbacks(["fit", "--trainer.max_epochs", "1"])
        (['fit', '--trainer.max_epochs', '1'], [])
    """
    import yaml

    argv = list(argv)
    notes: list[str] = []
    seen = 0
    for index, value in _config_files(argv):
        path = Path(value)
        if not path.is_file():
            continue  # LightningCLI reports a missing file (or reads an inline YAML string)
        config = yaml.safe_load(path.read_text())
        trainer = config.get("trainer") if isinstance(config, dict) else None
        if not isinstance(trainer, dict) or "callbacks" not in trainer:
            continue
        seen += 1
        if seen == 1:
            continue
        callbacks = trainer.pop("callbacks")
        trainer["callbacks+"] = callbacks if isinstance(callbacks, list) else [callbacks]
        text = yaml.safe_dump(config, sort_keys=False)
        argv[index] = f"--config={text}" if argv[index].startswith("--config=") else text
        names = [str(c.get("class_path", "?")).rsplit(".", 1)[-1] for c in trainer["callbacks+"] if isinstance(c, dict)]
        notes.append(f"{value}: its trainer.callbacks ({', '.join(names)}) are added to the earlier config's")
    return argv, notes


def _run_fit(argv: Sequence[str]) -> int:
    """``xaiwatch fit ...``: LightningCLI with YOLOv8Module and YoloDataModule."""
    from xaiwatch.data import YoloDataModule
    from xaiwatch.models import YOLOv8Module

    args, notes = merge_config_callbacks(argv)
    for note in notes:
        print(f"[xaiwatch] {note}", flush=True)
    xaiwatch_cli_class()(YOLOv8Module, YoloDataModule, args=args)
    return 0


def _positive_int(minimum: int) -> Callable[[str], int]:
    """An argparse ``type``: an integer ``>= minimum`` (else a parser error naming the value)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an integer >= {minimum}, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be an integer >= {minimum}, got {value}")
        return value

    return parse


def _add_fit(sub: Any) -> None:
    sub.add_parser(
        "fit",
        help="LightningCLI fit with YOLOv8Module and YoloDataModule (takes --config presets; several are merged)",
    )


def _add_demo(sub: Any) -> None:
    demo = sub.add_parser(
        "demo",
        help="fine-tune YOLOv8n (or DAMO-YOLO: --model damo) on generated data with the callbacks, log to TensorBoard",
    )
    demo.add_argument(
        "--out",
        default=None,
        help="output folder (dataset and TensorBoard logs): new, empty or an earlier demo's; never a folder of yours "
        "(default demo_output; --real: demo_real_output)",
    )
    demo.add_argument("--epochs", type=_positive_int(1), default=None, help="default 12 (--real: 8)")
    demo.add_argument(
        "--imgsz", type=_positive_int(32), default=None, help="image side in pixels, >= 32 (160; --real: 224)"
    )
    demo.add_argument("--num-train", type=_positive_int(1), default=600)
    demo.add_argument("--num-val", type=_positive_int(1), default=100)
    demo.add_argument("--batch-size", type=_positive_int(1), default=None, help="default 16 (--real: 8)")
    demo.add_argument(
        "--model",
        default="yolov8n.yaml",
        help="ultralytics architecture yaml (YOLOv8), or damo / damo-tiny / damo-small / damo-medium (DAMO-YOLO)",
    )
    demo.add_argument("--callbacks", default=None, help=f"callback preset YAML (default callbacks/{DEFAULT_PRESET})")
    demo.add_argument("--seed", type=_positive_int(0), default=0)
    demo.add_argument("--accelerator", default="auto")
    demo.add_argument("--real", action="store_true", help="real trees and a real checkpoint (xaiwatch.demo_real)")
    demo.add_argument("--real-model", default="yolov8n-abd", help="with --real: yolov8n-abd|yolov8s-fall|yolov8n")
    demo.set_defaults(run=_run_demo)


#: the defaults of the options the two demos share: (shapes demo, ``--real``)
_DEMO_DEFAULTS = {
    "out": ("demo_output", "demo_real_output"),
    "epochs": (12, 8),
    "imgsz": (160, 224),
    "batch_size": (16, 8),
}


def _run_demo(args: argparse.Namespace) -> int:
    for key, defaults in _DEMO_DEFAULTS.items():  # an option not given takes its demo's default
        if getattr(args, key) is None:
            setattr(args, key, defaults[1] if args.real else defaults[0])
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


def _add_explain(sub: Any) -> None:
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
    p.add_argument("--names", default=None, help="comma-separated class names, for a DAMO-YOLO directory without any")
    p.add_argument(
        "--pad-background", action="store_true", help="DAMO-YOLO directory whose head has no background channel"
    )
    p.set_defaults(run=_explain)


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
        names=None if args.names is None else [n.strip() for n in args.names.split(",")],
        pad_background=args.pad_background,
    )
    n = sum(len(r.detections) for r in result.images)
    print(f"[xaiwatch] {n} detections on {len(result.images)} images; {result.json_path}, {result.contact_sheet}")
    return 0


def _add_report(sub: Any) -> None:
    report = sub.add_parser("report", help="one self-contained HTML page of a run (read from its TensorBoard logs)")
    report.add_argument("logdir", help="a run directory or a folder of runs, e.g. lightning_logs/version_0")
    report.add_argument("-o", "--out", default="report.html", help="the HTML file (never replaces a file of yours)")
    report.add_argument("--all-pictures", action="store_true", help="every epoch's explanation pictures, too")
    report.set_defaults(run=_report)


def _report(args: argparse.Namespace) -> int:
    from xaiwatch.report import write_report

    print(f"[xaiwatch] report written to {write_report(args.logdir, args.out, args.all_pictures)}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The ``xaiwatch`` argument parser: one ``_add_<command>`` per subcommand."""
    from xaiwatch import __version__

    parser = argparse.ArgumentParser(prog="xaiwatch", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"xaiwatch {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in (_add_fit, _add_demo, _add_explain, _add_report):
        add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``xaiwatch`` console script.

    An :class:`~xaiwatch.core.errors.XaiwatchError` (bad input) ends the command with its message and exit status
    2, without a traceback.
    """
    from xaiwatch.core.errors import XaiwatchError

    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "fit":
        try:
            return _run_fit(argv)
        except XaiwatchError as err:
            print(f"xaiwatch fit: error: {err}", file=sys.stderr)
            return 2
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.run(args))
    except XaiwatchError as err:
        print(f"xaiwatch {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
