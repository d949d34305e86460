"""Argument checks shared by xaiwatch callbacks (raised in ``__init__``, showing the value)."""

from __future__ import annotations

from collections.abc import Sequence

from xaiwatch.core.errors import ConfigurationError
from xaiwatch.explain import engine_class

__all__ = ["validate_methods", "validate_probe_indices", "validate_positive", "validate_choices"]

_ON_ERROR = ("warn", "raise")


def validate_methods(methods: Sequence[str]) -> None:
    if not methods:
        raise ConfigurationError("`methods` must name at least one explanation method.")
    for m in methods:
        engine_class(m)  # raises with the list of valid methods
    if len(set(methods)) != len(methods):
        raise ConfigurationError(f"`methods` has duplicates: {list(methods)}.")


def validate_probe_indices(probe_indices: Sequence[int]) -> list[int]:
    indices = [int(i) for i in probe_indices]
    if not indices or len(set(indices)) != len(indices) or min(indices) < 0:
        raise ConfigurationError(f"`probe_indices` must be distinct indices >= 0, got {indices}.")
    return indices


def validate_positive(**values: int) -> None:
    for name, value in values.items():
        if int(value) < 1:
            raise ConfigurationError(f"`{name}` must be >= 1, got {value}.")


def validate_choices(normalize: str | None = None, on_error: str | None = None) -> None:
    """Check the choices given (``None`` = not given)."""
    if normalize is not None and normalize not in ("per_map", "fixed"):
        raise ConfigurationError(f"`normalize` can be per_map or fixed, got {normalize!r}.")
    if on_error is not None and on_error not in _ON_ERROR:
        raise ConfigurationError(f"`on_error` can be warn or raise, got {on_error!r}.")
