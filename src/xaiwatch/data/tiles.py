"""Cut large annotated images (VOC boxes) into tiles and write them as an ultralytics-layout dataset.

Aerial and microscopy images are larger than a detector's input; :func:`write_tiled_dataset` cuts every image
into ``tile`` x ``tile`` crops every ``stride`` pixels (plus a last crop flush with the right / bottom edge, so
no pixel is lost; an image smaller than ``tile`` is one crop of its own size), clips each box to the crop, drops
boxes of which less than ``min_visible`` of the area is inside, splits the tiles into train / val with a seeded
permutation (tiles sharing pixels stay on the same side) and writes::

    out/dataset.yaml          path, train: images/train, val: images/val, names
    out/images/{train,val}/<image stem>_x<X>_y<Y>.png
    out/labels/{train,val}/<image stem>_x<X>_y<Y>.txt
    out/tiles.json            per tile: split, source image, origin, size, number of boxes
    out/.xaiwatch-output      the marker: the files this writer wrote (nothing else is ever deleted)

which :class:`~xaiwatch.data.YoloDataModule` reads. The output folder must be new, empty, or a folder this
writer wrote before (it holds the marker); a non-empty folder without the marker is refused, and rewriting an
owned folder removes only the files listed in the marker.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from xaiwatch.core.errors import ConfigurationError, DatasetFormatError
from xaiwatch.data.voc import VocAnnotation

__all__ = [
    "MARKER",
    "Tile",
    "clip_boxes",
    "make_tiles",
    "overlap_groups",
    "split_tiles",
    "tile_origins",
    "write_tiled_dataset",
]

MARKER = ".xaiwatch-output"
"""Name of the file that marks a folder as written by xaiwatch (it lists the files written)."""


@dataclass(frozen=True)
class Tile:
    """One crop of a source image with its boxes in crop coordinates.

    Attributes:
        source: the source image.
        x0: left edge of the crop in the source image (pixels).
        y0: top edge of the crop in the source image (pixels).
        width: crop width.
        height: crop height.
        boxes: float64 :math:`(n, 4)` ``x1 y1 x2 y2`` pixels of the crop, clipped to it.
        labels: int64 :math:`(n,)` class indices.
    """

    source: Path
    x0: int
    y0: int
    width: int
    height: int
    boxes: np.ndarray
    labels: np.ndarray

    @property
    def name(self) -> str:
        """File stem of the tile: ``<source stem>_x<X>_y<Y>``."""
        return f"{self.source.stem}_x{self.x0}_y{self.y0}"


def tile_origins(length: int, tile: int, stride: int) -> list[int]:
    """Start offsets of the crops along one axis: every ``stride`` pixels, plus one flush with the far edge.

    Args:
        length: image size along the axis.
        tile: crop size.
        stride: step between crops.

    Returns:
        Sorted offsets; ``[0]`` when ``length <= tile``.

    Example:
        >>> tile_origins(1000, 320, 320)
        [0, 320, 640, 680]
        >>> tile_origins(200, 320, 320)
        [0]
    """
    if length <= tile:
        return [0]
    starts = list(range(0, length - tile + 1, stride))
    if starts[-1] + tile < length:
        starts.append(length - tile)
    return starts


def clip_boxes(boxes: np.ndarray, window: Sequence[float], min_visible: float) -> tuple[np.ndarray, np.ndarray]:
    """Clip boxes to a window and keep those with at least ``min_visible`` of their area inside it.

    Args:
        boxes: :math:`(n, 4)` ``x1 y1 x2 y2``.
        window: ``(x0, y0, x1, y1)`` of the crop, same coordinates as ``boxes``.
        min_visible: smallest kept fraction of a box's area inside the window, in ``(0, 1]``.

    Returns:
        The kept boxes clipped and shifted to window coordinates :math:`(m, 4)`, and the boolean keep mask
        :math:`(n,)` over the input boxes.

    Example:
        >>> kept, mask = clip_boxes(np.array([[90.0, 0, 110, 10], [95, 0, 115, 10]]), (0, 0, 100, 100), 0.5)
        >>> kept.tolist(), mask.tolist()
        ([[90.0, 0.0, 100.0, 10.0]], [True, False])
    """
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    wx0, wy0, wx1, wy1 = (float(v) for v in window)
    clipped = np.stack(
        [
            np.clip(boxes[:, 0], wx0, wx1),
            np.clip(boxes[:, 1], wy0, wy1),
            np.clip(boxes[:, 2], wx0, wx1),
            np.clip(boxes[:, 3], wy0, wy1),
        ],
        axis=1,
    )
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    inside = np.clip(clipped[:, 2] - clipped[:, 0], 0, None) * np.clip(clipped[:, 3] - clipped[:, 1], 0, None)
    visible = np.divide(inside, area, out=np.zeros_like(area), where=area > 0)
    keep = (inside > 0) & (visible >= min_visible - 1e-12)
    return clipped[keep] - np.array([wx0, wy0, wx0, wy0]), keep


def _image_size(ann: VocAnnotation) -> tuple[int, int]:
    try:
        with Image.open(ann.image_path) as im:
            w, h = im.size
    except OSError as err:
        raise DatasetFormatError(f"{ann.image_path}: cannot read the image of {ann.xml_path} ({err})") from err
    if ann.width is not None and (ann.width, ann.height) != (w, h):
        raise DatasetFormatError(
            f"{ann.xml_path}: <size> says {ann.width} x {ann.height} but {ann.image_path} is {w} x {h}; "
            "the boxes would be misplaced — fix <size> or the image"
        )
    return w, h


def _class_index(ann: VocAnnotation, names: list[str] | None, single: bool) -> np.ndarray:
    if single:
        return np.zeros(len(ann), dtype=np.int64)
    names = list(names or [])
    unknown = sorted(set(ann.names) - set(names))
    if unknown:
        raise ConfigurationError(
            f"{ann.xml_path} has boxes of classes {unknown} not in `names` {names}; add them to `names`, or pass "
            "`single_class='<name>'` to merge all classes into one"
        )
    return np.asarray([names.index(n) for n in ann.names], dtype=np.int64)


def make_tiles(
    annotations: Sequence[VocAnnotation],
    tile: int = 320,
    stride: int | None = None,
    min_visible: float = 0.5,
    names: list[str] | None = None,
    single_class: bool = True,
) -> list[Tile]:
    """Cut annotated images into tiles (see the module docstring), without writing anything.

    Args:
        annotations: the images and their boxes (e.g. from :func:`~xaiwatch.data.voc.read_voc`).
        tile: crop side in pixels.
        stride: step between crops (default ``tile``: no overlap, except the crop flush with the edge).
        min_visible: boxes with less than this fraction of their area inside a crop are dropped from it.
        names: class names when ``single_class`` is false (box ``<name>`` -> index in ``names``).
        single_class: every box is class 0.

    Returns:
        The tiles, image by image, row by row.

    Raises:
        ConfigurationError: for a non-positive ``tile`` or ``stride``, ``min_visible`` outside ``(0, 1]``, or a
            box class missing from ``names``.
        DatasetFormatError: if an image cannot be read or its size disagrees with the xml.
    """
    stride = tile if stride is None else stride
    for arg, value in (("tile", tile), ("stride", stride)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigurationError(f"`{arg}` must be a positive integer of pixels, got {value!r}")
    if not 0 < min_visible <= 1:
        raise ConfigurationError(f"`min_visible` must be a fraction in (0, 1], got {min_visible!r}")
    tiles: list[Tile] = []
    for ann in annotations:
        w, h = _image_size(ann)
        labels = _class_index(ann, names, single_class)
        for y0 in tile_origins(h, tile, stride):
            for x0 in tile_origins(w, tile, stride):
                tw, th = min(tile, w), min(tile, h)
                kept, keep = clip_boxes(ann.boxes, (x0, y0, x0 + tw, y0 + th), min_visible)
                tiles.append(Tile(ann.image_path, x0, y0, tw, th, kept, labels[keep]))
    return tiles


def overlap_groups(tiles: Sequence[Tile]) -> np.ndarray:
    """Group tiles that share pixels (same source image, overlapping windows), transitively.

    Args:
        tiles: tiles from :func:`make_tiles`.

    Returns:
        int64 :math:`(n,)` group index of each tile (groups numbered by first appearance).

    Example:
        >>> from pathlib import Path
        >>> t = [Tile(Path("a.png"), x, 0, 32, 32, np.zeros((0, 4)), np.zeros(0, int)) for x in (0, 32, 40)]
        >>> overlap_groups(t).tolist()
        [0, 1, 1]
    """
    parent = list(range(len(tiles)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for i, a in enumerate(tiles):
        for j in range(i + 1, len(tiles)):
            b = tiles[j]
            if a.source == b.source and min(a.x0 + a.width, b.x0 + b.width) > max(a.x0, b.x0):
                if min(a.y0 + a.height, b.y0 + b.height) > max(a.y0, b.y0):
                    parent[root(j)] = root(i)
    roots = [root(i) for i in range(len(tiles))]
    first = {r: k for k, r in enumerate(dict.fromkeys(roots))}
    return np.asarray([first[r] for r in roots], dtype=np.int64)


def split_tiles(num_tiles: int, val_fraction: float, seed: int, groups: np.ndarray | None = None) -> np.ndarray:
    """Boolean "is validation" mask over tiles, drawn by a seeded permutation.

    Without ``groups``, exactly ``round(val_fraction * n)`` tiles are drawn. With ``groups`` (e.g. from
    :func:`overlap_groups`), whole groups are drawn in a seeded order until the validation split has at least that
    many tiles, so that no validation tile shares pixels with a training tile.

    Args:
        num_tiles: number of tiles.
        val_fraction: share of tiles in the validation split, in ``(0, 1)``.
        seed: seed of ``numpy.random.default_rng``.
        groups: optional group index of each tile; a group is never split.

    Returns:
        bool :math:`(n,)`; at least one tile (group) on each side when there are two or more.

    Raises:
        ConfigurationError: for ``val_fraction`` outside ``(0, 1)``, ``groups`` of another length, or a single group.

    Example:
        >>> split_tiles(5, 0.4, seed=0).sum()
        np.int64(2)
    """
    if not 0 < val_fraction < 1:
        raise ConfigurationError(f"`val_fraction` must be in (0, 1), got {val_fraction!r}")
    groups = np.arange(num_tiles) if groups is None else np.asarray(groups)
    if groups.shape != (num_tiles,):
        raise ConfigurationError(f"`groups` must have one entry per tile ({num_tiles}), got shape {groups.shape}")
    unique = np.unique(groups)
    if num_tiles >= 2 and len(unique) < 2:
        raise ConfigurationError(
            "all tiles overlap each other, so no validation tile can be kept apart from the training tiles; use a "
            "`stride` of at least `tile`, or `separate_overlaps=False`"
        )
    n_val = int(round(val_fraction * num_tiles))
    if num_tiles >= 2:
        n_val = min(max(n_val, 1), num_tiles - 1)
    order = unique[np.random.default_rng(seed).permutation(len(unique))]
    mask = np.zeros(num_tiles, dtype=bool)
    for g in order[:-1]:  # the last group drawn always stays in train
        if mask.sum() >= n_val:
            break
        mask |= groups == g
    return mask


def _check_output(out: Path) -> None:
    """Refuse an output that is a file, or a non-empty folder without the marker (changes nothing)."""
    if out.exists() and not out.is_dir():
        raise ConfigurationError(f"output {out} exists and is not a folder; choose another output folder")
    if out.is_dir() and any(out.iterdir()) and not (out / MARKER).is_file():
        raise ConfigurationError(
            f"output folder {out} is not empty and was not written by xaiwatch (no {MARKER} file); nothing "
            "was changed. Choose a new or empty folder."
        )


def _claim(out: Path) -> None:
    """Make ``out`` a folder this writer owns; remove the files it wrote there before (and only those)."""
    _check_output(out)
    marker = out / MARKER
    if out.is_dir() and any(out.iterdir()):
        try:
            written = json.loads(marker.read_text()).get("files", [])
        except (OSError, ValueError, AttributeError) as err:
            raise ConfigurationError(
                f"{marker} is unreadable ({err}); remove {out} yourself or choose another"
            ) from err
        parents: set[Path] = set()
        for rel in written:
            p = out / rel
            if p.is_file() and out.resolve() in p.resolve().parents:
                p.unlink()
                parents.update(q for q in p.parents if out.resolve() in q.resolve().parents)
        for d in sorted(parents, key=lambda q: len(q.parts), reverse=True):
            if d.is_dir() and not any(d.iterdir()):
                d.rmdir()
    out.mkdir(parents=True, exist_ok=True)
    marker.write_text(json.dumps({"writer": "xaiwatch.data.tiles", "files": []}))


def _new_file(out: Path, rel: str, written: list[str]) -> Path:
    """Reserve ``out/rel`` for writing: refuse a name written twice or a file xaiwatch did not write; update the marker."""
    path = out / rel
    if rel in written:
        raise ConfigurationError(f"two tiles would be written to {path}; source images need distinct file names")
    if path.exists():
        raise ConfigurationError(
            f"{path} exists and was not written by xaiwatch; it is left as is. Move it or choose another output folder."
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    written.append(rel)
    (out / MARKER).write_text(json.dumps({"writer": "xaiwatch.data.tiles", "files": written}))
    return path


def _label_lines(t: Tile) -> str:
    lines = []
    for (x1, y1, x2, y2), c in zip(t.boxes, t.labels):
        cx, cy = (x1 + x2) / 2 / t.width, (y1 + y2) / 2 / t.height
        lines.append(f"{int(c)} {cx:.6f} {cy:.6f} {(x2 - x1) / t.width:.6f} {(y2 - y1) / t.height:.6f}")
    return "\n".join(lines) + ("\n" if lines else "")


def write_tiled_dataset(
    annotations: Sequence[VocAnnotation],
    out: str | Path,
    tile: int = 320,
    stride: int | None = None,
    min_visible: float = 0.5,
    val_fraction: float = 0.2,
    seed: int = 0,
    single_class: str | None = "tree",
    names: Sequence[str] | None = None,
    keep_empty: bool = True,
    separate_overlaps: bool = True,
) -> Path:
    """Tile annotated images and write them as an ultralytics-layout dataset (see the module docstring).

    Args:
        annotations: the images and their VOC boxes.
        out: output folder: new, empty, or written by this function before.
        tile: crop side in pixels.
        stride: step between crops (default ``tile``).
        min_visible: boxes with less than this fraction of their area inside a crop are dropped from it.
        val_fraction: share of tiles in the validation split (tiles are split, not source images).
        seed: seed of the split.
        single_class: one class of this name for every box (default ``"tree"``); ``None`` keeps the VOC names.
        names: class order when ``single_class`` is ``None`` (default: the sorted VOC names).
        keep_empty: keep tiles without boxes (as background images).
        separate_overlaps: tiles that share pixels (the crops flush with the edges, or ``stride < tile``) go to the
            same split (:func:`overlap_groups`), so the validation tiles are unseen pixels.

    Returns:
        The path of the written ``dataset.yaml``.

    Raises:
        ConfigurationError: for an invalid argument, an output folder that is not empty and was not written by
            xaiwatch, or no tile left.
        DatasetFormatError: if an image cannot be read or disagrees with its xml.

    Example:
        >>> import tempfile, pathlib
        >>> from PIL import Image
        >>> from xaiwatch.data.voc import VocAnnotation
        >>> d = pathlib.Path(tempfile.mkdtemp())
        >>> Image.new("RGB", (64, 32)).save(d / "a.png")
        >>> ann = VocAnnotation(d / "a.xml", d / "a.png", 64, 32, np.array([[2.0, 2, 20, 20]]), ["x"], np.zeros(1, bool))
        >>> yaml_path = write_tiled_dataset([ann], d / "out", tile=32, val_fraction=0.5)
        >>> sorted(p.name for p in (d / "out" / "labels").rglob("*.txt"))
        ['a_x0_y0.txt', 'a_x32_y0.txt']
    """
    import yaml

    out = Path(out)
    _check_output(out)
    if single_class is None:
        class_names = list(names) if names is not None else sorted({n for a in annotations for n in a.names})
        if not class_names:
            raise ConfigurationError("no box in `annotations`, so no class name; pass `names` or `single_class`")
    else:
        class_names = [str(single_class)]
    tiles = make_tiles(annotations, tile, stride, min_visible, names=class_names, single_class=single_class is not None)
    if not keep_empty:
        tiles = [t for t in tiles if len(t.boxes)]
    if len(tiles) < 2:
        raise ConfigurationError(f"only {len(tiles)} tile(s) to split into train and val; use a smaller `tile`")
    is_val = split_tiles(len(tiles), val_fraction, seed, groups=overlap_groups(tiles) if separate_overlaps else None)
    _claim(out)
    written: list[str] = []
    records = []
    images: dict[Path, Image.Image] = {}
    for t, val in zip(tiles, is_val):
        split = "val" if val else "train"
        if t.source not in images:
            with Image.open(t.source) as im:
                images = {t.source: im.convert("RGB")}
        crop = images[t.source].crop((t.x0, t.y0, t.x0 + t.width, t.y0 + t.height))
        crop.save(_new_file(out, f"images/{split}/{t.name}.png", written))
        _new_file(out, f"labels/{split}/{t.name}.txt", written).write_text(_label_lines(t))
        records.append(
            {"name": t.name, "split": split, "source": str(t.source), "x0": t.x0, "y0": t.y0, "width": t.width}
            | {"height": t.height, "num_boxes": len(t.boxes)}
        )
    _new_file(out, "tiles.json", written).write_text(json.dumps(records, indent=1))
    data = {"path": ".", "train": "images/train", "val": "images/val", "names": dict(enumerate(class_names))}
    _new_file(out, "dataset.yaml", written).write_text(yaml.safe_dump(data, sort_keys=False))
    return out / "dataset.yaml"
