"""Can an automatic check see a cue *on* the object? Part occlusion on the calibration models (a negative result).

The context checks of the gate keep the object's box and replace what is around it, so a shortcut drawn on the
object (``spot5``: a class-coloured square in the middle of each object) is invisible to them. The natural
automatic test of a cue inside the box is occlusion (Zeiler & Fergus 2014): cut the box into a ``grid x grid``
partition, replace one cell at a time (by the box's median colour, or by a blur of the image) and ask whether the
object's class changes while it is still detected. A model that decides from one small part should flip when
that part is hidden; a model that decides from the whole shape should not.

This script measures it on the models ``examples/calibrate_gate.py train`` wrote (``<out>/runs/*``, final
weights, the same 16 probes the gate uses) and prints, per model, the share of probes where hiding some cell
flips the class (``any_flip``), the mean over cells (``mean_flip``) and the largest relative score drop
(``max_drop``). Measured on 2026-12-02 (seed 0): the spot5 shortcut model (flip 0.66) and its clean twin are not
told apart (``any_flip`` 0.17 vs 0.17 with the median fill, 0.00 vs 0.17 with blur): hiding the cue is not the
cue made wrong, and a model whose cue is missing falls back on the shape. docs/gate.md says what to use instead
(a counterfactual of the suspected cue, ``counterfactual_flip``).

    python examples/part_occlusion.py --out runs/calibrate_gate
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

os.environ.setdefault("YOLO_OFFLINE", "1")

import torch

FILLS = ("median", "blur")


def cells(box: torch.Tensor, grid: int) -> list[tuple[int, int, int, int]]:
    """The ``grid x grid`` partition of ``box`` (x1, y1, x2, y2) in whole pixels, row by row."""
    x1, y1, x2, y2 = (float(v) for v in box)
    xs = [x1 + (x2 - x1) * i / grid for i in range(grid + 1)]
    ys = [y1 + (y2 - y1) * j / grid for j in range(grid + 1)]
    return [(round(xs[i]), round(ys[j]), round(xs[i + 1]), round(ys[j + 1])) for j in range(grid) for i in range(grid)]


def occluded(images: torch.Tensor, boxes: torch.Tensor, cell: int, grid: int, fill: str) -> torch.Tensor:
    """The probes with cell ``cell`` of each tracked box replaced by ``fill``."""
    from xaiwatch.checks.perturbation import fill_image

    out = images.clone()
    blurred = fill_image(images, "blur") if fill == "blur" else None
    for i, box in enumerate(boxes):
        x1, y1, x2, y2 = cells(box, grid)[cell]
        if x2 <= x1 or y2 <= y1:
            continue
        if fill == "median":
            bx1, by1, bx2, by2 = (round(float(v)) for v in box)
            colour = images[i, :, by1:by2, bx1:bx2].reshape(3, -1).median(dim=1).values
            out[i, :, y1:y2, x1:x2] = colour[:, None, None]
        else:
            out[i, :, y1:y2, x1:x2] = blurred[i, :, y1:y2, x1:x2]
    return out


def part_occlusion(adapter, images: torch.Tensor, boxes: torch.Tensor, labels: torch.Tensor, grid: int = 3) -> dict:
    """Per fill: mean over defined probes of any-cell flip, mean-cell flip and the largest relative score drop."""
    from xaiwatch.checks.counterfactual import object_scores
    from xaiwatch.core.context import eval_state

    nan = torch.tensor(float("nan"))
    results = {}
    with torch.no_grad(), eval_state(adapter.model):
        s0, c0, _ = object_scores(adapter.raw(images), boxes, labels, 0.5, best=True)
        defined = (s0 >= adapter.conf) & (c0 >= 0)
        for fill in FILLS:
            flips = torch.full((len(images), grid * grid), float("nan"))
            drops = torch.full_like(flips, float("nan"))
            for cell in range(grid * grid):
                s1, c1, top1 = object_scores(
                    adapter.raw(occluded(images, boxes, cell, grid, fill)), boxes, labels, 0.5, best=True
                )
                counted = defined & (c1 >= 0) & (top1 >= adapter.conf)  # still detected: as what?
                flips[:, cell] = torch.where(counted, (c1 != c0).float(), nan)
                drops[:, cell] = torch.where(defined, ((s0 - s1) / s0.clamp(min=1e-6)).clamp(-1, 1), nan)
            per_probe = {
                "any_flip": torch.nan_to_num(flips, 0.0).amax(1),
                "mean_flip": torch.nan_to_num(flips, 0.0).mean(1),
                "max_drop": torch.nan_to_num(drops, -1.0).amax(1),
            }
            results[fill] = {k: float(v[defined].mean()) if defined.any() else None for k, v in per_probe.items()}
            results[fill]["defined"] = int(defined.sum())
    return results


def evaluate_run(run: Path, num_probe: int = 16, grid: int = 3) -> dict:
    """:func:`part_occlusion` of a calibration run's final model on the gate's probes (cue consistent)."""
    import calibrate_gate as cg

    meta = json.loads((run / "train.json").read_text())
    _, adapter, dataset = cg.load_run(run, meta["weights"][-1]["path"])
    probes, _, boxes, labels = cg.gate_probes(dataset, num_probe)
    return part_occlusion(adapter, probes.images, boxes, labels, grid)


def main() -> None:
    import sys

    sys.path.insert(0, str(Path(__file__).parent))
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/calibrate_gate", help="calibrate_gate.py's output folder")
    parser.add_argument("--grid", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    for run in sorted(Path(args.out, "runs").glob("*/train.json")):
        print(run.parent.name, json.dumps(evaluate_run(run.parent, grid=args.grid)), flush=True)


if __name__ == "__main__":
    main()
