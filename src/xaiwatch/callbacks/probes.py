"""Finding the validation data and choosing the fixed probe set (shared by every xaiwatch callback)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch

from xaiwatch.core.errors import ConfigurationError
from xaiwatch.core.types import ProbeSet

__all__ = [
    "tensorboard_writer",
    "validation_dataset",
    "stage_dataset",
    "choose_probe_indices",
    "load_probes",
    "probe_item",
    "largest_objects",
]


def validation_dataset(trainer: pl.Trainer, owner: str) -> Any:
    """The dataset of the trainer's (first) validation dataloader, resolved at ``setup()``.

    Raises:
        ConfigurationError: when the trainer has no validation dataloader, or it has no indexable dataset.
    """
    return stage_dataset(trainer, "fit", owner)


def stage_dataset(trainer: pl.Trainer, stage: str, owner: str) -> Any:
    """The dataset of the first dataloader that ``stage`` evaluates on (``fit``/``validate``: validation data,
    ``test``: test data), resolved at ``setup()`` before Lightning loads the loaders.

    This reads Lightning's loop data sources (``_data_source``: the only place that knows loaders passed to
    ``trainer.fit(model, train, val)`` before they are loaded); ``setup.cfg`` pins Lightning below 3.

    Raises:
        ConfigurationError: when the trainer has no such dataloader, or it has no indexable dataset.
    """
    loop = {"test": trainer.test_loop, "validate": trainer.validate_loop}.get(
        stage, trainer.fit_loop.epoch_loop.val_loop
    )
    source = loop._data_source
    loader = source.dataloader() if source.is_defined() else None
    if isinstance(loader, (list, tuple)):
        loader = loader[0] if loader else None
    if isinstance(loader, dict):
        loader = next(iter(loader.values()), None)
    if loader is None:
        raise ConfigurationError(
            f"{owner} needs validation data to choose its probe images, but the Trainer has no validation "
            "dataloader. Pass `val_dataloaders=` to `trainer.fit`, implement `val_dataloader()` in your "
            "LightningModule/DataModule, or give the probe images yourself."
        )
    dataset = getattr(loader, "dataset", None)
    if dataset is None or not hasattr(dataset, "__getitem__") or not hasattr(dataset, "__len__"):
        raise ConfigurationError(f"{owner} needs a map-style validation dataset (with __len__ and __getitem__).")
    return dataset


def probe_item(item: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(image, boxes, labels)`` from a dataset item.

    Accepts the dict items of :class:`~xaiwatch.data.YoloDataset` (``image``, ``boxes``, ``labels``) and the
    torchvision detection convention ``(image, {"boxes": ..., "labels": ...})``.
    """
    if isinstance(item, dict) and "image" in item:
        image, target = item["image"], item
    elif isinstance(item, (tuple, list)) and len(item) >= 2 and isinstance(item[1], dict):
        image, target = item[0], item[1]
    else:
        raise ConfigurationError(
            "Cannot read a validation item: expected a dict with 'image', 'boxes', 'labels' or a tuple "
            f"(image, {{'boxes', 'labels'}}), got {type(item).__name__}."
        )
    boxes = torch.as_tensor(target.get("boxes", torch.zeros(0, 4)), dtype=torch.float32).reshape(-1, 4)
    labels = torch.as_tensor(target.get("labels", torch.zeros(0)), dtype=torch.long).reshape(-1)
    image = torch.as_tensor(image)
    if image.dim() != 3 or image.shape[0] != 3:
        raise ConfigurationError(f"Validation images must be (3, H, W) tensors, got shape {tuple(image.shape)}.")
    return image.float(), boxes, labels


def choose_probe_indices(dataset: Any, num_probe: int, seed: int, owner: str) -> list[int]:
    """Deterministic probe indices: a seeded permutation, images with ground-truth boxes first.

    The order is the permutation's, not sorted, so a smaller ``num_probe`` with the same seed chooses a prefix:
    ``probe_<NN>`` names the same validation image in every callback (explain probe 3 is boundary probe 3).

    Raises:
        ConfigurationError: when the dataset has fewer than ``num_probe`` images.
    """
    n = len(dataset)
    if num_probe > n:
        raise ConfigurationError(
            f"{owner}: `num_probe={num_probe}` but the validation set has only {n} images. Lower `num_probe`."
        )
    order = np.random.default_rng(seed).permutation(n).tolist()
    with_boxes, without = [], []
    for i in order:
        if len(with_boxes) >= num_probe:
            break
        (with_boxes if len(probe_item(dataset[i])[1]) else without).append(i)
    return (with_boxes + without)[:num_probe]


def load_probes(dataset: Any, indices: Sequence[int], owner: str) -> ProbeSet:
    """Read the probe images and their ground truth; all images must share one size."""
    n = len(dataset)
    bad = [i for i in indices if not 0 <= int(i) < n]
    if bad:
        raise ConfigurationError(f"{owner}: probe indices {bad} are outside the validation set (size {n}).")
    items = [probe_item(dataset[int(i)]) for i in indices]
    shapes = {tuple(im.shape) for im, _, _ in items}
    if len(shapes) != 1:
        raise ConfigurationError(f"{owner}: probe images must share one size (letterbox them), got {sorted(shapes)}.")
    return ProbeSet(
        torch.stack([im for im, _, _ in items]),
        [b for _, b, _ in items],
        [lab for _, _, lab in items],
        [int(i) for i in indices],
    )


def tensorboard_writer(trainer: pl.Trainer, owner: str) -> Any:
    """The ``SummaryWriter`` of the trainer's TensorBoard logger.

    Raises:
        ConfigurationError: when the trainer has no ``TensorBoardLogger``.
    """
    from pytorch_lightning.loggers import TensorBoardLogger

    for logger in trainer.loggers:
        if isinstance(logger, TensorBoardLogger):
            return logger.experiment
    raise ConfigurationError(
        f"Cannot use `{owner}` with a `Trainer` that has no `TensorBoardLogger`: add "
        "`logger=TensorBoardLogger(save_dir)` (the default logger when tensorboard is installed)."
    )


def largest_objects(boxes: torch.Tensor, labels: torch.Tensor, k: int) -> list[list[float]]:
    """The ``k`` largest ground-truth objects of a probe as ``[x1, y1, x2, y2, label]`` (the tracked objects)."""
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    order = area.argsort(descending=True)[:k].tolist()
    return [[*boxes[i].tolist(), float(labels[i])] for i in order]
