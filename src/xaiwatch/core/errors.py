"""Error types raised by xaiwatch.

Every error says which argument or input was wrong, what was expected, what was received and how to
fix it. They subclass the built-in type a caller would naturally catch (``ValueError``, ``TypeError``,
``ModuleNotFoundError``) as well as :class:`XaiwatchError`.
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = [
    "XaiwatchError",
    "ConfigurationError",
    "ShapeError",
    "UnsupportedModelError",
    "MissingDependencyError",
    "DatasetFormatError",
    "check_shape",
]


class XaiwatchError(Exception):
    """Base class of every error raised by xaiwatch."""


class ConfigurationError(XaiwatchError, ValueError):
    """An argument has a value xaiwatch cannot use."""


class ShapeError(XaiwatchError, ValueError):
    """A tensor has the wrong number of dimensions or the wrong size."""

    def __init__(self, name: str, actual_shape: Sequence[int], expected_shape: Sequence[str | int]) -> None:
        self.actual_shape = tuple(actual_shape)
        self.expected_shape = tuple(expected_shape)
        super().__init__(
            f"`{name}` must have shape ({', '.join(map(str, self.expected_shape))}), got {self.actual_shape}."
        )


class UnsupportedModelError(XaiwatchError, TypeError):
    """The model (or a method on this model) is not supported."""


class MissingDependencyError(XaiwatchError, ModuleNotFoundError):
    """An optional dependency is not installed; the message names the extra to install."""


class DatasetFormatError(XaiwatchError, ValueError):
    """A dataset file (yaml, label file, image) is malformed; the message names the file and line."""


def check_shape(x: object, shape: Sequence[str | int], name: str = "input") -> None:
    """Check that ``x`` is a tensor of the given symbolic shape, like kornia's ``KORNIA_CHECK_SHAPE``.

    Args:
        x: the tensor to check.
        shape: one entry per dimension: an ``int`` requires that size, a ``str`` accepts any size.
        name: the argument name used in the message.

    Raises:
        ShapeError: if ``x`` is not a tensor, has another number of dimensions, or a fixed size differs.

    Example:
        >>> import torch
        >>> check_shape(torch.zeros(2, 3, 8, 8), ["B", 3, "H", "W"])
    """
    import torch

    if not isinstance(x, torch.Tensor):
        raise ShapeError(name, (), shape) from TypeError(f"`{name}` must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != len(shape) or any(isinstance(s, int) and s != d for s, d in zip(shape, x.shape)):
        raise ShapeError(name, tuple(x.shape), shape)
