"""Check keyword arguments against a class's signature before calling it, for messages that list the valid ones."""

from __future__ import annotations

import inspect
from collections.abc import Iterable
from typing import Any

__all__ = ["accepted_arguments", "unknown_arguments"]

_NAMED = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)


def accepted_arguments(cls: type, exclude: Iterable[str] = ()) -> list[str] | None:
    """The keyword arguments ``cls(...)`` accepts, following ``**kwargs`` that a subclass passes to its base.

    Walks the method resolution order: the named parameters of each ``__init__`` are collected until one has no
    ``**kwargs``.

    Args:
        cls: the class.
        exclude: names to leave out (e.g. a positional ``adapter``).

    Returns:
        The names in signature order, or ``None`` when the signature is open-ended (every ``__init__`` up to
        ``object`` takes ``**kwargs``) and any name may be valid.

    Example:
        >>> class A:
        ...     def __init__(self, x: int = 0, y: int = 1) -> None: ...
        >>> class B(A):
        ...     def __init__(self, z: int = 2, **kwargs: int) -> None: ...
        >>> accepted_arguments(B)
        ['z', 'x', 'y']
    """
    names: list[str] = []
    skip = {"self", *exclude}
    for klass in cls.__mro__:
        init = klass.__dict__.get("__init__")
        if init is None or klass is object:
            continue
        try:
            params = list(inspect.signature(init).parameters.values())
        except (TypeError, ValueError):
            return None
        names += [p.name for p in params if p.kind in _NAMED and p.name not in skip and p.name not in names]
        if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
            return names
    return None


def unknown_arguments(cls: type, kwargs: dict[str, Any], exclude: Iterable[str] = ()) -> tuple[list[str], list[str]]:
    """The keys of ``kwargs`` that ``cls(...)`` does not accept, and the accepted names.

    Returns:
        ``(unknown, valid)``; both empty when the signature is open-ended.

    Example:
        >>> class A:
        ...     def __init__(self, num_probe: int = 8) -> None: ...
        >>> unknown_arguments(A, {"num_probes": 4})
        (['num_probes'], ['num_probe'])
    """
    valid = accepted_arguments(cls, exclude)
    if valid is None:
        return [], []
    return [k for k in kwargs if k not in valid], valid
