"""Callback presets: the LightningCLI YAML files in the repository's ``callbacks/`` folder."""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

import yaml
from pytorch_lightning.callbacks import Callback

from xaiwatch.core.errors import ConfigurationError

__all__ = ["load_callbacks"]


def load_callbacks(path: str | Path) -> list[Callback]:
    """Instantiate the ``trainer.callbacks`` of a LightningCLI config file.

    The file is the one ``--config`` takes: ``trainer: callbacks: [{class_path: ..., init_args: {...}}]``.

    Raises:
        ConfigurationError: for a missing file, another layout, or a class that is not a Lightning Callback.
    """
    path = Path(path)
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
        callbacks.append(cls(**(entry.get("init_args") or {})))
    return callbacks
