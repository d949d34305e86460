"""Image classification data in the ultralytics layout: a procedural generator and a Lightning data module.

The layout is one folder per split and one sub-folder per class (as torchvision's ``ImageFolder`` and
ultralytics' classification trainer read it)::

    root/train/<class>/000000.png
    root/val/<class>/000000.png
    root/meta/{train,val}.json     # written by generate_classification: the render spec of every image
    root/meta/info.json

Class ``i`` is the ``i``-th class folder name in sorted order (the ultralytics convention).
Dataset items carry the whole image as one box, so that detection-oriented tools (``ExplainCallback`` tracks
one box and label per probe image) explain the class score unchanged.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from xaiwatch.core.errors import ConfigurationError, DatasetFormatError
from xaiwatch.core.outputs import claim_files, prepare_output_folder, seal_output_folder
from xaiwatch.data import shapes
from xaiwatch.data.yolo import IMAGE_EXTENSIONS, letterbox

__all__ = [
    "ClassificationDataModule",
    "ClassificationDataset",
    "class_folders",
    "collate_classification",
    "generate_classification",
]

_SPLITS = ("train", "val")


# --------------------------------------------------------------------------------------------------- generator
def _prepare_root(root: Path, overwrite: bool) -> Path:
    """Make ``root`` an xaiwatch output folder; with ``overwrite``, remove only the files xaiwatch wrote there."""
    return prepare_output_folder(root, what="the shapes classification dataset", overwrite=overwrite)


def _sample_split(
    split_id: int, split: str, count: int, seed: int, classes: list[str], options: dict[str, Any]
) -> list[dict[str, Any]]:
    """Specs of one split: one object per image, drawn by the shapes generator's own sampler."""
    rng = np.random.default_rng([int(seed), split_id])
    specs = []
    for i in range(int(count)):
        spec = shapes._sample_spec(rng, i, split=split, classes=classes, objects_per_image=(1, 1), **options)
        if len(spec["objects"]) != 1:  # cannot happen with object_size <= imgsz // 2; checked to be explicit
            raise ConfigurationError(f"could not place the object of image {i}; use a smaller `object_size`")
        spec["file"] = f"{split}/{classes[spec['objects'][0]['cls']]}/{spec['id']}.png"
        specs.append(spec)
    return specs


def generate_classification(
    root: str | Path,
    *,
    num_train: int = 600,
    num_val: int = 100,
    imgsz: int = 64,
    classes: Sequence[str] = ("circle", "square", "triangle"),
    seed: int = 0,
    overwrite: bool = False,
    shortcut: str | None = None,
    object_size: tuple[int, int] | None = None,
) -> Path:
    """Generate a shapes classification dataset: one shape on a photograph crop per image.

    Images are rendered by :func:`xaiwatch.data.shapes.render` from specs drawn by the shapes generator with
    exactly one object per image; the object's class is the image's class. The specs are stored in
    ``root/meta/<split>.json`` (each with its ``"file"``), so :func:`~xaiwatch.data.read_specs` reads them.

    Args:
        root: output folder (created).
        num_train: number of training images.
        num_val: number of validation images.
        imgsz: image side in pixels, at least 32.
        classes: at least two shape names of :data:`~xaiwatch.data.shapes.SHAPES`. They are sorted, so class
            ``i`` is ``sorted(classes)[i]``, the order in which the class folders are read back.
        seed: random seed; the same arguments give byte-identical files.
        overwrite: replace a dataset xaiwatch wrote in ``root`` (only the files it wrote there are removed; a
            folder holding files xaiwatch did not write is refused).
        shortcut: ``None``, ``"context"`` or ``"marker"``: a cue correlated with the class in train only (see
            :func:`xaiwatch.data.generate`).
        object_size: inclusive range of the object size in pixels; default ``(3 * imgsz // 8, imgsz // 2)`` (the
            object dominates the image, as in a classification data set).

    Returns:
        ``root`` as a :class:`~pathlib.Path`.

    Raises:
        ConfigurationError: for an invalid argument, or when ``root`` holds a dataset and ``overwrite`` is false.
    """
    imgsz = shapes._check_counts(imgsz, num_train, num_val, seed)
    classes = sorted(shapes._check_classes(classes, faces=False))
    if len(classes) < 2:
        raise ConfigurationError(f"`classes` must name at least 2 shapes for classification, got {classes}")
    shapes._check_shortcut(shortcut, classes)
    size_default = (3 * imgsz // 8, imgsz // 2)
    _, osz = shapes._check_sizes(imgsz, (1, 1), object_size or size_default, shortcut)
    blur = float(shapes._check_blur(None, shortcut))
    root = _prepare_root(Path(root), overwrite)
    options = {"imgsz": imgsz, "object_size": osz, "blur": blur, "shortcut": shortcut}
    info = {
        "generator": "xaiwatch.data.classification",
        "imgsz": imgsz,
        "names": classes,
        "object_size": list(osz),
        "blur": blur,
        "shortcut": shortcut,
        "seed": int(seed),
        "num_train": int(num_train),
        "num_val": int(num_val),
    }
    for split_id, (split, count) in enumerate(zip(_SPLITS, (num_train, num_val))):
        specs = _sample_split(split_id, split, count, seed, classes, options)
        # every class folder exists in both splits, also when a split has no such image
        folders = [f"{split}/{name}/" for name in classes]
        claim_files(root, folders + [spec["file"] for spec in specs] + [f"meta/{split}.json"])
        for spec in specs:
            Image.fromarray(shapes.render(spec, imgsz), mode="RGB").save(root / spec["file"], compress_level=1)
        meta = {"split": split, "imgsz": imgsz, "names": classes, "shortcut": shortcut, "specs": specs}
        (root / "meta" / f"{split}.json").write_text(json.dumps(meta, indent=1))
    claim_files(root, ["meta/info.json"])
    (root / "meta" / "info.json").write_text(json.dumps(info, indent=1))
    seal_output_folder(root)
    return root


# --------------------------------------------------------------------------------------------------- reading
def _images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())


def class_folders(split_dir: str | Path) -> list[str]:
    """The sorted class folder names of one split folder.

    Args:
        split_dir: e.g. ``root/train``.

    Returns:
        the names of its sub-folders, sorted (class ``i`` is the ``i``-th).

    Raises:
        DatasetFormatError: if the folder does not exist, has no class sub-folder or holds no image.
    """
    split_dir = Path(split_dir)
    layout = "expected root/<split>/<class>/<image>.png (the ultralytics classification layout)"
    if not split_dir.is_dir():
        raise DatasetFormatError(f"split folder {split_dir} does not exist; {layout}")
    names = sorted(p.name for p in split_dir.iterdir() if p.is_dir())
    if not names:
        raise DatasetFormatError(f"split folder {split_dir} has no class sub-folder; {layout}")
    if not any(_images_in(split_dir / n) for n in names):
        raise DatasetFormatError(
            f"split folder {split_dir} holds no image ({', '.join(IMAGE_EXTENSIONS)}) in its class folders; {layout}"
        )
    return names


class ClassificationDataset(Dataset):
    """Images of one split folder, letterboxed to a square, labelled by their class folder.

    Args:
        split_dir: the split folder (``root/train``), with one sub-folder per class.
        names: the class names (folder names); default: the sorted sub-folders of ``split_dir``.
        imgsz: side of the square output images.
        augment: flip horizontally with probability 0.5 (drawn from torch's global RNG).

    Raises:
        DatasetFormatError: for a missing or empty split folder, or a class folder not in ``names``.
        ConfigurationError: for ``imgsz < 1``.
    """

    def __init__(
        self, split_dir: str | Path, names: Sequence[str] | None = None, imgsz: int = 64, augment: bool = False
    ) -> None:
        if isinstance(imgsz, bool) or not isinstance(imgsz, int) or imgsz < 1:
            raise ConfigurationError(f"`imgsz` must be a positive integer, got {imgsz!r}")
        self.split_dir = Path(split_dir)
        found = class_folders(self.split_dir)
        self.names = [str(n) for n in names] if names is not None else found
        extra = sorted(set(found) - set(self.names))
        if extra:
            raise DatasetFormatError(f"{self.split_dir} has class folders {extra} that are not classes {self.names}")
        self.imgsz = imgsz
        self.augment = bool(augment)
        self.samples: list[tuple[Path, int]] = [
            (p, k)
            for k, n in enumerate(self.names)
            if (self.split_dir / n).is_dir()
            for p in _images_in(self.split_dir / n)
        ]

    def __len__(self) -> int:
        return len(self.samples)

    def get(self, index: int, flip: bool = False) -> dict[str, Any]:
        """Load item ``index``, flipped horizontally if ``flip``.

        Returns:
            ``{"image": float32 (3, S, S) RGB in [0, 1], "label": int, "boxes": float32 (1, 4) the whole image
            [0, 0, S, S], "labels": int64 (1,) [label], "path": str, "index": int}``.

        Raises:
            DatasetFormatError: if the image cannot be read.
        """
        path, label = self.samples[index]
        try:
            with Image.open(path) as im:
                arr = np.asarray(im.convert("RGB"))
        except OSError as e:
            raise DatasetFormatError(f"{path}: cannot read the image ({e}); fix or remove it") from e
        img, _, _ = letterbox(arr, self.imgsz)
        if flip:
            img = img[:, ::-1]
        s = float(self.imgsz)
        return {
            "image": torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1))),
            "label": int(label),
            "boxes": torch.tensor([[0.0, 0.0, s, s]]),
            "labels": torch.tensor([label], dtype=torch.long),
            "path": str(path),
            "index": int(index),
        }

    def __getitem__(self, index: int) -> dict[str, Any]:
        """Load one item (see :meth:`get`), randomly flipped when ``augment``."""
        flip = self.augment and bool(torch.rand(()) < 0.5)
        return self.get(index, flip=flip)


def collate_classification(items: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Batch classification items.

    Returns:
        ``{"images": (B, 3, S, S), "labels": int64 (B,), "boxes": (B, 1, 4), "paths": list of str,
        "indices": int64 (B,)}``.
    """
    return {
        "images": torch.stack([it["image"] for it in items]),
        "labels": torch.as_tensor([int(it["label"]) for it in items], dtype=torch.long),
        "boxes": torch.stack([it["boxes"] for it in items]),
        "paths": [it["path"] for it in items],
        "indices": torch.as_tensor([int(it["index"]) for it in items], dtype=torch.long),
    }


class ClassificationDataModule(pl.LightningDataModule):
    """Lightning data module over a classification folder ``root/{train,val}/<class>/*``.

    The folders are checked when the module is constructed; the images are listed in :meth:`setup`.

    Args:
        root: dataset folder (e.g. written by :func:`generate_classification`).
        imgsz: side of the square (letterboxed) images.
        batch_size: images per batch.
        num_workers: data loader workers (persistent when > 0).
        augment: random horizontal flips in the training split.
        seed: seed of the training shuffle order.

    Raises:
        DatasetFormatError: for a missing or empty split folder, or class folders differing between splits.
        ConfigurationError: for a non-positive ``imgsz`` or ``batch_size`` or a negative ``num_workers``.
    """

    def __init__(
        self,
        root: str | Path,
        imgsz: int = 64,
        batch_size: int = 32,
        num_workers: int = 0,
        augment: bool = True,
        seed: int = 0,
    ) -> None:
        super().__init__()
        for name, value, lo in (("imgsz", imgsz, 1), ("batch_size", batch_size, 1), ("num_workers", num_workers, 0)):
            if isinstance(value, bool) or not isinstance(value, int) or value < lo:
                raise ConfigurationError(f"`{name}` must be an integer >= {lo}, got {value!r}")
        self.save_hyperparameters()
        self.root = Path(root)
        train, val = (class_folders(self.root / s) for s in _SPLITS)
        if train != val:
            raise DatasetFormatError(
                f"class folders differ between {self.root / 'train'} and {self.root / 'val'}: only in train "
                f"{sorted(set(train) - set(val))}, only in val {sorted(set(val) - set(train))}; both splits need the "
                "same class folders (an empty folder is fine)"
            )
        self._names = train
        self.train_dataset: ClassificationDataset | None = None
        self.val_dataset: ClassificationDataset | None = None

    @property
    def names(self) -> list[str]:
        """Class names (sorted folder names), index ``i`` is class ``i``."""
        return list(self._names)

    @property
    def num_classes(self) -> int:
        """Number of classes."""
        return len(self._names)

    def setup(self, stage: str | None = None) -> None:
        """Build the datasets the stage needs.

        Args:
            stage: ``"fit"``, ``"validate"``, ``"test"``, ``"predict"`` or ``None`` (all).
        """
        hp = self.hparams
        if stage in (None, "fit") and self.train_dataset is None:
            self.train_dataset = ClassificationDataset(self.root / "train", self._names, hp.imgsz, augment=hp.augment)
        if self.val_dataset is None:
            self.val_dataset = ClassificationDataset(self.root / "val", self._names, hp.imgsz, augment=False)

    def _loader(self, dataset: ClassificationDataset, shuffle: bool) -> DataLoader:
        hp = self.hparams
        return DataLoader(
            dataset,
            batch_size=hp.batch_size,
            shuffle=shuffle,
            num_workers=hp.num_workers,
            persistent_workers=hp.num_workers > 0,
            collate_fn=collate_classification,
            generator=torch.Generator().manual_seed(int(hp.seed)) if shuffle else None,
        )

    def train_dataloader(self) -> DataLoader:
        """Shuffled, augmented training batches (see :func:`collate_classification`)."""
        if self.train_dataset is None:
            self.setup("fit")
        return self._loader(self.train_dataset, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        """Validation batches in folder order, without augmentation."""
        if self.val_dataset is None:
            self.setup("validate")
        return self._loader(self.val_dataset, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        """The validation split."""
        return self.val_dataloader()
