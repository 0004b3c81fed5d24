"""Whether a predicted keypoint is correct (PCK): the one rule every score, picture and table uses.

A point is correct at ``alpha`` when its Euclidean error to the ground truth is below ``alpha * threshold``:
strictly (``<``, the keypoint benchmarks and the reference) or, with ``inclusive``, ``<=`` (the dense-flow
benchmarks). The threshold is the pair's (its protocol's rule, ``datamodules/protocols.py``) or one per point.
:class:`lightning_modules.metrics.PCK`, :func:`lightning_modules.metrics.dense_flow_counts`, the correspondence
pictures (:func:`.visualize.keypoints_correct`) and the A.10 analysis all call :func:`keypoint_correct`.
Plain torch, computed in float64 (float32 on MPS, which has no float64) for exact agreement with NumPy-based
reference scoring.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["alpha_value", "alphas_tensor", "check_point_shapes", "compute_dtype", "keypoint_correct", "within"]


def alpha_value(alpha: float | Tensor) -> float:
    """An alpha as a Python float; reduced-precision tensors are rounded to the digits they carry (float32
    ``0.1``, which is ``0.10000000149...``, is ``0.1``)."""
    if isinstance(alpha, Tensor):
        value = float(alpha.item())
        if alpha.is_floating_point() and alpha.dtype != torch.float64:
            digits = round(-math.log10(torch.finfo(alpha.dtype).resolution)) + 1  # float32: 7
            value = float(f"{value:.{digits}g}")
        return value
    return float(alpha)


def compute_dtype(device: torch.device) -> torch.dtype:
    """float64 for exact agreement with NumPy-based reference scoring; MPS has no float64."""
    return torch.float32 if device.type == "mps" else torch.float64


def alphas_tensor(alphas: Sequence[float] | Tensor, device: torch.device, dtype: torch.dtype) -> Tensor:
    """``[A]`` alphas (each :func:`alpha_value`), so that the strict bound is exactly ``alpha * threshold``."""
    values = alphas.detach().reshape(-1).unbind(0) if isinstance(alphas, Tensor) else list(alphas)
    a = torch.tensor([alpha_value(x) for x in values], device=device, dtype=dtype)
    if a.numel() == 0:
        raise ValueError("`alphas` must contain at least one value.")
    return a


def within(error: Tensor, bound: Tensor, inclusive: bool = False) -> Tensor:
    """``error < bound`` (the keypoint PCK convention) or ``error <= bound`` (the dense-flow one)."""
    return error <= bound if inclusive else error < bound


def check_point_shapes(pred: Tensor, gt: Tensor, valid: Tensor | None) -> None:
    """``pred`` is ``[N, 2]``, ``gt`` has its shape and ``valid`` (if given) is ``[N]``; else ValueError."""
    if pred.ndim != 2 or pred.shape[-1] != 2:
        raise ValueError(f"`pred` must have shape [N, 2], got {tuple(pred.shape)}.")
    if gt.shape != pred.shape:
        raise ValueError(f"`gt` must have the shape of `pred` {tuple(pred.shape)}, got {tuple(gt.shape)}.")
    if valid is not None and valid.shape != pred.shape[:1]:
        raise ValueError(f"`valid` must have shape [{pred.shape[0]}], got {tuple(valid.shape)}.")


def keypoint_correct(
    pred: Tensor,
    gt: Tensor,
    threshold: float | Tensor,
    alphas: Sequence[float] | Tensor,
    valid: Tensor | None = None,
    inclusive: bool = False,
) -> Tensor:
    """Per-keypoint correctness at several alphas.

    A point is correct when ``||pred - gt||_2 < alpha * threshold`` (strict; ``<=`` with ``inclusive``, the
    dense-flow convention) and it is valid. A point with a non-finite coordinate is never correct.

    Args:
        pred: Predicted points, ``[N, 2]`` (x, y) in original pixels.
        gt: Ground-truth points, ``[N, 2]``.
        threshold: The PCK threshold in pixels: one for all points (a number or a scalar tensor, e.g. the
            max side of the target bbox), or ``[N]``, one per point (points of several pairs at once).
        alphas: ``A`` alpha values (a reduced-precision tensor is rounded to the digits it carries, so
            float32 ``0.1`` means exactly ``0.1``).
        valid: Optional ``[N]`` bool mask; invalid points are never correct.
        inclusive: Count an error equal to ``alpha * threshold`` as correct.

    Returns:
        A bool tensor ``[A, N]`` on the device of ``pred``.
    """
    check_point_shapes(pred, gt, valid)
    device = pred.device
    dtype = compute_dtype(device)
    a = alphas_tensor(alphas, device, dtype)
    thr = torch.as_tensor(threshold, device=device).to(dtype)
    if thr.numel() != 1 and tuple(thr.shape) != tuple(pred.shape[:1]):
        raise ValueError(f"`threshold` must be a number or have shape [{pred.shape[0]}], got {tuple(thr.shape)}.")
    thr = thr.reshape(()) if thr.numel() == 1 else thr.reshape(1, -1)
    err = torch.linalg.vector_norm(pred.to(dtype) - gt.to(device=device, dtype=dtype), dim=-1)  # [N]
    correct = within(err.unsqueeze(0), a.unsqueeze(1) * thr, inclusive)  # [A, N]
    if valid is not None:
        correct = correct & valid.to(device=device, dtype=torch.bool).unsqueeze(0)
    return correct
