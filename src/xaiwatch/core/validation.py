"""Argument validation used everywhere: each function returns the clean value or raises a message showing it.

Every public constructor of xaiwatch validates its arguments with these, so that a bad value fails at once with
the argument's name, what was expected and what was given (torchmetrics' ``_<name>_arg_validation`` stage).

Example:
    >>> positive_int("num_probe", 8)
    8
    >>> in_range("iou_threshold", 0.5, 0.0, 1.0, low_open=True)
    0.5
    >>> positive_int("num_probe", True)
    Traceback (most recent call last):
    ...
    xaiwatch.core.errors.ConfigurationError: `num_probe` must be an integer >= 1, got True.
"""

from __future__ import annotations

import numbers
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from xaiwatch.core.errors import ConfigurationError

__all__ = [
    "positive_int",
    "non_negative_int",
    "optional_positive_int",
    "in_range",
    "probability",
    "positive_float",
    "choice",
    "distinct_indices",
    "existing_path",
]


def _integer(name: str, value: Any, minimum: int) -> int:
    integral = isinstance(value, numbers.Integral) and not isinstance(value, bool)
    if not integral or int(value) < minimum:
        raise ConfigurationError(f"`{name}` must be an integer >= {minimum}, got {value!r}.")
    return int(value)


def positive_int(name: str, value: Any) -> int:
    """``value`` as an ``int >= 1``; booleans and non-integral numbers are refused.

    Raises:
        ConfigurationError: otherwise, naming the argument and showing the value.
    """
    return _integer(name, value, 1)


def non_negative_int(name: str, value: Any) -> int:
    """``value`` as an ``int >= 0``.

    Raises:
        ConfigurationError: otherwise.
    """
    return _integer(name, value, 0)


def optional_positive_int(name: str, value: Any) -> int | None:
    """``None`` or an ``int >= 1``.

    Raises:
        ConfigurationError: otherwise.
    """
    return None if value is None else positive_int(name, value)


def in_range(
    name: str, value: Any, low: float, high: float, *, low_open: bool = False, high_open: bool = False
) -> float:
    """``value`` as a float in the interval from ``low`` to ``high`` (closed unless ``*_open``).

    Raises:
        ConfigurationError: for a non-number, NaN or a value outside the interval (shown in interval notation).
    """
    interval = f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ConfigurationError(f"`{name}` must be a number in {interval}, got {value!r}.")
    v = float(value)
    below = v <= low if low_open else v < low
    above = v >= high if high_open else v > high
    if v != v or below or above:
        raise ConfigurationError(f"`{name}` must be in {interval}, got {value!r}.")
    return v


def probability(name: str, value: Any) -> float:
    """``value`` in ``[0, 1]``.

    Raises:
        ConfigurationError: otherwise.
    """
    return in_range(name, value, 0.0, 1.0)


def positive_float(name: str, value: Any) -> float:
    """``value`` as a float ``> 0`` (finite).

    Raises:
        ConfigurationError: otherwise.
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0 < float(value) < float("inf"):
        raise ConfigurationError(f"`{name}` must be a number > 0, got {value!r}.")
    return float(value)


def choice(name: str, value: Any, choices: Iterable[str]) -> str:
    """``value`` if it is one of ``choices``.

    Raises:
        ConfigurationError: otherwise, listing the choices.
    """
    options = list(choices)
    if value not in options:
        raise ConfigurationError(f"`{name}` can be {', '.join(map(str, options))}; got {value!r}.")
    return value


def distinct_indices(name: str, values: Sequence[Any]) -> list[int]:
    """A non-empty list of distinct integers ``>= 0``.

    Raises:
        ConfigurationError: otherwise.
    """
    if isinstance(values, (str, bytes)) or not isinstance(values, Iterable):
        raise ConfigurationError(f"`{name}` must be a list of distinct indices >= 0, got {values!r}.")
    values = list(values)
    ok = bool(values) and all(isinstance(v, numbers.Integral) and not isinstance(v, bool) for v in values)
    if not ok or min(values) < 0 or len(set(values)) != len(values):
        raise ConfigurationError(f"`{name}` must be distinct indices >= 0, got {values}.")
    return [int(v) for v in values]


def existing_path(name: str, value: Any, kind: str = "file") -> Path:
    """``value`` as a :class:`~pathlib.Path` that exists and is a ``"file"``, a ``"folder"`` or ``"any"``.

    Raises:
        ConfigurationError: when it does not exist or is of the other kind ("... is a folder, expected a file").
    """
    path = Path(value)
    if not path.exists():
        raise ConfigurationError(f"`{name}`: {str(path)!r} does not exist.")
    if kind == "file" and path.is_dir():
        raise ConfigurationError(f"`{name}`: {str(path)!r} is a folder, expected a file.")
    if kind == "folder" and not path.is_dir():
        raise ConfigurationError(f"`{name}`: {str(path)!r} is a file, expected a folder.")
    return path
