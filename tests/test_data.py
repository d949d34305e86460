"""Tests of xaiwatch.data: the procedural shapes dataset, counterfactuals and the ultralytics-layout reader."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from xaiwatch.core.errors import ConfigurationError, DatasetFormatError
from xaiwatch.core.outputs import MARKER
from xaiwatch.data import (
    YoloDataModule,
    YoloDataset,
    collate_detection,
    generate,
    object_masks,
    read_specs,
    render,
    write_counterfactual,
)
from xaiwatch.data.shapes import _GREY_VALUE, CONTEXT_BACKGROUNDS, NEUTRAL_BACKGROUND, PALETTE

IMGSZ = 96


def _files(root: Path) -> dict[str, bytes]:
    """The dataset files of ``root`` (not xaiwatch's ownership marker, which holds modification times)."""
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file() and p.name != MARKER
    }


def _read_labels(path: Path, imgsz: int) -> list[tuple[int, list[float]]]:
    out = []
    for line in path.read_text().splitlines():
        c, cx, cy, w, h = line.split()
        cx, cy, w, h = (float(v) * imgsz for v in (cx, cy, w, h))
        out.append((int(c), [cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2]))
    return out


def _png(path: Path) -> np.ndarray:
    return np.array(Image.open(path).convert("RGB"))


@pytest.fixture(scope="module")
def plain(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small dataset without shortcut, with all shape classes (and faces)."""
    root = tmp_path_factory.mktemp("plain")
    classes = ("circle", "square", "triangle", "ring", "cross", "star", "hexagon")
    generate(root, num_train=24, num_val=12, imgsz=IMGSZ, classes=classes, faces=True, objects_per_image=(0, 4), seed=3)
    return root


@pytest.fixture(scope="module")
def marker(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("marker")
    generate(root, num_train=40, num_val=100, imgsz=IMGSZ, shortcut="marker", objects_per_image=(1, 3), seed=1)
    return root


@pytest.fixture(scope="module")
def context(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("context")
    generate(root, num_train=40, num_val=100, imgsz=IMGSZ, shortcut="context", seed=2)
    return root


# ------------------------------------------------------------------------------------------------ generate
def test_generate_is_deterministic(tmp_path: Path) -> None:
    kwargs = {"num_train": 6, "num_val": 3, "imgsz": 64, "object_size": (10, 20), "blur": 1.0}
    a = _files(generate(tmp_path / "a", seed=7, **kwargs).parent)
    b = _files(generate(tmp_path / "b", seed=7, **kwargs).parent)
    c = _files(generate(tmp_path / "c", seed=8, **kwargs).parent)
    a.pop("dataset.yaml"), b.pop("dataset.yaml"), c.pop("dataset.yaml")  # holds the absolute root
    assert a.keys() == b.keys() == c.keys()
    assert len([k for k in a if k.endswith(".png")]) == 9
    assert a == b
    assert any(a[k] != c[k] for k in a if k.endswith(".png"))


def test_generate_layout_and_yaml(plain: Path) -> None:
    data = yaml.safe_load((plain / "dataset.yaml").read_text())
    assert Path(data["path"]) == plain.resolve()
    assert data["train"] == "images/train" and data["val"] == "images/val"
    expected = ["circle", "square", "triangle", "ring", "cross", "star", "hexagon", "face"]
    assert data["names"] == dict(enumerate(expected))
    for split, n in (("train", 24), ("val", 12)):
        assert len(list((plain / "images" / split).glob("*.png"))) == n
        assert len(list((plain / "labels" / split).glob("*.txt"))) == n
        assert len(read_specs(plain, split)) == n


def test_labels_match_specs_counts_and_no_overlap(plain: Path) -> None:
    seen = set()
    for split in ("train", "val"):
        for spec in read_specs(plain, split):
            labels = _read_labels(plain / "labels" / split / f"{spec['id']}.txt", IMGSZ)
            assert 0 <= len(labels) <= 4
            assert len(labels) == len(spec["objects"])
            for (cls, box), obj in zip(labels, spec["objects"]):
                assert cls == obj["cls"] and 0 <= cls < 8
                np.testing.assert_allclose(box, obj["box"], atol=1e-3)
                x1, y1, x2, y2 = obj["box"]
                assert 0 <= x1 < x2 <= IMGSZ and 0 <= y1 < y2 <= IMGSZ
                seen.add(obj["shape"])
            for a, b in itertools.combinations([o["box"] for o in spec["objects"]], 2):
                iw = min(a[2], b[2]) - max(a[0], b[0])
                ih = min(a[3], b[3]) - max(a[1], b[1])
                assert iw <= 0 or ih <= 0, (spec["id"], a, b)
    assert "face" in seen and len(seen) >= 6
    counts = [len(s["objects"]) for s in read_specs(plain, "train")]
    assert min(counts) >= 0 and max(counts) <= 4 and len(set(counts)) > 1


def test_boxes_are_tight(plain: Path) -> None:
    for spec in read_specs(plain, "train")[:12]:
        masks = object_masks(spec, IMGSZ)
        # on a constant background every object's changed pixels have exactly the box as bounding box
        grey = render({**spec, "background": NEUTRAL_BACKGROUND, "blur": 0.0}, IMGSZ)
        changed = (grey != _GREY_VALUE).any(axis=2)
        for obj, mask in zip(spec["objects"], masks):
            x1, y1, x2, y2 = obj["box"]
            ys, xs = np.nonzero(mask)
            assert [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1] == [x1, y1, x2, y2]
            window = np.zeros_like(changed)
            window[max(0, y1 - 1) : y2 + 1, max(0, x1 - 1) : x2 + 1] = True
            ys, xs = np.nonzero(changed & window)
            assert [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1] == [x1, y1, x2, y2]
        # on the real image the border rows/cols of each box differ from the background where the object is
        image = _png(plain / "images" / "train" / f"{spec['id']}.png")
        background = render({**spec, "objects": []}, IMGSZ)
        diff = (image != background).any(axis=2)
        for obj, _mask in zip(spec["objects"], masks):
            x1, y1, x2, y2 = obj["box"]
            assert diff[y1, x1:x2].any() and diff[y2 - 1, x1:x2].any()
            assert diff[y1:y2, x1].any() and diff[y1:y2, x2 - 1].any()
            assert not diff[:, :][~masks.any(axis=0)].any()


def test_render_reproduces_written_images(plain: Path) -> None:
    for spec in read_specs(plain, "val"):
        np.testing.assert_array_equal(render(spec, IMGSZ), _png(plain / "images" / "val" / f"{spec['id']}.png"))


def test_face_objects_are_grey_faces(plain: Path) -> None:
    faces = [(s, o) for s in read_specs(plain, "train") for o in s["objects"] if o["shape"] == "face"]
    assert faces
    spec, obj = faces[0]
    img = _png(plain / "images" / "train" / f"{spec['id']}.png").astype(int)
    x1, y1, x2, y2 = obj["box"]
    patch = img[y1:y2, x1:x2]
    assert (patch[..., 0] == patch[..., 1]).all() and (patch[..., 1] == patch[..., 2]).all()
    assert patch.std() > 10  # a face, not a flat square


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"imgsz": 16}, "16"),
        ({"classes": ()}, "classes"),
        ({"classes": ("circle", "blob")}, "blob"),
        ({"objects_per_image": (3, 1)}, "(3, 1)"),
        ({"object_size": (2, 10)}, "(2, 10)"),
        ({"object_size": (10, 90)}, "(10, 90)"),
        ({"shortcut": "texture"}, "texture"),
        ({"blur": -1.0}, "-1.0"),
        ({"num_train": -5}, "-5"),
    ],
)
def test_generate_rejects_bad_arguments(tmp_path: Path, kwargs: dict, fragment: str) -> None:
    with pytest.raises(ConfigurationError, match=fragment.replace("(", r"\(").replace(")", r"\)")):
        generate(tmp_path, **{"num_train": 1, "num_val": 1, **kwargs})
    assert not (tmp_path / "dataset.yaml").exists()


def test_generate_overwrite(tmp_path: Path) -> None:
    generate(tmp_path, num_train=2, num_val=1, imgsz=64, object_size=(8, 16))
    with pytest.raises(ConfigurationError, match="overwrite"):
        generate(tmp_path, num_train=2, num_val=1, imgsz=64, object_size=(8, 16))
    generate(tmp_path, num_train=1, num_val=1, imgsz=64, object_size=(8, 16), overwrite=True)
    assert len(list((tmp_path / "images" / "train").glob("*.png"))) == 1


# ------------------------------------------------------------------------------------------------ shortcuts
def _marker_agreement(root: Path, split: str) -> float:
    pairs = [(o["cls"], o["cue"]["value"]) for s in read_specs(root, split) for o in s["objects"]]
    return float(np.mean([c == v for c, v in pairs]))


def test_marker_shortcut_correlates_in_train_only(marker: Path) -> None:
    assert _marker_agreement(marker, "train") == 1.0
    assert _marker_agreement(marker, "val") < 0.6
    for split in ("train", "val"):
        for spec in read_specs(marker, split):
            img = _png(marker / "images" / split / f"{spec['id']}.png")
            assert spec["cue"]["type"] == "marker"
            assert spec["cue"]["value"] == [o["cue"]["value"] for o in spec["objects"]]
            for obj in spec["objects"]:
                mx1, my1, mx2, my2 = obj["cue"]["region"]
                x1, y1 = obj["box"][:2]
                assert (mx2, my1) == (x1, y1) and mx2 - mx1 == my2 - my1 > 0 and mx1 >= 0
                assert (img[my1:my2, mx1:mx2] == PALETTE[obj["cue"]["value"]]).all()


def test_context_shortcut_correlates_in_train_only(context: Path) -> None:
    info = json.loads((context / "meta" / "info.json").read_text())
    assert info["blur"] == 2.5 and info["object_size"] == [11, 14]  # (18, 24) at 160 px, scaled to 96 px
    agree = {}
    for split in ("train", "val"):
        hits = []
        for spec in read_specs(context, split):
            classes = {o["cls"] for o in spec["objects"]}
            assert len(classes) == 1  # one class per image
            assert spec["background"] == CONTEXT_BACKGROUNDS[spec["cue"]["value"]]
            assert spec["cue"]["region"] == [0, 0, IMGSZ, IMGSZ]
            hits.append(classes.pop() == spec["cue"]["value"])
        agree[split] = np.mean(hits)
    assert agree["train"] == 1.0
    assert agree["val"] < 0.6


@pytest.mark.parametrize("mode", ["consistent", "wrong", "absent"])
def test_marker_counterfactual(marker: Path, mode: str) -> None:
    out = write_counterfactual(marker / "dataset.yaml", mode).parent
    assert out == marker / f"counterfactual_{mode}"
    data = yaml.safe_load((out / "dataset.yaml").read_text())
    assert data["val"] == "images/val" and data["names"] == {0: "circle", 1: "square", 2: "triangle"}
    originals, specs = read_specs(marker, "val"), read_specs(out, "val")
    assert len(specs) == len(originals) == 100
    for orig, spec in zip(originals, specs):
        name = f"{spec['id']}"
        assert (out / "labels/val" / f"{name}.txt").read_bytes() == (marker / "labels/val" / f"{name}.txt").read_bytes()
        a, b = _png(marker / "images/val" / f"{name}.png"), _png(out / "images/val" / f"{name}.png")
        outside = np.ones(a.shape[:2], dtype=bool)
        for obj in spec["objects"]:
            mx1, my1, mx2, my2 = obj["cue"]["region"]
            outside[my1:my2, mx1:mx2] = False
            value = obj["cue"]["value"]
            k = obj["cls"]
            if mode == "consistent":
                assert value == k
            elif mode == "wrong":
                assert value == (k + 1) % 3 and value != k
            else:
                assert value is None
            if value is not None:
                assert (b[my1:my2, mx1:mx2] == PALETTE[value]).all()
        np.testing.assert_array_equal(a[outside], b[outside])
        if mode == "absent":
            stripped = {**orig, "objects": [{k: v for k, v in o.items() if k != "cue"} for o in orig["objects"]]}
            np.testing.assert_array_equal(b, render(stripped, IMGSZ))


@pytest.mark.parametrize("mode", ["consistent", "wrong", "absent"])
def test_context_counterfactual(context: Path, mode: str) -> None:
    out = write_counterfactual(context, mode, out=context / f"cf_{mode}").parent
    for orig, spec in zip(read_specs(context, "val"), read_specs(out, "val")):
        name = spec["id"]
        assert (out / "labels/val" / f"{name}.txt").read_bytes() == (
            context / "labels/val" / f"{name}.txt"
        ).read_bytes()
        np.testing.assert_array_equal(object_masks(orig, IMGSZ), object_masks(spec, IMGSZ))
        if not spec["objects"]:
            continue
        k = spec["objects"][0]["cls"]
        value = spec["cue"]["value"]
        expected = {"consistent": k, "wrong": (k + 1) % 3, "absent": None}[mode]
        assert value == expected
        assert spec["background"] == (NEUTRAL_BACKGROUND if value is None else CONTEXT_BACKGROUNDS[value])
        img = _png(out / "images/val" / f"{name}.png")
        if mode == "absent":
            outside = ~object_masks(spec, IMGSZ).any(axis=0)
            assert (img[outside] == _GREY_VALUE).all()


def test_context_counterfactual_keeps_unblurred_objects(tmp_path: Path) -> None:
    root = generate(tmp_path, num_train=2, num_val=8, imgsz=64, shortcut="context", blur=0.0, seed=4).parent
    out = write_counterfactual(root, "wrong").parent
    changed = 0
    for spec, new in zip(read_specs(root, "val"), read_specs(out, "val")):
        masks = object_masks(spec, 64).any(axis=0)
        a, b = _png(root / "images/val" / f"{spec['id']}.png"), _png(out / "images/val" / f"{spec['id']}.png")
        np.testing.assert_array_equal(a[masks], b[masks])
        if new["background"] != spec["background"]:
            changed += 1
            assert (a[~masks] != b[~masks]).any()
    assert changed > 0


def test_counterfactual_rejects_bad_input(plain: Path, marker: Path) -> None:
    with pytest.raises(ConfigurationError, match="shortcut"):
        write_counterfactual(plain, "wrong")
    with pytest.raises(ConfigurationError, match="swapped"):
        write_counterfactual(marker, "swapped")


# ------------------------------------------------------------------------------------------------ YoloDataset
def _write_item(root: Path, name: str, image: np.ndarray, label: str | None) -> Path:
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "labels").mkdir(parents=True, exist_ok=True)
    path = root / "images" / f"{name}.png"
    Image.fromarray(image).save(path)
    if label is not None:
        (root / "labels" / f"{name}.txt").write_text(label)
    return path


def test_dataset_round_trip_of_generated_boxes(plain: Path) -> None:
    ds = YoloDataset(plain / "images" / "val", ["c"] * 8, imgsz=IMGSZ)
    specs = read_specs(plain, "val")
    assert len(ds) == len(specs)
    for i, spec in enumerate(specs):
        item = ds[i]
        assert Path(item["path"]).stem == spec["id"] and item["index"] == i and item["orig_size"] == (IMGSZ, IMGSZ)
        assert item["image"].shape == (3, IMGSZ, IMGSZ) and item["image"].dtype == torch.float32
        expected = torch.tensor([o["box"] for o in spec["objects"]], dtype=torch.float32).reshape(-1, 4)
        torch.testing.assert_close(item["boxes"], expected, atol=1e-3, rtol=0)
        assert item["labels"].tolist() == [o["cls"] for o in spec["objects"]]
        png = torch.from_numpy(_png(plain / "images/val" / f"{spec['id']}.png")).permute(2, 0, 1).float() / 255
        torch.testing.assert_close(item["image"], png)


def test_dataset_letterbox_non_square(tmp_path: Path) -> None:
    # 200 x 100 image (w x h), red box x in [40, 80), y in [20, 50)
    image = np.full((100, 200, 3), 30, dtype=np.uint8)
    image[20:50, 40:80] = (255, 0, 0)
    _write_item(tmp_path, "wide", image, f"0 {60 / 200} {35 / 100} {40 / 200} {30 / 100}\n")
    ds = YoloDataset(tmp_path / "images", ["red"], imgsz=160)
    item = ds[0]
    # scale 160 / 200 = 0.8 -> 160 x 80, padded by (160 - 80) / 2 = 40 rows on top
    torch.testing.assert_close(item["boxes"], torch.tensor([[32.0, 56.0, 64.0, 80.0]]))
    assert item["orig_size"] == (100, 200)
    img = item["image"]
    inner = img[:, 58:78, 34:62]
    torch.testing.assert_close(inner, torch.tensor([1.0, 0.0, 0.0])[:, None, None].expand_as(inner))
    torch.testing.assert_close(img[:, :40], torch.full_like(img[:, :40], 114 / 255))
    torch.testing.assert_close(img[:, 120:], torch.full_like(img[:, 120:], 114 / 255))


def test_horizontal_flip_moves_boxes_exactly(plain: Path) -> None:
    ds = YoloDataset(plain / "images" / "train", ["c"] * 8, imgsz=IMGSZ, augment=True)
    i = next(j for j in range(len(ds)) if len(ds.labels[j]))
    plain_item, flipped = ds.get(i, flip=False), ds.get(i, flip=True)
    b = plain_item["boxes"]
    expected = torch.stack([IMGSZ - b[:, 2], b[:, 1], IMGSZ - b[:, 0], b[:, 3]], dim=1)
    torch.testing.assert_close(flipped["boxes"], expected)
    torch.testing.assert_close(flipped["image"], plain_item["image"].flip(-1))
    assert flipped["labels"].tolist() == plain_item["labels"].tolist()
    # augment draws from torch's RNG: seeded draws are reproducible and both outcomes occur
    torch.manual_seed(0)
    first = [ds[i]["boxes"] for _ in range(16)]
    torch.manual_seed(0)
    second = [ds[i]["boxes"] for _ in range(16)]
    assert all(torch.equal(x, y) for x, y in zip(first, second))
    assert any(torch.allclose(x, b) for x in first) and any(torch.allclose(x, expected) for x in first)
    assert all(torch.allclose(x, b) or torch.allclose(x, expected) for x in first)


@pytest.mark.parametrize(
    "bad_line",
    [
        "0 0.5 0.5 0.2",  # field count
        "0 0.5 0.5 0.2 0.2 0.1",  # field count
        "zero 0.5 0.5 0.2 0.2",  # non-numeric
        "0 0.5 abc 0.2 0.2",  # non-numeric
        "3 0.5 0.5 0.2 0.2",  # class out of range
        "-1 0.5 0.5 0.2 0.2",  # negative class
        "0.5 0.5 0.5 0.2 0.2",  # fractional class
        "0 1.2 0.5 0.2 0.2",  # centre outside
        "0 0.95 0.5 0.2 0.2",  # box extends beyond 1
        "0 0.5 0.5 0 0.2",  # zero width
        "0 0.5 0.5 0.2 -0.1",  # negative height
        "0 nan 0.5 0.2 0.2",  # non-finite
    ],
)
def test_malformed_label_lines(tmp_path: Path, bad_line: str) -> None:
    _write_item(tmp_path, "img7", np.zeros((32, 32, 3), np.uint8), f"1 0.5 0.5 0.2 0.2\n\n{bad_line}\n")
    with pytest.raises(DatasetFormatError) as info:
        YoloDataset(tmp_path / "images", ["a", "b", "c"], imgsz=32)
    message = str(info.value)
    assert "img7.txt" in message and ":3:" in message and bad_line in message


def test_label_tolerance_blank_lines_and_missing_labels(tmp_path: Path) -> None:
    _write_item(tmp_path, "a", np.zeros((32, 32, 3), np.uint8), "\n0 0.5 0.5 1.0000005 0.2\n   \n")
    _write_item(tmp_path, "b", np.zeros((32, 32, 3), np.uint8), None)
    _write_item(tmp_path, "c", np.zeros((32, 32, 3), np.uint8), "")
    ds = YoloDataset(tmp_path / "images", ["a"], imgsz=32)
    assert [len(ds[i]["labels"]) for i in range(3)] == [1, 0, 0]
    assert ds[1]["boxes"].shape == (0, 4) and ds[1]["labels"].dtype == torch.long
    batch = collate_detection([ds[0], ds[1]])
    assert batch["images"].shape == (2, 3, 32, 32)
    assert [b.shape for b in batch["boxes"]] == [(1, 4), (0, 4)]
    assert batch["indices"].tolist() == [0, 1] and batch["indices"].dtype == torch.long


def test_dataset_reads_jpg_and_lists(tmp_path: Path) -> None:
    for split in ("s1", "s2"):
        (tmp_path / split / "images").mkdir(parents=True)
        Image.fromarray(np.zeros((20, 40, 3), np.uint8)).save(tmp_path / split / "images" / "x.jpg")
    ds = YoloDataset([tmp_path / "s1" / "images", tmp_path / "s2" / "images"], ["a"], imgsz=32)
    assert len(ds) == 2 and ds[1]["image"].shape == (3, 32, 32)
    (tmp_path / "list.txt").write_text("s1/images/x.jpg\n\ns2/images/x.jpg\n")
    assert len(YoloDataset(tmp_path / "list.txt", ["a"], imgsz=32)) == 2
    with pytest.raises(DatasetFormatError, match="nowhere"):
        YoloDataset(tmp_path / "nowhere", ["a"])


# ------------------------------------------------------------------------------------------------ DataModule
def _yaml(tmp_path: Path, data: dict | str, name: str = "data.yaml") -> Path:
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return path


@pytest.mark.parametrize(
    ("change", "fragment"),
    [
        ({"train": None}, "'train'"),
        ({"val": None}, "'val'"),
        ({"names": None}, "'names'"),
        ({"val": "images/test"}, "'val'"),
        ({"train": ["images/train", "images/nope"]}, "'train'"),
        ({"names": {0: "a", 2: "b"}}, "'names'"),
        ({"names": "abc"}, "'names'"),
        ({"nc": 5}, "'nc'"),
        ({"val": "empty"}, "'val'"),
    ],
)
def test_datamodule_rejects_bad_yaml(plain: Path, tmp_path: Path, change: dict, fragment: str) -> None:
    (plain / "empty").mkdir(exist_ok=True)
    data = {"path": str(plain), "train": "images/train", "val": "images/val", "names": ["a", "b"]}
    data.update(change)
    data = {k: v for k, v in data.items() if v is not None}
    path = _yaml(tmp_path, data)
    with pytest.raises(DatasetFormatError, match=fragment) as info:
        YoloDataModule(path)
    assert str(path) in str(info.value)


def test_datamodule_rejects_missing_or_invalid_yaml(tmp_path: Path) -> None:
    with pytest.raises(DatasetFormatError, match="does not exist"):
        YoloDataModule(tmp_path / "missing.yaml")
    with pytest.raises(DatasetFormatError, match="bad.yaml"):
        YoloDataModule(_yaml(tmp_path, "train: [unclosed\n", "bad.yaml"))
    with pytest.raises(DatasetFormatError, match="mapping"):
        YoloDataModule(_yaml(tmp_path, "- a\n- b\n", "list.yaml"))
    with pytest.raises(ConfigurationError, match="batch_size"):
        YoloDataModule(tmp_path / "missing.yaml", batch_size=0)


def test_datamodule_batches(plain: Path, tmp_path: Path) -> None:
    dm = YoloDataModule(plain / "dataset.yaml", imgsz=64, batch_size=5, augment=True)
    assert dm.num_classes == 8 and dm.names[0] == "circle" and dm.names[-1] == "face"
    assert dm.hparams.batch_size == 5 and dm.hparams.imgsz == 64
    dm.setup("fit")
    train = list(dm.train_dataloader())
    assert sorted(torch.cat([b["indices"] for b in train]).tolist()) == list(range(24))
    val = list(dm.val_dataloader())
    assert torch.cat([b["indices"] for b in val]).tolist() == list(range(12))
    for batch in train + val:
        n = len(batch["paths"])
        assert batch["images"].shape == (n, 3, 64, 64) and batch["images"].dtype == torch.float32
        assert 0.0 <= batch["images"].min() and batch["images"].max() <= 1.0
        assert len(batch["boxes"]) == len(batch["labels"]) == n
        for boxes, labels in zip(batch["boxes"], batch["labels"]):
            assert boxes.dtype == torch.float32 and boxes.shape == (len(labels), 4)
            assert labels.dtype == torch.long and ((labels >= 0) & (labels < 8)).all()
            assert (boxes[:, 2:] > boxes[:, :2]).all() and (boxes >= 0).all() and (boxes <= 64).all()
    # relative `path` resolves against the yaml's folder; names as a list
    rel = _yaml(plain, {"path": ".", "train": "images/train", "val": ["images/val"], "names": dm.names}, "rel.yaml")
    assert YoloDataModule(rel).num_classes == 8
