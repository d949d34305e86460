"""A procedural detection dataset ("shapes on photographs") written to disk in the ultralytics layout.

:func:`generate` writes::

    root/dataset.yaml                    # path, train: images/train, val: images/val, names: {0: circle, ...}
    root/images/{train,val}/000000.png
    root/labels/{train,val}/000000.txt   # "class cx cy w h", normalised, 6 decimals; empty when no objects
    root/meta/{train,val}.json           # the render spec of every image (see below)
    root/meta/info.json                  # the arguments of the generator

Every image is a pure function of a JSON-serialisable *spec* (see :func:`render`), so the same image can be
re-rendered with a changed cue (:func:`write_counterfactual`). A spec looks like::

    {
        "id": "000000",
        "background": "grass",            # a photograph bundled with scikit-image, or "grey"
        "crop": [fx, fy, scale],           # crop origin as a fraction of the free range, crop side = scale * imgsz
        "blur": 0.0,                       # Gaussian sigma applied inside the object masks
        "objects": [
            {"cls": 0, "shape": "circle", "size": 30, "box": [x1, y1, x2, y2], "color": [r, g, b],
             "rotation": 12.5, "cue": {...}},          # "face": int for the "face" shape; "cue" only with a shortcut
        ],
        "cue": {"type": "context", "variant": "planted", "value": 2, "region": [0, 0, 160, 160]} or None,
    }

Boxes are in pixels with exclusive ``x2, y2`` (pixel ``i`` covers ``[i, i + 1)``) and are the exact tight extent
of the object's mask. With ``shortcut="marker"`` the image-level ``"cue"`` holds lists (one value and one region
per object, in object order) and every object has its own scalar ``"cue"`` entry; with ``shortcut="context"``
``"value"`` is the class index whose background is shown and ``"region"`` is the whole image. A cue ``"value"``
of ``None`` means the cue is absent.
"""

from __future__ import annotations

import colorsys
import functools
import json
import math
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from xaiwatch.core.errors import ConfigurationError, DatasetFormatError
from xaiwatch.core.outputs import claim_files, prepare_output_folder, seal_output_folder

__all__ = [
    "BACKGROUNDS",
    "CONTEXT_BACKGROUNDS",
    "FAMILIES",
    "Family",
    "generate_family",
    "NEUTRAL_BACKGROUND",
    "PALETTE",
    "SHAPES",
    "generate",
    "object_masks",
    "read_specs",
    "render",
    "write_counterfactual",
]

#: Photographs bundled with scikit-image used as backgrounds (all available offline).
BACKGROUNDS: tuple[str, ...] = (
    "astronaut",
    "coffee",
    "chelsea",
    "rocket",
    "hubble_deep_field",
    "brick",
    "grass",
    "gravel",
    "camera",
)
#: With ``shortcut="context"`` class ``k`` is shown on ``CONTEXT_BACKGROUNDS[k]`` in the training split.
CONTEXT_BACKGROUNDS: tuple[str, ...] = (
    "grass",
    "brick",
    "hubble_deep_field",
    "gravel",
    "coffee",
    "rocket",
    "chelsea",
    "astronaut",
    "camera",
)
#: The background used when the context cue is absent: a uniform grey no class uses.
NEUTRAL_BACKGROUND = "grey"
_GREY_VALUE = 128
#: Marker colours; with ``shortcut="marker"`` class ``k`` gets ``PALETTE[k]`` in the training split.
PALETTE: tuple[tuple[int, int, int], ...] = (
    (230, 25, 75),
    (60, 180, 75),
    (0, 130, 200),
    (255, 225, 25),
    (245, 130, 48),
    (145, 30, 180),
    (70, 240, 240),
    (240, 50, 230),
    (255, 255, 255),
    (0, 0, 0),
)
#: Shapes that can be used as class names.
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "ring", "cross", "star", "hexagon", "face")
#: Cues planted per object (a value per object) and per image (one class per image, the value is its class).
PER_OBJECT_SHORTCUTS: tuple[str, ...] = ("marker", "spot", "halo")
IMAGE_SHORTCUTS: tuple[str, ...] = ("context", "tint")
_SHORTCUTS = (None, *IMAGE_SHORTCUTS, *PER_OBJECT_SHORTCUTS)
#: ``shortcut="tint"``: the background is blended with ``PALETTE[class]`` at this weight.
TINT_ALPHA = 0.45
#: ``shortcut="halo"``: halo width as a share of the object's nominal size.
HALO_WIDTH = 0.25
#: ``shortcut="spot"``: side of the on-object marker as a share of the box's shorter side.
SPOT_FRACTION = 0.35
#: ``shortcut="halo"``: the number of texture patterns (class ``k`` gets pattern ``k``).
NUM_TEXTURES = 6
_COUNTERFACTUAL_MODES = ("consistent", "wrong", "absent")
_MAX_TRIES = 100
_GAP = 2  # minimum free pixels between two objects (their boxes never overlap)
_OUTLINE_FACTOR = 0.3


# --------------------------------------------------------------------------------------------------- resources
@functools.cache
def _photo(name: str) -> Image.Image:
    """Load a scikit-image photograph once, as an RGB PIL image."""
    import skimage.data

    if name not in BACKGROUNDS:
        raise ConfigurationError(f"unknown background {name!r}; expected one of {BACKGROUNDS + (NEUTRAL_BACKGROUND,)}")
    arr = np.asarray(getattr(skimage.data, name)())
    if arr.ndim == 2:
        arr = np.repeat(arr[..., None], 3, axis=2)
    arr = arr[..., :3]
    if arr.dtype != np.uint8:
        arr = np.clip(arr * 255.0 if arr.max() <= 1.0 else arr, 0, 255).astype(np.uint8)
    img = Image.fromarray(np.ascontiguousarray(arr), mode="RGB")
    img.load()
    return img


@functools.lru_cache(maxsize=1)
def _faces() -> np.ndarray:
    """The 100 face crops of ``skimage.data.lfw_subset()`` as uint8 :math:`(100, 25, 25)`."""
    import skimage.data

    faces = skimage.data.lfw_subset()[:100]
    return np.clip(np.round(faces * 255.0), 0, 255).astype(np.uint8)


# --------------------------------------------------------------------------------------------------- geometry
def _regular_polygon(n: int, radius: float, rotation: float, offset: float = -90.0) -> np.ndarray:
    angles = np.deg2rad(offset + rotation + np.arange(n) * 360.0 / n)
    return np.stack([radius * np.cos(angles), radius * np.sin(angles)], axis=1)


def _star(radius: float, rotation: float) -> np.ndarray:
    angles = np.deg2rad(-90.0 + rotation + np.arange(10) * 36.0)
    radii = np.where(np.arange(10) % 2 == 0, radius, radius * 0.45)
    return np.stack([radii * np.cos(angles), radii * np.sin(angles)], axis=1)


def _rotate(points: np.ndarray, rotation: float) -> np.ndarray:
    t = math.radians(rotation)
    rot = np.array([[math.cos(t), -math.sin(t)], [math.sin(t), math.cos(t)]])
    return points @ rot.T


def _polygon_mask(points: np.ndarray, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
    """Even-odd point-in-polygon test of pixel centres (``points`` are (x, y) relative to the centre)."""
    inside = np.zeros(np.broadcast(xs, ys).shape, dtype=bool)
    n = len(points)
    for i in range(n):
        x0, y0 = points[i]
        x1, y1 = points[(i + 1) % n]
        if y0 == y1:
            continue
        crosses = (y0 > ys) != (y1 > ys)
        x_at = x0 + (ys - y0) * (x1 - x0) / (y1 - y0)
        inside ^= crosses & (xs < x_at)
    return inside


@functools.lru_cache(maxsize=4096)
def _local_mask_cached(shape: str, size: int, rotation: float) -> np.ndarray:
    half = math.ceil(size * 0.75) + 2
    coords = np.arange(-half, half + 1, dtype=np.float64)
    xs = coords[None, :]
    ys = coords[:, None]
    r = size / 2.0
    if shape == "circle":
        mask = xs**2 + ys**2 <= r * r
    elif shape == "ring":
        d2 = xs**2 + ys**2
        mask = (d2 <= r * r) & (d2 >= (0.55 * r) ** 2)
    elif shape in ("square", "face"):
        rot = 0.0 if shape == "face" else rotation
        mask = _polygon_mask(_rotate(np.array([[-r, -r], [r, -r], [r, r], [-r, r]]), rot), xs, ys)
    elif shape == "triangle":
        mask = _polygon_mask(_regular_polygon(3, r * 1.15, rotation), xs, ys)
    elif shape == "hexagon":
        mask = _polygon_mask(_regular_polygon(6, r, rotation), xs, ys)
    elif shape == "star":
        mask = _polygon_mask(_star(r * 1.1, rotation), xs, ys)
    elif shape == "cross":
        a, b = r, r / 3.0
        bar1 = _polygon_mask(_rotate(np.array([[-a, -b], [a, -b], [a, b], [-a, b]]), rotation), xs, ys)
        bar2 = _polygon_mask(_rotate(np.array([[-b, -a], [b, -a], [b, a], [-b, a]]), rotation), xs, ys)
        mask = bar1 | bar2
    else:
        raise ConfigurationError(f"unknown shape {shape!r}; expected one of {SHAPES}")
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    if len(rows) == 0:
        raise ConfigurationError(f"shape {shape!r} of size {size} is empty; use a larger object_size")
    mask = mask[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]
    mask.setflags(write=False)
    return mask


def _local_mask(obj: dict[str, Any]) -> np.ndarray:
    """The tight boolean mask :math:`(h, w)` of one object spec (independent of its position)."""
    return _local_mask_cached(str(obj["shape"]), int(obj["size"]), float(obj.get("rotation", 0.0)))


def _inner_edge(mask: np.ndarray) -> np.ndarray:
    """Pixels of ``mask`` that have a 4-neighbour outside the mask (a one-pixel inner outline)."""
    padded = np.pad(mask, 1, constant_values=False)
    interior = padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]
    return mask & ~interior


# --------------------------------------------------------------------------------------------------- render
def _background(spec: dict[str, Any], imgsz: int) -> np.ndarray:
    name = spec["background"]
    if name == NEUTRAL_BACKGROUND:
        return np.full((imgsz, imgsz, 3), _GREY_VALUE, dtype=np.uint8)
    photo = _photo(name)
    fx, fy, scale = (float(v) for v in spec["crop"])
    side = round(imgsz * scale)
    side = max(1, min(side, photo.width, photo.height))
    x = round(fx * (photo.width - side))
    y = round(fy * (photo.height - side))
    crop = photo.resize((imgsz, imgsz), Image.Resampling.BILINEAR, box=(x, y, x + side, y + side))
    return np.array(crop, dtype=np.uint8)


def object_masks(spec: dict[str, Any], imgsz: int) -> np.ndarray:
    """The boolean mask of every object of a spec, at its position in the image.

    Args:
        spec: an image spec (see the module docstring).
        imgsz: the image side in pixels.

    Returns:
        bool array :math:`(N, H, W)` with ``H = W = imgsz``, one mask per object in spec order; the tight
        bounding box of mask ``i`` is ``spec["objects"][i]["box"]``.

    Raises:
        DatasetFormatError: if a stored box does not match the mask its shape, size and rotation produce.
    """
    objects = spec.get("objects", [])
    out = np.zeros((len(objects), imgsz, imgsz), dtype=bool)
    for i, obj in enumerate(objects):
        local = _local_mask(obj)
        x1, y1, x2, y2 = (int(v) for v in obj["box"])
        if (y2 - y1, x2 - x1) != local.shape or x1 < 0 or y1 < 0 or x2 > imgsz or y2 > imgsz:
            raise DatasetFormatError(
                f"spec {spec.get('id', '?')}: object {i} has box {obj['box']} but its mask has shape {local.shape} "
                f"(image side {imgsz}); re-generate the dataset with the same xaiwatch version"
            )
        out[i, y1:y2, x1:x2] = local
    return out


def _texture(value: int, x1: int, y1: int, x2: int, y2: int) -> np.ndarray:
    """Black-and-white texture ``value`` (stripes, checks, diagonals, dots) over an image region, uint8 (h, w, 3).

    The pattern is a function of absolute pixel coordinates, so the same value gives the same texture everywhere.
    """
    ys, xs = np.mgrid[y1:y2, x1:x2]
    pattern = [
        (ys // 2) % 2,
        (xs // 2) % 2,
        (xs // 2 + ys // 2) % 2,
        ((xs + ys) // 2) % 2,
        ((xs - ys) // 2) % 2,
        (xs % 4 < 2) & (ys % 4 < 2),
    ][int(value) % NUM_TEXTURES]
    return np.repeat((np.asarray(pattern, dtype=bool) * 255).astype(np.uint8)[..., None], 3, axis=2)


def render(spec: dict[str, Any], imgsz: int) -> np.ndarray:
    """Render one image from its spec (a pure function: the same spec gives the same pixels).

    The order is: background crop, objects (filled colour with a dark one-pixel inner outline, or a face), a
    Gaussian blur of sigma ``spec["blur"]`` applied to the pixels inside the object masks only (so boxes stay
    tight), then the cue markers, so changing a marker changes no pixel outside its square.

    Args:
        spec: an image spec (see the module docstring).
        imgsz: the image side in pixels.

    Returns:
        uint8 array :math:`(H, W, 3)` with ``H = W = imgsz``.

    Raises:
        DatasetFormatError: if the spec's boxes do not match its shapes.
    """
    img = _background(spec, imgsz)
    cue = spec.get("cue") or {}
    if cue.get("type") == "tint" and cue.get("value") is not None:
        color = np.asarray(PALETTE[int(cue["value"])], dtype=np.float64)
        img = np.clip(np.round((1 - TINT_ALPHA) * img + TINT_ALPHA * color), 0, 255).astype(np.uint8)
    objects = spec.get("objects", [])
    masks = object_masks(spec, imgsz)
    for obj in objects:
        halo = obj.get("cue")
        if halo and halo.get("type") == "halo" and halo.get("value") is not None:
            hx1, hy1, hx2, hy2 = (int(v) for v in halo["region"])
            img[hy1:hy2, hx1:hx2] = _texture(int(halo["value"]), hx1, hy1, hx2, hy2)
    for obj, mask in zip(objects, masks):
        x1, y1, x2, y2 = (int(v) for v in obj["box"])
        local = mask[y1:y2, x1:x2]
        region = img[y1:y2, x1:x2]
        if obj["shape"] == "face":
            face = Image.fromarray(_faces()[int(obj.get("face", 0)) % 100], mode="L")
            face = np.asarray(face.resize((x2 - x1, y2 - y1), Image.Resampling.BILINEAR))
            region[local] = np.repeat(face[..., None], 3, axis=2)[local]
        else:
            color = np.asarray(obj["color"], dtype=np.float64)
            region[local] = color.astype(np.uint8)
            region[_inner_edge(local)] = (color * _OUTLINE_FACTOR).astype(np.uint8)
    sigma = float(spec.get("blur", 0.0) or 0.0)
    if sigma > 0 and len(objects):
        from scipy.ndimage import gaussian_filter

        union = masks.any(axis=0)
        blurred = gaussian_filter(img.astype(np.float32), sigma=(sigma, sigma, 0), mode="nearest")
        img[union] = np.clip(np.round(blurred[union]), 0, 255).astype(np.uint8)
    for obj in objects:
        cue = obj.get("cue")
        if cue and cue.get("type") in ("marker", "spot") and cue.get("value") is not None:
            mx1, my1, mx2, my2 = (int(v) for v in cue["region"])
            img[my1:my2, mx1:mx2] = np.asarray(PALETTE[int(cue["value"])], dtype=np.uint8)
    return img


# --------------------------------------------------------------------------------------------------- sampling
def _saturated_color(rng: np.random.Generator) -> list[int]:
    h = float(rng.random())
    s = float(rng.uniform(0.75, 1.0))
    v = float(rng.uniform(0.75, 1.0))
    return [round(c * 255) for c in colorsys.hsv_to_rgb(h, s, v)]


def _marker_size(imgsz: int) -> int:
    return max(3, round(6 * imgsz / 160))


def _marker_region(box: Sequence[int], imgsz: int) -> list[int]:
    """The marker square: left of the box, aligned with its top edge (touching the box)."""
    m = _marker_size(imgsz)
    x1, y1 = int(box[0]), int(box[1])
    return [x1 - m, y1, x1, y1 + m]


def _overlaps(a: Sequence[int], b: Sequence[int], gap: int) -> bool:
    return a[0] < b[2] + gap and b[0] < a[2] + gap and a[1] < b[3] + gap and b[1] < a[3] + gap


def _sample_crop(rng: np.random.Generator, name: str, imgsz: int) -> list[float]:
    if name == NEUTRAL_BACKGROUND:
        return [0.0, 0.0, 1.0]
    photo = _photo(name)
    hi = min(2.0, min(photo.width, photo.height) / imgsz)
    lo = min(1.0, hi)
    scale = float(rng.uniform(lo, hi)) if hi > lo else hi
    return [round(float(rng.random()), 4), round(float(rng.random()), 4), round(scale, 4)]


def _halo_width(size: int) -> int:
    """Width in pixels of the texture halo around an object of nominal ``size``."""
    return max(2, round(HALO_WIDTH * size))


def _spot_region(box: Sequence[int]) -> list[int]:
    """The on-object marker square: centred in the box, side 35% of the box's shorter side (at least 3 px)."""
    x1, y1, x2, y2 = (int(v) for v in box)
    m = max(3, round(SPOT_FRACTION * min(x2 - x1, y2 - y1)))
    cx, cy = (x1 + x2) // 2, (y1 + y2) // 2
    return [cx - m // 2, cy - m // 2, cx - m // 2 + m, cy - m // 2 + m]


def _cue_region(shortcut: str, box: list[int], halo: int, imgsz: int) -> list[int]:
    """The pixels a per-object cue occupies: marker (left of the box), spot (centre) or halo (the grown box)."""
    if shortcut == "marker":
        return _marker_region(box, imgsz)
    if shortcut == "spot":
        return _spot_region(box)
    return [max(0, box[0] - halo), max(0, box[1] - halo), min(imgsz, box[2] + halo), min(imgsz, box[3] + halo)]


def _image_cue(
    rng: np.random.Generator, shortcut: str | None, k: int, planted: bool, photos: tuple[str, ...] | None, imgsz: int
) -> tuple[str, int | None, dict[str, Any] | None]:
    """The background, the class of the image (image-level cues) and the image's cue spec."""
    if shortcut == "context":
        image_class = int(rng.integers(k))
        value = image_class if planted else int(rng.integers(k))
        cue = {"type": "context", "variant": "planted", "value": value, "region": [0, 0, imgsz, imgsz]}
        return (photos or CONTEXT_BACKGROUNDS)[value], image_class, cue
    pool = photos or BACKGROUNDS
    background = pool[int(rng.integers(len(pool)))]
    if shortcut != "tint":
        return background, None, None
    image_class = int(rng.integers(k))
    value = image_class if planted else int(rng.integers(k))
    return (
        background,
        image_class,
        {"type": "tint", "variant": "planted", "value": value, "region": [0, 0, imgsz, imgsz]},
    )


def _sample_spec(
    rng: np.random.Generator,
    index: int,
    *,
    split: str,
    imgsz: int,
    classes: Sequence[str],
    objects_per_image: tuple[int, int],
    object_size: tuple[int, int],
    blur: float,
    shortcut: str | None,
    backgrounds: Sequence[str] | None = None,
    correlated: bool = True,
) -> dict[str, Any]:
    k = len(classes)
    planted = split == "train" and correlated  # the cue follows the class only in a correlated training split
    n = int(rng.integers(objects_per_image[0], objects_per_image[1] + 1))
    photos = tuple(backgrounds) if backgrounds else None
    background, image_class, cue = _image_cue(rng, shortcut, k, planted, photos, imgsz)
    crop = _sample_crop(rng, background, imgsz)
    margin = _marker_size(imgsz) if shortcut == "marker" else 0
    occupied: list[list[int]] = []
    objects: list[dict[str, Any]] = []
    for _ in range(n):
        cls = image_class if image_class is not None else int(rng.integers(k))
        shape = classes[cls]
        size = int(rng.integers(object_size[0], object_size[1] + 1))
        rotation = 0.0 if shape in ("circle", "ring", "face") else round(float(rng.uniform(0.0, 360.0)), 2)
        obj: dict[str, Any] = {"cls": cls, "shape": shape, "size": size}
        if shape == "face":
            obj["face"] = int(rng.integers(100))
            obj["color"] = None
        else:
            obj["color"] = _saturated_color(rng)
        obj["rotation"] = rotation
        h, w = _local_mask(obj).shape
        halo = _halo_width(size) if shortcut == "halo" else 0
        if w + margin > imgsz or h > imgsz:
            continue
        for _try in range(_MAX_TRIES):
            x1 = int(rng.integers(margin, imgsz - w + 1))
            y1 = int(rng.integers(0, imgsz - h + 1))
            box = [x1, y1, x1 + w, y1 + h]
            footprint = [x1 - margin - halo, y1 - halo, x1 + w + halo, y1 + h + halo]
            if not any(_overlaps(footprint, o, _GAP) for o in occupied):
                break
        else:
            continue  # give up on this object: the image gets fewer objects
        occupied.append(footprint)
        obj["box"] = box
        if shortcut in ("marker", "spot", "halo"):
            value = cls if planted else int(rng.integers(k))
            region = _cue_region(shortcut, box, halo, imgsz)
            obj["cue"] = {"type": shortcut, "variant": "planted", "value": value, "region": region}
        elif cue is not None:
            obj["cue"] = dict(cue)
        objects.append(obj)
    if shortcut in PER_OBJECT_SHORTCUTS:
        cue = {
            "type": shortcut,
            "variant": "planted",
            "value": [o["cue"]["value"] for o in objects],
            "region": [o["cue"]["region"] for o in objects],
        }
    return {"id": f"{index:06d}", "background": background, "crop": crop, "blur": blur, "objects": objects, "cue": cue}


# --------------------------------------------------------------------------------------------------- writing
def _label_text(spec: dict[str, Any], imgsz: int) -> str:
    lines = []
    for obj in spec["objects"]:
        x1, y1, x2, y2 = obj["box"]
        cx, cy = (x1 + x2) / 2 / imgsz, (y1 + y2) / 2 / imgsz
        w, h = (x2 - x1) / imgsz, (y2 - y1) / imgsz
        lines.append(f"{obj['cls']} {cx:.6f} {cy:.6f} {w:.6f} {h:.6f}\n")
    return "".join(lines)


def _write_png(path: Path, img: np.ndarray) -> None:
    Image.fromarray(img, mode="RGB").save(path, format="PNG", compress_level=1)


def _write_yaml(path: Path, root: Path, splits: dict[str, str], names: Sequence[str]) -> None:
    import yaml

    data = {"path": str(root.resolve()), **splits, "names": dict(enumerate(names))}
    path.write_text(yaml.safe_dump(data, sort_keys=False, default_flow_style=False))


def _write_split(root: Path, split: str, specs: list[dict[str, Any]], imgsz: int, info: dict[str, Any]) -> None:
    img_dir, lbl_dir, meta_dir = root / "images" / split, root / "labels" / split, root / "meta"
    ids = [spec["id"] for spec in specs]
    claim_files(
        root,
        [f"images/{split}/{i}.png" for i in ids] + [f"labels/{split}/{i}.txt" for i in ids] + [f"meta/{split}.json"],
    )
    for spec in specs:
        _write_png(img_dir / f"{spec['id']}.png", render(spec, imgsz))
        (lbl_dir / f"{spec['id']}.txt").write_text(_label_text(spec, imgsz))
    meta = {"split": split, "imgsz": imgsz, "names": info["names"], "shortcut": info["shortcut"], "specs": specs}
    (meta_dir / f"{split}.json").write_text(json.dumps(meta, indent=1))


def _check_range(name: str, value: Any, lo_min: int) -> tuple[int, int]:
    try:
        lo, hi = (int(v) for v in value)
        ok = lo == value[0] and hi == value[1]
    except (TypeError, ValueError):
        ok = False
    if not ok or lo < lo_min or hi < lo:
        raise ConfigurationError(
            f"`{name}` must be a pair of integers (min, max) with {lo_min} <= min <= max, got {value!r}"
        )
    return lo, hi


def _check_counts(imgsz: Any, num_train: Any, num_val: Any, seed: Any) -> int:
    """Validate ``imgsz`` and the non-negative integer arguments of :func:`generate`; return ``imgsz``."""
    if isinstance(imgsz, bool) or not isinstance(imgsz, (int, np.integer)) or imgsz < 32:
        raise ConfigurationError(f"`imgsz` must be an integer >= 32, got {imgsz!r}")
    for name, value in (("num_train", num_train), ("num_val", num_val), ("seed", seed)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
            raise ConfigurationError(f"`{name}` must be a non-negative integer, got {value!r}")
    return int(imgsz)


def _check_classes(classes: Any, faces: bool) -> list[str]:
    """Validate the class names of :func:`generate` (adding ``"face"`` when ``faces``); return them as a list."""
    if isinstance(classes, str) or not isinstance(classes, Sequence):
        raise ConfigurationError(f"`classes` must be a sequence of shape names, got {classes!r}")
    classes = [str(c) for c in classes]
    if faces and "face" not in classes:
        classes.append("face")
    if not classes:
        raise ConfigurationError("`classes` is empty; give at least one shape name, e.g. ('circle', 'square')")
    unknown = [c for c in classes if c not in SHAPES]
    if unknown:
        raise ConfigurationError(f"unknown class name(s) {unknown} in `classes`; each must be one of {SHAPES}")
    if len(set(classes)) != len(classes):
        raise ConfigurationError(f"`classes` has duplicates: {classes}")
    return classes


def _check_shortcut(shortcut: Any, classes: list[str]) -> None:
    """Validate ``shortcut`` and the number of classes it supports."""
    if shortcut not in _SHORTCUTS:
        raise ConfigurationError(f"`shortcut` must be one of {_SHORTCUTS}, got {shortcut!r}")
    if shortcut is not None and len(classes) < 2:
        raise ConfigurationError(f"shortcut={shortcut!r} needs at least 2 classes, got {classes}")
    max_k = {"context": len(CONTEXT_BACKGROUNDS), "halo": NUM_TEXTURES}.get(shortcut, len(PALETTE))
    if shortcut is not None and len(classes) > max_k:
        raise ConfigurationError(f"shortcut={shortcut!r} supports at most {max_k} classes, got {len(classes)}")


def _check_backgrounds(backgrounds: Any, shortcut: str | None, classes: list[str]) -> list[str] | None:
    """Validate ``backgrounds`` (photo names; with ``shortcut="context"`` one per class at least)."""
    if backgrounds is None:
        return None
    if isinstance(backgrounds, str) or not isinstance(backgrounds, Sequence) or not backgrounds:
        raise ConfigurationError(f"`backgrounds` must be a non-empty sequence of photo names, got {backgrounds!r}")
    names = [str(b) for b in backgrounds]
    unknown = [b for b in names if b not in BACKGROUNDS + (NEUTRAL_BACKGROUND,)]
    if unknown:
        raise ConfigurationError(f"unknown background(s) {unknown} in `backgrounds`; each must be one of {BACKGROUNDS}")
    if shortcut == "context" and len(names) < len(classes):
        raise ConfigurationError(
            f"shortcut='context' shows class k on backgrounds[k]: give at least {len(classes)} backgrounds, got {names}"
        )
    return names


def _check_sizes(
    imgsz: int, objects_per_image: Any, object_size: Any, shortcut: str | None
) -> tuple[tuple[int, int], tuple[int, int]]:
    """Validate the object count and size ranges (applying the size default); return ``(opi, osz)``."""
    opi = _check_range("objects_per_image", objects_per_image, 0)
    if object_size is None:
        base = (18, 24) if shortcut == "context" else (18, 40)
        osz = (max(4, round(base[0] * imgsz / 160)), max(4, round(base[1] * imgsz / 160)))
    else:
        osz = _check_range("object_size", object_size, 4)
    if osz[1] > imgsz // 2:
        raise ConfigurationError(f"`object_size` maximum must be <= imgsz // 2 = {imgsz // 2}, got {object_size!r}")
    return opi, osz


def _check_blur(blur: Any, shortcut: str | None) -> Any:
    """Validate ``blur`` (applying its default); return it."""
    if blur is None:
        blur = 2.5 if shortcut == "context" else 0.0
    if not isinstance(blur, (int, float)) or not math.isfinite(blur) or blur < 0:
        raise ConfigurationError(f"`blur` must be a finite number >= 0, got {blur!r}")
    return blur


def _prepare_root(root: Path, overwrite: bool) -> Path:
    """Make ``root`` an xaiwatch output folder; with ``overwrite``, remove only the files xaiwatch wrote there.

    A folder holding files xaiwatch did not write (no ``.xaiwatch-output`` marker) is refused, whatever
    ``overwrite`` says (see :mod:`xaiwatch.core.outputs`).
    """
    return prepare_output_folder(root, what="the shapes dataset", overwrite=overwrite)


def generate(
    root: str | Path,
    *,
    num_train: int = 600,
    num_val: int = 100,
    imgsz: int = 160,
    classes: Sequence[str] = ("circle", "square", "triangle"),
    objects_per_image: tuple[int, int] = (1, 4),
    object_size: tuple[int, int] | None = None,
    faces: bool = False,
    blur: float | None = None,
    shortcut: str | None = None,
    backgrounds: Sequence[str] | None = None,
    correlated: bool = True,
    seed: int = 0,
    overwrite: bool = False,
) -> Path:
    """Generate the shapes detection dataset in the ultralytics layout.

    Args:
        root: output folder: new, empty, or written by xaiwatch (it holds a ``.xaiwatch-output`` marker).
        num_train: number of training images.
        num_val: number of validation images.
        imgsz: image side in pixels (square images), at least 32.
        classes: class names, each one of :data:`SHAPES`; class ``i`` is ``classes[i]``.
        objects_per_image: inclusive range of the number of objects per image (fewer are placed when they do
            not fit without overlap after 100 tries each).
        object_size: inclusive range of the nominal object size in pixels at ``imgsz``. ``None`` means
            ``(18, 40)`` (``(18, 24)`` with ``shortcut="context"``), scaled by ``imgsz / 160``.
        faces: add a class ``"face"`` (a face crop of ``skimage.data.lfw_subset()`` scaled to the box).
        blur: Gaussian sigma applied inside the object masks. ``None`` means 0 (2.5 with ``shortcut="context"``).
        shortcut: plant a cue correlated with the class in train and uncorrelated in val: ``None``,
            ``"context"`` (one class per image, class ``k`` on background ``CONTEXT_BACKGROUNDS[k]`` in train,
            random class background in val) or ``"marker"`` (a 6 px square of colour ``PALETTE[class]`` left of
            each box in train, a random palette colour in val), ``"tint"`` (one class per image, the background
            blended with ``PALETTE[class]`` at weight :data:`TINT_ALPHA`), ``"halo"`` (a black-and-white texture,
            pattern ``class``, in a band of :data:`HALO_WIDTH` x size around each object's box) or ``"spot"`` (a
            square of colour ``PALETTE[class]`` at the centre of each object, :data:`SPOT_FRACTION` of its side).
        backgrounds: photographs to draw backgrounds from (default :data:`BACKGROUNDS`); with
            ``shortcut="context"`` class ``k`` is shown on ``backgrounds[k]`` (default :data:`CONTEXT_BACKGROUNDS`).
        correlated: ``False`` draws the training split's cue at random as in validation: the *clean twin* of a
            shortcut dataset (the same pixels statistics, no class information in the cue).
        seed: random seed; the same arguments give byte-identical files.
        overwrite: replace a dataset xaiwatch wrote in ``root``: only the files the marker lists (unchanged since
            written) and the counterfactual folders inside are removed; a user's file is never touched.

    Returns:
        The path of the written ``dataset.yaml``.

    Raises:
        ConfigurationError: for an invalid argument; when ``root`` holds files xaiwatch did not write; when it
            holds a dataset xaiwatch wrote and ``overwrite`` is false.
    """
    imgsz = _check_counts(imgsz, num_train, num_val, seed)
    classes = _check_classes(classes, faces)
    _check_shortcut(shortcut, classes)
    opi, osz = _check_sizes(imgsz, objects_per_image, object_size, shortcut)
    blur = _check_blur(blur, shortcut)
    photos = _check_backgrounds(backgrounds, shortcut, classes)
    if not isinstance(correlated, bool):
        raise ConfigurationError(f"`correlated` must be True or False, got {correlated!r}")
    root = _prepare_root(Path(root), overwrite)

    info = {
        "generator": "xaiwatch.data.shapes",
        "imgsz": imgsz,
        "names": classes,
        "objects_per_image": list(opi),
        "object_size": list(osz),
        "blur": float(blur),
        "shortcut": shortcut,
        "backgrounds": photos,
        "correlated": bool(correlated),
        "seed": int(seed),
        "num_train": int(num_train),
        "num_val": int(num_val),
    }
    for split_id, (split, count) in enumerate((("train", num_train), ("val", num_val))):
        rng = np.random.default_rng([int(seed), split_id])
        specs = [
            _sample_spec(
                rng,
                i,
                split=split,
                imgsz=imgsz,
                classes=classes,
                objects_per_image=opi,
                object_size=osz,
                blur=float(blur),
                shortcut=shortcut,
                backgrounds=photos,
                correlated=correlated,
            )
            for i in range(int(count))
        ]
        _write_split(root, split, specs, imgsz, info)
    claim_files(root, ["meta/info.json", "dataset.yaml"])
    (root / "meta" / "info.json").write_text(json.dumps(info, indent=1))
    yaml_path = root / "dataset.yaml"
    _write_yaml(yaml_path, root, {"train": "images/train", "val": "images/val"}, classes)
    seal_output_folder(root)
    return yaml_path


# --------------------------------------------------------------------------------------------------- counterfactual
def _dataset_root(root: str | Path) -> Path:
    root = Path(root)
    return root.parent if root.is_file() else root


def _read_json(path: Path) -> Any:
    if not path.is_file():
        raise DatasetFormatError(
            f"{path} does not exist; the folder must be written by xaiwatch.data.generate (call it first)"
        )
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise DatasetFormatError(f"{path} is not valid JSON (line {e.lineno}: {e.msg}); re-generate the dataset") from e


def read_specs(root: str | Path, split: str = "val") -> list[dict[str, Any]]:
    """Read the render specs of one split of a generated dataset.

    Args:
        root: the dataset folder (or its ``dataset.yaml``).
        split: ``"train"`` or ``"val"``.

    Returns:
        One spec per image, in file order (``spec["id"]`` is the file stem).

    Raises:
        DatasetFormatError: if ``root/meta/<split>.json`` is missing or malformed.
    """
    path = _dataset_root(root) / "meta" / f"{split}.json"
    meta = _read_json(path)
    if not isinstance(meta, dict) or not isinstance(meta.get("specs"), list):
        raise DatasetFormatError(f"{path} has no 'specs' list; re-generate the dataset with xaiwatch.data.generate")
    return meta["specs"]


def _counterfactual_spec(
    spec: dict[str, Any], mode: str, shortcut: str, k: int, backgrounds: Sequence[str] | None = None
) -> dict[str, Any]:
    spec = json.loads(json.dumps(spec))  # deep copy

    def value_for(cls: int) -> int | None:
        if mode == "consistent":
            return cls
        if mode == "wrong":
            return (cls + 1) % k
        return None

    if shortcut in IMAGE_SHORTCUTS:
        classes = {o["cls"] for o in spec["objects"]}
        if spec["objects"]:
            value = value_for(min(classes))
        else:  # no object: keep the cue for consistent/wrong, drop it for absent
            value = None if mode == "absent" else spec["cue"]["value"]
        if shortcut == "context":
            spec["background"] = NEUTRAL_BACKGROUND if value is None else (backgrounds or CONTEXT_BACKGROUNDS)[value]
        spec["cue"] = {**spec["cue"], "variant": mode, "value": value}
        for obj in spec["objects"]:
            obj["cue"] = dict(spec["cue"])
    else:
        for obj in spec["objects"]:
            obj["cue"] = {**obj["cue"], "variant": mode, "value": value_for(int(obj["cls"]))}
        spec["cue"] = {
            "type": shortcut,
            "variant": mode,
            "value": [o["cue"]["value"] for o in spec["objects"]],
            "region": [o["cue"]["region"] for o in spec["objects"]],
        }
    return spec


def write_counterfactual(
    root: str | Path,
    mode: str,
    *,
    split: str = "val",
    out: str | Path | None = None,
) -> Path:
    """Re-render one split of a shortcut dataset with the cue made consistent, wrong or absent.

    Everything but the cue is unchanged: labels are byte-identical, marker datasets differ only inside the
    marker squares, context datasets keep every object mask (only the background changes; with ``blur > 0``
    the blurred object edges mix in the new background).

    Args:
        root: a folder written by :func:`generate` with ``shortcut`` set (or its ``dataset.yaml``).
        mode: ``"consistent"`` (cue value = true class), ``"wrong"`` (cue value = ``(class + 1) % num_classes``)
            or ``"absent"`` (no marker / a uniform grey background no class uses).
        split: the split to re-render.
        out: output folder; default ``root/counterfactual_<mode>``. It holds the split under
            ``images/<split>`` and a ``dataset.yaml`` whose ``train`` and ``val`` both point to it. It must be
            new, empty, or written by xaiwatch; its earlier files of this split are replaced, nothing else.

    Returns:
        The path of the written ``dataset.yaml``.

    Raises:
        ConfigurationError: for an unknown ``mode``, when the dataset has no shortcut, or when ``out`` holds files
            xaiwatch did not write.
        DatasetFormatError: if the dataset's metadata is missing or malformed.
    """
    if mode not in _COUNTERFACTUAL_MODES:
        raise ConfigurationError(f"`mode` must be one of {_COUNTERFACTUAL_MODES}, got {mode!r}")
    root = _dataset_root(root)
    info = _read_json(root / "meta" / "info.json")
    shortcut = info.get("shortcut")
    if shortcut not in _SHORTCUTS[1:]:
        raise ConfigurationError(
            f"{root} was generated with shortcut={shortcut!r}; counterfactuals need a dataset generated with "
            f"a shortcut, one of {_SHORTCUTS[1:]}"
        )
    names = list(info["names"])
    imgsz = int(info["imgsz"])
    specs = read_specs(root, split)
    out = Path(out) if out is not None else root / f"counterfactual_{mode}"
    # a new folder, or one xaiwatch wrote: its earlier files of this split (and its yaml) are replaced, nothing else
    mine = [f"images/{split}/", f"labels/{split}/", f"meta/{split}.json", "meta/info.json", "dataset.yaml"]
    prepare_output_folder(out, what=f"the {mode} counterfactual", overwrite=True, replace=mine)
    new_specs = [_counterfactual_spec(s, mode, shortcut, len(names), info.get("backgrounds")) for s in specs]
    _write_split(out, split, new_specs, imgsz, info)
    # labels are copied byte for byte from the original
    for spec in specs:
        src = root / "labels" / split / f"{spec['id']}.txt"
        if src.is_file():
            shutil.copyfile(src, out / "labels" / split / f"{spec['id']}.txt")
    cf_info = {**info, "counterfactual": mode, "source": str(root.resolve()), "split": split}
    claim_files(out, ["meta/info.json", "dataset.yaml"])
    (out / "meta" / "info.json").write_text(json.dumps(cf_info, indent=1))
    yaml_path = out / "dataset.yaml"
    _write_yaml(yaml_path, out, {"train": f"images/{split}", "val": f"images/{split}"}, names)
    seal_output_folder(out)
    return yaml_path


# --------------------------------------------------------------------------------------------------- families
@dataclass(frozen=True)
class Family:
    """A generated dataset family for calibrating the saliency gate: classes, sizes, photos and a shortcut kind.

    Args:
        classes: the class shapes (2-6).
        object_size: object size range as a share of the image side.
        shortcut: the planted cue (see :func:`generate`).
        backgrounds: the photographs (with ``"context"``: class ``k`` on ``backgrounds[k]``).
        objects_per_image: object count range.
        blur: Gaussian sigma inside the object masks (hides shape detail so that the cue is the easier signal).
    """

    classes: tuple[str, ...]
    object_size: tuple[float, float]
    shortcut: str
    backgrounds: tuple[str, ...]
    objects_per_image: tuple[int, int] = (1, 3)
    blur: float = 0.0

    def sizes(self, imgsz: int) -> tuple[int, int]:
        """The object size range in pixels at ``imgsz`` (at least 6 px)."""
        return (max(6, round(self.object_size[0] * imgsz)), max(6, round(self.object_size[1] * imgsz)))


#: Five families that differ in class count (2-6), shapes, object sizes (8-40% of the side), photographs and
#: shortcut kind (class-correlated background photo, background tint, texture halo, on-object marker).
FAMILIES: dict[str, Family] = {
    "context3": Family(
        ("circle", "square", "triangle"), (0.11, 0.15), "context", ("grass", "brick", "hubble_deep_field"), (1, 4), 2.5
    ),
    "tint2": Family(
        ("circle", "hexagon"), (0.20, 0.40), "tint", ("astronaut", "coffee", "chelsea", "rocket"), (1, 2), 3.0
    ),
    "halo4": Family(
        ("star", "hexagon", "circle", "square"),
        (0.10, 0.22),
        "halo",
        ("gravel", "camera", "brick", "grass"),
        (1, 3),
        1.5,
    ),
    "spot5": Family(
        ("circle", "square", "triangle", "ring", "hexagon"),
        (0.15, 0.30),
        "spot",
        ("hubble_deep_field", "coffee", "rocket", "astronaut"),
        (1, 3),
        1.5,
    ),
    "context6": Family(
        ("circle", "square", "triangle", "ring", "cross", "star"),
        (0.08, 0.16),
        "context",
        ("gravel", "coffee", "rocket", "chelsea", "astronaut", "camera"),
        (1, 4),
        2.0,
    ),
}


def generate_family(
    root: str | Path,
    family: str | Family,
    *,
    shortcut: bool = True,
    num_train: int = 300,
    num_val: int = 64,
    imgsz: int = 128,
    seed: int = 0,
    overwrite: bool = False,
) -> Path:
    """Generate one member of a calibration family: its shortcut dataset or its clean twin.

    Both twins draw the cue in every image; only the shortcut twin's training split ties it to the class
    (``correlated=True``). Validation is uncorrelated in both (use :func:`write_counterfactual` for cue-consistent
    and cue-wrong copies of it).

    Args:
        root: output folder.
        family: a name of :data:`FAMILIES` or a :class:`Family`.
        shortcut: the shortcut twin (``True``) or the clean twin.
        num_train: training images.
        num_val: validation images.
        imgsz: image side.
        seed: random seed.
        overwrite: see :func:`generate`.

    Returns:
        the written ``dataset.yaml``.

    Raises:
        ConfigurationError: for an unknown family name.

    Example:
        >>> FAMILIES["tint2"].sizes(128)
        (26, 51)
    """
    if isinstance(family, str):
        if family not in FAMILIES:
            raise ConfigurationError(f"unknown family {family!r}; known families: {sorted(FAMILIES)}")
        family = FAMILIES[family]
    return generate(
        root,
        num_train=num_train,
        num_val=num_val,
        imgsz=imgsz,
        classes=family.classes,
        objects_per_image=family.objects_per_image,
        object_size=family.sizes(imgsz),
        blur=family.blur,
        shortcut=family.shortcut,
        backgrounds=family.backgrounds,
        correlated=bool(shortcut),
        seed=seed,
        overwrite=overwrite,
    )
