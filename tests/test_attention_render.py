"""Attention pictures: heads grid with head average, deformable points as dots where they are."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from xaiwatch.core.errors import ConfigurationError, ShapeError
from xaiwatch.render.attention import attention_heads_grid, deformable_points_panel


def _changed_columns(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    diff = np.abs(a.astype(int) - b.astype(int)).sum(axis=(0, 2))
    return np.nonzero(diff > 0)[0]


def test_heads_grid_places_each_head_and_the_average():
    image = torch.zeros(3, 32, 32)
    base = torch.zeros(8, 32, 32)
    base[:, 0, 0] = 1e-3  # every head non-zero, so scales are defined
    ref = attention_heads_grid(image, base, shared_scale=False)
    assert ref.dtype == np.uint8 and ref.shape[1] > 1.8 * ref.shape[0]  # 2 rows x (4 heads + average)
    cols = {}
    for head in (0, 3):
        heads = base.clone()
        heads[head, 10:20, 10:20] = 1.0
        cols[head] = _changed_columns(ref, attention_heads_grid(image, heads, shared_scale=False))
    width = ref.shape[1]
    # head 0 changes its own cell (first column) and the average (last column); head 3 its cell, 4th column
    assert cols[0].min() < width / 5 and cols[0].max() > 4 * width / 5
    assert width * 3 / 5 < cols[3][cols[3] < 4 * width / 5].mean() < width * 4 / 5
    # a shared scale: a head ten times weaker than another is drawn dimmer than with its own scale
    weak = base.clone()
    weak[0, 10:20, 10:20], weak[1, 10:20, 10:20] = 1.0, 0.1
    assert (
        np.abs(
            attention_heads_grid(image, weak).astype(int) - attention_heads_grid(image, weak, shared_scale=False)
        ).sum()
        > 0
    )
    with pytest.raises(ShapeError):
        attention_heads_grid(image, torch.zeros(32, 32))
    with pytest.raises(ConfigurationError, match="columns"):
        attention_heads_grid(image, base, columns=0)


def test_deformable_points_are_drawn_where_they_are():
    image = torch.zeros(3, 64, 64)
    levels = torch.tensor([0, 1])
    left = deformable_points_panel(image, torch.tensor([[8.0, 32.0], [8.0, 32.0]]), torch.tensor([1.0, 0.5]), levels)
    right = deformable_points_panel(image, torch.tensor([[56.0, 32.0], [56.0, 32.0]]), torch.tensor([1.0, 0.5]), levels)
    blank = deformable_points_panel(image, torch.tensor([[8.0, 32.0], [56.0, 32.0]]), torch.zeros(2), levels)
    c_left, c_right = _changed_columns(blank, left), _changed_columns(blank, right)
    assert c_left.size and c_right.size and c_left.mean() < c_right.mean()
    with_map = deformable_points_panel(image, torch.rand(3, 2, 2) * 64, torch.rand(3, 2), levels,
                                       saliency=torch.rand(1, 64, 64), box=[4, 4, 30, 30])  # fmt: skip
    assert with_map.shape[1] > 1.5 * left.shape[1]  # second panel
    with pytest.raises(ConfigurationError, match="xy"):
        deformable_points_panel(image, torch.rand(2, 3), torch.rand(2), levels)
