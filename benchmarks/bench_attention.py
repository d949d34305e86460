"""Attention methods and RT-DETR, measured (not asserted).

- cost: each attention method (4 boxes of one image, one call of ``attribute_boxes``) as a ratio to one forward
  pass of the same model, for YOLO11n, YOLOv10n, YOLO12n and RT-DETR-l at 320 px;
- fine-tuning: one optimiser step (forward, ultralytics' loss, backward, AdamW) of RT-DETR-l, the small RT-DETR of
  the tests and YOLOv8n/YOLO11n at 160 px, batch 2;
- ``--trained``: a small RT-DETR (width 64, 3 decoder layers) trained a few hundred steps on the shapes data; is its
  deformable attention specific to its box (share of the map in the box vs in the other objects), and does it change
  when the weights are randomised (Spearman correlation with the cascading randomisation's maps)? Writes
  ``docs/images/rtdetr_deformable.png``.

Single thread (the machine is shared). Run: python benchmarks/bench_attention.py [--quick] [--trained]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("YOLO_OFFLINE", "1")

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(ROOT / "tests"))
from run import timeit  # noqa: E402  (the one timer of every benchmark)

METHODS = ("attention", "attention_rollout", "deformable_attention")


def _adapter(name: str):
    from ultralytics.nn.tasks import RTDETRDetectionModel

    from xaiwatch.adapters import RTDETRAdapter, YOLOv8Adapter
    from xaiwatch.models.yolov8 import build_detection_model

    torch.manual_seed(0)
    if name.startswith("rtdetr"):
        return RTDETRAdapter(RTDETRDetectionModel(f"{name}.yaml", nc=3, verbose=False).eval())
    return YOLOv8Adapter(build_detection_model(f"{name}.yaml", 3).eval())


def bench_cost(size: int, repeat: int) -> dict:
    """Seconds of one forward and of each applicable attention method (4 boxes), and their ratio."""
    from xaiwatch.core.errors import UnsupportedModelError
    from xaiwatch.explain import get_engine
    from xaiwatch.targets import BoxTarget

    out = {}
    image = torch.rand(1, 3, size, size)
    for name in ("yolo11n", "yolov10n", "yolo12n", "rtdetr-l"):
        adapter = _adapter(name)
        with torch.no_grad():
            raw = adapter.raw(image)
        best = raw.scores[0].amax(dim=-1).topk(4).indices.tolist()
        targets = [BoxTarget(c, None) for c in best]

        def forward(a=adapter):
            with torch.no_grad():
                a.raw(image)

        row = {"forward_s": timeit(forward, repeat)}
        for method in METHODS:
            try:
                engine = get_engine(method, adapter)
            except UnsupportedModelError:
                continue
            row[f"{method}_s"] = timeit(lambda e=engine, t=targets: e.attribute_boxes(image, t), repeat)
            row[f"{method}_x_forward"] = row[f"{method}_s"] / row["forward_s"]
        out[name] = row
        print(name, {k: round(v, 4) for k, v in row.items()}, flush=True)
    return out


def bench_steps(size: int, repeat: int) -> dict:
    """Seconds of one fine-tuning step, batch 2."""
    import pytorch_lightning as pl

    from conftest import SquaresDataset, collate, tiny_rtdetr_cfg
    from xaiwatch.models import RTDETRModule, YOLOv8Module

    batch = collate([SquaresDataset(2, 0, size=size)[i] for i in range(2)])
    builds = {
        "yolov8n": lambda: YOLOv8Module("yolov8n.yaml", num_classes=3),
        "yolo11n": lambda: YOLOv8Module("yolo11n.yaml", num_classes=3),
        "rtdetr-small (tests)": lambda: RTDETRModule(tiny_rtdetr_cfg(), num_classes=3),
        "rtdetr-l": lambda: RTDETRModule("rtdetr-l.yaml", num_classes=3),
    }
    out = {}
    for name, build in builds.items():
        pl.seed_everything(0)
        module = build()
        module.net.train()
        opt = torch.optim.AdamW(module.parameters(), lr=1e-4)

        def step(m=module, o=opt):
            o.zero_grad()
            m.training_step(batch, 0).backward()  # a benchmark of training itself, not an explanation
            o.step()

        params = sum(p.numel() for p in module.parameters())
        out[name] = {"step_s": timeit(step, repeat), "params_M": params / 1e6}
        print(name, {k: round(v, 4) for k, v in out[name].items()}, flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--trained", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    repeat = 2 if args.quick else 5
    results = {"cost_320px": bench_cost(320, repeat), "step_160px_batch2": bench_steps(160, repeat)}
    if args.trained:
        from bench_attention_trained import run

        results["trained_rtdetr"] = run(quick=args.quick)
    folder = ROOT / "bench_output"
    folder.mkdir(exist_ok=True)
    (folder / f"attention-{int(time.time())}.json").write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
