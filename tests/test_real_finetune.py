"""Real checkpoints and real images (the pinned wheels): the deepforest tiles, the kept / re-initialised report of
ABD.pt and the fall detector, and ``xaiwatch demo --real`` end to end on a tiny budget (marker ``real``)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from xaiwatch.core.errors import ConfigurationError

pytestmark = pytest.mark.real


def test_deepforest_annotations_and_tiles(tmp_path: Path) -> None:
    from xaiwatch.data import YoloDataModule
    from xaiwatch.data.tiles import make_tiles
    from xaiwatch.demo_real import deepforest_annotations, write_deepforest_tiles

    anns = deepforest_annotations()
    assert {a.image_path.name: len(a) for a in anns} == {
        "2019_YELL_2_528000_4978000_image_crop2.png": 574,
        "2019_YELL_2_541000_4977000_image_crop.png": 279,
        "OSBS_029.png": 61,
        "SOAP_061.png": 37,
    }
    assert all(a.image_path.suffix == ".png" for a in anns)
    tiles = make_tiles(anns, tile=320, min_visible=0.5)
    # 2299 x 2472 -> 8 x 8 tiles, 1249 x 1035 -> 4 x 4, the two 400 x 400 images -> 2 x 2 each
    assert len(tiles) == 64 + 16 + 4 + 4
    for t in tiles:
        assert (t.boxes[:, :2] >= 0).all() and (t.boxes[:, 2] <= t.width).all() and (t.boxes[:, 3] <= t.height).all()
    yaml_path = write_deepforest_tiles(tmp_path / "data", tile=320, seed=0)
    dm = YoloDataModule(str(yaml_path), imgsz=320, augment=False)
    dm.setup("fit")
    assert dm.names == ["tree"]
    assert (len(dm.train_dataset), len(dm.val_dataset)) == (70, 18)
    assert sum(len(x) for x in dm.train_dataset.labels) + sum(len(x) for x in dm.val_dataset.labels) == sum(
        len(t.boxes) for t in tiles
    )


def test_real_checkpoints_kept_and_reinitialised() -> None:
    from xaiwatch.demo_real import real_module

    abd = real_module("yolov8n-abd").weights_report
    # YOLOv8n's class branch has hidden width max(64, min(nc, 100)): 100 for 147 classes, 64 for 1, so all of cv3
    # (36 tensors plus its 6 BatchNorm step counters) is re-initialised
    assert (len(abd.kept), len(abd.reinitialised), abd.total) == (313, 42, 355)
    assert abd.reinitialised == abd.class_branch and abd.source_classes == 147
    fall = real_module("yolov8s-fall").weights_report
    # YOLOv8s: hidden width 128 either way, only the three output 1x1 convs change
    assert (len(fall.kept), abd.total) == (349, 355) and fall.unexpected == []
    assert fall.source_names == ["Normal", "Fall"]
    assert fall.reinitialised == [f"model.22.cv3.{i}.2.{p}" for i in range(3) for p in ("weight", "bias")]


def test_fall_detector_into_yolov8n_is_refused() -> None:
    from xaiwatch.data.real import fall_detector_weights
    from xaiwatch.models import YOLOv8Module

    with pytest.raises(ConfigurationError, match=r"kept 40 of 355 .*first convolution has 32 output channels"):
        YOLOv8Module("yolov8n.yaml", num_classes=1, weights=str(fall_detector_weights()), trust_pickle=True)


def _acc(log_dir: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir), size_guidance={"images": 0, "scalars": 0})
    acc.Reload()
    return acc


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_demo_real_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """One short epoch from ABD.pt with the demo preset: mAP logged, pictures in TensorBoard, maps on the trees."""
    from xaiwatch.checks import energy_in_box
    from xaiwatch.core.context import explaining
    from xaiwatch.demo_real import run_real_demo
    from xaiwatch.explain import get_engine
    from xaiwatch.targets import MatchedBoxTarget

    out = tmp_path / "out"
    out.mkdir()
    (out / "my_notes.txt").write_text("the user's own file")
    (out / "tensorboard").mkdir()
    (out / "tensorboard" / "old_run.txt").write_bytes(b"\x00user bytes")
    user = _snapshot(out)
    result = run_real_demo(out, epochs=1, imgsz=160, batch_size=8, limit_train_batches=4, accelerator="cpu")
    printed = capsys.readouterr().out
    assert f"tensorboard --logdir {out.resolve()}" in printed
    assert "kept 313 of 355 tensors" in printed
    after = _snapshot(out)
    assert {k: after[k] for k in user} == user  # nothing the user had is changed

    acc = _acc(result.log_dir)
    maps50 = [e.value for e in acc.Scalars("val/map50")]
    assert len(maps50) == 1 and 0 <= maps50[0] <= 1
    images = set(acc.Tags()["images"])
    assert {f"explain/{m}/probe_{i:02d}" for m in ("saliency", "layer_cam") for i in range(8)} <= images
    steps = [e.step for e in acc.Images("explain/saliency/probe_00")]
    assert steps[0] == 0 and len(steps) == 2 and steps[1] > 0  # before training and after the epoch (global step)
    assert len(acc.Scalars("saliency/energy_concentration/saliency")) == 1  # demo.yaml logs it every epoch

    # the saliency map of each validation tile's largest tree: more energy in the tree's box than its area share
    module, dm = result.module, result.datamodule
    adapter = module.xai_adapter()
    engine = get_engine("saliency", adapter)
    ds = dm.val_dataset
    items = [ds[i] for i in range(len(ds)) if len(ds[i]["boxes"])][:8]
    images_t = torch.stack([it["image"] for it in items])
    tracked = []
    for it in items:
        b = it["boxes"]
        tracked.append(b[((b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])).argmax()])
    boxes = torch.stack(tracked)
    with explaining(module.net):
        maps = engine.attribute(images_t, [MatchedBoxTarget(b.tolist(), 0) for b in boxes])
    assert torch.isfinite(maps).all()
    energy = energy_in_box(maps, boxes).numpy()
    share = (((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])) / images_t.shape[-1] ** 2).numpy()
    # measured here after 4 steps at 160 px: 7 of 8 tiles, mean energy 0.094 vs mean area share 0.052 (1.8x)
    assert (energy > share).sum() >= 6 and energy.mean() > 1.5 * share.mean(), (energy, share)

    # a second run into the same folder rewrites only its own data files
    with pytest.raises(ConfigurationError, match="not empty and was not written by xaiwatch"):
        (tmp_path / "foreign" / "data").mkdir(parents=True)
        (tmp_path / "foreign" / "data" / "x.png").write_bytes(b"mine")
        run_real_demo(tmp_path / "foreign", epochs=1)
    assert (tmp_path / "foreign" / "data" / "x.png").read_bytes() == b"mine"
    assert not (tmp_path / "foreign" / "tensorboard").exists()
    assert np.isfinite(result.metrics["val/map50"])
