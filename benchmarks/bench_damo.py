"""DAMO-YOLO-T next to YOLOv8n, measured (not asserted).

- batch 4, 320 px, one box target per image: forward, the floor (forward + backward to the input), and saliency,
  Grad-CAM (neck.p3) and -- DAMO-YOLO only, a ReLU network -- guided backpropagation, as ratios to each model's
  own floor;
- one epoch of the demo (shapes data, 160 px, 600 train / 100 val images, batch 16) with and without the demo's
  default callbacks (callbacks/demo.yaml: explanations, projections, error analysis, decision boundary). The fit
  with callbacks includes their run before training (step 0); each callback's own seconds after the epoch are read
  back from TensorBoard (``xaiwatch/*_seconds``, ``errors/seconds``, ``boundary/seconds``).

Run: python benchmarks/bench_damo.py [--quick] (or call ``run(quick)`` from benchmarks/run.py).
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

os.environ.setdefault("YOLO_OFFLINE", "1")

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).parent))
from run import smoke, timeit  # noqa: E402  (the one timer of every benchmark)


def _adapters() -> dict:
    from xaiwatch.adapters import DamoYoloAdapter, YOLOv8Adapter
    from xaiwatch.models import DamoYoloModule
    from xaiwatch.models.yolov8 import build_detection_model

    torch.manual_seed(0)
    damo = DamoYoloModule("tiny", num_classes=3).net.eval()
    yolo = build_detection_model("yolov8n.yaml", 3).eval()
    return {"DAMO-YOLO-T": DamoYoloAdapter(damo), "YOLOv8n": YOLOv8Adapter(yolo)}


def bench_methods(repeat: int) -> dict:
    """Forward, floor and each method's ratio to its floor, batch 4 at 320 px, for both models."""
    from xaiwatch.explain import get_engine
    from xaiwatch.targets import BoxTarget

    batch, size = (1, 160) if smoke() else (4, 320)
    x = torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(0))
    targets = [BoxTarget(100 * (i + 1), i % 3) for i in range(batch)]  # P3 candidates (1,600 of 2,100 at 320 px)
    results = {}
    for name, adapter in _adapters().items():

        def forward(adapter=adapter):
            with torch.no_grad():
                adapter.raw(x)

        def floor(adapter=adapter):
            xi = x.clone().requires_grad_()
            torch.autograd.grad(adapter.score(xi, targets).sum(), xi)

        rows = {"forward": timeit(forward, repeat), "floor (forward + backward to input)": timeit(floor, repeat)}
        methods = {"saliency": {}, "grad_cam": {"layer": "neck.p3"}}
        if name.startswith("DAMO"):
            methods["guided_backprop"] = {"other_activations": "plain_gradient"}
        for method, options in methods.items():
            engine = get_engine(method, adapter, **options)
            rows[method] = timeit(lambda engine=engine: engine.attribute(x, targets), repeat)
        base = rows["floor (forward + backward to input)"]
        results[name] = {k: {"seconds": v, "x_floor": v / base} for k, v in rows.items()}
        results[name]["candidates"] = int(adapter.raw(x[:1]).scores.shape[1])
        results[name]["parameters_M"] = sum(p.numel() for p in adapter.model.parameters()) / 1e6
    return results


def bench_demo_epoch(quick: bool, out: Path) -> dict:
    """Seconds of one demo epoch (fit of 1 epoch: train + validation), without and with callbacks/demo.yaml."""

    from xaiwatch.data import generate

    n_train, n_val = (32, 16) if quick else (600, 100)
    data = generate(out / "damo_data", num_train=n_train, num_val=n_val, imgsz=160, seed=0, overwrite=True)
    results = {}
    for model in ("damo", "yolov8n.yaml"):
        row = {}
        for label, callbacks in (("plain", []), ("demo callbacks", _demo_callbacks(quick))):
            seconds, trainer = timed_demo_fit(data, model, callbacks, 1, out, "bench_damo")
            row[f"{label} seconds ({n_train} train images)"] = seconds
            row[f"{label} val/map50"] = float(trainer.callback_metrics.get("val/map50", float("nan")))
            if callbacks:  # each callback's own seconds after the epoch (its last step)
                row["per-callback seconds after the epoch"] = _callback_seconds(trainer.logger.log_dir)
        row["callbacks share"] = (
            1 - row[f"plain seconds ({n_train} train images)"] / row[f"demo callbacks seconds ({n_train} train images)"]
        )
        results["DAMO-YOLO-T" if model == "damo" else "YOLOv8n"] = row
    return results


def timed_demo_fit(data: Path, model: str, callbacks: list, epochs: int, out: Path, name: str) -> tuple[float, object]:
    """Wall seconds of a seeded demo fit (160 px, batch 16, ``demo_module(model)``) with ``callbacks``, and its
    trainer. A preset holding a GatedModelCheckpoint needs checkpointing on (Lightning refuses one with
    ``enable_checkpointing=False``); it writes into the logger's version folder, as in the demo."""
    import pytorch_lightning as pl
    from pytorch_lightning.callbacks import ModelCheckpoint

    from xaiwatch.cli import demo_module
    from xaiwatch.data import YoloDataModule

    pl.seed_everything(0)
    dm = YoloDataModule(str(data), imgsz=160, batch_size=16, seed=0)
    dm.setup("fit")
    module = demo_module(model, num_classes=dm.num_classes, names=dm.names)
    trainer = pl.Trainer(
        max_epochs=epochs,
        logger=pl.loggers.TensorBoardLogger(str(out), name=name),
        callbacks=callbacks,
        enable_checkpointing=any(isinstance(cb, ModelCheckpoint) for cb in callbacks),
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        log_every_n_steps=10,
    )
    start = time.perf_counter()
    trainer.fit(module, datamodule=dm)
    return time.perf_counter() - start, trainer


def _demo_callbacks(quick: bool) -> list:
    """callbacks/demo.yaml; in the smoke run with at most 2 probes each and a 10 s boundary budget."""
    from xaiwatch.callbacks import load_callbacks

    callbacks = load_callbacks(ROOT / "callbacks" / "demo.yaml")
    if quick:
        for cb in callbacks:
            if getattr(cb, "num_probe", None):  # callbacks that choose their images otherwise have None
                cb.num_probe = min(cb.num_probe, 2)
                if getattr(cb, "min_defined", None):  # the gate's min_defined must stay <= num_probe
                    cb.min_defined = min(cb.min_defined, cb.num_probe)
            if getattr(cb, "max_images", None):
                cb.max_images = min(cb.max_images, 8)
            if hasattr(cb, "budget_seconds"):
                cb.budget_seconds = 10
    return callbacks


def _callback_seconds(log_dir: str) -> dict:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(log_dir, size_guidance={"scalars": 0})
    acc.Reload()
    # everything is logged at the global step: step 0 is the run before training, the last step the epoch's
    return {
        tag: acc.Scalars(tag)[-1].value
        for tag in acc.Tags()["scalars"]
        if tag.endswith("seconds") and acc.Scalars(tag)[-1].step > 0
    }


def run(quick: bool = False, out: str | Path = "bench_output") -> dict:
    """Both measurements; ``quick`` (the smoke run) uses one repeat at 160 px and a 32-image epoch."""
    from xaiwatch.core.outputs import prepare_output_folder

    out = prepare_output_folder(out, what="the benchmarks' output", keep=True)
    return {"methods_320px_batch4": bench_methods(3 if quick else 5), "demo_epoch": bench_demo_epoch(quick, out)}


if __name__ == "__main__":
    import json

    sys.path.insert(0, str(ROOT / "src"))
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    if "--quick" in sys.argv:
        os.environ["XAIWATCH_BENCH_SMOKE"] = "1"
    print(json.dumps(run("--quick" in sys.argv), indent=1))
