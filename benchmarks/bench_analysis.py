"""Error analysis and decision boundaries, measured (not asserted).

- ErrorAnalysisCallback on 64 validation images (YOLOv8n, 160 px, 2 false positives + 2 misses explained with
  saliency, confusion figure) as a share of one validation pass over the same 64 images;
- one decision-boundary probe per object (PGD, 5 steps, 5 bisection halvings, 1 image, 160 px) against its floor:
  the gradient steps it took x one forward + backward.

Run: python benchmarks/bench_analysis.py (or through benchmarks/run.py).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

os.environ.setdefault("YOLO_OFFLINE", "1")

import torch


def _responsive(net: torch.nn.Module) -> torch.nn.Module:
    """A freshly initialised YOLOv8's activations vanish (every score = sigmoid(bias)); re-estimating BatchNorm
    statistics on random images and zeroing the class biases gives a random detector whose detections can be
    attacked (a trained checkpoint is not available offline)."""
    bns = [m for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None
    with torch.no_grad():
        net.train()(torch.rand(8, 3, 160, 160, generator=torch.Generator().manual_seed(0)))
    for m in bns:
        m.momentum = 0.03
    for seq in net.model[-1].cv3:
        seq[-1].bias.data.fill_(0.0)
    return net.eval()


def bench_error_share(out: Path, num_val: int = 64) -> dict:
    import pytorch_lightning as pl

    from xaiwatch.callbacks import ErrorAnalysisCallback
    from xaiwatch.data import YoloDataModule, generate
    from xaiwatch.models import YOLOv8Module

    data = generate(out / "analysis_data", num_train=16, num_val=num_val, imgsz=160, seed=0, overwrite=True)
    dm = YoloDataModule(str(data), imgsz=160, batch_size=16)
    times: dict[str, float] = {}

    class Clock(pl.Callback):  # first in the list: its epoch end fires before the analysis runs
        def on_validation_epoch_start(self, trainer, pl_module):
            times["start"] = time.perf_counter()

        def on_validation_epoch_end(self, trainer, pl_module):
            times["val"] = time.perf_counter() - times["start"]

    torch.manual_seed(0)
    module = YOLOv8Module("yolov8n.yaml", num_classes=3)
    _responsive(module.net)
    cb = ErrorAnalysisCallback(max_images=num_val, conf=0.25, explain_top_k=2, on_error="raise")
    trainer = pl.Trainer(
        max_epochs=1,
        limit_train_batches=1,
        logger=pl.loggers.TensorBoardLogger(str(out), name="bench_analysis"),
        callbacks=[Clock(), cb],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    trainer.fit(module, datamodule=dm)
    runs = {}
    for top_k in (2, 0):
        cb.explain_top_k, cb._engine = top_k, cb._engine if top_k else None
        start = time.perf_counter()
        with torch.inference_mode():
            cb.run_now(trainer, module)
        runs[top_k] = time.perf_counter() - start
    return {
        f"validation pass seconds ({num_val} images)": times["val"],
        f"error analysis seconds ({num_val} images, 4 explained)": runs[2],
        "share of a validation pass": runs[2] / times["val"],
        "error analysis seconds without explanations": runs[0],
        "share without explanations": runs[0] / times["val"],
        "errors counted": cb.last_counts.totals(),
    }


def bench_boundary(repeat: int = 3) -> dict:
    from xaiwatch.adapters import YOLOv8Adapter
    from xaiwatch.analysis import min_epsilon
    from xaiwatch.models.yolov8 import build_detection_model

    torch.manual_seed(0)
    adapter = YOLOv8Adapter(_responsive(build_detection_model("yolov8n.yaml", 3)), conf=0.5)
    image = torch.rand(1, 3, 160, 160, generator=torch.Generator().manual_seed(1))
    dets = adapter.detect(image)[0]
    box, label = dets.boxes[0], int(dets.labels[0])

    def floor_step():
        x = image.clone().requires_grad_()
        torch.autograd.grad(adapter.score(x, lambda raw: raw.scores[:, 0, label]).sum(), x)

    floor_step()
    start = time.perf_counter()
    for _ in range(10):
        floor_step()
    step = (time.perf_counter() - start) / 10
    probes = []
    for _ in range(repeat):
        start = time.perf_counter()
        result = min_epsilon(adapter, image, box, label, attack="pgd", steps=5, bisection_steps=5, max_eps=0.1)
        probes.append(time.perf_counter() - start)
    probe = sorted(probes)[len(probes) // 2]
    return {
        "fwd+bwd seconds": step,
        "probe seconds (one object)": probe,
        "gradient steps taken": result.steps,
        "floor seconds (steps x fwd+bwd)": result.steps * step,
        "x floor": probe / max(result.steps * step, 1e-9),
        "min_eps": result.min_eps,
    }


def bench_analysis(out: str | Path = "bench_output", quick: bool = False) -> dict:
    """Both measurements; ``quick`` (the smoke run) uses 16 validation images and one boundary probe."""
    from xaiwatch.core.outputs import prepare_output_folder

    out = prepare_output_folder(out, what="the benchmarks' output", keep=True)
    if quick:
        return {"error_share": bench_error_share(out, num_val=16), "boundary_probe": bench_boundary(repeat=1)}
    return {"error_share": bench_error_share(out), "boundary_probe": bench_boundary()}


if __name__ == "__main__":
    import json

    print(json.dumps(bench_analysis(), indent=1, default=str))
