"""Read a detection dataset in the ultralytics layout: :class:`YoloDataset` and :class:`YoloDataModule`.

The layout is a yaml file with an optional ``path`` (the dataset root; relative paths resolve against the
yaml's folder), ``train`` and ``val`` (a folder, a list of folders, or a ``.txt`` file listing image paths,
relative to the root), and ``names`` (a list, or a dict ``{index: name}``; ``nc`` is optional and checked).
The label file of ``.../images/.../x.png`` is ``.../labels/.../x.txt`` with one ``class cx cy w h`` line
(normalised to [0, 1]) per object; an image without a label file has no objects.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from xaiwatch.core.errors import ConfigurationError, DatasetFormatError

__all__ = [
    "IMAGE_EXTENSIONS",
    "YoloDataModule",
    "YoloDataset",
    "collate_detection",
    "label_path",
    "letterbox",
    "read_dataset_yaml",
    "verify_images",
]

IMAGE_EXTENSIONS: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
PAD_VALUE = 114 / 255
_TOL = 1e-6


def label_path(image_path: str | Path) -> Path:
    """The label file of an image: the last ``images`` path component becomes ``labels``, the suffix ``.txt``.

    Args:
        image_path: path of an image.

    Returns:
        The path of its label file (a sibling ``.txt`` when no component is named ``images``).
    """
    parts = list(Path(image_path).parts)
    for i in range(len(parts) - 2, -1, -1):
        if parts[i] == "images":
            parts[i] = "labels"
            break
    return Path(*parts).with_suffix(".txt")


def _list_images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())


def verify_images(paths: Sequence[str | Path]) -> None:
    """Check that every image file is readable: its header parses and its data is complete (PIL ``verify``).

    ``verify`` reads the file without decoding the pixels (PNG: every chunk and its CRC); PIL does not check a
    JPEG's data, so a JPEG must also end with its end-of-image marker (the check ultralytics makes). A truncated or
    corrupt file is found before training rather than at the batch that holds it. Measured here
    (``benchmarks/bench_images.py``, 2 shared cores): 0.2 s per 1000 160 px PNGs and 0.25 s per 1000 640x480
    JPEGs (0.9 s and 1.3 s under heavy load), 10 to 40 times less than decoding them.

    Args:
        paths: image paths.

    Raises:
        DatasetFormatError: naming every unreadable file (up to 5) and how many there are.

    Example:
        >>> import tempfile
        >>> bad = Path(tempfile.mkdtemp()) / "x.png"
        >>> _ = bad.write_bytes(b"not an image")
        >>> verify_images([bad])
        Traceback (most recent call last):
        ...
        xaiwatch.core.errors.DatasetFormatError: 1 unreadable image ...
    """
    bad: list[str] = []
    for p in paths:
        try:
            with Image.open(p) as im:
                im.verify()
                fmt = im.format
            if fmt == "JPEG" and not _jpeg_ends(Path(p)):
                raise OSError("the JPEG end-of-image marker is missing (truncated file)")
        except Exception as e:  # noqa: BLE001 - PIL raises OSError, SyntaxError, struct.error... for bad files
            bad.append(f"{p} ({type(e).__name__}: {e})")
    if bad:
        raise DatasetFormatError(
            f"{len(bad)} unreadable image{'s' if len(bad) > 1 else ''} (truncated or not an image): "
            f"{'; '.join(bad[:5])}{'; ...' if len(bad) > 5 else ''}. Fix or remove them (with their label files), "
            "or pass check_images=False to skip this check"
        )


def _jpeg_ends(path: Path) -> bool:
    """Whether a JPEG file ends with the end-of-image marker ``FFD9`` (trailing padding bytes allowed)."""
    with path.open("rb") as f:
        f.seek(0, 2)
        f.seek(max(0, f.tell() - 64))
        tail = f.read().rstrip(b"\x00")
    return tail.endswith(b"\xff\xd9")


def _parse_label_file(path: Path, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Parse one label file into (classes :math:`(n,)` int64, boxes :math:`(n, 4)` cxcywh float64)."""
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise DatasetFormatError(f"{path}: cannot read the label file ({e}); fix or delete it") from e
    classes: list[int] = []
    boxes: list[list[float]] = []
    fix = "expected 'class cx cy w h' with an integer class and coordinates normalised to [0, 1]"
    for lineno, line in enumerate(text.splitlines(), start=1):
        fields = line.split()
        if not fields:
            continue
        where = f"{path}:{lineno}: {line.strip()!r}"
        if len(fields) != 5:
            raise DatasetFormatError(f"{where} has {len(fields)} fields; {fix}")
        try:
            values = [float(f) for f in fields]
        except ValueError as e:
            raise DatasetFormatError(f"{where} is not numeric; {fix}") from e
        if not all(math.isfinite(v) for v in values):
            raise DatasetFormatError(f"{where} has a non-finite value; {fix}")
        cls = values[0]
        if cls != int(cls) or not 0 <= cls < num_classes:
            raise DatasetFormatError(
                f"{where}: class {fields[0]} is not an integer in [0, {num_classes - 1}]; "
                f"fix the label or add the class to `names`"
            )
        cx, cy, w, h = values[1:]
        if w <= 0 or h <= 0:
            raise DatasetFormatError(f"{where}: box width and height must be positive; {fix}")
        lo = [cx - w / 2, cy - h / 2]
        hi = [cx + w / 2, cy + h / 2]
        if min(values[1:] + lo) < -_TOL or max(values[1:] + hi) > 1 + _TOL:
            raise DatasetFormatError(f"{where}: coordinates outside [0, 1]; {fix}")
        classes.append(int(cls))
        boxes.append([cx, cy, w, h])
    return np.asarray(classes, dtype=np.int64), np.asarray(boxes, dtype=np.float64).reshape(-1, 4)


def letterbox(image: np.ndarray, imgsz: int) -> tuple[np.ndarray, tuple[float, float], tuple[int, int]]:
    """Resize an image so its long side is ``imgsz`` (keeping the aspect ratio) and pad it to a centred square.

    A point ``(x, y)`` of the original image (continuous pixel coordinates) maps to
    ``(x * sx + pad_x, y * sy + pad_y)``.

    Args:
        image: uint8 array :math:`(H, W, 3)`.
        imgsz: output side.

    Returns:
        The float32 image :math:`(S, S, 3)` in [0, 1] padded with 114/255, the scales ``(sx, sy)`` and the
        padding ``(pad_x, pad_y)`` (left, top).
    """
    h, w = image.shape[:2]
    r = imgsz / max(h, w)
    new_w, new_h = max(1, round(w * r)), max(1, round(h * r))
    if (new_w, new_h) != (w, h):
        image = np.asarray(Image.fromarray(image).resize((new_w, new_h), Image.Resampling.BILINEAR))
    pad_x, pad_y = (imgsz - new_w) // 2, (imgsz - new_h) // 2
    out = np.full((imgsz, imgsz, 3), PAD_VALUE, dtype=np.float32)
    out[pad_y : pad_y + new_h, pad_x : pad_x + new_w] = image.astype(np.float32) / 255.0
    return out, (new_w / w, new_h / h), (pad_x, pad_y)


class YoloDataset(Dataset):
    """Images and labels of one split of an ultralytics-layout dataset, letterboxed to a square.

    All label files are parsed (and checked) when the dataset is constructed.

    Args:
        image_paths_or_folder: a folder (searched recursively), a list of folders and/or image paths, or a
            ``.txt`` file listing image paths (relative paths resolve against the ``.txt``'s folder).
        names: class names; class ``i`` is ``names[i]``.
        imgsz: side of the square output images.
        augment: flip horizontally with probability 0.5 (drawn from torch's global RNG, which Lightning's
            ``seed_everything(workers=True)`` seeds in the main process and in every worker).

    Raises:
        DatasetFormatError: if a folder or list file does not exist, no image is found, or a label line is
            malformed (the message names the file, the 1-based line number and the line).
        ConfigurationError: for an empty ``names`` or ``imgsz < 1``.
    """

    def __init__(
        self,
        image_paths_or_folder: str | Path | Sequence[str | Path],
        names: Sequence[str],
        imgsz: int = 160,
        augment: bool = False,
    ) -> None:
        if isinstance(names, str) or not len(names):
            raise ConfigurationError(f"`names` must be a non-empty sequence of class names, got {names!r}")
        if isinstance(imgsz, bool) or not isinstance(imgsz, int) or imgsz < 1:
            raise ConfigurationError(f"`imgsz` must be a positive integer, got {imgsz!r}")
        self.names = [str(n) for n in names]
        self.imgsz = imgsz
        self.augment = bool(augment)
        self.image_paths = self._resolve(image_paths_or_folder)
        if not self.image_paths:
            raise DatasetFormatError(
                f"no image ({', '.join(IMAGE_EXTENSIONS)}) found in {image_paths_or_folder!s}; check the path"
            )
        self.labels: list[np.ndarray] = []
        self.boxes_cxcywh: list[np.ndarray] = []
        for p in self.image_paths:
            lp = label_path(p)
            if lp.is_file():
                cls, boxes = _parse_label_file(lp, len(self.names))
            else:
                cls, boxes = np.zeros(0, dtype=np.int64), np.zeros((0, 4), dtype=np.float64)
            self.labels.append(cls)
            self.boxes_cxcywh.append(boxes)

    @staticmethod
    def _resolve(source: str | Path | Sequence[str | Path]) -> list[Path]:
        sources = [source] if isinstance(source, (str, Path)) else list(source)
        paths: list[Path] = []
        for s in sources:
            p = Path(s)
            if p.is_dir():
                paths.extend(_list_images(p))
            elif p.is_file() and p.suffix.lower() == ".txt":
                for line in p.read_text().splitlines():
                    line = line.strip()
                    if line:
                        q = Path(line)
                        paths.append(q if q.is_absolute() else (p.parent / q))
            elif p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS:
                paths.append(p)
            else:
                raise DatasetFormatError(
                    f"{p} is not an image folder, an image or a .txt list of images; check the dataset path"
                )
        return paths

    def __len__(self) -> int:
        return len(self.image_paths)

    def get(self, index: int, flip: bool = False) -> dict[str, Any]:
        """Load item ``index``, flipped horizontally if ``flip`` (regardless of ``augment``).

        Args:
            index: item index.
            flip: flip the image and its boxes horizontally.

        Returns:
            The item dict (see :meth:`__getitem__`).

        Raises:
            DatasetFormatError: if the image cannot be read.
        """
        path = self.image_paths[index]
        try:
            with Image.open(path) as im:
                arr = np.asarray(im.convert("RGB"))
        except OSError as e:
            raise DatasetFormatError(f"{path}: cannot read the image ({e}); fix or remove it") from e
        h, w = arr.shape[:2]
        img, (sx, sy), (px, py) = letterbox(arr, self.imgsz)
        b = self.boxes_cxcywh[index]
        xyxy = np.stack(
            [
                (b[:, 0] - b[:, 2] / 2) * w * sx + px,
                (b[:, 1] - b[:, 3] / 2) * h * sy + py,
                (b[:, 0] + b[:, 2] / 2) * w * sx + px,
                (b[:, 1] + b[:, 3] / 2) * h * sy + py,
            ],
            axis=1,
        ).reshape(-1, 4)
        # clip the rounding noise of 6-decimal labels (and the tolerated 1e-6 overshoot) to the image content
        new_w, new_h = w * sx, h * sy
        xyxy[:, 0::2] = np.clip(xyxy[:, 0::2], px, px + new_w)
        xyxy[:, 1::2] = np.clip(xyxy[:, 1::2], py, py + new_h)
        if flip:
            img = img[:, ::-1]
            xyxy = np.stack([self.imgsz - xyxy[:, 2], xyxy[:, 1], self.imgsz - xyxy[:, 0], xyxy[:, 3]], axis=1)
        return {
            "image": torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1))),
            "boxes": torch.from_numpy(xyxy.astype(np.float32)).reshape(-1, 4),
            "labels": torch.from_numpy(self.labels[index].copy()),
            "path": str(path),
            "index": int(index),
            "orig_size": (int(h), int(w)),
        }

    def __getitem__(self, index: int) -> dict[str, Any]:
        """Load one item.

        Args:
            index: item index.

        Returns:
            ``{"image": float32 (3, S, S) RGB in [0, 1], "boxes": float32 (n, 4) xyxy pixels of the letterboxed
            image, "labels": int64 (n,), "path": str, "index": int, "orig_size": (h, w)}``.
        """
        flip = self.augment and bool(torch.rand(()) < 0.5)
        return self.get(index, flip=flip)


def collate_detection(items: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Batch detection items of :class:`YoloDataset`.

    Args:
        items: items with equal image sizes.

    Returns:
        ``{"images": (B, 3, S, S), "boxes": list of (n_i, 4), "labels": list of (n_i,), "paths": list of str,
        "indices": int64 (B,), "orig_sizes": list of (h, w)}``.
    """
    return {
        "images": torch.stack([it["image"] for it in items]),
        "boxes": [it["boxes"] for it in items],
        "labels": [it["labels"] for it in items],
        "paths": [it["path"] for it in items],
        "indices": torch.as_tensor([int(it["index"]) for it in items], dtype=torch.long),
        "orig_sizes": [tuple(it.get("orig_size", ())) for it in items],
    }


def _load_dataset_yaml(dataset_yaml: Path) -> dict[str, Any]:
    """Load a dataset yaml and check that it is a mapping with non-empty ``train``, ``val`` and ``names``."""
    import yaml

    if dataset_yaml.is_dir():
        found = sorted(p.name for p in dataset_yaml.glob("*.y*ml"))
        hint = f" (it holds {', '.join(found[:3])})" if found else ""
        raise DatasetFormatError(
            f"`dataset_yaml` {dataset_yaml} is a folder; pass the dataset's yaml file{hint}, "
            f"e.g. {dataset_yaml / (found[0] if found else 'dataset.yaml')}"
        )
    if not dataset_yaml.is_file():
        raise DatasetFormatError(f"dataset yaml {dataset_yaml} does not exist; check the `dataset_yaml` argument")
    try:
        data = yaml.safe_load(dataset_yaml.read_text())
    except yaml.YAMLError as e:
        raise DatasetFormatError(f"{dataset_yaml} is not valid yaml: {e}") from e
    if not isinstance(data, dict):
        raise DatasetFormatError(f"{dataset_yaml} must hold a mapping with keys 'train', 'val' and 'names'")
    for key in ("train", "val", "names"):
        if data.get(key) in (None, "", [], {}):
            raise DatasetFormatError(
                f"{dataset_yaml}: missing or empty key '{key}'; add it (see the ultralytics format)"
            )
    return data


def _parse_names_dict(dataset_yaml: Path, raw: dict[Any, Any]) -> list[str]:
    """The class names of a ``names: {index: name}`` mapping (indices ``0..n-1`` without gaps)."""
    try:
        keys = sorted(int(k) for k in raw)
    except (TypeError, ValueError) as e:
        raise DatasetFormatError(f"{dataset_yaml}: key 'names' must map integer indices to names, got {raw!r}") from e
    if keys != list(range(len(raw))):
        raise DatasetFormatError(
            f"{dataset_yaml}: key 'names' must have indices 0..{len(raw) - 1} without gaps, got {sorted(raw)}"
        )
    return [str(raw[k] if k in raw else raw[str(k)]) for k in keys]


def _parse_names(dataset_yaml: Path, data: dict[str, Any]) -> list[str]:
    """The class names of a loaded dataset yaml, checked against its optional ``nc``."""
    raw = data["names"]
    if isinstance(raw, dict):
        names = _parse_names_dict(dataset_yaml, raw)
    elif isinstance(raw, list):
        names = [str(n) for n in raw]
    else:
        raise DatasetFormatError(f"{dataset_yaml}: key 'names' must be a list or a dict {{index: name}}, got {raw!r}")
    if "nc" in data and data["nc"] != len(names):
        raise DatasetFormatError(f"{dataset_yaml}: key 'nc' is {data['nc']!r} but 'names' has {len(names)} entries")
    return names


def _resolve_split(dataset_yaml: Path, key: str, value: Any, root: Path) -> list[Path]:
    """The existing image sources of split ``key`` (a path or a list of paths, relative ones against ``root``)."""
    entries = value if isinstance(value, list) else [value]
    if not all(isinstance(e, str) for e in entries):
        raise DatasetFormatError(f"{dataset_yaml}: key '{key}' must be a path or a list of paths, got {value!r}")
    resolved = []
    for e in entries:
        p = Path(e)
        p = p if p.is_absolute() else root / p
        if not p.exists():
            raise DatasetFormatError(f"{dataset_yaml}: key '{key}' points to {p}, which does not exist")
        if p.is_dir() and not _list_images(p):
            raise DatasetFormatError(f"{dataset_yaml}: key '{key}' points to {p}, which holds no image")
        resolved.append(p)
    return resolved


def read_dataset_yaml(dataset_yaml: Path) -> tuple[list[str], dict[str, list[Path]]]:
    """Validate a dataset yaml; return the names and the resolved image sources of ``train`` and ``val``."""
    data = _load_dataset_yaml(dataset_yaml)
    names = _parse_names(dataset_yaml, data)
    root = Path(data["path"]) if data.get("path") else Path(".")
    if not root.is_absolute():
        root = dataset_yaml.parent / root
    sources: dict[str, list[Path]] = {}
    for key in ("train", "val"):
        sources[key] = _resolve_split(dataset_yaml, key, data[key], root)
    return names, sources


class YoloDataModule(pl.LightningDataModule):
    """Lightning data module over an ultralytics-layout dataset yaml.

    The yaml is validated when the module is constructed; labels are parsed in :meth:`setup`.

    Args:
        dataset_yaml: path of the dataset yaml.
        imgsz: side of the square (letterboxed) images.
        batch_size: images per batch.
        num_workers: data loader workers (persistent when > 0).
        augment: random horizontal flips in the training split.
        seed: seed of the training shuffle order.
        check_images: at :meth:`setup`, check that every image file is readable (:func:`verify_images`), so a
            corrupt file stops the run before training instead of at the batch that holds it.

    Raises:
        DatasetFormatError: for a missing or invalid yaml (or a folder instead), a missing key, a path that does
            not exist or an empty image folder (the message names the yaml and the key); at :meth:`setup`, for a
            malformed label line or an unreadable image.
        ConfigurationError: for a non-positive ``imgsz`` or ``batch_size`` or a negative ``num_workers``.
    """

    def __init__(
        self,
        dataset_yaml: str | Path,
        imgsz: int = 160,
        batch_size: int = 16,
        num_workers: int = 0,
        augment: bool = True,
        seed: int = 0,
        check_images: bool = True,
    ) -> None:
        super().__init__()
        for name, value, lo in (("imgsz", imgsz, 1), ("batch_size", batch_size, 1), ("num_workers", num_workers, 0)):
            if isinstance(value, bool) or not isinstance(value, int) or value < lo:
                raise ConfigurationError(f"`{name}` must be an integer >= {lo}, got {value!r}")
        self.save_hyperparameters()
        self.hparams["dataset_yaml"] = str(dataset_yaml)  # a str: checkpoints then load with weights_only=True
        self.dataset_yaml = Path(dataset_yaml)
        self._names, self._sources = read_dataset_yaml(self.dataset_yaml)
        self.train_dataset: YoloDataset | None = None
        self.val_dataset: YoloDataset | None = None

    @property
    def names(self) -> list[str]:
        """Class names, index ``i`` is class ``i``."""
        return list(self._names)

    @property
    def num_classes(self) -> int:
        """Number of classes."""
        return len(self._names)

    def setup(self, stage: str | None = None) -> None:
        """Build the datasets (parsing every label file) the stage needs.

        Args:
            stage: ``"fit"``, ``"validate"``, ``"test"``, ``"predict"`` or ``None`` (all).

        Raises:
            DatasetFormatError: for a malformed label line or (with ``check_images``) an unreadable image.
        """
        hp = self.hparams
        if stage in (None, "fit") and self.train_dataset is None:
            self.train_dataset = YoloDataset(self._sources["train"], self._names, hp.imgsz, augment=hp.augment)
            if hp.get("check_images", True):
                verify_images(self.train_dataset.image_paths)
        if self.val_dataset is None:
            self.val_dataset = YoloDataset(self._sources["val"], self._names, hp.imgsz, augment=False)
            if hp.get("check_images", True):
                verify_images(self.val_dataset.image_paths)

    def _loader(self, dataset: YoloDataset, shuffle: bool) -> DataLoader:
        hp = self.hparams
        generator = torch.Generator().manual_seed(int(hp.seed)) if shuffle else None
        return DataLoader(
            dataset,
            batch_size=hp.batch_size,
            shuffle=shuffle,
            drop_last=False,
            num_workers=hp.num_workers,
            persistent_workers=hp.num_workers > 0,
            collate_fn=collate_detection,
            generator=generator,
        )

    def train_dataloader(self) -> DataLoader:
        """Shuffled, augmented training batches (see :func:`collate_detection`)."""
        if self.train_dataset is None:
            self.setup("fit")
        return self._loader(self.train_dataset, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        """Validation batches in file order, without augmentation."""
        if self.val_dataset is None:
            self.setup("validate")
        return self._loader(self.val_dataset, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        """The validation split (the ultralytics layout has no mandatory test split)."""
        return self.val_dataloader()
