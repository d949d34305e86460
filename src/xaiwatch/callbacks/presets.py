"""Callback presets: the LightningCLI YAML files in the repository's ``callbacks/`` folder."""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

import yaml
from pytorch_lightning.callbacks import Callback

from xaiwatch.core.arguments import unknown_arguments
from xaiwatch.core.errors import ConfigurationError, XaiwatchError

__all__ = ["load_callbacks", "default_preset", "DEFAULT_PRESET"]

#: the preset ``xaiwatch demo`` attaches (``callbacks/demo.yaml`` of the repository)
DEFAULT_PRESET = "demo.yaml"


def default_preset(name: str = DEFAULT_PRESET) -> Path | None:
    """``callbacks/<name>`` found from the working folder or the installed package's parents (``None``: not found).

    Example:
        >>> default_preset("no-such-preset.yaml") is None
        True
    """
    here = Path(__file__).resolve()
    for root in (Path.cwd(), *here.parents):
        candidate = root / "callbacks" / name
        if candidate.is_file():
            return candidate
    return None


def load_callbacks(path: str | Path) -> list[Callback]:
    r"""Instantiate the ``trainer.callbacks`` of a LightningCLI config file.

    The file is the one ``--config`` takes: ``trainer: callbacks: [{class_path: ..., init_args: {...}}]``.

    Raises:
        ConfigurationError: for a missing file, another layout, a class that is not a Lightning Callback, or an
            argument the callback does not take (the message names the file, the callback and its valid arguments).
            An error of a callback's own argument checks is re-raised with the file and the callback prepended.

    Example:
        >>> import tempfile
        >>> preset = Path(tempfile.mkdtemp()) / "p.yaml"
        >>> _ = preset.write_text("trainer:\n  callbacks:\n    - class_path: pytorch_lightning.callbacks.Timer\n")
        >>> [type(cb).__name__ for cb in load_callbacks(preset)]
        ['Timer']
    """
    path = Path(path)
    if path.is_dir():
        raise ConfigurationError(f"Callback preset {str(path)!r} is a folder; pass one of its YAML files.")
    if not path.is_file():
        raise ConfigurationError(f"Callback preset {str(path)!r} does not exist.")
    config = yaml.safe_load(path.read_text()) or {}
    entries = (config.get("trainer") or {}).get("callbacks") if isinstance(config, dict) else None
    if not isinstance(entries, list) or not entries:
        raise ConfigurationError(f"{str(path)!r} must define `trainer: callbacks:` as a list of class_path entries.")
    callbacks = []
    for n, entry in enumerate(entries):
        if not isinstance(entry, dict) or "class_path" not in entry:
            raise ConfigurationError(f"{str(path)!r}: callbacks[{n}] needs a `class_path`, got {entry!r}.")
        module_name, _, cls_name = str(entry["class_path"]).rpartition(".")
        try:
            cls: Any = getattr(importlib.import_module(module_name), cls_name)
        except (ImportError, AttributeError, ValueError) as err:
            raise ConfigurationError(f"{str(path)!r}: cannot import {entry['class_path']!r} ({err}).") from err
        if not (isinstance(cls, type) and issubclass(cls, Callback)):
            raise ConfigurationError(f"{str(path)!r}: {entry['class_path']!r} is not a Lightning Callback.")
        callbacks.append(_instantiate(path, n, cls, entry.get("init_args") or {}))
    return callbacks


def _instantiate(path: Path, n: int, cls: type[Callback], init_args: Any) -> Callback:
    """``cls(**init_args)``, with the file, the callback and the valid arguments in every error."""
    where = f"{str(path)!r}: callbacks[{n}] ({cls.__name__})"
    if not isinstance(init_args, dict):
        raise ConfigurationError(
            f"{where}: `init_args` must be a mapping of argument names to values, got {init_args!r}."
        )
    unknown, valid = unknown_arguments(cls, init_args)
    if unknown:
        raise ConfigurationError(
            f"{where}: unknown argument{'s' if len(unknown) > 1 else ''} {', '.join(unknown)}. "
            f"Valid arguments of {cls.__name__}: {', '.join(valid)}."
        )
    try:
        return cls(**init_args)
    except XaiwatchError as err:
        try:
            wrapped = type(err)(f"{where}: {err}")
        except TypeError:  # an error type with another constructor (ShapeError)
            raise err from None
        raise wrapped from err
    except TypeError as err:  # a value of the wrong type that the constructor did not check itself
        raise ConfigurationError(f"{where}: {err}. Valid arguments of {cls.__name__}: {', '.join(valid)}.") from err
