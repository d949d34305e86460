"""Post-hoc explanation of a saved detector: ``explain_images(weights=..., images=...)`` and ``xaiwatch explain``.

Loads a checkpoint (an ultralytics ``.pt``, a Lightning ``.ckpt`` of :class:`~xaiwatch.models.YOLOv8Module` or
:class:`~xaiwatch.models.DamoYoloModule`, or an official DAMO-YOLO directory), detects objects on images (files, a
folder, or the ``val`` split of a YOLO dataset yaml), explains each detection with the chosen methods and writes,
into a folder it owns: one panel per detection and method, a contact sheet, ``explanations.json`` (detections,
scores and check values) and optionally TensorBoard events.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from xaiwatch.adapters.base import DetectorAdapter
from xaiwatch.core.errors import ConfigurationError

__all__ = [
    "MARKER",
    "DetectionRecord",
    "ExplainResult",
    "ImageRecord",
    "explain_images",
    "load_detector",
    "prepare_output",
]

MARKER = ".xaiwatch-output"
"""File marking a folder written by xaiwatch; only such folders (or empty ones) are written into."""

DEFAULT_METHODS = ("layer_cam", "saliency")


# --------------------------------------------------------------------------------------------------- loading
def load_detector(
    weights: str | os.PathLike,
    trust_pickle: bool = False,
    model: str | None = None,
    device: str | torch.device = "cpu",
    conf: float = 0.25,
    iou: float = 0.7,
    names: Sequence[str] | None = None,
    pad_background: bool = False,
) -> DetectorAdapter:
    """The adapter of a saved detector, in eval mode on ``device``.

    Args:
        weights: an ultralytics ``.pt`` (pickled model: needs ``trust_pickle``), a plain ``state_dict`` file of an
            ultralytics model (needs ``model``), a Lightning ``.ckpt`` of ``YOLOv8Module`` / ``DamoYoloModule``, or an
            official DAMO-YOLO model directory (see :func:`~xaiwatch.models.load_damo_directory`).
        trust_pickle: allow reading files that store pickled objects (loading them runs code from the file).
        model: architecture yaml for a plain ``state_dict`` (e.g. ``"yolov8n.yaml"``).
        device: where to run.
        conf, iou: post-processing thresholds of the detections.
        names: class names of a DAMO-YOLO directory whose config carries none (its ``label_map.pkl`` is a pickle,
            never read); a checkpoint file carries its own names.
        pad_background: for a DAMO-YOLO directory whose head has no background channel (newer DAMO-YOLO), see
            :func:`~xaiwatch.models.load_damo_directory`.

    Returns:
        the adapter.

    Raises:
        ConfigurationError: for a missing file, a file that is not a checkpoint, one that needs ``trust_pickle``,
            a Lightning checkpoint of another module, weights that do not all match the architecture, ``names``
            given for a checkpoint file, or a DAMO-YOLO directory that cannot be read (missing weights, a
            class-count mismatch, ...).
    """
    from xaiwatch.models.yolov8 import read_weights_file

    path = Path(weights)
    if path.is_dir():
        from xaiwatch.models import load_damo_directory

        adapter = load_damo_directory(
            path, names=None if names is None else list(names), pad_background=pad_background
        ).xai_adapter()
    else:
        if names is not None:
            raise ConfigurationError(
                f"`names` ({list(names)}) is read only for a DAMO-YOLO model directory; {str(path)!r} is a file, "
                "and a checkpoint file carries its own class names. Leave `names` (`--names`) out."
            )
        import pathlib

        # Lightning saves the data module's hyper-parameters too: YoloDataModule(Path(...)) stores a PosixPath,
        # which weights_only=True refuses unless allowed (building a path runs no code from the file).
        paths = [type(Path()), pathlib.PurePosixPath, pathlib.PureWindowsPath]
        with torch.serialization.safe_globals(paths):
            ckpt = read_weights_file(path, trust_pickle=trust_pickle)
        if _is_lightning_checkpoint(ckpt):
            adapter = _from_lightning(ckpt, path)
        elif _is_damo_weights(ckpt):
            raise ConfigurationError(
                f"{str(path)!r} holds the tensors of a DAMO-YOLO network, not its architecture. Pass its model "
                "directory instead (the folder with damoyolo.py, the TinyNAS structure .txt and this file), or "
                "build `DamoYoloModule(size, num_classes=..., weights=path)` and pass `module.xai_adapter()`."
            )
        else:
            adapter = _from_ultralytics(ckpt, path, trust_pickle, model)
    adapter.conf, adapter.iou = float(conf), float(iou)
    adapter.model.to(device).eval()
    adapter.reset_caches()
    return adapter


def _is_lightning_checkpoint(ckpt: Any) -> bool:
    """A ``Trainer.save_checkpoint`` file: a ``state_dict`` plus Lightning's version or the hyper-parameters."""
    return (
        isinstance(ckpt, dict)
        and isinstance(ckpt.get("state_dict"), dict)
        and ("hyper_parameters" in ckpt or "pytorch-lightning_version" in ckpt)
    )


def _is_damo_weights(ckpt: Any) -> bool:
    """A DAMO-YOLO ``.pth``: a state dict (or ``{"model": state dict}``) with ZeroHead's class layers."""
    if isinstance(ckpt, dict):
        state = next((ckpt[k] for k in ("model", "state_dict", "ema") if isinstance(ckpt.get(k), dict)), ckpt)
        return any(isinstance(k, str) and k.removeprefix("module.").startswith("head.gfl_cls.") for k in state)
    return False


def _lightning_class(ckpt: dict, path: Path) -> Any:
    """``YOLOv8Module`` or ``DamoYoloModule``, told apart by the names of the saved tensors."""
    from xaiwatch.models import DamoYoloModule, YOLOv8Module

    keys = list(ckpt["state_dict"])
    hp = dict(ckpt.get("hyper_parameters") or {})
    if any(k.startswith("net.head.gfl_cls.") for k in keys):
        return DamoYoloModule
    if any(k.startswith("net.model.") for k in keys) and "model" in hp:
        return YOLOv8Module
    raise ConfigurationError(
        f"{str(path)!r} is a Lightning checkpoint but not of YOLOv8Module or DamoYoloModule (tensors "
        f"{keys[:3]}, hyper-parameters {sorted(hp)[:6]}). Build your module, load the checkpoint into it and pass "
        "an adapter to `explain_images` (e.g. `YOLOv8Adapter(module.net)`), or give the module an `xai_adapter()`."
    )


def _from_lightning(ckpt: dict, path: Path) -> DetectorAdapter:
    import inspect

    cls = _lightning_class(ckpt, path)
    hp = {k: v for k, v in dict(ckpt.get("hyper_parameters") or {}).items() if k not in {"weights", "trust_pickle"}}
    unknown = sorted(set(hp) - set(inspect.signature(cls.__init__).parameters))
    if unknown:
        raise ConfigurationError(
            f"{str(path)!r} is a Lightning checkpoint with tensors of {cls.__name__}, but its hyper-parameters "
            f"{unknown} are not arguments of {cls.__name__}: it was saved by another module or another version of "
            "xaiwatch. Build the module yourself, load the state_dict and pass `module.xai_adapter()`."
        )
    module = cls(**hp)
    state = ckpt["state_dict"]
    what = f"{cls.__name__}(num_classes={hp.get('num_classes')})"
    try:
        missing, unexpected = module.load_state_dict(state, strict=False)
    except RuntimeError as err:  # tensors of another shape, e.g. another class count than the hyper-parameters
        detail = [line.strip() for line in str(err).strip().splitlines()]
        raise ConfigurationError(
            f"{str(path)!r} does not match the {what} its hyper-parameters describe: {(detail[1:] or detail)[0]} "
            f"(of {len(state)} tensors). Was the checkpoint edited, or saved by another version of the module?"
        ) from None
    if missing or unexpected:
        raise ConfigurationError(
            f"{str(path)!r} does not match {what}: missing {list(missing)[:3]}, unexpected {list(unexpected)[:3]} "
            f"(of {len(state)} tensors)."
        )
    return module.xai_adapter()


def _from_ultralytics(ckpt: Any, path: Path, trust_pickle: bool, model: str | None) -> DetectorAdapter:
    from torch import nn

    from xaiwatch.models import YOLOv8Module

    net = None
    if isinstance(ckpt, dict):
        net = next((ckpt[k] for k in ("ema", "model") if isinstance(ckpt.get(k), nn.Module)), None)
    elif isinstance(ckpt, nn.Module):
        net = ckpt
    if net is not None:
        raw_names = getattr(net, "names", None) or {}
        names = [str(raw_names[k]) for k in sorted(raw_names)] if isinstance(raw_names, dict) else list(raw_names)
        arch: Any = getattr(net, "yaml", None)
        if not isinstance(arch, dict):
            raise ConfigurationError(f"{str(path)!r} holds a {type(net).__name__} without its architecture (`yaml`).")
        num_classes = int(arch.get("nc", len(names)))
    elif model is not None:
        arch, num_classes, names = model, None, None
    else:
        raise ConfigurationError(
            f"{str(path)!r} holds only tensors (a state_dict), not the architecture. Pass `model=` (`--model`) with "
            "the architecture yaml it was trained with, e.g. 'yolov8n.yaml'."
        )
    if num_classes is None:
        head = [k for k in ckpt if k.endswith("cv3.0.2.bias")] if isinstance(ckpt, dict) else []
        num_classes = int(ckpt[head[0]].numel()) if head else 80
    module = YOLOv8Module(
        arch, num_classes=num_classes, names=names or None, weights=str(path), trust_pickle=trust_pickle
    )
    report = module.weights_report
    if report is not None and (report.skipped or report.reinitialised):
        raise ConfigurationError(
            f"{str(path)!r} does not match the architecture: {len(report.kept)} tensors loaded, "
            f"{len(report.skipped)} in the file not used (e.g. {report.skipped[:3]}), {len(report.reinitialised)} "
            f"of the model not in the file (e.g. {report.reinitialised[:3]}). Pass the architecture yaml it was "
            "trained with (`model=`)."
        )
    return module.xai_adapter()


# ---------------------------------------------------------------------------------------------------- output
def prepare_output(out: str | os.PathLike) -> tuple[Path, set[str]]:
    """Make ``out`` a folder xaiwatch may write into; return it and the files xaiwatch wrote there before.

    A missing or empty folder is created and marked with :data:`MARKER`; a folder with the marker is reused (only
    the files listed in the marker may be replaced). Any other non-empty folder is refused.

    Raises:
        ConfigurationError: if ``out`` is a file or a non-empty folder xaiwatch did not create.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ConfigurationError(f"`out` {str(out)!r} is a file; give a folder (new, empty, or written by xaiwatch).")
    marker = out / MARKER
    if out.is_dir() and any(out.iterdir()) and not marker.is_file():
        raise ConfigurationError(
            f"`out` {str(out)!r} is not empty and was not created by xaiwatch (no {MARKER} file): xaiwatch never "
            "writes into folders it does not own. Give a new or empty folder."
        )
    out.mkdir(parents=True, exist_ok=True)
    owned: set[str] = set()
    if marker.is_file():
        try:
            owned = set(json.loads(marker.read_text() or "{}").get("files", []))
        except json.JSONDecodeError:
            owned = set()
    else:
        marker.write_text(json.dumps({"created_by": "xaiwatch", "files": []}))
    return out, owned


class _Writer:
    """Writes files into an owned folder, never over a file it did not write itself."""

    def __init__(self, out: Path, owned: set[str]) -> None:
        self.out, self.owned, self.written = out, owned, set(owned)

    def path(self, relative: str) -> Path:
        target = self.out / relative
        if target.exists() and relative not in self.owned:
            raise ConfigurationError(
                f"{str(target)!r} exists and was not written by xaiwatch; it is left untouched. Move it away or "
                "choose another `out` folder."
            )
        target.parent.mkdir(parents=True, exist_ok=True)
        self.written.add(relative)
        return target

    def save_marker(self) -> None:
        (self.out / MARKER).write_text(json.dumps({"created_by": "xaiwatch", "files": sorted(self.written)}, indent=1))


# ---------------------------------------------------------------------------------------------------- images
def _image_sources(images: str | os.PathLike | Sequence[str | os.PathLike]) -> tuple[list[Path], list[str] | None]:
    """Image paths from files, folders, or a dataset yaml (its ``val`` split); the yaml's names if any."""
    from xaiwatch.data.yolo import read_dataset_yaml

    sources = [images] if isinstance(images, (str, os.PathLike)) else list(images)
    if not sources:
        raise ConfigurationError("`images` is empty; give image files, a folder or a dataset yaml.")
    paths: list[Path] = []
    names = None
    for s in sources:
        p = Path(s)
        if p.suffix.lower() in {".yaml", ".yml"} and p.is_file():
            names, split = read_dataset_yaml(p)
            paths.extend(split["val"])
        elif p.exists():
            paths.append(p)
        else:
            raise ConfigurationError(
                f"`images` entry {str(p)!r} does not exist (give image files, a folder or a yaml)."
            )
    return paths, names


# ---------------------------------------------------------------------------------------------------- result
@dataclass
class DetectionRecord:
    """One detection and its explanations.

    Attributes:
        box: ``xyxy`` in pixels of the model input (the letterboxed image).
        box_original: the same box in pixels of the original image.
        score, label, name, candidate: as :class:`~xaiwatch.core.types.Detections`.
        explained: whether maps were computed (``max_objects`` limits them).
        checks: method to ``{"energy_in_box", "pointing_game", "instance_specificity"}`` of its map on this box.
        panels: method to the panel PNG (relative to the output folder).
    """

    box: list[float]
    box_original: list[float]
    score: float
    label: int
    name: str
    candidate: int
    explained: bool = False
    checks: dict[str, dict[str, float | bool | None]] = field(default_factory=dict)
    panels: dict[str, str] = field(default_factory=dict)


@dataclass
class ImageRecord:
    """One image: its path, sizes and detections."""

    path: str
    size: list[int]
    input_size: list[int]
    detections: list[DetectionRecord]


@dataclass
class ExplainResult:
    """What :func:`explain_images` wrote.

    Attributes:
        out: the output folder.
        images: one record per image.
        json_path: ``explanations.json`` (the same records).
        contact_sheet: the PNG of every panel (``None`` when nothing was detected).
        tensorboard: the TensorBoard log folder, when written.
        maps: ``(image index, detection index, method)`` to the :math:`(1, H, W)` map (in memory only).
    """

    out: Path
    images: list[ImageRecord]
    json_path: Path
    contact_sheet: Path | None
    tensorboard: Path | None = None
    maps: dict[tuple[int, int, str], torch.Tensor] = field(default_factory=dict, repr=False)


def _json_value(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


# --------------------------------------------------------------------------------------------------- explain
def explain_images(
    weights: str | os.PathLike | DetectorAdapter,
    images: str | os.PathLike | Sequence[str | os.PathLike],
    methods: Sequence[str] = DEFAULT_METHODS,
    out: str | os.PathLike = "xaiwatch_explain",
    max_objects: int | None = None,
    imgsz: int = 640,
    device: str = "cpu",
    trust_pickle: bool = False,
    model: str | None = None,
    conf: float = 0.25,
    tensorboard: bool = False,
    progress: bool = True,
    names: Sequence[str] | None = None,
    pad_background: bool = False,
) -> ExplainResult:
    """Detect, explain every detection with every method, and write panels, a contact sheet and a JSON.

    Args:
        weights: a checkpoint (see :func:`load_detector`) or an adapter already built.
        images: image files, folders, and/or YOLO dataset yamls (their ``val`` split, with ground truth drawn).
        methods: explanation methods of kind ``"map"`` (see :func:`~xaiwatch.explain.available_methods`).
        out: output folder: new, empty, or written by xaiwatch before (see :func:`prepare_output`).
        max_objects: explain at most this many detections per image (highest scores first); ``None``: all.
        imgsz: letterbox side, a multiple of the model's stride.
        device: ``"cpu"``, ``"cuda"``, ``"cuda:1"``...
        trust_pickle, model, conf: see :func:`load_detector`.
        tensorboard: also write the panels and check values as TensorBoard events under ``out/tensorboard``.
        progress: show a tqdm progress bar over images.
        names, pad_background: for a DAMO-YOLO directory, see :func:`load_detector`.

    Returns:
        the :class:`ExplainResult`.

    Raises:
        ConfigurationError: for a bad argument (checked before anything is computed or written).

    Example:
        >>> from xaiwatch.data.real import fall_detector_weights, ultralytics_asset  # doctest: +SKIP
        >>> r = explain_images(fall_detector_weights(), [ultralytics_asset("bus.jpg")], trust_pickle=True,
        ...                    out="bus_explained")  # doctest: +SKIP
        >>> [d.name for d in r.images[0].detections]  # doctest: +SKIP
        ['Normal', 'Normal', 'Normal', 'Normal']
    """
    from xaiwatch.explain import engine_class
    from xaiwatch.render.dispatch import draws_heat_map

    methods = list(methods)
    if not methods:
        raise ConfigurationError("`methods` is empty; give at least one, e.g. ['layer_cam', 'saliency'].")
    for m in methods:
        engine_class(m)  # an unknown name lists the valid ones
        if not draws_heat_map(m):
            raise ConfigurationError(f"Method {m!r} does not draw a heat map over the image; use e.g. layer_cam.")
    if max_objects is not None and int(max_objects) < 1:
        raise ConfigurationError(f"`max_objects` must be >= 1 or None, got {max_objects}.")
    if int(imgsz) < 1:
        raise ConfigurationError(f"`imgsz` must be >= 1, got {imgsz}.")
    if isinstance(weights, DetectorAdapter) and (names is not None or pad_background):
        raise ConfigurationError(
            "`names` and `pad_background` are read when loading a DAMO-YOLO directory; `weights` is an adapter "
            "already built: set `adapter.names` instead, or pass the directory as `weights`."
        )
    paths, yaml_names = _image_sources(images)
    adapter = (
        weights
        if isinstance(weights, DetectorAdapter)
        else load_detector(
            weights,
            trust_pickle=trust_pickle,
            model=model,
            device=device,
            conf=conf,
            names=names,
            pad_background=pad_background,
        )
    )
    multiple = adapter.input_multiple
    if multiple and imgsz % multiple:
        raise ConfigurationError(
            f"`imgsz` {imgsz} is not a multiple of the model's stride {multiple}; use e.g. "
            f"{max(multiple, round(imgsz / multiple) * multiple)}."
        )
    from xaiwatch.data.yolo import YoloDataset

    dataset = YoloDataset(paths, names=yaml_names or adapter.names or ["0"], imgsz=int(imgsz))
    out_dir, owned = prepare_output(out)
    writer = _Writer(out_dir, owned)
    return _run(adapter, dataset, methods, writer, max_objects, device, tensorboard, progress)


def _run(
    adapter: DetectorAdapter,
    dataset: Any,
    methods: list[str],
    writer: _Writer,
    max_objects: int | None,
    device: str,
    tensorboard: bool,
    progress: bool,
) -> ExplainResult:
    from tqdm.auto import tqdm

    from xaiwatch.explain import get_engine

    engines = {m: get_engine(m, adapter) for m in methods}
    tb = _tensorboard(writer) if tensorboard else None
    records: list[ImageRecord] = []
    pictures: list[np.ndarray] = []
    maps_out: dict[tuple[int, int, str], torch.Tensor] = {}
    try:
        for i in tqdm(range(len(dataset)), desc="xaiwatch explain", unit="image", disable=not progress):
            item = dataset[i]
            rec, pics = _explain_one(adapter, engines, item, i, writer, max_objects, device, tb, maps_out)
            records.append(rec)
            pictures.extend(pics)
    finally:
        if tb is not None:
            tb.writer.close()
    sheet = None
    if pictures:
        from PIL import Image

        sheet = writer.path("contact_sheet.png")
        Image.fromarray(_contact_sheet(pictures)).save(sheet)
    json_path = writer.path("explanations.json")
    payload = {
        "methods": methods,
        "names": adapter.names,
        "conf": adapter.conf,
        "iou": adapter.iou,
        "images": [asdict(r) for r in records],
    }
    json_path.write_text(json.dumps(payload, indent=1, default=_json_value, allow_nan=False))
    writer.save_marker()
    return ExplainResult(
        writer.out, records, json_path, sheet, (writer.out / "tensorboard") if tb is not None else None, maps_out
    )


def _tensorboard(writer: _Writer) -> Any:
    from torch.utils.tensorboard import SummaryWriter

    from xaiwatch.logging import XaiWriter

    folder = writer.out / "tensorboard"
    writer.written.add("tensorboard")
    if folder.exists() and "tensorboard" not in writer.owned:
        raise ConfigurationError(f"{str(folder)!r} exists and was not written by xaiwatch; choose another `out`.")
    return XaiWriter(SummaryWriter(str(folder)))


def _check_values(
    map_: torch.Tensor, box: torch.Tensor, others: torch.Tensor, signed: bool
) -> dict[str, float | bool | None]:
    from xaiwatch.checks import energy_in_box, instance_specificity, pointing_game

    m = map_[None].abs() if signed else map_[None]
    spec = float(instance_specificity(m, box[None], [others])[0])
    return {
        "energy_in_box": float(energy_in_box(m, box[None])[0]),
        "pointing_game": bool(pointing_game(m, box[None])[0]),
        "instance_specificity": spec if math.isfinite(spec) else None,
    }


def _explain_one(
    adapter: DetectorAdapter,
    engines: dict[str, Any],
    item: dict,
    index: int,
    writer: _Writer,
    max_objects: int | None,
    device: str,
    tb: Any,
    maps_out: dict,
) -> tuple[ImageRecord, list[np.ndarray]]:
    from xaiwatch.render import explanation_panel
    from xaiwatch.targets import BoxTarget

    image = item["image"][None].to(device)
    dets = adapter.detect(image)[0].to("cpu")
    h, w = item["orig_size"]
    s = image.shape[-1]
    r = s / max(h, w)
    pad = torch.tensor([(s - round(w * r)) // 2, (s - round(h * r)) // 2] * 2, dtype=torch.float32)
    scale = torch.tensor([round(w * r) / w, round(h * r) / h] * 2, dtype=torch.float32)
    order = torch.argsort(dets.scores, descending=True, stable=True)
    chosen = order[: max_objects or len(order)].tolist()
    stem = f"{index:04d}_{Path(item['path']).stem}"
    records = [
        DetectionRecord(
            box=[float(v) for v in dets.boxes[j]],
            box_original=[float(v) for v in (dets.boxes[j] - pad) / scale],
            score=float(dets.scores[j]),
            label=int(dets.labels[j]),
            name=adapter.names[int(dets.labels[j])] if adapter.names else str(int(dets.labels[j])),
            candidate=int(dets.candidates[j]),
        )
        for j in range(len(dets))
    ]
    pictures = []
    if chosen:
        targets = [BoxTarget(int(dets.candidates[j]), int(dets.labels[j])) for j in chosen]
        for method, engine in engines.items():
            maps = engine.attribute_boxes(image, targets).cpu()
            for k, j in enumerate(chosen):
                others = dets.boxes[[q for q in range(len(dets)) if q != j]]
                rec = records[j]
                rec.explained = True
                rec.checks[method] = _check_values(maps[k], dets.boxes[j], others, engine.signed)
                maps_out[(index, j, method)] = maps[k]
                c = rec.checks[method]
                sub = f"{method}: energy in box {c['energy_in_box']:.2f}, specificity " + (
                    f"{c['instance_specificity']:.2f}" if c["instance_specificity"] is not None else "n/a"
                )
                picture = explanation_panel(
                    item["image"],
                    maps[k],
                    gt_boxes=item["boxes"],
                    gt_labels=item["labels"],
                    detections=dets,
                    tracked_box=dets.boxes[j],
                    names=adapter.names,
                    title=f"{Path(item['path']).name}: {rec.name} {rec.score:.2f} (detection {j})",
                    subtitle=sub,
                    normalize="per_map",
                )
                relative = f"panels/{method}/{stem}_det{j:02d}.png"
                from PIL import Image

                Image.fromarray(picture).save(writer.path(relative))
                rec.panels[method] = relative
                pictures.append(picture)
                if tb is not None:
                    tb.explanation(method, f"{stem}_det{j:02d}", picture, step=0)
    image_record = ImageRecord(item["path"], [int(h), int(w)], [int(image.shape[-2]), int(image.shape[-1])], records)
    return image_record, pictures


def _contact_sheet(pictures: list[np.ndarray], columns: int = 4) -> np.ndarray:
    """All panels in a grid, row by row (white padding for unequal sizes)."""
    ph = max(p.shape[0] for p in pictures)
    pw = max(p.shape[1] for p in pictures)
    cols = min(columns, len(pictures))
    rows = -(-len(pictures) // cols)
    sheet = np.full((rows * ph, cols * pw, 3), 255, dtype=np.uint8)
    for n, p in enumerate(pictures):
        y, x = divmod(n, cols)
        sheet[y * ph : y * ph + p.shape[0], x * pw : x * pw + p.shape[1]] = p[..., :3]
    return sheet
