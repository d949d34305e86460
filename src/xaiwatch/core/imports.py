"""Optional dependencies, checked the torchmetrics way: a flag, a lazy import, an error naming the extra."""

from __future__ import annotations

import importlib.util
from functools import cache

from xaiwatch.core.errors import MissingDependencyError

__all__ = ["available", "require"]


@cache
def available(module: str) -> bool:
    """True when ``module`` can be imported (without importing it)."""
    return importlib.util.find_spec(module) is not None


def require(module: str, extra: str) -> None:
    """Raise :class:`MissingDependencyError` naming the extra to install when ``module`` is missing."""
    if not available(module):
        raise MissingDependencyError(
            f"`{module}` is required for this feature but is not installed. Install it with "
            f"`pip install 'xaiwatch[{extra}]'`."
        )
