"""An independent bicubic resampler for tests: the textbook cubic-convolution kernel, in float64.

It implements what ``torch.nn.functional.interpolate(mode="bicubic", align_corners=False,
antialias=False)`` means (Keys' kernel with a = -0.75, half-pixel centres, borders replicated) without
calling it, so tests can check the *positions* a resize samples (the torch-hub "+0.1" rule, ODISE's CLIP
resize) rather than comparing torch with itself.
"""

from __future__ import annotations

import math

import numpy as np

A = -0.75  # the kernel parameter torch (and OpenCV) use


def _kernel(s: float) -> float:
    s = abs(s)
    if s <= 1:
        return (A + 2) * s**3 - (A + 3) * s**2 + 1
    if s < 2:
        return A * s**3 - 5 * A * s**2 + 8 * A * s - 4 * A
    return 0.0


def cubic_matrix(in_size: int, out_size: int, scale_factor: float | None = None) -> np.ndarray:
    """``[out_size, in_size]`` weights of a 1-D bicubic resize.

    Args:
        in_size: Input samples.
        out_size: Output samples.
        scale_factor: When given, output sample ``i`` sits at input position ``(i + 0.5) / scale_factor - 0.5``
            (what ``interpolate(scale_factor=...)`` does); otherwise at ``(i + 0.5) * in_size / out_size - 0.5``.
    """
    step = in_size / out_size if scale_factor is None else 1.0 / scale_factor
    weights = np.zeros((out_size, in_size))
    for i in range(out_size):
        x = (i + 0.5) * step - 0.5
        base = math.floor(x)
        for j in range(base - 1, base + 3):
            weights[i, min(max(j, 0), in_size - 1)] += _kernel(x - j)
    return weights


def resize_channels_last(grid: np.ndarray, out_size: tuple[int, int], scale_factor: float | None = None) -> np.ndarray:
    """Bicubic resize of an ``[H, W, C]`` array to ``out_size`` (float64)."""
    rows = cubic_matrix(grid.shape[0], out_size[0], scale_factor)
    cols = cubic_matrix(grid.shape[1], out_size[1], scale_factor)
    return np.einsum("ai,ijc,bj->abc", rows, grid.astype(np.float64), cols)
