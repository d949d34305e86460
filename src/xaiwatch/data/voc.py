"""Read Pascal VOC annotation files: :func:`read_voc` (one xml) and :func:`read_voc_folder` (every xml of a folder).

A VOC file is an ``<annotation>`` with a ``<filename>``, an optional ``<size>`` (``width``, ``height``) and one
``<object>`` per box (``<name>``, ``<bndbox>`` with ``xmin ymin xmax ymax``, optional ``<difficult>``). Coordinates are
returned as written (float pixels, ``x1 y1 x2 y2``); no 1-based shift is applied, since tools disagree on it (the
original Pascal devkit is 1-based, most exporters and deepforest write 0-based pixel edges).
"""

from __future__ import annotations

import math
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from xaiwatch.core.errors import DatasetFormatError

__all__ = ["VocAnnotation", "read_voc", "read_voc_folder"]

_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".webp")


@dataclass(frozen=True)
class VocAnnotation:
    """The boxes of one image, read from a VOC xml file.

    Attributes:
        xml_path: the file the annotation was read from.
        image_path: the image it describes (see :func:`read_voc` for how it is found).
        width: ``<size><width>`` of the file, or ``None`` when absent.
        height: ``<size><height>`` of the file, or ``None`` when absent.
        boxes: float64 :math:`(n, 4)` ``x1, y1, x2, y2`` pixels.
        names: the ``<name>`` of each box.
        difficult: bool :math:`(n,)`, the ``<difficult>`` flag of each box (``False`` when absent).
    """

    xml_path: Path
    image_path: Path
    width: int | None
    height: int | None
    boxes: np.ndarray = field(repr=False)
    names: list[str]
    difficult: np.ndarray = field(repr=False)

    def __len__(self) -> int:
        """Number of boxes."""
        return len(self.names)


def _text(parent: ET.Element, tag: str, where: str, xml_path: Path) -> str:
    child = parent.find(tag)
    if child is None or child.text is None or not child.text.strip():
        raise DatasetFormatError(f"{xml_path}: {where} has no <{tag}> element (or it is empty); add it")
    return child.text.strip()


def _number(parent: ET.Element, tag: str, where: str, xml_path: Path) -> float:
    raw = _text(parent, tag, where, xml_path)
    try:
        value = float(raw)
    except ValueError as err:
        raise DatasetFormatError(f"{xml_path}: {where} <{tag}> is {raw!r}, expected a number of pixels") from err
    if not math.isfinite(value):
        raise DatasetFormatError(f"{xml_path}: {where} <{tag}> is {raw!r}, expected a finite number of pixels")
    return value


def _find_image(xml_path: Path, filename: str, image_dir: Path | None) -> Path:
    """``<filename>`` in ``image_dir`` (default: the xml's folder); else an image of the same stem there."""
    folder = image_dir if image_dir is not None else xml_path.parent
    direct = folder / filename
    if direct.is_file():
        return direct
    for stem in dict.fromkeys((Path(filename).stem, xml_path.stem)):
        for suffix in _IMAGE_SUFFIXES:
            candidate = folder / f"{stem}{suffix}"
            if candidate.is_file():
                return candidate
    raise DatasetFormatError(
        f"{xml_path}: <filename> is {filename!r} but neither it nor an image named {Path(filename).stem}.* "
        f"({', '.join(_IMAGE_SUFFIXES)}) exists in {folder}; pass `image_dir` or fix <filename>"
    )


def _size(root: ET.Element, xml_path: Path) -> tuple[int | None, int | None]:
    size = root.find("size")
    if size is None:
        return None, None
    w = _number(size, "width", "<size>", xml_path)
    h = _number(size, "height", "<size>", xml_path)
    if w <= 0 or h <= 0:
        raise DatasetFormatError(f"{xml_path}: <size> is {w:g} x {h:g}, expected positive width and height")
    return int(w), int(h)


def _read_object(obj: ET.Element, k: int, xml_path: Path) -> tuple[list[float], str, bool]:
    where = f"<object> #{k + 1}"
    name = _text(obj, "name", where, xml_path)
    bnd = obj.find("bndbox")
    if bnd is None:
        raise DatasetFormatError(f"{xml_path}: {where} ({name!r}) has no <bndbox> element; add it")
    box = [_number(bnd, tag, f"{where} <bndbox>", xml_path) for tag in ("xmin", "ymin", "xmax", "ymax")]
    if box[2] <= box[0] or box[3] <= box[1]:
        raise DatasetFormatError(
            f"{xml_path}: {where} <bndbox> is xmin={box[0]:g} ymin={box[1]:g} xmax={box[2]:g} ymax={box[3]:g}; "
            "expected xmax > xmin and ymax > ymin"
        )
    diff = obj.find("difficult")
    difficult = diff is not None and (diff.text or "0").strip() not in ("0", "", "false", "False")
    return box, name, difficult


def read_voc(xml_path: str | Path, image_dir: str | Path | None = None) -> VocAnnotation:
    """Read one Pascal VOC xml file.

    The image is ``<filename>`` in ``image_dir`` (default: the xml's folder); when that file does not exist, an
    image with the same stem (of ``<filename>``, then of the xml) and a common image suffix is used (deepforest's
    ``OSBS_029.xml`` names ``OSBS_029.tif`` and ships ``OSBS_029.png`` next to it).

    Args:
        xml_path: the annotation file.
        image_dir: folder of the images, if not the xml's.

    Returns:
        The :class:`VocAnnotation`.

    Raises:
        DatasetFormatError: if the file is missing or not well-formed xml, the root is not ``<annotation>``, an
            element is missing or not a number, a box is empty, or the image cannot be found (the message names
            the file and the element).

    Example:
        >>> import tempfile, pathlib
        >>> d = pathlib.Path(tempfile.mkdtemp())
        >>> _ = (d / "a.png").write_bytes(b"")
        >>> _ = (d / "a.xml").write_text(
        ...     "<annotation><filename>a.png</filename><object><name>tree</name>"
        ...     "<bndbox><xmin>1</xmin><ymin>2</ymin><xmax>5</xmax><ymax>9</ymax></bndbox></object></annotation>")
        >>> ann = read_voc(d / "a.xml")
        >>> ann.names, ann.boxes.tolist()
        (['tree'], [[1.0, 2.0, 5.0, 9.0]])
    """
    xml_path = Path(xml_path)
    if not xml_path.is_file():
        raise DatasetFormatError(f"VOC file {xml_path} does not exist; check the path")
    try:
        root = ET.parse(xml_path).getroot()
    except ET.ParseError as err:
        raise DatasetFormatError(f"{xml_path}: not well-formed xml ({err}); fix the file") from err
    if root.tag != "annotation":
        raise DatasetFormatError(f"{xml_path}: the root element is <{root.tag}>, expected <annotation> (Pascal VOC)")
    filename = _text(root, "filename", "<annotation>", xml_path)
    width, height = _size(root, xml_path)
    boxes, names, difficult = [], [], []
    for k, obj in enumerate(root.findall("object")):
        box, name, diff = _read_object(obj, k, xml_path)
        boxes.append(box)
        names.append(name)
        difficult.append(diff)
    return VocAnnotation(
        xml_path=xml_path,
        image_path=_find_image(xml_path, filename, Path(image_dir) if image_dir is not None else None),
        width=width,
        height=height,
        boxes=np.asarray(boxes, dtype=np.float64).reshape(-1, 4),
        names=names,
        difficult=np.asarray(difficult, dtype=bool),
    )


def read_voc_folder(folder: str | Path, image_dir: str | Path | None = None) -> list[VocAnnotation]:
    """Read every ``*.xml`` of a folder (sorted by name) with :func:`read_voc`.

    Args:
        folder: a folder of VOC xml files.
        image_dir: folder of the images, if not ``folder``.

    Returns:
        One :class:`VocAnnotation` per file.

    Raises:
        DatasetFormatError: if the folder does not exist or holds no xml file, or a file is malformed.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise DatasetFormatError(f"VOC folder {folder} does not exist; check the path")
    files = sorted(folder.glob("*.xml"))
    if not files:
        raise DatasetFormatError(f"{folder} holds no .xml file; expected Pascal VOC annotations")
    return [read_voc(f, image_dir) for f in files]
