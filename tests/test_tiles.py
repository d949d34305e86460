"""VOC reader and tile converter: box clipping / drop rule, seeded split, round trip through YoloDataModule, and a
writer that never touches files it did not write."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from xaiwatch.core.errors import ConfigurationError, DatasetFormatError
from xaiwatch.data import YoloDataModule
from xaiwatch.data.tiles import (
    MARKER,
    clip_boxes,
    make_tiles,
    overlap_groups,
    split_tiles,
    tile_origins,
    write_tiled_dataset,
)
from xaiwatch.data.voc import VocAnnotation, read_voc, read_voc_folder


def _voc_xml(filename: str, objects: list[tuple[str, list[float]]], size: tuple[int, int] | None = None) -> str:
    parts = [f"<annotation><filename>{filename}</filename>"]
    if size:
        parts.append(f"<size><width>{size[0]}</width><height>{size[1]}</height><depth>3</depth></size>")
    for name, (x1, y1, x2, y2) in objects:
        parts.append(
            f"<object><name>{name}</name><difficult>0</difficult><bndbox><xmin>{x1}</xmin><ymin>{y1}</ymin>"
            f"<xmax>{x2}</xmax><ymax>{y2}</ymax></bndbox></object>"
        )
    return "".join(parts) + "</annotation>"


@pytest.fixture
def voc_dir(tmp_path: Path) -> Path:
    """One 100 x 70 noise image with 4 VOC boxes of 2 classes."""
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (70, 100, 3), dtype=np.uint8)).save(tmp_path / "scene.png")
    objects = [
        ("oak", [5, 5, 20, 25]),
        ("pine", [35, 10, 60, 30]),
        ("oak", [70, 40, 98, 68]),
        ("pine", [44, 44, 56, 60]),
    ]
    (tmp_path / "scene.xml").write_text(_voc_xml("scene.png", objects, (100, 70)))
    return tmp_path


# ------------------------------------------------------------------------------------------------------ VOC reader
def test_read_voc_values(voc_dir: Path) -> None:
    ann = read_voc(voc_dir / "scene.xml")
    assert ann.image_path == voc_dir / "scene.png"
    assert (ann.width, ann.height) == (100, 70)
    assert ann.names == ["oak", "pine", "oak", "pine"]
    np.testing.assert_array_equal(ann.boxes[1], [35, 10, 60, 30])
    assert ann.difficult.tolist() == [False] * 4


def test_read_voc_finds_image_by_stem(tmp_path: Path) -> None:
    """deepforest's OSBS_029.xml names a .tif while a .png of the same stem sits next to it."""
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    (tmp_path / "a.xml").write_text(_voc_xml("a.tif", [("t", [1, 1, 4, 4])]))
    assert read_voc(tmp_path / "a.xml").image_path == tmp_path / "a.png"
    (tmp_path / "b.xml").write_text(_voc_xml("missing.jpg", [("t", [1, 1, 4, 4])]))
    with pytest.raises(DatasetFormatError, match=r"b\.xml.*<filename> is 'missing\.jpg'.*image_dir"):
        read_voc(tmp_path / "b.xml")


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("<annotation><filename>a.png", r"bad\.xml: not well-formed xml"),
        ("<doc><filename>a.png</filename></doc>", r"bad\.xml: the root element is <doc>, expected <annotation>"),
        ("<annotation><object><name>t</name></object></annotation>", r"bad\.xml: <annotation> has no <filename>"),
        (
            "<annotation><filename>a.png</filename><object><name>t</name></object></annotation>",
            r"bad\.xml: <object> #1 \('t'\) has no <bndbox>",
        ),
        (
            "<annotation><filename>a.png</filename><object><name>t</name><bndbox><xmin>1</xmin><ymin>x</ymin>"
            "<xmax>3</xmax><ymax>4</ymax></bndbox></object></annotation>",
            r"bad\.xml: <object> #1 <bndbox> <ymin> is 'x', expected a number",
        ),
        (
            "<annotation><filename>a.png</filename><object><name>t</name><bndbox><xmin>1</xmin><ymin>2</ymin>"
            "<xmax>3</xmax></bndbox></object></annotation>",
            r"bad\.xml: <object> #1 <bndbox> has no <ymax>",
        ),
        (
            "<annotation><filename>a.png</filename><object><name>t</name><bndbox><xmin>5</xmin><ymin>2</ymin>"
            "<xmax>3</xmax><ymax>4</ymax></bndbox></object></annotation>",
            r"bad\.xml: <object> #1 <bndbox> is xmin=5 .* expected xmax > xmin",
        ),
    ],
)
def test_read_voc_bad_input(tmp_path: Path, text: str, match: str) -> None:
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    (tmp_path / "bad.xml").write_text(text)
    with pytest.raises(DatasetFormatError, match=match):
        read_voc(tmp_path / "bad.xml")


def test_read_voc_folder_bad_input(tmp_path: Path) -> None:
    with pytest.raises(DatasetFormatError, match="does not exist"):
        read_voc_folder(tmp_path / "nope")
    with pytest.raises(DatasetFormatError, match="holds no .xml file"):
        read_voc_folder(tmp_path)


# ------------------------------------------------------------------------------------------------ tiling rules
def test_tile_origins() -> None:
    assert tile_origins(1000, 320, 320) == [0, 320, 640, 680]
    assert tile_origins(640, 320, 320) == [0, 320]
    assert tile_origins(400, 320, 160) == [0, 80]
    assert tile_origins(300, 320, 320) == [0]


def test_clip_boxes_hand_computed() -> None:
    boxes = np.array(
        [
            [10, 10, 30, 30],  # inside: kept as is
            [90, 0, 110, 10],  # 100 of 200 px inside = 0.5: kept, clipped to x2 = 100
            [95, 0, 115, 10],  # 50 of 200 = 0.25: dropped
            [-10, -10, 10, 30],  # 10 * 30 = 300 of 800 = 0.375: dropped at 0.5, kept at 0.3
            [120, 120, 130, 130],  # outside: dropped
        ],
        dtype=float,
    )
    kept, mask = clip_boxes(boxes, (0, 0, 100, 100), 0.5)
    assert mask.tolist() == [True, True, False, False, False]
    np.testing.assert_array_equal(kept, [[10, 10, 30, 30], [90, 0, 100, 10]])
    kept, mask = clip_boxes(boxes, (0, 0, 100, 100), 0.3)
    assert mask.tolist() == [True, True, False, True, False]
    np.testing.assert_array_equal(kept[2], [0, 0, 10, 30])
    # a window not at the origin: 20 x 20 of 20 x 30 visible (0.667), shifted to window coordinates
    kept, mask = clip_boxes(np.array([[60.0, 40, 80, 70]]), (50, 50, 150, 150), 0.5)
    np.testing.assert_array_equal(kept, [[10, 0, 30, 20]])
    kept, mask = clip_boxes(np.array([[60.0, 40, 80, 70]]), (50, 50, 150, 150), 0.7)
    assert kept.shape == (0, 4) and not mask.any()


def test_make_tiles_boxes_and_classes(voc_dir: Path) -> None:
    ann = read_voc(voc_dir / "scene.xml")
    tiles = make_tiles([ann], tile=50, stride=50, min_visible=0.5, names=["oak", "pine"], single_class=False)
    assert [(t.x0, t.y0) for t in tiles] == [(0, 0), (50, 0), (0, 20), (50, 20)]
    first = tiles[0]  # window (0, 0, 50, 50): oak inside; pine [35,10,60,30] 15/25 = 0.6 visible; pine [44,44,56,60]
    # 6 * 6 = 36 of 12 * 16 = 192 -> dropped
    np.testing.assert_array_equal(first.boxes, [[5, 5, 20, 25], [35, 10, 50, 30]])
    assert first.labels.tolist() == [0, 1]
    last = tiles[3]  # window (50, 20, 100, 70): oak [70,40,98,68] inside -> [20,20,48,48]; pine 10/25 -> dropped;
    # pine [44,44,56,60] 6/12 = 0.5 -> kept, [0, 24, 6, 40]
    np.testing.assert_array_equal(last.boxes, [[20, 20, 48, 48], [0, 24, 6, 40]])
    assert last.labels.tolist() == [0, 1]
    with pytest.raises(ConfigurationError, match=r"classes \['pine'\] not in `names`"):
        make_tiles([ann], tile=50, names=["oak"], single_class=False)
    with pytest.raises(ConfigurationError, match="`min_visible` must be a fraction"):
        make_tiles([ann], min_visible=0)
    with pytest.raises(ConfigurationError, match="`stride` must be a positive integer"):
        make_tiles([ann], stride=0)


def test_make_tiles_size_mismatch(voc_dir: Path) -> None:
    (voc_dir / "scene.xml").write_text(_voc_xml("scene.png", [("oak", [1, 1, 5, 5])], (200, 70)))
    with pytest.raises(DatasetFormatError, match=r"<size> says 200 x 70 but .*scene\.png is 100 x 70"):
        make_tiles([read_voc(voc_dir / "scene.xml")])


def test_split_deterministic() -> None:
    a, b = split_tiles(81, 0.2, seed=3), split_tiles(81, 0.2, seed=3)
    np.testing.assert_array_equal(a, b)
    assert a.sum() == 16
    assert not np.array_equal(a, split_tiles(81, 0.2, seed=4))
    assert split_tiles(2, 0.01, seed=0).tolist().count(True) == 1  # both sides non-empty
    with pytest.raises(ConfigurationError, match="`val_fraction` must be in"):
        split_tiles(10, 1.0, seed=0)


def test_overlapping_tiles_stay_in_one_split(voc_dir: Path, tmp_path: Path) -> None:
    ann = read_voc(voc_dir / "scene.xml")
    tiles = make_tiles([ann], tile=48, stride=48)  # x: 0, 48, 52 (flush); y: 0, 22 (flush)
    assert [(t.x0, t.y0) for t in tiles] == [(0, 0), (48, 0), (52, 0), (0, 22), (48, 22), (52, 22)]
    groups = overlap_groups(tiles)
    assert groups.tolist() == [0, 1, 1, 0, 1, 1]
    for seed in range(5):
        mask = split_tiles(len(tiles), 0.3, seed, groups=groups)
        assert 0 < mask.sum() < len(tiles)
        assert all(len(set(mask[groups == g].tolist())) == 1 for g in np.unique(groups))
    yaml_path = write_tiled_dataset([ann], tmp_path / "t", tile=48, stride=48, val_fraction=0.3)
    dm = YoloDataModule(str(yaml_path), imgsz=48)
    dm.setup("fit")
    val_x = {int(Path(p).stem.split("_x")[1].split("_")[0]) for p in dm.val_dataset.image_paths}
    train_x = {int(Path(p).stem.split("_x")[1].split("_")[0]) for p in dm.train_dataset.image_paths}
    assert val_x.isdisjoint(train_x) and (val_x == {0} or train_x == {0})
    with pytest.raises(ConfigurationError, match="all tiles overlap each other"):
        write_tiled_dataset([ann], tmp_path / "u", tile=48, stride=40)
    with pytest.raises(ConfigurationError, match="`groups` must have one entry per tile"):
        split_tiles(3, 0.5, 0, groups=np.zeros(2))


# ------------------------------------------------------------------------------------------------- the writer
def test_round_trip_through_datamodule(voc_dir: Path, tmp_path: Path) -> None:
    ann = read_voc(voc_dir / "scene.xml")
    out = tmp_path / "tiles"
    yaml_path = write_tiled_dataset(
        [ann], out, tile=48, stride=40, val_fraction=0.4, seed=1, single_class=None, separate_overlaps=False
    )
    tiles = {t.name: t for t in make_tiles([ann], 48, 40, 0.5, names=["oak", "pine"], single_class=False)}
    dm = YoloDataModule(str(yaml_path), imgsz=48, batch_size=2, augment=False)
    dm.setup("fit")
    assert dm.names == ["oak", "pine"]
    seen = []
    for ds in (dm.train_dataset, dm.val_dataset):
        for i in range(len(ds)):
            item = ds[i]
            t = tiles[Path(item["path"]).stem]
            np.testing.assert_allclose(item["boxes"].numpy(), t.boxes, atol=1e-3)
            assert item["labels"].tolist() == t.labels.tolist()
            crop = np.asarray(Image.open(voc_dir / "scene.png").convert("RGB"))[t.y0 : t.y0 + 48, t.x0 : t.x0 + 48]
            np.testing.assert_allclose(item["image"].numpy().transpose(1, 2, 0), crop / 255.0, atol=1e-6)
            seen.append(t.name)
    assert sorted(seen) == sorted(tiles)  # (0, 40, 52) x (0, 22): 6 tiles, each once
    assert len(dm.val_dataset) == 2
    records = json.loads((out / "tiles.json").read_text())
    assert {r["name"]: r["split"] for r in records} == {
        Path(p).stem: s for s, ds in (("train", dm.train_dataset), ("val", dm.val_dataset)) for p in ds.image_paths
    }


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_writer_refuses_foreign_folder(voc_dir: Path, tmp_path: Path) -> None:
    ann = read_voc(voc_dir / "scene.xml")
    user = tmp_path / "mine"
    (user / "images" / "train").mkdir(parents=True)
    (user / "images" / "train" / "photo.png").write_bytes(b"\x89PNG user bytes")
    (user / "dataset.yaml").write_text("my: own\n")
    before = _snapshot(user)
    with pytest.raises(ConfigurationError, match=f"not empty and was not written by xaiwatch \\(no {MARKER}"):
        write_tiled_dataset([ann], user, tile=48)
    assert _snapshot(user) == before


def test_writer_rewrites_only_its_own_files(voc_dir: Path, tmp_path: Path) -> None:
    ann = read_voc(voc_dir / "scene.xml")
    out = tmp_path / "tiles"
    write_tiled_dataset([ann], out, tile=48, stride=40, separate_overlaps=False)
    old_names = {p.name for p in (out / "labels").rglob("*.txt")}
    # the user adds files inside the folder xaiwatch owns, one of them next to the tiles
    (out / "notes.txt").write_text("keep me")
    (out / "images" / "train" / "extra.png").write_bytes(b"user image bytes")
    user_files = {k: v for k, v in _snapshot(out).items() if k in ("notes.txt", "images/train/extra.png")}
    write_tiled_dataset([ann], out, tile=50, stride=50)
    after = _snapshot(out)
    assert {k: after[k] for k in user_files} == user_files
    new_names = {p.name for p in (out / "labels").rglob("*.txt")}
    assert new_names == {"scene_x0_y0.txt", "scene_x50_y0.txt", "scene_x0_y20.txt", "scene_x50_y20.txt"}
    assert not (old_names - new_names) & {Path(k).name for k in after}  # the 48 px tiles are gone
    assert "notes.txt" not in json.loads((out / MARKER).read_text())["files"]


def test_writer_bad_input(voc_dir: Path, tmp_path: Path) -> None:
    ann = read_voc(voc_dir / "scene.xml")
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigurationError, match="exists and is not a folder"):
        write_tiled_dataset([ann], tmp_path / "file")
    with pytest.raises(ConfigurationError, match=r"only 1 tile\(s\)"):
        write_tiled_dataset([ann], tmp_path / "one", tile=200)
    assert not (tmp_path / "one").exists()


def test_voc_annotation_len() -> None:
    ann = VocAnnotation(Path("a.xml"), Path("a.png"), None, None, np.zeros((2, 4)), ["a", "b"], np.zeros(2, bool))
    assert len(ann) == 2


def test_writer_never_overwrites_a_user_file_in_its_folder(voc_dir: Path, tmp_path: Path) -> None:
    ann = read_voc(voc_dir / "scene.xml")
    out = tmp_path / "tiles"
    write_tiled_dataset([ann], out, tile=50, stride=50)
    (out / "labels" / "train").mkdir(parents=True, exist_ok=True)
    # the user drops a file where a tile of another split would go (not listed in the marker)
    target = out / "labels" / "train" / "scene_x0_y0.txt"
    listed = json.loads((out / MARKER).read_text())["files"]
    if "labels/train/scene_x0_y0.txt" in listed:
        target = out / "labels" / "val" / "scene_x0_y0.txt"
        target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text("0 0.5 0.5 0.1 0.1  # mine\n")
    for seed in range(6):  # some seed puts that tile in the user's file's split
        try:
            write_tiled_dataset([ann], out, tile=50, stride=50, seed=seed)
        except ConfigurationError as err:
            assert "exists and was not written by xaiwatch" in str(err)
            break
    else:
        pytest.fail("no seed put the tile where the user's file is")
    assert target.read_text() == "0 0.5 0.5 0.1 0.1  # mine\n"
