"""xaiwatch benchmarks: costs as ratios to the compute floor, the peer library side by side, in one run.

Nothing here is asserted; `make bench` prints a table and writes bench_output/results.json.
Run: python benchmarks/run.py [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("YOLO_OFFLINE", "1")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch

torch.set_num_threads(max(1, os.cpu_count() or 1))


def timeit(fn: Callable[[], object], repeat: int = 5, warmup: int = 1) -> float:
    """Median wall time of ``fn`` in seconds."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def yolov8n(num_classes: int = 3) -> torch.nn.Module:
    from xaiwatch.models.yolov8 import build_detection_model

    torch.manual_seed(0)
    return build_detection_model("yolov8n.yaml", num_classes).eval()


def bench_foundation(repeat: int) -> dict:
    """YOLOv8n, batch 4, 320 px: forward, forward+backward (floor), saliency and Grad-CAM vs the floor and the peer."""
    from pytorch_grad_cam import GradCAM

    from xaiwatch.adapters import YOLOv8Adapter
    from xaiwatch.explain import get_engine
    from xaiwatch.targets import BoxTarget

    net = yolov8n()
    adapter = YOLOv8Adapter(net)
    x = torch.rand(4, 3, 320, 320)
    targets = [BoxTarget(100 * (i + 1), i % 3) for i in range(4)]

    def forward():
        with torch.no_grad():
            adapter.raw(x)

    def floor():
        xi = x.clone().requires_grad_()
        torch.autograd.grad(adapter.score(xi, targets).sum(), xi)

    saliency = get_engine("saliency", adapter)
    grad_cam = get_engine("grad_cam", adapter, layer="neck.p3")

    class RawScores(torch.nn.Module):  # what the peer needs: a module whose output the targets index
        def __init__(self) -> None:
            super().__init__()
            self.net = net

        def forward(self, images):
            return adapter.raw(images).scores

    peer_targets = [lambda out, c=t.candidate, lab=t.label: out[c, lab] for t in targets]
    peer = GradCAM(model=RawScores(), target_layers=[net.model[15]])

    rows = {
        "forward": timeit(forward, repeat),
        "floor (forward + backward to input)": timeit(floor, repeat),
        "saliency (ours)": timeit(lambda: saliency.attribute(x, targets), repeat),
        "grad_cam (ours)": timeit(lambda: grad_cam.attribute(x, targets), repeat),
        "grad_cam (pytorch-grad-cam 1.5.7)": timeit(lambda: peer(input_tensor=x, targets=peer_targets), repeat),
    }
    floor_s = rows["floor (forward + backward to input)"]
    return {name: {"seconds": s, "x_floor": s / floor_s} for name, s in rows.items()}


def bench_callback_share(quick: bool) -> dict:
    """The demo configuration (YOLOv8n, 160 px, 600 train / 100 val images, batch 16, 8 probes, saliency + Grad-CAM):
    seconds of one explanation run vs one training epoch + its validation."""
    import pytorch_lightning as pl

    from xaiwatch.callbacks import ExplainCallback
    from xaiwatch.data import YoloDataModule, generate
    from xaiwatch.models import YOLOv8Module

    out = Path("bench_output")
    n_train = 160 if quick else 600
    data = generate(out / "data", num_train=n_train, num_val=100, imgsz=160, seed=0, overwrite=True)
    dm = YoloDataModule(str(data), imgsz=160, batch_size=16)
    dm.setup("fit")
    times = {}

    class Clock(pl.Callback):
        def on_train_epoch_start(self, trainer, pl_module):
            times["start"] = time.perf_counter()

        def on_validation_end(self, trainer, pl_module):
            times["epoch"] = time.perf_counter() - times["start"]

    cb = ExplainCallback(num_probe=8, explain_at_start=False, on_error="raise")
    module = YOLOv8Module("yolov8n.yaml", num_classes=dm.num_classes, names=dm.names)
    trainer = pl.Trainer(
        max_epochs=1,
        logger=pl.loggers.TensorBoardLogger(str(out), name="bench"),
        callbacks=[Clock(), cb],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    trainer.fit(module, datamodule=dm)
    explain = timeit(lambda: cb._run(module, step=99), repeat=2, warmup=0)
    epoch = times["epoch"] - explain  # the Clock saw one explanation inside the epoch
    per_epoch = 600 / n_train
    return {
        "train+val epoch seconds (600 images)": epoch * per_epoch,
        "explain seconds (8 probes x 2 methods)": explain,
        "share of epoch time": explain / (epoch * per_epoch + explain),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="fewer repeats and a smaller epoch")
    args = parser.parse_args()
    repeat = 3 if args.quick else 5
    results = {"torch": torch.__version__, "threads": torch.get_num_threads()}
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU\n")
    print("== Foundation: YOLOv8n, batch 4, 320 px (one target per image) ==")
    results["foundation"] = bench_foundation(repeat)
    for name, r in results["foundation"].items():
        print(f"  {name:40s} {r['seconds'] * 1000:9.1f} ms   {r['x_floor']:5.2f} x floor")
    print("\n== Loop methods vs Captum direct, D-RISE vs its floor: YOLOv8n, 1 image, 320 px ==")
    from bench_engines import bench_engines

    results["engines"] = bench_engines(args.quick, memory=not args.quick)
    for name, r in results["engines"].items():
        mb = r.get("peak_mb", float("nan"))
        print(f"  {name:62s} {r['seconds']:8.3f} s  {r['x_floor']:7.2f} x floor  {mb:8.0f} MB peak")
    try:
        from bench_allboxes import bench_allboxes
    except ImportError:
        bench_allboxes = None
    if bench_allboxes is not None:
        print("\n== All boxes of an image: YOLOv8n, batch 1, 320 px, K boxes ==")
        results["allboxes"] = bench_allboxes(repeat=repeat)
        print(json.dumps(results["allboxes"], indent=1))
    print("\n== Feature capture share of a validation pass; PCA / t-SNE / UMAP on 1k and 5k x 256 ==")
    from bench_projection import bench_projection

    results["projection"] = bench_projection(args.quick, memory=not args.quick)
    for name, r in results["projection"].items():
        share = f"{100 * r['overhead_share']:+6.1f} % of validation" if "overhead_share" in r else ""
        print(f"  {name:55s} {r['seconds']:8.3f} s  {r.get('peak_mb', float('nan')):7.0f} MB  {share}")

    print("\n== Error analysis share of a validation pass; boundary probe vs its floor: YOLOv8n, 160 px ==")
    from bench_analysis import bench_analysis

    results["analysis"] = bench_analysis()
    print(json.dumps(results["analysis"], indent=1, default=str))
    print("\n== Saliency checks vs one explanation of 16 probes; the gate's share of epoch time ==")
    from bench_gate import bench_gate

    results["gate"] = bench_gate(args.quick)
    for name, r in results["gate"]["checks"].items():
        print(f"  {name:40s} {r['seconds']:8.3f} s  {r['x_explanation']:6.2f} x explanation")
    for name, v in results["gate"]["share"].items():
        print(f"  {name:40s} {v:9.3f}")
    print("\n== DAMO-YOLO-T vs YOLOv8n: floors, method ratios, a demo epoch with and without the callbacks ==")
    import bench_damo

    results["damo"] = bench_damo.run(args.quick)
    print(json.dumps(results["damo"], indent=1, default=str))
    print("\n== Our per-box CAMs vs ultralytics' own LayerCAM: YOLOv8n, 1 image, 320 px, K boxes ==")
    import bench_ultralytics_cam

    results["ultralytics_cam"] = bench_ultralytics_cam.run(args.quick)
    bench_ultralytics_cam.report(results["ultralytics_cam"])
    print("\n== ExplainCallback share of epoch time, demo configuration ==")
    results["callback_share"] = bench_callback_share(args.quick)
    for name, v in results["callback_share"].items():
        print(f"  {name:40s} {v:9.3f}")
    Path("bench_output").mkdir(exist_ok=True)
    Path("bench_output/results.json").write_text(json.dumps(results, indent=2))
    print("\nwritten to bench_output/results.json")


if __name__ == "__main__":
    main()
