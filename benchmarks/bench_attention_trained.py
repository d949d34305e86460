"""A briefly trained small RT-DETR: is its per-box deformable attention specific to the box, and does it depend on the
weights? Measured, not asserted; also writes docs/images/rtdetr_deformable*.png.

Run: python benchmarks/bench_attention_trained.py [--quick] [--steps N] (``--steps 0``: the untrained baseline; it
also rewrites the pictures, so run it before the trained run), or ``run(quick)`` from bench_attention.py.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("YOLO_OFFLINE", "1")

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))


def _train(folder: Path, steps: int, imgsz: int):
    import pytorch_lightning as pl

    from conftest import tiny_rtdetr_cfg
    from xaiwatch.data import YoloDataModule, generate
    from xaiwatch.models import RTDETRModule

    yaml = generate(folder / "shapes", num_train=600, num_val=40, imgsz=imgsz, objects_per_image=(2, 3), seed=0)
    pl.seed_everything(0)
    module = RTDETRModule(tiny_rtdetr_cfg(width=64, layers=3), num_classes=3, lr=1e-3, warmup_steps=50)
    data = YoloDataModule(yaml, imgsz=imgsz, batch_size=8, seed=0)
    trainer = pl.Trainer(
        max_steps=steps,
        val_check_interval=None,
        check_val_every_n_epoch=1000,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        accelerator="cpu",
    )
    if steps == 0:  # the fresh model: the baseline of the specificity numbers
        data.setup("validate")
        return module, data, {"steps": 0}
    start = time.perf_counter()
    trainer.fit(module, datamodule=data)
    seconds = time.perf_counter() - start
    validation = trainer.validate(module, datamodule=data, verbose=False)[0]
    return module, data, {"steps": steps, "train_s": seconds, **{k: float(v) for k, v in validation.items()}}


def _specificity(engine, data) -> dict:
    """Per object of every validation image with 2+ objects: share of its map in its own box and in the others'."""
    from xaiwatch.checks.localization import box_masks
    from xaiwatch.targets import MatchedBoxTarget

    own, other, area, wins, detected = [], [], [], 0, 0
    for i in range(len(data.val_dataset)):
        item = data.val_dataset[i]
        boxes, labels = item["boxes"], item["labels"]
        if len(boxes) < 2:
            continue
        targets = [MatchedBoxTarget(b, int(lab), iou_threshold=0.5, conf=0.3) for b, lab in zip(boxes, labels)]
        found = engine.explain_boxes(item["image"][None], targets)
        maps = found.maps[:, 0]
        masks = box_masks(boxes, maps.shape[-2:])
        shares = (maps[:, None] * masks[None]).sum(dim=(2, 3)) / maps.sum(dim=(1, 2))[:, None]  # (K obj, K boxes)
        for k in range(len(targets)):
            others = torch.cat([shares[k, :k], shares[k, k + 1 :]])
            own.append(float(shares[k, k]))
            other.append(float(others.mean()))
            area.append(float(masks[k].float().mean()))
            wins += int(shares[k, k] > others.max())
            detected += int(found.matches[k].detected)
    n = len(own)
    return {
        "objects": n,
        "detected": detected,
        "own_box_share": sum(own) / n,
        "other_box_share_mean": sum(other) / n,
        "own_box_area_share": sum(area) / n,
        "own_box_highest": wins / n,
    }


def _randomization(adapter, engine_name: str, data) -> dict:
    from xaiwatch.checks.randomization import randomization_similarity
    from xaiwatch.checks.similarity import spearman
    from xaiwatch.explain import get_engine
    from xaiwatch.targets import MatchedBoxTarget

    items = [data.val_dataset[i] for i in range(8)]

    def maps(model):
        engine = get_engine(engine_name, adapter.with_model(model))
        return torch.cat(
            [
                engine.attribute_boxes(it["image"][None], [MatchedBoxTarget(it["boxes"][0], int(it["labels"][0]))])
                for it in items
            ]
        )

    sims = randomization_similarity(maps, adapter.model, adapter.randomization_stages(), spearman)
    return {stage: float(s.mean()) for stage, s in sims.items()}


def _pictures(engine, data, out: Path) -> list[str]:
    from PIL import Image

    from xaiwatch.render import stack_vertical
    from xaiwatch.render.attention import attention_heads_grid, deformable_points_panel
    from xaiwatch.targets import MatchedBoxTarget

    for i in range(len(data.val_dataset)):
        item = data.val_dataset[i]
        if len(item["boxes"]) >= 3:
            break
    image = item["image"][None]
    names = data.names if hasattr(data, "names") else None
    targets = [MatchedBoxTarget(b, int(lab), conf=0.3) for b, lab in zip(item["boxes"], item["labels"])]
    found = engine.explain_boxes(image, targets)
    maps = found.maps
    points = engine.points(image, targets)
    rows = []
    for k, (t, p) in enumerate(zip(targets, points)):
        m = found.matches[k]
        label = names[t.label] if names else str(t.label)
        rows.append(
            deformable_points_panel(
                image[0],
                p.xy[-1],
                p.weights[-1],
                p.levels,
                saliency=maps[k],
                box=t.box,
                title=f"object {k} ({label}): query {p.candidate}, score {m.score:.2f}, IoU {m.iou:.2f} | last layer's "
                "points, map over all layers",
            )  # fmt: skip
        )
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / "rtdetr_deformable.png", out / "rtdetr_deformable_heads.png"]
    Image.fromarray(stack_vertical(rows)).save(paths[0])
    heads = engine.heads(image, targets[:1])[0]
    grid = attention_heads_grid(image[0], heads, box=targets[0].box, title="deformable attention per head, object 0")
    Image.fromarray(grid).save(paths[1])
    return [str(p.relative_to(ROOT)) for p in paths]


def run(quick: bool = False, imgsz: int = 128, steps: int = 400) -> dict:
    """Train, measure specificity and randomisation, write the pictures; returns the numbers."""
    from xaiwatch.explain import get_engine

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        module, data, result = _train(Path(tmp), 60 if quick else steps, imgsz)
        if steps == 0:
            module.net.eval()
        module.net.eval()
        adapter = module.xai_adapter()
        result["map"] = {}
        for method in ("deformable_attention", "attention_rollout", "attention"):
            engine = get_engine(method, adapter)
            result["map"][method] = {
                "specificity": _specificity(engine, data),
                "randomization_spearman": _randomization(adapter, method, data),
            }
            print(method, json.dumps(result["map"][method]), flush=True)
        result["pictures"] = _pictures(get_engine("deformable_attention", adapter), data, ROOT / "docs" / "images")
    return result


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--steps", type=int, default=400)
    cli = parser.parse_args()
    print(json.dumps(run(cli.quick, steps=cli.steps), indent=2))
