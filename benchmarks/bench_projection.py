"""ProjectionCallback costs: feature capture as a share of a validation pass; PCA / t-SNE / UMAP on 1k and 5k points.

Capture: YOLOv8n (3 classes, from the yaml), 16 images of 320 px in batches of 8, 3 ground-truth boxes each; a
"validation pass" is the adapter's forward + NMS over them, the capture run is ``xaiwatch.features.embed`` on the
same batches (the same forward plus hooks on neck P3/P4/P5, RoIAlign of every ground-truth and predicted box,
TP/FP matching, sprite thumbnails). Projections: 10 Gaussian clusters in 256 dimensions. Peak memory is the
resident-set growth of each row run once in a fresh process (the sampler of bench_engines.py).
Run: python benchmarks/bench_projection.py [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(__file__))
from run import smoke, timeit, yolov8n  # noqa: E402

SIZE, IMAGES, BATCH = (160, 4, 4) if smoke() else (320, 16, 8)
LAYERS = ["neck.p3", "neck.p4", "neck.p5"]


def _batches() -> list[tuple]:
    g = torch.Generator().manual_seed(0)
    out = []
    for lo in range(0, IMAGES, BATCH):
        images = torch.rand(BATCH, 3, SIZE, SIZE, generator=g)
        xy = torch.rand(BATCH, 3, 2, generator=g) * (SIZE - 80)
        boxes = [torch.cat([p, p + 40 + 40 * torch.rand(3, 2, generator=g)], 1) for p in xy]
        labels = [torch.randint(0, 3, (3,), generator=g) for _ in range(BATCH)]
        out.append((images, boxes, labels, list(range(lo, lo + BATCH))))
    return out


def _clusters(n: int, dim: int = 256, k: int = 10) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    labels = rng.integers(0, k, n)
    return rng.normal(size=(k, dim))[labels] * 3 + rng.normal(size=(n, dim)), labels


def _rows(quick: bool) -> dict[str, Callable[[], object]]:
    from xaiwatch.adapters import YOLOv8Adapter
    from xaiwatch.features import embed, project

    net = yolov8n()
    batches = _batches()
    adapter = YOLOv8Adapter(net)
    worst = YOLOv8Adapter(net, conf=0.001)  # up to max_det=300 predictions per image
    rows: dict[str, Callable[[], object]] = {
        "validation pass (forward + NMS)": lambda: [adapter.detect(b[0]) for b in batches],
        "capture, conf 0.25": lambda: embed(adapter, batches, LAYERS),
        "capture, conf 0.001 (every candidate up to max_det)": lambda: embed(worst, batches, LAYERS),
    }
    sizes = (200,) if smoke() else (1000,) if quick else (1000, 5000)
    for n in sizes:
        x, _ = _clusters(n)
        for method in ("pca", "tsne") if smoke() else ("pca", "tsne", "umap"):  # smoke: no numba compile (minutes)
            rows[f"{method} {n} x 256"] = lambda x=x, m=method: project(x, m)
    return rows


def _umap_compile_seconds() -> float:
    """numba compiles UMAP's kernels on the first call in a process; later calls do not pay it."""
    from xaiwatch.features import project

    start = time.perf_counter()
    project(_clusters(200)[0], "umap")
    return time.perf_counter() - start


def bench_projection(quick: bool = False, memory: bool = True) -> dict:
    """Seconds (median) and peak memory of each row; capture rows also as a share of the validation pass."""
    from bench_engines import _peak_mb

    results: dict[str, dict[str, float]] = {}
    if not smoke():
        results["umap first call (numba compile), 200 points"] = {"seconds": _umap_compile_seconds()}
    rows = _rows(quick)
    rounds = 1 if smoke() else 3 if quick else 7
    for name, fn in rows.items():
        heavy = name.startswith(("tsne", "umap", "pca"))
        results[name] = {"seconds": timeit(fn, repeat=1 if heavy or quick else 3, warmup=0 if heavy else 1)}
    validation = rows["validation pass (forward + NMS)"]
    for name in [n for n in rows if n.startswith("capture")]:  # paired rounds: load changes hit both alike
        pairs = [(timeit(validation, 1, 0), timeit(rows[name], 1, 0)) for _ in range(rounds)]
        results[name]["overhead_share"] = statistics.median(c / v - 1.0 for v, c in pairs)
    for name, r in results.items():
        if memory and name in rows:
            r["peak_mb"] = _peak_mb(name, quick, module="bench_projection")
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--no-memory", action="store_true")
    args = parser.parse_args()
    results = bench_projection(args.quick, memory=not args.no_memory)
    for name, r in results.items():
        share = f"{100 * r['overhead_share']:+6.1f} % of validation" if "overhead_share" in r else ""
        print(f"  {name:55s} {r['seconds']:8.3f} s  {r.get('peak_mb', float('nan')):7.0f} MB  {share}")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
