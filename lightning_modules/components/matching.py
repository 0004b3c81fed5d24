"""Keypoint transfer and dense flow by nearest neighbour on a square feature grid.

Coordinates are pixels of the ``size`` x ``size`` padded model input; the grid has ``grid`` cells per
side. A keypoint falls in cell ``floor(x * grid / size)``; a predicted cell is mapped to its centre with
the reference's convention ``cell * s + s / 2 - 0.5`` (``s = size / grid``; 14 px cells at 840 px give
``14 * cell + 6.5``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = [
    "cells_to_points",
    "dense_flow",
    "nearest_neighbor_index",
    "nearest_neighbors",
    "points_to_cells",
    "transfer_keypoints",
]


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
    source: torch.Tensor, target: torch.Tensor, points: torch.Tensor, size: int, target_size: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Predict where source keypoints land in the target image.

    Args:
        source: ``[D, G, G]`` source descriptors.
        target: ``[D, G, G]`` target descriptors.
        points: ``[N, 2]`` (x, y) source keypoints in padded-input pixels.
        size: Side of the padded source square in pixels.
        target_size: Side of the padded target square (default ``size``); differs from ``size`` only when
            each image is annotated in its own square (the "original" annotation resolution).

    Returns:
        ``(predicted points [N, 2] in padded-target pixels, L2 feature distance of each match [N])``.
    """
    grid = source.shape[-1]
    src_tokens, trg_tokens = source.flatten(1).T, target.flatten(1).T
    cells = points_to_cells(points, size, grid)
    index, distance = nearest_neighbors(src_tokens[cells], trg_tokens)
    return cells_to_points(index, size if target_size is None else target_size, grid), distance


def nearest_neighbor_index(queries: torch.Tensor, keys: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
    """L2 nearest key of every query, ``chunk`` queries at a time (bounded ``chunk x M`` memory)."""
    if len(queries) == 0:
        return torch.zeros(0, dtype=torch.long, device=queries.device)
    return torch.cat([nearest_neighbors(part, keys)[0] for part in queries.split(chunk)])


def dense_flow(
    source: torch.Tensor, target: torch.Tensor, height: int, width: int, chunk: int = 4096
) -> torch.Tensor:
    """Dense flow from every target pixel to its source correspondence, as the reference computes it.

    Every target cell is matched to its L2 nearest source cell; the cell offsets (source - target) form a
    ``G x G`` flow that is bilinearly upsampled to the ``L x L`` padded square (``L = max(height, width)``),
    scaled by ``L / G`` and cropped to the centred ``height x width`` image. Only ``G^2`` matches and one
    ``2 x L x L`` field are held, never all pixel pairs.

    Args:
        source: ``[D, G, G]`` source descriptors.
        target: ``[D, G, G]`` target descriptors.
        height: Image height in pixels (source and target share it).
        width: Image width in pixels.
        chunk: Target cells matched at a time.

    Returns:
        ``[2, height, width]`` flow (dx, dy) in pixels: target pixel + flow = source pixel.
    """
    grid = target.shape[-1]
    index = nearest_neighbor_index(target.flatten(1).T, source.flatten(1).T, chunk)
    rows, cols = torch.div(index, grid, rounding_mode="floor"), index % grid
    cell = torch.arange(grid, device=target.device)
    flow = torch.stack(
        [(cols.view(grid, grid) - cell.view(1, grid)).float(), (rows.view(grid, grid) - cell.view(grid, 1)).float()]
    )
    side = max(height, width)
    flow = F.interpolate(flow[None], size=(side, side), mode="bilinear", align_corners=False)[0] * (side / grid)
    top, left = (side - height) // 2, (side - width) // 2
    return flow[:, top : top + height, left : left + width]
