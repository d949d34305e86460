"""Saliency checks and the gate, measured (not asserted).

- each check's cost on 16 probes (YOLOv8n, 160 px, saliency maps) as a ratio to one explanation of the same
  probes (the 16 saliency maps the map checks judge);
- where one evaluation of the default gate spends its time (forward passes, saliency maps, context variants);
- the gate's share of epoch time with its default checks and with the previous defaults, in the demo
  configuration (600 training images, batch 16, 160 px), the epoch measured in the same run.

Run: python benchmarks/bench_gate.py [--quick] (or through benchmarks/run.py).
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

os.environ.setdefault("YOLO_OFFLINE", "1")

import torch

sys.path.insert(0, str(Path(__file__).parent))


def bench_check_costs(repeat: int = 3, probes: int = 16) -> dict:
    from bench_analysis import _responsive
    from run import timeit

    from xaiwatch.adapters import YOLOv8Adapter
    from xaiwatch.checks import CHECKS, CheckOptions, evaluate_checks
    from xaiwatch.explain import get_engine
    from xaiwatch.models.yolov8 import build_detection_model
    from xaiwatch.targets import MatchedBoxTarget

    torch.manual_seed(0)
    net = _responsive(build_detection_model("yolov8n.yaml", 3))
    adapter = YOLOv8Adapter(net)
    g = torch.Generator().manual_seed(0)
    images = torch.rand(probes, 3, 160, 160, generator=g)
    xy = torch.randint(0, 110, (probes, 2), generator=g).float()
    boxes = torch.cat([xy, xy + 40], dim=1)
    targets = [MatchedBoxTarget(b, 0) for b in boxes]
    engines = {"saliency": get_engine("saliency", adapter)}
    gt = [b[None] for b in boxes]
    options = CheckOptions(min_score=0.0)

    def explain():
        return [engines["saliency"].attribute_boxes(images[i : i + 1], [t]) for i, t in enumerate(targets)]

    base = timeit(explain, repeat)
    rows = {f"one explanation ({probes} saliency maps)": {"seconds": base, "x_explanation": 1.0}}
    for check in CHECKS:
        cf = images.flip(-1) if check == "counterfactual_flip" else None
        seconds = timeit(
            lambda check=check, cf=cf: evaluate_checks(
                adapter, engines, images, targets, boxes, gt, {check}, options, cf
            ),
            repeat,
        )
        rows[check] = {"seconds": seconds, "x_explanation": seconds / base, "extra_x": (seconds - base) / base}
    return rows


def _probe_scene(probes: int):
    """A YOLOv8n whose scores respond to its input (``bench_analysis._responsive``) and ``probes`` random 160 px
    probes with one 40 px box each."""
    from bench_analysis import _responsive

    from xaiwatch.adapters import YOLOv8Adapter
    from xaiwatch.models.yolov8 import build_detection_model
    from xaiwatch.targets import MatchedBoxTarget

    torch.manual_seed(0)
    adapter = YOLOv8Adapter(_responsive(build_detection_model("yolov8n.yaml", 3)))
    g = torch.Generator().manual_seed(0)
    images = torch.rand(probes, 3, 160, 160, generator=g)
    xy = torch.randint(0, 110, (probes, 2), generator=g).float()
    boxes = torch.cat([xy, xy + 40], dim=1)
    labels = torch.randint(0, 3, (probes,), generator=g)
    targets = [MatchedBoxTarget(b, int(c)) for b, c in zip(boxes, labels)]
    return adapter, images, boxes, labels, targets


def _cpu_seconds(fn, repeat: int) -> float:
    """Median CPU time of ``fn`` (``time.process_time``: robust to other processes sharing the cores), one warm-up."""
    fn()
    times = []
    for _ in range(max(1, repeat)):
        t = time.process_time()
        fn()
        times.append(time.process_time() - t)
    return sorted(times)[len(times) // 2]


def bench_gate_breakdown(repeat: int = 3, probes: int = 16) -> dict:
    """One evaluation of the gate's checks on ``probes`` probes, whole and by part (CPU seconds, 1 thread)."""
    from xaiwatch.callbacks.gate import DEFAULT_CHECKS
    from xaiwatch.checks import CheckOptions, context_swap, evaluate_probes
    from xaiwatch.checks.evaluate import _maps
    from xaiwatch.checks.rule import parse_rules
    from xaiwatch.explain import get_engine

    adapter, images, boxes, labels, targets = _probe_scene(probes)
    engine = get_engine("saliency", adapter)
    gt, gl = [b[None] for b in boxes], [c[None] for c in labels]
    o = CheckOptions(min_score=0.0)

    def run(checks):
        needed = parse_rules(checks, ["saliency"])[1]
        engines = {"saliency": engine} if needed & {"energy_concentration", "pointing_game"} else {}
        return evaluate_probes(adapter, engines, images, targets, boxes, gt, needed, o, labels=labels, gt_labels=gl)

    half = images.clone()
    half[: probes // 2] *= 0.0  # 8 probes black: their objects are not detected (undefined)

    with torch.no_grad():
        parts = {
            f"one forward pass ({probes} probes)": _cpu_seconds(lambda: adapter.raw(images), repeat),
            f"saliency maps ({probes} probes, {o.batch_size} per pass)": _cpu_seconds(
                lambda: _maps(engine, images, targets, o.batch_size), repeat
            ),
            "context variants (2 swaps + grey, 3 forward passes)": _cpu_seconds(
                lambda: context_swap(
                    adapter, images, boxes, labels, gt, gl, ("swap",), 2, 0.0, extra_fills=("grey",), margin=0.25
                ),
                repeat,
            ),
            "context variants, 8 black probes undefined (not re-scored)": _cpu_seconds(
                lambda: context_swap(
                    adapter, half, boxes, labels, gt, gl, ("swap",), 2, 1e-3, extra_fills=("grey",), margin=0.25
                ),
                repeat,
            ),
        }
    parts[f"default checks {sorted(DEFAULT_CHECKS)}"] = _cpu_seconds(lambda: run(DEFAULT_CHECKS), repeat)
    parts[f"previous default checks {sorted(PREVIOUS_CHECKS)}"] = _cpu_seconds(lambda: run(PREVIOUS_CHECKS), repeat)
    return parts


#: The gate's previous defaults (before swap_class_drop), for the before / after share of an epoch.
PREVIOUS_CHECKS = {
    "relative_context_reliance": 0.05,
    "context_swap": None,
    "energy_concentration": None,
    "pointing_game": None,
}


def bench_gate_share(quick: bool, out: Path = Path("bench_output")) -> dict:
    import pytorch_lightning as pl

    from xaiwatch.callbacks import SaliencyGate
    from xaiwatch.data import YoloDataModule, generate
    from xaiwatch.models import YOLOv8Module

    n_train, n_val, n_probe = (32, 16, 4) if quick else (600, 64, 16)
    data = generate(out / "gate_data", num_train=n_train, num_val=n_val, imgsz=160, seed=0, overwrite=True)
    dm = YoloDataModule(str(data), imgsz=160, batch_size=16)
    times: dict[str, float] = {}

    class Clock(pl.Callback):
        def on_train_epoch_start(self, trainer, pl_module):
            times["start"], times["cpu_start"] = time.perf_counter(), time.process_time()

        def on_validation_end(self, trainer, pl_module):
            times["epoch"] = time.perf_counter() - times["start"]
            times["cpu"] = time.process_time() - times["cpu_start"]

    gates = {
        "default": SaliencyGate(num_probe=n_probe, on_error="raise"),
        "previous defaults": SaliencyGate(checks=PREVIOUS_CHECKS, num_probe=n_probe, on_error="raise"),
    }
    torch.manual_seed(0)
    module = YOLOv8Module("yolov8n.yaml", num_classes=dm.num_classes, names=dm.names)
    trainer = pl.Trainer(
        max_epochs=1,
        logger=pl.loggers.TensorBoardLogger(str(out), name="bench_gate"),
        callbacks=[Clock(), *gates.values()],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    trainer.fit(module, datamodule=dm)
    seconds = {name: g.history[-1]["seconds"] for name, g in gates.items()}
    epoch = (times["epoch"] - sum(seconds.values())) * 600 / n_train  # the same epoch, without either gate
    cpu = (times["cpu"] - sum(seconds.values())) * 600 / n_train  # (the gates' CPU time ~ their wall time here)
    defined = {name: min(g.history[-1]["defined"].values()) for name, g in gates.items()}
    out = {"train+val epoch seconds (600 images)": epoch, "train+val epoch CPU seconds (600 images)": cpu}
    out.update({f"defined probes ({name})": d for name, d in defined.items()})
    for name, s in seconds.items():
        out[f"gate seconds ({n_probe} probes, {name})"] = s
        out[f"share of epoch time ({name})"] = s / (epoch + s)
    return out


def bench_gate(quick: bool, out: str | Path = "bench_output") -> dict:
    """Both measurements; ``quick`` (the smoke run): 4 probes, a 32-image epoch."""
    from xaiwatch.core.outputs import prepare_output_folder

    out = prepare_output_folder(out, what="the benchmarks' output", keep=True)
    breakdown = bench_gate_breakdown(1 if quick else 3, probes=4 if quick else 16)
    share = bench_gate_share(quick, out)
    epoch_cpu = share["train+val epoch CPU seconds (600 images)"]
    for key, seconds in list(breakdown.items()):  # every probe defined (a trained model): the worst case
        if key.startswith(("default checks", "previous default checks")):
            share[f"share of the epoch's CPU time, every probe defined: {key}"] = seconds / (epoch_cpu + seconds)
    return {
        "checks": bench_check_costs(1 if quick else 3, probes=4 if quick else 16),
        "breakdown": breakdown,
        "share": share,
    }


if __name__ == "__main__":
    import json

    if "--quick" in sys.argv:
        os.environ["XAIWATCH_BENCH_SMOKE"] = "1"
    print(json.dumps(bench_gate("--quick" in sys.argv), indent=1))
