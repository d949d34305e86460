"""Argument checks of callback arguments that need the method registry (the rest is
:mod:`xaiwatch.core.validation`)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from xaiwatch.core.errors import ConfigurationError
from xaiwatch.core.validation import distinct_indices
from xaiwatch.explain import engine_class

__all__ = ["validate_methods", "validate_method_options", "validate_probe_indices"]


def validate_methods(methods: Sequence[str]) -> None:
    """Every name is a registered method, at least one, no duplicates.

    Raises:
        ConfigurationError: otherwise (an unknown name lists the valid ones).
    """
    if not methods:
        raise ConfigurationError("`methods` must name at least one explanation method.")
    for m in methods:
        engine_class(m)  # raises with the list of valid methods
    if len(set(methods)) != len(methods):
        raise ConfigurationError(f"`methods` has duplicates: {list(methods)}.")


def validate_method_options(
    method_options: Mapping[str, Mapping[str, Any]] | None, methods: Sequence[str]
) -> dict[str, dict[str, Any]]:
    """A copy of ``method_options`` whose keys are among ``methods``.

    Raises:
        ConfigurationError: for options of a method that is not in ``methods``, or options that are not a dict.
    """
    options = dict(method_options or {})
    unknown = sorted(set(options) - set(methods))
    if unknown:
        raise ConfigurationError(f"`method_options` names methods not in `methods`: {unknown}.")
    bad = sorted(k for k, v in options.items() if not isinstance(v, Mapping))
    if bad:
        raise ConfigurationError(f"`method_options` must map each method to a dict of options; not a dict for {bad}.")
    return {k: dict(v) for k, v in options.items()}


def validate_probe_indices(probe_indices: Sequence[int]) -> list[int]:
    """Distinct indices ``>= 0`` (see :func:`~xaiwatch.core.validation.distinct_indices`)."""
    return distinct_indices("probe_indices", probe_indices)
