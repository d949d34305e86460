"""2-D projections of embeddings (PCA, t-SNE, UMAP) and their alignment to the previous epoch's layout."""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence

import numpy as np
import torch

from xaiwatch.core.errors import ConfigurationError, ShapeError
from xaiwatch.core.imports import require

__all__ = ["METHODS", "validate_projection", "project", "procrustes", "align", "aligned_init", "displacement"]

METHODS = ("pca", "tsne", "umap")


def validate_projection(
    method: str, num_points: int | None = None, perplexity: float = 30.0, n_neighbors: int = 15
) -> None:
    """Check a projection request before any work is done.

    Args:
        method: ``"pca"``, ``"tsne"`` or ``"umap"``.
        num_points: number of points to project, when known.
        perplexity: t-SNE perplexity.
        n_neighbors: UMAP neighbourhood size.

    Raises:
        ConfigurationError: for an unknown method, or a t-SNE perplexity / UMAP neighbourhood that needs more
            points than there are.
        MissingDependencyError: for UMAP when ``umap-learn`` is not installed (names the ``umap`` extra).
    """
    if method not in METHODS:
        raise ConfigurationError(f"`method` can be {', '.join(METHODS)}, got {method!r}.")
    if method == "umap":
        require("umap", "umap")
    if num_points is None:
        return
    if num_points < 3:
        raise ConfigurationError(f"A projection needs at least 3 points, got {num_points}.")
    if method == "tsne" and not 0 < perplexity < num_points:
        raise ConfigurationError(
            f"t-SNE `perplexity={perplexity}` must be smaller than the number of points ({num_points}); "
            f"lower `perplexity` (5-50, below {num_points}) or project more points."
        )
    if method == "umap" and not 2 <= n_neighbors < num_points:
        raise ConfigurationError(
            f"UMAP `n_neighbors={n_neighbors}` must be in [2, {num_points}) for {num_points} points; lower it."
        )


def _as_numpy(x: torch.Tensor | np.ndarray, name: str) -> np.ndarray:
    a = x.detach().cpu().double().numpy() if isinstance(x, torch.Tensor) else np.asarray(x, dtype=np.float64)
    if a.ndim != 2:
        raise ShapeError(name, a.shape, ["N", "D"])
    return a


def _pca(x: np.ndarray) -> np.ndarray:
    from sklearn.decomposition import PCA

    if x.shape[1] == 1:
        return np.concatenate([x - x.mean(0), np.zeros_like(x)], axis=1)
    return PCA(n_components=2, svd_solver="full", random_state=0).fit_transform(x)


def project(
    features: torch.Tensor | np.ndarray,
    method: str = "pca",
    init: np.ndarray | None = None,
    seed: int = 0,
    perplexity: float = 30.0,
    n_neighbors: int = 15,
    max_iter: int = 500,
) -> np.ndarray:
    """Project embeddings to 2-D.

    Args:
        features: :math:`(N, D)` embeddings.
        method: ``"pca"`` (scikit-learn, exact SVD), ``"tsne"`` (scikit-learn Barnes-Hut) or ``"umap"`` (umap-learn).
        init: :math:`(N, 2)` starting layout for t-SNE / UMAP (e.g. :func:`aligned_init`); PCA ignores it.
        seed: random state of t-SNE / UMAP.
        perplexity: t-SNE perplexity (< N).
        n_neighbors: UMAP neighbourhood size (< N).
        max_iter: t-SNE iterations.

    Returns:
        :math:`(N, 2)` float64 coordinates.

    Raises:
        ConfigurationError: see :func:`validate_projection`; also for an ``init`` of the wrong shape.
        MissingDependencyError: UMAP without ``umap-learn``.
    """
    x = _as_numpy(features, "features")
    validate_projection(method, len(x), perplexity, n_neighbors)
    if method == "pca":
        return _pca(x)
    if init is None:
        init = _pca(x)
    init = np.asarray(init, dtype=np.float64)
    if init.shape != (len(x), 2):
        raise ConfigurationError(f"`init` must have shape ({len(x)}, 2), got {init.shape}.")
    init = init - init.mean(0)
    if method == "tsne":
        from sklearn.manifold import TSNE

        # the scale scikit-learn gives its own PCA initialisation: keeps the layout, lets early exaggeration work
        init = init / (init[:, 0].std() or 1.0) * 1e-4
        iterations = "max_iter" if "max_iter" in inspect.signature(TSNE).parameters else "n_iter"  # < 1.5: n_iter
        tsne = TSNE(2, perplexity=perplexity, init=init, random_state=seed, n_jobs=1, **{iterations: max_iter})
        return tsne.fit_transform(x).astype(np.float64)
    import umap

    init = init / (np.abs(init).max() or 1.0) * 10.0  # the range UMAP's own spectral initialisation has
    reducer = umap.UMAP(n_components=2, n_neighbors=n_neighbors, init=init, random_state=seed, n_jobs=1)
    return np.asarray(reducer.fit_transform(x), dtype=np.float64)


def _shared(keys: Sequence[str | None], previous: Mapping[str, Sequence[float]]) -> tuple[list[int], np.ndarray]:
    """Rows of the points with a previous position, and those positions :math:`(n, 2)`."""
    pairs = [(i, previous[k]) for i, k in enumerate(keys) if k is not None and k in previous]
    return [i for i, _ in pairs], np.asarray([xy for _, xy in pairs], dtype=np.float64).reshape(-1, 2)


def procrustes(source: np.ndarray, target: np.ndarray, scale: bool = True) -> tuple[np.ndarray, float, np.ndarray]:
    """Orthogonal Procrustes: the rotation/reflection, scale and shift that best map ``source`` onto ``target``.

    Args:
        source: :math:`(N, 2)` points.
        target: :math:`(N, 2)` the same points elsewhere.
        scale: also fit one isotropic scale.

    Returns:
        ``(R, s, t)`` with ``source @ R * s + t`` closest to ``target`` in least squares.
    """
    from scipy.linalg import orthogonal_procrustes

    mu_s, mu_t = source.mean(0), target.mean(0)
    a, b = source - mu_s, target - mu_t
    rotation, sv_sum = orthogonal_procrustes(a, b)
    norm = float((a**2).sum())
    s = float(sv_sum / norm) if scale and norm > 0 else 1.0
    return rotation, s, mu_t - (mu_s @ rotation) * s


def align(layout: np.ndarray, keys: Sequence[str | None], previous: Mapping[str, Sequence[float]]) -> np.ndarray:
    """Rotate/reflect, scale and shift ``layout`` onto the previous epoch's positions of the same points.

    A similarity transform changes no distance ratio, so the picture says the same; it only stops the axes
    from flipping and spinning between epochs. Points are matched by key (``None`` = no match); with fewer
    than 3 matches the layout is returned unchanged.
    """
    rows, target = _shared(keys, previous)
    if len(rows) < 3:
        return layout
    rotation, s, t = procrustes(layout[rows], target)
    return layout @ rotation * s + t


def aligned_init(
    features: torch.Tensor | np.ndarray, keys: Sequence[str | None], previous: Mapping[str, Sequence[float]]
) -> np.ndarray | None:
    """Starting layout for t-SNE / UMAP: last epoch's position for known points, an aligned PCA for new ones.

    Args:
        features: :math:`(N, D)` embeddings of this epoch.
        keys: a stable key per point (``None`` for points without one, e.g. predictions).
        previous: key to the 2-D position of the previous epoch.

    Returns:
        :math:`(N, 2)` initial layout, or ``None`` when fewer than 3 points are known (use the method's default).
    """
    rows, known = _shared(keys, previous)
    if len(rows) < 3:
        return None
    layout = align(_pca(_as_numpy(features, "features")), keys, previous)
    layout[rows] = known
    return layout


def displacement(layout: np.ndarray, keys: Sequence[str | None], previous: Mapping[str, Sequence[float]]) -> float:
    """Mean distance moved by the points known in ``previous``, relative to the previous layout's spread.

    Returns:
        ``mean ||p_i - q_i|| / rms(q - mean(q))``, or ``nan`` when no point is shared.
    """
    rows, q = _shared(keys, previous)
    if not rows:
        return float("nan")
    spread = float(np.sqrt(((q - q.mean(0)) ** 2).sum(1).mean())) or 1.0
    return float(np.linalg.norm(layout[rows] - q, axis=1).mean() / spread)
