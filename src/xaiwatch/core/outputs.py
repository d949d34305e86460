"""Output folders that never lose a user's file.

Every xaiwatch writer (``generate``, ``write_counterfactual``, ``xaiwatch demo``) writes into an *output folder*: a
folder that did not exist or was empty when xaiwatch first wrote there. The folder holds a marker file,
``.xaiwatch-output``, listing every file xaiwatch wrote in it (with its size and modification time once written).
Only such a folder is reused, and replacing its content removes only the files the marker lists, unchanged since
xaiwatch wrote them; anything else (a user's file dropped into the folder, a listed file the user has edited) is
never overwritten or deleted: the writer stops with a message saying what to do.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from xaiwatch.core.errors import ConfigurationError

__all__ = ["MARKER", "claim_files", "is_output_folder", "prepare_output_folder", "seal_output_folder"]

#: name of the marker file of an output folder
MARKER = ".xaiwatch-output"
_VERSION = 1


def is_output_folder(root: str | Path) -> bool:
    """Whether ``root`` is a folder xaiwatch created for its output (it holds a :data:`MARKER` file).

    Example:
        >>> import tempfile
        >>> root = Path(tempfile.mkdtemp()) / "out"
        >>> is_output_folder(root), is_output_folder(prepare_output_folder(root, what="test"))
        (False, True)
    """
    return (Path(root) / MARKER).is_file()


def _read(root: Path) -> dict[str, Any]:
    path = root / MARKER
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigurationError(
            f"{path} is not a valid xaiwatch marker ({e}); xaiwatch will not write into {root}: choose another "
            "folder (or delete the folder yourself if you know it holds nothing you need)"
        ) from e
    if not isinstance(data, dict) or not isinstance(data.get("files"), dict):
        raise ConfigurationError(f"{path} is not an xaiwatch marker; choose another output folder than {root}")
    data.setdefault("dirs", [])
    return data


def _write(root: Path, data: dict[str, Any]) -> None:
    tmp = root / (MARKER + ".tmp")
    tmp.write_text(json.dumps(data, indent=0, sort_keys=True))
    os.replace(tmp, root / MARKER)


def _stat(path: Path) -> list[int]:
    st = path.stat()
    return [int(st.st_size), int(st.st_mtime_ns)]


def _first_entries(root: Path, limit: int = 3) -> list[str]:
    names = []
    for p in sorted(root.iterdir()):
        names.append(p.name + ("/" if p.is_dir() else ""))
        if len(names) == limit:
            break
    return names


def _changed(root: Path, files: dict[str, Any], select: Callable[[str], bool]) -> list[str]:
    """The listed files under ``select`` that exist and differ (size or mtime) from what xaiwatch wrote."""
    changed = []
    for rel, stat in files.items():
        p = root / rel
        if select(rel) and stat is not None and p.is_file() and _stat(p) != list(stat):
            changed.append(rel)
    return changed


def _clear(root: Path, data: dict[str, Any], select: Callable[[str], bool]) -> None:
    """Remove the listed files under ``select`` (and the listed folders left empty), nested output folders too."""
    for sub in sorted({p.parent for p in root.rglob(MARKER) if p.parent != root}, key=lambda p: -len(p.parts)):
        if select(sub.relative_to(root).as_posix() + "/"):
            prepare_output_folder(sub, overwrite=True, what="nested output")
            if [p.name for p in sub.iterdir()] == [MARKER]:  # nothing but our marker left: remove the folder
                (sub / MARKER).unlink()
                sub.rmdir()
    for rel in [r for r in data["files"] if select(r)]:
        p = root / rel
        if p.is_file() or p.is_symlink():
            p.unlink()
        del data["files"][rel]
    for rel in sorted(data["dirs"], key=lambda r: -r.count("/")):
        p = root / rel
        if select(rel + "/") and p.is_dir() and not any(p.iterdir()):
            p.rmdir()
    data["dirs"] = [r for r in data["dirs"] if (root / r).is_dir()]


def prepare_output_folder(
    root: str | Path,
    *,
    what: str,
    overwrite: bool = False,
    keep: bool = False,
    replace: Iterable[str] | None = None,
) -> Path:
    """Make ``root`` an output folder, or check that it is one and (with ``overwrite``) clear what xaiwatch wrote.

    Args:
        root: the folder. It must not exist, be empty, or be an output folder (hold a :data:`MARKER` file).
        what: what is written there, for the messages (e.g. ``"the shapes dataset"``).
        overwrite: when the folder already holds files xaiwatch wrote, remove them (only the listed files, and
            only when unchanged since xaiwatch wrote them; nested output folders alike). Without it such files stop
            the call.
        keep: reuse an output folder as it is (new files are added beside xaiwatch's earlier ones).
        replace: restrict ``overwrite`` (and the check) to the listed relative paths under these prefixes
            (e.g. ``["images/val/", "dataset.yaml"]``); ``None`` means every file xaiwatch wrote there.

    Returns:
        ``root`` as a :class:`~pathlib.Path`.

    Raises:
        ConfigurationError: if ``root`` is a file; if it holds files and no marker (files xaiwatch did not write);
            if it holds xaiwatch's earlier output and ``overwrite`` is false; if a file to replace was changed
            since xaiwatch wrote it.

    Example:
        >>> import tempfile
        >>> root = prepare_output_folder(Path(tempfile.mkdtemp()) / "out", what="test")
        >>> [p.write_text("x") for p in claim_files(root, ["a.txt"])]
        [1]
        >>> _ = seal_output_folder(root)
        >>> _ = prepare_output_folder(root, what="test", overwrite=True)
        >>> (root / "a.txt").exists()
        False
    """
    root = Path(root)
    prefixes = None if replace is None else tuple(replace)

    def select(rel: str) -> bool:
        return prefixes is None or any(rel == p or rel.startswith(p.rstrip("/") + "/") for p in prefixes)

    if root.exists() and not root.is_dir():
        raise ConfigurationError(f"{root} is a file, not a folder; xaiwatch writes {what} into a new folder")
    if (root / MARKER).is_file():
        data = _read(root)
        if keep:
            return root
        existing = [r for r in data["files"] if select(r) and (root / r).exists()]
        nested = [p for p in root.rglob(MARKER) if p.parent != root]
        if existing or nested:
            if not overwrite:
                raise ConfigurationError(
                    f"{root} already holds {what} written by xaiwatch ({len(existing)} files, e.g. {existing[:2]}); "
                    "pass overwrite=True to replace it (only the files xaiwatch wrote there are removed) or choose "
                    "another folder"
                )
            changed = _changed(root, data["files"], select)
            if changed:
                raise ConfigurationError(
                    f"{root}: {len(changed)} files xaiwatch wrote were changed since (e.g. {changed[:3]}); xaiwatch "
                    f"does not delete them: move them away, or write {what} into another folder"
                )
            _clear(root, data, select)
        _write(root, data)
        return root
    if root.is_dir() and any(root.iterdir()):
        raise ConfigurationError(
            f"{root} already holds files xaiwatch did not write ({', '.join(_first_entries(root))}...); xaiwatch "
            f"never overwrites or deletes them (overwrite=True does not change that). Write {what} into a new or "
            f"empty folder instead, e.g. {root / 'xaiwatch'}"
        )
    root.mkdir(parents=True, exist_ok=True)
    _write(root, {"version": _VERSION, "what": what, "files": {}, "dirs": []})
    return root


def claim_files(root: str | Path, paths: Iterable[str]) -> list[Path]:
    """Record ``paths`` (relative to the output folder ``root``) as xaiwatch's before writing them.

    Creates their parent folders. A path that already exists and is not xaiwatch's stops the call (nothing is
    recorded then).

    Args:
        root: an output folder (see :func:`prepare_output_folder`).
        paths: relative file paths, ``/``-separated; a path ending in ``/`` is a folder to create (removed again
            by a later overwrite when empty).

    Returns:
        The absolute paths of the files (not the folders), in order.

    Raises:
        ConfigurationError: if ``root`` is not an output folder, a path leaves it, or a path exists and was not
            written by xaiwatch.
    """
    root = Path(root)
    if not (root / MARKER).is_file():
        raise ConfigurationError(f"{root} is not an xaiwatch output folder; call prepare_output_folder first")
    data = _read(root)
    paths = [str(p) for p in paths]
    folders = [Path(p).as_posix() for p in paths if p.endswith("/")]
    rels = [Path(p).as_posix() for p in paths if not p.endswith("/")]
    foreign = []
    for rel in rels + folders:
        if Path(rel).is_absolute() or ".." in Path(rel).parts or rel == MARKER:
            raise ConfigurationError(f"{rel!r} must be a relative path inside {root}")
    for rel in rels:
        if rel not in data["files"] and (root / rel).exists():
            foreign.append(rel)
    if foreign:
        raise ConfigurationError(
            f"{root} holds {len(foreign)} files xaiwatch did not write where it would write (e.g. {foreign[:3]}); "
            "xaiwatch does not overwrite them: move them away or choose another folder"
        )
    dirs = set(data["dirs"])
    for rel in [*rels, *(f + "/x" for f in folders)]:
        parent = Path(rel).parent
        missing = [q for q in (parent, *parent.parents) if q != Path(".") and not (root / q).exists()]
        for q in reversed(missing):
            (root / q).mkdir()
            dirs.add(q.as_posix())
        data["files"].setdefault(rel, None)
    data["dirs"] = sorted(dirs)
    _write(root, data)
    return [root / rel for rel in rels]


def seal_output_folder(root: str | Path) -> Path:
    """Record the size and modification time of the files xaiwatch wrote in ``root`` (call after writing them).

    A sealed file that is changed afterwards is never deleted by a later ``overwrite``.

    Returns:
        ``root`` as a :class:`~pathlib.Path`.
    """
    root = Path(root)
    data = _read(root)
    for rel, stat in data["files"].items():
        if stat is None and (root / rel).is_file():
            data["files"][rel] = _stat(root / rel)
    _write(root, data)
    return root
