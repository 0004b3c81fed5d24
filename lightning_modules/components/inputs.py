"""Checks of user inputs shared by the own-images command (:mod:`datamodules.own_images`) and the Python call
(:meth:`.pipeline.FusedCorrespondence.match`): the same code, the same messages.

Every check names what it checks (``where``: a file and its entry, a command-line field, or an argument) and
raises :class:`ValueError`.
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["SWAPPED_HINT", "check_box", "check_mask", "check_points"]

#: Added to the error when most points fall outside the image and all of them would fit as ``(y, x)``.
SWAPPED_HINT = "points are (x, y): swapped?"


def _inside(points: np.ndarray, width: int, height: int) -> np.ndarray:
    return (points[:, 0] >= 0) & (points[:, 0] < width) & (points[:, 1] >= 0) & (points[:, 1] < height)


def check_points(value: Any, size: tuple[int, int], where: str) -> list[list[float]]:
    """Keypoints ``[[x, y], ...]`` (numbers, shape ``[N, 2]``, ``N >= 1``) checked to lie inside an image of
    ``size`` ``(width, height)`` (``0 <= x < width``, ``0 <= y < height``).

    When most points fall outside and every point would fit read as ``(y, x)``, the message ends with
    :data:`SWAPPED_HINT`.

    Returns:
        The points as a list of ``[x, y]`` floats.
    """
    if hasattr(value, "detach"):  # a torch tensor, without importing torch here
        value = value.detach().cpu().numpy()
    try:
        points = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{where}: expected [[x, y], ...] numbers, got {value!r}") from err
    if points.ndim != 2 or points.shape[1] != 2 or points.shape[0] == 0:
        raise ValueError(f"{where}: expected a non-empty list of [x, y] points, got shape {list(points.shape)}")
    if not np.isfinite(points).all():
        bad = points[~np.isfinite(points).all(axis=1)][0].tolist()
        raise ValueError(f"{where}: points must be finite numbers, got {bad}")
    width, height = size
    inside = _inside(points, width, height)
    if not inside.all():
        outside = np.flatnonzero(~inside)
        first = points[outside[0]].tolist()
        message = (f"{where}: point {int(outside[0])} {first} lies outside the {width}x{height} image "
                   f"({len(outside)} of {len(points)} points do)")
        if 2 * len(outside) > len(points) and _inside(points[:, ::-1], width, height).all():
            message += f"; {SWAPPED_HINT}"
        raise ValueError(message)
    return points.tolist()


def check_box(value: Any, size: tuple[int, int], where: str) -> tuple[float, float, float, float]:
    """A box ``[x0, y0, x1, y1]`` inside an image of ``size``, with ``x0 < x1`` and ``y0 < y1``."""
    try:
        x0, y0, x1, y1 = (float(v) for v in value)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{where}: expected [x0, y0, x1, y1], got {value!r}") from err
    width, height = size
    if not (0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height):
        raise ValueError(f"{where}: box {[x0, y0, x1, y1]} is empty or not inside the {width}x{height} image")
    return x0, y0, x1, y1


def check_mask(mask: Any, size: tuple[int, int], where: str, name: str = "mask") -> np.ndarray:
    """A mask ``[H, W]`` (nonzero = object) at its image's ``size``, with at least one pixel set, as bool.

    ``name`` is how the message calls the mask (e.g. its file).
    """
    if hasattr(mask, "detach"):
        mask = mask.detach().cpu().numpy()
    mask = np.asarray(mask) != 0
    if mask.ndim != 2 or (mask.shape[1], mask.shape[0]) != tuple(size):
        shape = f"{mask.shape[1]}x{mask.shape[0]}" if mask.ndim == 2 else f"of shape {list(mask.shape)}"
        raise ValueError(f"{where}: {name} is {shape}, its image is {size[0]}x{size[1]}")
    if not mask.any():
        raise ValueError(f"{where}: {name} marks no pixel")
    return mask
