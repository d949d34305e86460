"""The calibration families and their shortcut kinds: tint, texture halo, on-object spot, clean twins."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from xaiwatch.core.errors import ConfigurationError
from xaiwatch.data.shapes import (
    FAMILIES,
    HALO_WIDTH,
    PALETTE,
    TINT_ALPHA,
    generate,
    generate_family,
    object_masks,
    read_specs,
    render,
    write_counterfactual,
)


def _png(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB")).astype(int)


def test_families_differ_in_classes_sizes_photos_and_shortcut():
    counts = sorted(len(f.classes) for f in FAMILIES.values())
    assert len(FAMILIES) >= 5 and counts[0] == 2 and counts[-1] == 6
    assert {f.shortcut for f in FAMILIES.values()} >= {"context", "tint", "halo", "spot"}
    lo = min(f.object_size[0] for f in FAMILIES.values())
    hi = max(f.object_size[1] for f in FAMILIES.values())
    assert lo <= 0.1 and hi >= 0.4
    assert len({f.backgrounds for f in FAMILIES.values()}) == len(FAMILIES)


def test_tint_is_the_class_colour_blended_into_the_background(tmp_path):
    generate(tmp_path, num_train=6, num_val=4, imgsz=48, classes=("circle", "square"), shortcut="tint", seed=1)
    spec = read_specs(tmp_path, "train")[0]
    cls = spec["objects"][0]["cls"]
    assert spec["cue"]["value"] == cls and {o["cls"] for o in spec["objects"]} == {cls}  # one class per image
    plain = render({**spec, "cue": None}, 48)
    tinted = _png(tmp_path / "images" / "train" / f"{spec['id']}.png")
    masks = object_masks(spec, 48).any(axis=0)
    expected = np.round((1 - TINT_ALPHA) * plain + TINT_ALPHA * np.asarray(PALETTE[cls])).clip(0, 255)
    assert np.array_equal(tinted[~masks], expected[~masks])
    assert np.array_equal(tinted[masks], plain[masks].astype(int))  # objects are drawn over the tint


def test_halo_and_spot_sit_around_and_on_each_object(tmp_path):
    generate(tmp_path / "h", num_train=4, num_val=2, imgsz=64, classes=("star", "hexagon"), shortcut="halo", seed=0)
    spec = read_specs(tmp_path / "h", "train")[0]
    obj = spec["objects"][0]
    x1, y1, x2, y2 = obj["box"]
    w = max(2, round(HALO_WIDTH * obj["size"]))
    assert obj["cue"]["region"] == [max(0, x1 - w), max(0, y1 - w), min(64, x2 + w), min(64, y2 + w)]
    img = _png(tmp_path / "h" / "images" / "train" / f"{spec['id']}.png")
    hx1, hy1, hx2, hy2 = obj["cue"]["region"]
    band = img[hy1:hy2, hx1:hx2]
    ring = np.ones(band.shape[:2], bool)
    ring[y1 - hy1 : y2 - hy1, x1 - hx1 : x2 - hx1] = False
    assert set(np.unique(band[ring])) <= {0, 255}  # black-and-white texture outside the box
    generate(tmp_path / "s", num_train=4, num_val=2, imgsz=64, classes=("circle", "ring"), shortcut="spot", seed=0)
    spec = read_specs(tmp_path / "s", "train")[0]
    obj = spec["objects"][0]
    sx1, sy1, sx2, sy2 = obj["cue"]["region"]
    bx1, by1, bx2, by2 = obj["box"]
    assert bx1 <= sx1 < sx2 <= bx2 and by1 <= sy1 < sy2 <= by2  # inside the box: the box stays the object's
    img = _png(tmp_path / "s" / "images" / "train" / f"{spec['id']}.png")
    assert (img[sy1:sy2, sx1:sx2] == np.asarray(PALETTE[obj["cls"]])).all()


@pytest.mark.parametrize("shortcut", ["tint", "halo", "spot"])
def test_counterfactual_changes_only_the_cue(tmp_path, shortcut):
    generate(tmp_path, num_train=2, num_val=6, imgsz=48, classes=("circle", "square", "triangle"), shortcut=shortcut)
    wrong = write_counterfactual(tmp_path, "wrong").parent
    for a, b in zip(read_specs(tmp_path), read_specs(wrong)):
        assert [o["box"] for o in a["objects"]] == [o["box"] for o in b["objects"]]
        for oa, ob in zip(a["objects"], b["objects"]):
            value = ob["cue"]["value"]
            assert value == (oa["cls"] + 1) % 3
        ia, ib = _png(tmp_path / "images/val" / f"{a['id']}.png"), _png(wrong / "images/val" / f"{a['id']}.png")
        if shortcut != "tint" and a["objects"]:
            changed = np.abs(ia - ib).sum(axis=2) > 0
            inside = np.zeros_like(changed)
            for o in a["objects"]:
                x1, y1, x2, y2 = o["cue"]["region"]
                inside[y1:y2, x1:x2] = True
            assert not (changed & ~inside).any()  # nothing changes outside the cue regions
    labels = sorted((tmp_path / "labels/val").iterdir())
    assert all(p.read_bytes() == (wrong / "labels/val" / p.name).read_bytes() for p in labels)


def test_clean_twin_keeps_the_cue_but_not_its_correlation(tmp_path):
    kw = dict(num_train=40, num_val=8, imgsz=48, classes=("circle", "square", "triangle"), shortcut="spot", seed=3)
    generate(tmp_path / "short", **kw)
    generate(tmp_path / "clean", correlated=False, **kw)
    short = [o for s in read_specs(tmp_path / "short", "train") for o in s["objects"]]
    clean = [o for s in read_specs(tmp_path / "clean", "train") for o in s["objects"]]
    assert all(o["cue"]["value"] == o["cls"] for o in short)
    assert 0.15 < np.mean([o["cue"]["value"] == o["cls"] for o in clean]) < 0.6  # chance is 1/3
    assert read_specs(tmp_path / "short", "val") == read_specs(tmp_path / "clean", "val")  # the same validation set
    assert json.loads((tmp_path / "clean" / "meta" / "info.json").read_text())["correlated"] is False


def test_generate_family_and_bad_input(tmp_path):
    yaml = generate_family(tmp_path / "f", "context6", num_train=3, num_val=2, imgsz=64, seed=0)
    info = json.loads((yaml.parent / "meta" / "info.json").read_text())
    fam = FAMILIES["context6"]
    assert info["names"] == list(fam.classes) and info["object_size"] == list(fam.sizes(64))
    assert {s["background"] for s in read_specs(tmp_path / "f", "train")} <= set(fam.backgrounds)
    with pytest.raises(ConfigurationError, match="unknown family 'nope'"):
        generate_family(tmp_path / "g", "nope")
    with pytest.raises(ConfigurationError, match="unknown background"):
        generate(tmp_path / "b", num_train=1, num_val=1, backgrounds=("moon",))
    with pytest.raises(ConfigurationError, match="at least 3 backgrounds"):
        generate(tmp_path / "c", num_train=1, num_val=1, shortcut="context", backgrounds=("grass", "brick"))
    with pytest.raises(ConfigurationError, match="at most 6 classes"):
        generate(
            tmp_path / "d",
            num_train=1,
            num_val=1,
            shortcut="halo",
            classes=("circle",) * 1 + tuple(s for s in ("square", "triangle", "ring", "cross", "star", "hexagon")),
        )
    with pytest.raises(ConfigurationError, match="`correlated` must be True or False"):
        generate(tmp_path / "e", num_train=1, num_val=1, correlated="yes")
