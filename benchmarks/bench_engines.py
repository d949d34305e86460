"""Loop methods vs Captum called directly with its best internal batch size, D-RISE vs its forward floor, peak memory.

YOLOv8n (3 classes, from the yaml), one 320 px image, CPU. Each row is timed in this process; its peak memory
(growth of the peak resident set over the loaded model) is measured in a fresh subprocess so rows do not share a high-water
mark. Run: python benchmarks/bench_engines.py [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from collections.abc import Callable

import torch

sys.path.insert(0, os.path.dirname(__file__))
from run import smoke, timeit, yolov8n  # noqa: E402

SIZE = 160 if smoke() else 320


def _setup():
    from xaiwatch.adapters import YOLOv8Adapter
    from xaiwatch.targets import BoxTarget

    adapter = YOLOv8Adapter(yolov8n())
    torch.manual_seed(0)
    return adapter, torch.rand(1, 3, SIZE, SIZE), BoxTarget(700 if SIZE == 320 else 170, 1)  # a central P3 cell


def _rows(quick: bool) -> dict[str, Callable[[], object]]:
    from captum.attr import GradientShap, IntegratedGradients, NoiseTunnel, Saliency

    from xaiwatch.explain import get_engine

    adapter, x, target = _setup()
    f = lambda images: adapter.score(images, target)  # noqa: E731
    masks = 8 if smoke() else 200 if quick else 1000
    drise = get_engine("d_rise", adapter, num_masks=masks, conf=0.0)
    grey = torch.full_like(x, 0.5)

    def floor():
        xi = x.clone().requires_grad_()
        torch.autograd.grad(f(xi).sum(), xi)

    def drise_floor():  # N masked images through the model in the engine's own batch size, no gradients
        b = drise.batch_size(x)
        with torch.no_grad():
            for lo in range(0, masks, b):
                adapter.raw(x.expand(min(b, masks - lo), -1, -1, -1))

    rows = {"floor (1 forward + backward)": floor}
    # the smoke run (--quick in run.py) keeps every row but with 4 steps / samples and one batch size
    steps, samples = (4, 4) if smoke() else (32, 16)
    ig_batches, nt_batches = ((4,), (4,)) if smoke() else ((8, 16, 32), (8, 16))
    ours = {
        "integrated_gradients": get_engine("integrated_gradients", adapter, n_steps=steps),
        "smoothgrad": get_engine("smoothgrad", adapter, nt_samples=samples),
        "gradient_shap": get_engine("gradient_shap", adapter, n_samples=samples),
    }
    rows[f"integrated_gradients {steps} steps (ours)"] = lambda: ours["integrated_gradients"].attribute(x, target)
    for b in ig_batches:
        rows[f"integrated_gradients {steps} steps (Captum, internal_batch_size={b})"] = lambda b=b: IntegratedGradients(
            f
        ).attribute(x.clone(), baselines=x * 0, n_steps=steps, internal_batch_size=b)
    rows[f"smoothgrad {samples} samples (ours)"] = lambda: ours["smoothgrad"].attribute(x, target)
    for b in nt_batches:
        rows[f"smoothgrad {samples} samples (Captum, nt_samples_batch_size={b})"] = lambda b=b: NoiseTunnel(
            Saliency(f)
        ).attribute(x.clone(), nt_type="smoothgrad", nt_samples=samples, stdevs=0.15, nt_samples_batch_size=b)
    rows[f"gradient_shap {samples} samples (ours)"] = lambda: ours["gradient_shap"].attribute(x, target)
    rows[f"gradient_shap {samples} samples (Captum)"] = lambda: GradientShap(f).attribute(
        x.clone(), baselines=torch.cat([x * 0, grey]), n_samples=samples, stdevs=0.09
    )
    rows[f"d_rise {masks} masks (ours)"] = lambda: drise.attribute(x, target)
    rows[f"d_rise floor ({masks} masked forwards, batched)"] = drise_floor
    return rows


_MEASURE = """
import resource, sys
sys.path.insert(0, 'benchmarks')
import {module} as b
rows = b._rows({quick})
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
rows[{name!r}]()
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024)
"""


def _peak_mb(name: str, quick: bool, module: str = "bench_engines") -> float:
    """Growth of the peak resident set (``ru_maxrss``) while the row runs once in a fresh process (model built)."""
    code = _MEASURE.format(quick=quick, name=name, module=module)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=1800)
    try:
        return float(out.stdout.strip().splitlines()[-1])
    except (IndexError, ValueError):
        return float("nan")


def bench_engines(quick: bool = False, memory: bool = True) -> dict:
    """Time (and peak memory) of each row, with its ratio to the floor."""
    rows = _rows(quick)
    repeat = 1 if quick else 3
    results = {name: {"seconds": timeit(fn, repeat=repeat, warmup=1)} for name, fn in rows.items()}
    floor = results["floor (1 forward + backward)"]["seconds"]
    for name, r in results.items():
        r["x_floor"] = r["seconds"] / floor
        if memory:
            r["peak_mb"] = _peak_mb(name, quick)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--no-memory", action="store_true")
    args = parser.parse_args()
    results = bench_engines(args.quick, memory=not args.no_memory)
    for name, r in results.items():
        print(
            f"  {name:62s} {r['seconds']:8.3f} s  {r['x_floor']:7.2f} x floor  {r.get('peak_mb', float('nan')):8.0f} MB"
        )
    print(json.dumps(results))


if __name__ == "__main__":
    main()
