"""The PROJECTOR tab's files, written as ``SummaryWriter.add_embedding`` lays them out, without its slow parts.

``add_embedding`` writes ``tensors.tsv`` one row per file-system call (tensorboard's ``GFile`` re-opens the file for
every row), converts the sprite to float and back and encodes it at PNG level 6, and keeps the projector config in
memory only, so a resumed fit's writer rewrites ``projector_config.pbtxt`` with the epochs after the resume alone.
:func:`write_embedding` writes the same three files byte for byte (the sprite at level 1, the same pixels), adds
its entry to the config on disk, and keeps every other entry there: an earlier fit's epochs stay in the PROJECTOR.
"""

from __future__ import annotations

import io
import math
from pathlib import Path
from typing import Any

import numpy as np

from xaiwatch.logging.tensorboard import PNG_COMPRESS_LEVEL, PROJECTOR_CONFIG, _order_embeddings, _projector_entry

__all__ = ["write_embedding", "embedding_subdir", "import_embeddings", "read_config"]


def embedding_subdir(tag: str, step: int) -> str:
    """The folder of one embedding, relative to the log directory: ``<step, 5 digits>/<tag, %-encoded>``, as
    ``add_embedding`` names it."""
    encoded = tag.replace("%", "%25").replace("/", "%2f").replace("\\", "%5c")
    return f"{str(step).zfill(5)}/{encoded}"


def _tsv_rows(rows: list[list[Any]]) -> bytes:
    return ("\n".join("\t".join(str(v) for v in row) for row in rows) + "\n").encode()


def _sprite_png(thumbnails: np.ndarray) -> bytes:
    """``add_embedding``'s sprite of ``(N, 3 | 1, h, w)`` thumbnails in ``[0, 1]``: a square grid of
    ``ceil(sqrt(N))`` columns, zero-padded below, as uint8 (the same pixels), PNG at level 1."""
    from PIL import Image

    n, channels, h, w = thumbnails.shape
    if channels == 1:
        thumbnails = np.repeat(thumbnails, 3, axis=1)
    pixels = np.uint8((thumbnails.astype(np.float64) * 255).clip(0, 255))
    ncols = min(n, math.ceil(n**0.5))
    nrows = math.ceil(n / ncols)
    side = w * ncols
    if nrows * h > side:  # thumbnails taller than wide; add_embedding fails on them too
        raise ValueError(f"A sprite of {n} thumbnails of {h} x {w} px does not fit a square of side {side} px.")
    canvas = np.zeros((side, side, 3), dtype=np.uint8)
    for i in range(n):
        y, x = divmod(i, ncols)
        canvas[y * h : (y + 1) * h, x * w : (x + 1) * w] = pixels[i].transpose(1, 2, 0)
    buffer = io.BytesIO()
    Image.fromarray(canvas).save(buffer, format="PNG", compress_level=PNG_COMPRESS_LEVEL)
    return buffer.getvalue()


def write_embedding(
    log_dir: str | Path,
    tag: str,
    step: int,
    features: Any,
    metadata: list[list[Any]] | None = None,
    header: list[str] | None = None,
    thumbnails: Any = None,
) -> Path:
    """Write one embedding of the PROJECTOR and list it in ``projector_config.pbtxt`` (the last epoch of each tag
    first, see :func:`~xaiwatch.logging.order_projector_config`).

    Args:
        log_dir: the run's log directory.
        tag: the embedding's name (e.g. ``projection/neck.p3``).
        step: its step; an entry of the same tag and step is replaced.
        features: :math:`(N, D)` vectors.
        metadata: ``N`` rows of metadata columns (one column without ``header``).
        header: the metadata's column names.
        thumbnails: :math:`(N, 3, h, w)` images in ``[0, 1]`` for the sprite.

    Returns:
        The embedding's folder.

    Raises:
        ValueError: when metadata or thumbnails do not have one row per vector, or the header does not match.
    """
    from tensorboard.plugins.projector.projector_config_pb2 import EmbeddingInfo

    mat = np.asarray(features.detach().cpu() if hasattr(features, "detach") else features)
    if mat.ndim != 2:
        raise ValueError(f"`features` must be (N, D), got shape {tuple(mat.shape)}.")
    n = mat.shape[0]
    log_dir = Path(log_dir)
    subdir = embedding_subdir(tag, step)
    folder = log_dir / subdir
    folder.mkdir(parents=True, exist_ok=True)
    info = EmbeddingInfo(tensor_name=f"{tag}:{str(step).zfill(5)}", tensor_path=f"{subdir}/tensors.tsv")
    if metadata is not None:
        if len(metadata) != n:
            raise ValueError(f"{len(metadata)} metadata rows for {n} vectors.")
        if header:
            if any(len(row) != len(header) for row in metadata):
                raise ValueError(f"Every metadata row must have the header's {len(header)} columns.")
            rows = [list(header), *metadata]
        else:
            rows = [[v] for v in metadata]
        (folder / "metadata.tsv").write_bytes(_tsv_rows(rows))
        info.metadata_path = f"{subdir}/metadata.tsv"
    if thumbnails is not None:
        thumbs = np.asarray(thumbnails.detach().cpu() if hasattr(thumbnails, "detach") else thumbnails)
        if thumbs.ndim != 4 or thumbs.shape[0] != n:
            raise ValueError(f"`thumbnails` must be (N, C, h, w) with N = {n}, got shape {tuple(thumbs.shape)}.")
        (folder / "sprite.png").write_bytes(_sprite_png(thumbs))
        info.sprite.image_path = f"{subdir}/sprite.png"
        info.sprite.single_image_dim.extend([int(thumbs.shape[3]), int(thumbs.shape[2])])
    (folder / "tensors.tsv").write_bytes(_tsv_rows(mat.tolist()))

    config = read_config(log_dir)
    kept = [e for e in config.embeddings if e.tensor_path != info.tensor_path]
    del config.embeddings[:]
    config.embeddings.extend([*kept, info])
    _save_config(log_dir, config)
    return folder


def read_config(log_dir: str | Path):
    """The ``ProjectorConfig`` of a log directory (empty when it has none)."""
    from google.protobuf import text_format
    from tensorboard.plugins.projector.projector_config_pb2 import ProjectorConfig

    config = ProjectorConfig()
    path = Path(log_dir) / PROJECTOR_CONFIG
    if path.is_file():
        text_format.Parse(path.read_text(), config)
    return config


def _save_config(log_dir: Path, config) -> None:
    """Write ``config`` ordered as :func:`~xaiwatch.logging.order_projector_config` orders it, in one write."""
    from google.protobuf import text_format

    _order_embeddings(config)
    (log_dir / PROJECTOR_CONFIG).write_text(text_format.MessageToString(config))


def import_embeddings(log_dir: str | Path, earlier: str | Path, prefix: str) -> int:
    """Copy an earlier run's embeddings whose tag starts with ``prefix`` into ``log_dir`` and list them there.

    A resumed fit logs into a new version folder, and TensorBoard's PROJECTOR refuses files outside the folder of
    its config, so the epochs before the resume are copied (not linked: a step written again must not change the
    earlier run's files). Entries ``log_dir`` already lists, and entries whose files are missing, are left alone.

    Returns:
        The number of embeddings copied.
    """
    import shutil

    log_dir, earlier = Path(log_dir), Path(earlier)
    if log_dir.resolve() == earlier.resolve():
        return 0
    config, theirs = read_config(log_dir), read_config(earlier)
    listed = {e.tensor_path for e in config.embeddings}
    copied = 0
    for entry in theirs.embeddings:
        tag, step = _projector_entry(entry)
        if not tag.startswith(prefix) or entry.tensor_path in listed or step < 0:
            continue
        files = [p for p in (entry.tensor_path, entry.metadata_path, entry.sprite.image_path) if p]
        if not all((earlier / p).is_file() for p in files):
            continue
        for p in files:
            (log_dir / p).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(earlier / p, log_dir / p)
        config.embeddings.append(entry)
        listed.add(entry.tensor_path)
        copied += 1
    if copied:
        _save_config(log_dir, config)
    return copied
