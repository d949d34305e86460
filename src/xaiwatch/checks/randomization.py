"""Adebayo et al. (2018) model-randomization sanity check, on deep copies (the model is never touched)."""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator, Sequence

import torch
from torch import nn

from xaiwatch.core.context import fork_rng
from xaiwatch.core.errors import ConfigurationError

__all__ = ["randomize", "cascading_randomization", "randomization_similarity"]

Stage = tuple[str, Sequence[str]]


def _reinit(module: nn.Module) -> None:
    for m in module.modules():
        reset = getattr(m, "reset_parameters", None)
        if callable(reset):
            reset()


def randomize(model: nn.Module, paths: Sequence[str], seed: int = 0, inplace: bool = False) -> nn.Module:
    """Re-initialise the learned weights of the submodules at ``paths`` (``reset_parameters``, normalisation
    statistics included); parameters that do not train (``requires_grad=False``, e.g. YOLOv8's fixed DFL
    projection) keep their values.

    Args:
        model: the model; a deep copy is randomised unless ``inplace``.
        paths: dotted submodule paths (``""`` is the whole model).
        seed: seed of the new weights (global RNGs are restored afterwards).
        inplace: randomise ``model`` itself (used by the cascade on its own copy).

    Returns:
        the randomised model (a copy unless ``inplace``).

    Raises:
        ConfigurationError: for a path that is not a submodule.
    """
    target = model if inplace else copy.deepcopy(model)
    frozen = {n: p.detach().clone() for n, p in target.named_parameters() if not p.requires_grad}
    with fork_rng(seed), torch.no_grad():
        for path in paths:
            try:
                sub = target.get_submodule(path)
            except AttributeError:
                raise ConfigurationError(
                    f"Cannot randomise {path!r}: not a submodule of {type(model).__name__}."
                ) from None
            _reinit(sub)
        params = dict(target.named_parameters())
        for name, value in frozen.items():
            params[name].copy_(value)
    return target


def cascading_randomization(
    model: nn.Module, stages: Sequence[Stage], seed: int = 0
) -> Iterator[tuple[str, nn.Module]]:
    """Randomise ``stages`` one after another, top (head) first, each on top of the previous ones.

    Yields ``(stage name, model copy)`` after each stage; the copy is one deep copy of ``model`` modified in
    place between yields (use it before asking for the next).
    """
    if not stages:
        raise ConfigurationError("`stages` is empty; give at least one (name, [module paths]) stage.")
    work = copy.deepcopy(model)
    for i, (name, paths) in enumerate(stages):
        randomize(work, paths, seed=seed + i, inplace=True)
        yield name, work


def randomization_similarity(
    map_fn: Callable[[nn.Module], torch.Tensor],
    model: nn.Module,
    stages: Sequence[Stage],
    similarity: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """Similarity between the maps of ``model`` and of cascading randomised copies of it.

    A map that barely changes when the weights that produced it are randomised does not explain the model.

    Args:
        map_fn: a model to its maps :math:`(N, 1, H, W)` of the fixed probes and targets.
        model: the trained model (unchanged).
        stages: ``(name, module paths)`` from the top of the network down (see ``adapter.randomization_stages()``).
        similarity: e.g. :func:`~xaiwatch.checks.similarity.spearman` or :func:`~xaiwatch.checks.similarity.ssim`.
        seed: seed of the random weights.

    Returns:
        stage name (cumulative) to the :math:`(N,)` similarities.
    """
    reference = map_fn(model)
    return {name: similarity(reference, map_fn(copy_)) for name, copy_ in cascading_randomization(model, stages, seed)}
