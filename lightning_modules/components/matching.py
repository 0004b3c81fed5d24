"""Keypoint transfer by nearest neighbour on a square feature grid.

Coordinates are pixels of the ``size`` x ``size`` padded model input; the grid has ``grid`` cells per
side. A keypoint falls in cell ``floor(x * grid / size)``; a predicted cell is mapped to its centre with
the reference's convention ``cell * s + s / 2 - 0.5`` (``s = size / grid``; 14 px cells at 840 px give
``14 * cell + 6.5``).
"""

from __future__ import annotations

import torch

__all__ = ["points_to_cells", "cells_to_points", "nearest_neighbors", "transfer_keypoints"]


def points_to_cells(points: torch.Tensor, size: int, grid: int) -> torch.Tensor:
    """Flat cell index (``row * grid + col``) of ``[N, 2]`` (x, y) points; out-of-image points are clamped."""
    cells = torch.floor(points * (grid / size)).long().clamp_(0, grid - 1)
    return cells[:, 1] * grid + cells[:, 0]


def cells_to_points(cells: torch.Tensor, size: int, grid: int) -> torch.Tensor:
    """(x, y) centre, in pixels, of flat cell indices ``[N]``."""
    step = size / grid
    rows, cols = torch.div(cells, grid, rounding_mode="floor"), cells % grid
    return torch.stack([cols, rows], dim=-1).float() * step + (step / 2 - 0.5)


def nearest_neighbors(queries: torch.Tensor, keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """L2 nearest neighbour of every query among the keys, without a Python loop.

    Args:
        queries: ``[N, D]``.
        keys: ``[M, D]``.

    Returns:
        ``(index [N], distance [N])``.
    """
    # argmin ||q - k||^2 = argmax (2 q.k - ||k||^2); the ||q||^2 term is constant per query.
    queries, keys = queries.float(), keys.float()
    scores = 2 * queries @ keys.T - (keys * keys).sum(dim=1)
    index = scores.argmax(dim=1)
    # Recomputed directly for the winners only: the expanded form loses precision near zero.
    distance = (queries - keys[index]).norm(dim=1)
    return index, distance


def transfer_keypoints(
    source: torch.Tensor, target: torch.Tensor, points: torch.Tensor, size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Predict where source keypoints land in the target image.

    Args:
        source: ``[D, G, G]`` source descriptors.
        target: ``[D, G, G]`` target descriptors.
        points: ``[N, 2]`` (x, y) source keypoints in padded-input pixels.
        size: Side of the padded input in pixels.

    Returns:
        ``(predicted points [N, 2] in padded-input pixels, L2 feature distance of each match [N])``.
    """
    grid = source.shape[-1]
    src_tokens, trg_tokens = source.flatten(1).T, target.flatten(1).T
    cells = points_to_cells(points, size, grid)
    index, distance = nearest_neighbors(src_tokens[cells], trg_tokens)
    return cells_to_points(index, size, grid), distance
