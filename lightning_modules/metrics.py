"""Percentage of Correct Keypoints (PCK) as a torchmetrics ``Metric`` plus a functional twin.

This module depends on ``torch`` and ``torchmetrics`` only (never on ``lightning``), so the
metric can be used in plain PyTorch code as well as inside a LightningModule.

Semantics (see ``DESIGN.md``, "Benchmark protocols"):

* A predicted keypoint is *correct* at ``alpha`` when its Euclidean error to the ground truth is
  **strictly** less than ``alpha * threshold``; ``threshold`` is per pair (SPair-71k: max side of the
  target bounding box; PF-Pascal: max side of the target image).
* Only points flagged valid count, both in the numerator and in the denominator.
* Three averages, all in percent:

  - ``per_point``: all valid points pooled over all pairs;
  - ``per_image``: mean over pairs of each pair's PCK (pairs with zero valid points are excluded);
  - ``per_category``: per-point PCK within each category, and ``category_mean``: the unweighted mean
    of ``per_category`` over the categories with at least one point (the SPair-71k paper number).

Empty inputs: every average over an empty set is ``float("nan")`` (never a division error), and
categories without points are omitted from ``per_category``. In particular ``PCK.compute()`` with no
update returns ``{"pck": {alpha: {"per_point": nan, "per_image": nan, "category_mean": nan,
"per_category": {}}}, "num_pairs": 0, "num_points": 0}``.

Distributed evaluation: Lightning's ``DistributedSampler`` pads the last batch with duplicate samples.
``PCK`` stores a stable 64-bit key per pair (:func:`stable_pair_key`) and ``compute()`` keeps only the
first occurrence of each key, so N processes give exactly the single-process numbers.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

__all__ = [
    "PCK",
    "format_alpha",
    "keypoint_correct",
    "pair_correct_counts",
    "pck",
    "stable_pair_key",
    "summarize_pck",
]


# --------------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------------
def format_alpha(alpha: float | Tensor) -> str:
    """Format an alpha value as the key used in result dictionaries.

    The shortest round-trip representation of the float is used (``repr(float(alpha))``), so
    ``0.1 -> "0.1"``, ``0.05 -> "0.05"``, ``0.15 -> "0.15"``, ``1 -> "1.0"``. A reduced-precision
    tensor (e.g. float32 ``0.1`` which is ``0.10000000149...``) is first rounded to the number of
    significant digits its dtype carries, so it also formats as ``"0.1"``.

    Args:
        alpha: The alpha value (Python number or scalar tensor).

    Returns:
        The alpha as a string key.
    """
    return repr(_alpha_value(alpha))


def _alpha_value(alpha: float | Tensor) -> float:
    """An alpha as a Python float; reduced-precision tensors are rounded to the digits they carry."""
    if isinstance(alpha, Tensor):
        value = float(alpha.item())
        if alpha.is_floating_point() and alpha.dtype != torch.float64:
            digits = round(-math.log10(torch.finfo(alpha.dtype).resolution)) + 1  # float32: 7
            value = float(f"{value:.{digits}g}")
        return value
    return float(alpha)


def stable_pair_key(pair_id: str) -> int:
    """Map a pair id to a stable signed 64-bit integer.

    Uses the first 8 bytes of ``hashlib.blake2b`` (not Python's salted ``hash``), so the key is the
    same in every process and every run; it is used to de-duplicate pairs gathered from several
    processes.

    Args:
        pair_id: The pair identifier (SPair-71k: the annotation file stem).

    Returns:
        An integer in ``[-2**63, 2**63)`` (fits a ``torch.long``).
    """
    digest = hashlib.blake2b(str(pair_id).encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, byteorder="little", signed=True)


def _compute_dtype(device: torch.device) -> torch.dtype:
    # float64 for exact agreement with NumPy-based reference scoring; MPS has no float64.
    return torch.float32 if device.type == "mps" else torch.float64


def _alphas_tensor(alphas: Sequence[float] | Tensor, device: torch.device, dtype: torch.dtype) -> Tensor:
    # float32 tensor alphas are rounded (0.10000000149 -> 0.1) so that the strict bound is alpha * thr
    values = alphas.detach().reshape(-1).unbind(0) if isinstance(alphas, Tensor) else list(alphas)
    a = torch.tensor([_alpha_value(x) for x in values], device=device, dtype=dtype)
    if a.numel() == 0:
        raise ValueError("`alphas` must contain at least one value.")
    return a


def _check_points(pred: Tensor, gt: Tensor, valid: Tensor | None) -> None:
    if pred.ndim != 2 or pred.shape[-1] != 2:
        raise ValueError(f"`pred` must have shape [N, 2], got {tuple(pred.shape)}.")
    if gt.shape != pred.shape:
        raise ValueError(f"`gt` must have the shape of `pred` {tuple(pred.shape)}, got {tuple(gt.shape)}.")
    if valid is not None and valid.shape != pred.shape[:1]:
        raise ValueError(f"`valid` must have shape [{pred.shape[0]}], got {tuple(valid.shape)}.")


# --------------------------------------------------------------------------------------------------
# functional twin
# --------------------------------------------------------------------------------------------------
def keypoint_correct(
    pred: Tensor,
    gt: Tensor,
    threshold: float | Tensor,
    alphas: Sequence[float] | Tensor,
    valid: Tensor | None = None,
) -> Tensor:
    """Per-keypoint correctness at several alphas for one pair.

    A point is correct when ``||pred - gt||_2 < alpha * threshold`` (strict) and it is valid.

    Args:
        pred: Predicted points, ``[N, 2]`` (x, y) in original pixels.
        gt: Ground-truth points, ``[N, 2]``.
        threshold: The pair's PCK threshold (e.g. max side of the target bbox), a number or a
            scalar tensor.
        alphas: ``A`` alpha values (a reduced-precision tensor is rounded to the digits it carries,
            so float32 ``0.1`` means exactly ``0.1``).
        valid: Optional ``[N]`` bool mask; invalid points are never correct.

    Returns:
        A bool tensor ``[A, N]`` on the device of ``pred``.
    """
    _check_points(pred, gt, valid)
    device = pred.device
    dtype = _compute_dtype(device)
    a = _alphas_tensor(alphas, device, dtype)
    thr = torch.as_tensor(threshold, device=device).to(dtype).reshape(())
    err = torch.linalg.vector_norm(pred.to(dtype) - gt.to(device=device, dtype=dtype), dim=-1)  # [N]
    correct = err.unsqueeze(0) < (a * thr).unsqueeze(1)  # [A, N]
    if valid is not None:
        correct = correct & valid.to(device=device, dtype=torch.bool).unsqueeze(0)
    return correct


def pair_correct_counts(
    pred: Tensor,
    gt: Tensor,
    threshold: float | Tensor,
    alphas: Sequence[float] | Tensor,
    valid: Tensor | None = None,
) -> tuple[Tensor, int]:
    """Number of correct keypoints per alpha, and number of valid keypoints, for one pair.

    Args:
        pred: Predicted points, ``[N, 2]``.
        gt: Ground-truth points, ``[N, 2]``.
        threshold: The pair's PCK threshold.
        alphas: ``A`` alpha values.
        valid: Optional ``[N]`` bool mask.

    Returns:
        ``(correct, num_points)``: a long tensor ``[A]`` and the number of valid points.
    """
    correct = keypoint_correct(pred, gt, threshold, alphas, valid)
    num_points = int(pred.shape[0]) if valid is None else int(valid.to(torch.bool).sum().item())
    return correct.sum(dim=1, dtype=torch.long), num_points


def _nan_percent(num: Tensor, den: Tensor) -> Tensor:
    """100 * num / den, NaN where den == 0 (float64)."""
    num = num.to(torch.float64)
    den = den.to(torch.float64)
    out = torch.full_like(num, float("nan"))
    ok = den > 0
    return torch.where(ok, 100.0 * num / torch.where(ok, den, torch.ones_like(den)), out)


def summarize_pck(
    correct: Tensor,
    num_points: Tensor,
    category_index: Tensor,
    categories: Sequence[str],
    alphas: Sequence[float],
) -> dict[str, dict[str, Any]]:
    """Turn per-pair counts into the three PCK averages.

    Args:
        correct: ``[P, A]`` number of correct points per pair and alpha.
        num_points: ``[P]`` number of valid points per pair.
        category_index: ``[P]`` index into ``categories`` per pair.
        categories: The category names.
        alphas: The ``A`` alpha values (used for the keys, see :func:`format_alpha`).

    Returns:
        ``{format_alpha(a): {"per_point": float, "per_image": float, "category_mean": float,
        "per_category": {name: float}}}``, values in percent as Python floats. Averages over an
        empty set are NaN; categories with no points are omitted from ``per_category``.
    """
    alphas = list(alphas)
    num_alphas = len(alphas)
    correct = correct.reshape(-1, num_alphas).to(torch.float64)
    num_points = num_points.reshape(-1).to(device=correct.device, dtype=torch.float64)
    category_index = category_index.reshape(-1).to(device=correct.device, dtype=torch.long)
    if not (correct.shape[0] == num_points.shape[0] == category_index.shape[0]):
        raise ValueError(
            "`correct`, `num_points` and `category_index` must have the same number of pairs, got "
            f"{correct.shape[0]}, {num_points.shape[0]} and {category_index.shape[0]}."
        )
    num_categories = len(categories)
    if category_index.numel() and (int(category_index.min()) < 0 or int(category_index.max()) >= num_categories):
        raise ValueError(f"`category_index` out of range for {num_categories} categories.")

    # per point: pool everything
    per_point = _nan_percent(correct.sum(0), num_points.sum().expand(num_alphas))  # [A]

    # per image: mean over pairs with at least one point
    has_points = num_points > 0
    if bool(has_points.any()):
        per_image = (100.0 * correct[has_points] / num_points[has_points].unsqueeze(1)).mean(0)
    else:
        per_image = torch.full((num_alphas,), float("nan"), dtype=torch.float64, device=correct.device)

    # per category: pooled within each category
    cat_correct = torch.zeros(num_categories, num_alphas, dtype=torch.float64, device=correct.device)
    cat_correct.index_add_(0, category_index, correct)
    cat_points = torch.zeros(num_categories, dtype=torch.float64, device=correct.device)
    cat_points.index_add_(0, category_index, num_points)
    present = cat_points > 0
    per_category = _nan_percent(cat_correct, cat_points.unsqueeze(1).expand_as(cat_correct))  # [C, A]
    if bool(present.any()):
        category_mean = per_category[present].mean(0)
    else:
        category_mean = torch.full((num_alphas,), float("nan"), dtype=torch.float64, device=correct.device)

    per_point_l = per_point.tolist()
    per_image_l = per_image.tolist()
    category_mean_l = category_mean.tolist()
    per_category_l = per_category.tolist()
    present_l = present.tolist()
    result: dict[str, dict[str, Any]] = {}
    for j, alpha in enumerate(alphas):
        result[format_alpha(alpha)] = {
            "per_point": float(per_point_l[j]),
            "per_image": float(per_image_l[j]),
            "category_mean": float(category_mean_l[j]),
            "per_category": {
                str(name): float(per_category_l[c][j]) for c, name in enumerate(categories) if present_l[c]
            },
        }
    return result


def pck(
    preds: list[Tensor],
    gts: list[Tensor],
    thresholds: Sequence[float] | Tensor,
    categories: Sequence[str],
    alphas: Sequence[float],
    valids: list[Tensor] | None = None,
) -> dict[str, dict[str, Any]]:
    """Convenience PCK over a list of pairs (no de-duplication).

    Args:
        preds: Per pair predicted points ``[N_i, 2]``.
        gts: Per pair ground-truth points ``[N_i, 2]``.
        thresholds: Per pair PCK thresholds.
        categories: Per pair category names; the category list is their sorted unique set.
        alphas: Alpha values.
        valids: Optional per pair ``[N_i]`` bool masks.

    Returns:
        The dictionary of :func:`summarize_pck`.
    """
    num_pairs = len(preds)
    thresholds = thresholds.tolist() if isinstance(thresholds, Tensor) else list(thresholds)
    if not (len(gts) == len(thresholds) == len(categories) == num_pairs) or (
        valids is not None and len(valids) != num_pairs
    ):
        raise ValueError("`preds`, `gts`, `thresholds`, `categories` (and `valids`) must have the same length.")
    names = sorted(set(categories))
    lookup = {name: i for i, name in enumerate(names)}
    alphas = list(alphas)
    rows, counts = [], []
    for i in range(num_pairs):
        c, n = pair_correct_counts(preds[i], gts[i], thresholds[i], alphas, None if valids is None else valids[i])
        rows.append(c.cpu())
        counts.append(n)
    correct = torch.stack(rows) if rows else torch.zeros(0, len(alphas), dtype=torch.long)
    return summarize_pck(
        correct,
        torch.tensor(counts, dtype=torch.long),
        torch.tensor([lookup[c] for c in categories], dtype=torch.long),
        names,
        alphas,
    )


# --------------------------------------------------------------------------------------------------
# torchmetrics Metric
# --------------------------------------------------------------------------------------------------
class PCK(Metric):
    """Percentage of Correct Keypoints with per-point, per-image and category-mean averages.

    States (all ``dist_reduce_fx="cat"`` lists of long tensors, created on the metric's device):
    ``correct`` (per pair ``[A]`` counts, stored flattened), ``num_points``, ``category_index`` and
    ``pair_key`` (:func:`stable_pair_key` of the pair id). ``compute()`` de-duplicates pairs by key,
    keeping the first occurrence, so that the duplicates a padded ``DistributedSampler`` adds do not
    bias the result.

    ``compute()`` returns ``{"pck": {format_alpha(a): {"per_point", "per_image", "category_mean",
    "per_category": {...}}}, "num_pairs": int, "num_points": int}``, values in percent. With no
    update (or no valid point) the averages are NaN and ``per_category`` is empty.

    Args:
        alphas: The alpha values, e.g. ``(0.01, 0.05, 0.1)`` for SPair-71k.
        categories: The known category names; ``update`` rejects any other name.
        **kwargs: Forwarded to :class:`torchmetrics.Metric`.

    Example:
        >>> metric = PCK(alphas=[0.1], categories=["cat", "dog"])
        >>> metric.update([torch.tensor([[0.0, 0.0]])], [torch.tensor([[3.0, 4.0]])], [100.0], ["cat"], ["p0"])
        >>> metric.compute()["pck"]["0.1"]["per_point"]
        100.0
    """

    full_state_update: bool = False
    higher_is_better: bool = True
    is_differentiable: bool = False

    def __init__(self, alphas: Sequence[float], categories: Sequence[str], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        values = alphas.detach().reshape(-1).unbind(0) if isinstance(alphas, Tensor) else alphas
        self.alphas: tuple[float, ...] = tuple(_alpha_value(a) for a in values)
        if not self.alphas:
            raise ValueError("`alphas` must contain at least one value.")
        self.categories: tuple[str, ...] = tuple(str(c) for c in categories)
        if len(set(self.categories)) != len(self.categories):
            raise ValueError(f"`categories` contains duplicates: {list(self.categories)}.")
        self._category_lookup = {name: i for i, name in enumerate(self.categories)}
        self.add_state("correct", default=[], dist_reduce_fx="cat")
        self.add_state("num_points", default=[], dist_reduce_fx="cat")
        self.add_state("category_index", default=[], dist_reduce_fx="cat")
        self.add_state("pair_key", default=[], dist_reduce_fx="cat")

    def update(
        self,
        preds: list[Tensor],
        gts: list[Tensor],
        thresholds: Tensor | Sequence[float],
        categories: Sequence[str],
        pair_ids: Sequence[str],
        valids: list[Tensor] | None = None,
    ) -> None:
        """Add a batch of pairs.

        Args:
            preds: Per pair predicted points ``[N_i, 2]`` (original pixels).
            gts: Per pair ground-truth points ``[N_i, 2]``.
            thresholds: Per pair PCK thresholds, ``[B]``.
            categories: Per pair category names (must be among the metric's categories).
            pair_ids: Per pair stable identifiers (used for de-duplication).
            valids: Optional per pair ``[N_i]`` bool masks.

        Raises:
            ValueError: On length/shape mismatches or an unknown category.
        """
        batch = len(preds)
        if isinstance(categories, str) or isinstance(pair_ids, str):
            raise ValueError("`categories` and `pair_ids` must be sequences of strings, one per pair.")
        if isinstance(thresholds, Tensor):
            thresholds = thresholds.reshape(-1)
        if not (len(gts) == len(thresholds) == len(categories) == len(pair_ids) == batch) or (
            valids is not None and len(valids) != batch
        ):
            raise ValueError(
                "`preds`, `gts`, `thresholds`, `categories`, `pair_ids` (and `valids`) must have the same "
                f"length, got {len(preds)}, {len(gts)}, {len(thresholds)}, {len(categories)}, {len(pair_ids)}"
                + ("" if valids is None else f", {len(valids)}")
                + "."
            )
        unknown = sorted({str(c) for c in categories} - self._category_lookup.keys())
        if unknown:
            raise ValueError(f"Unknown categor{'y' if len(unknown) == 1 else 'ies'} {unknown}; known: {list(self.categories)}.")
        if batch == 0:
            return

        for i in range(batch):
            _check_points(preds[i], gts[i], None if valids is None else valids[i])

        device = preds[0].device
        dtype = _compute_dtype(device)
        num_alphas = len(self.alphas)
        sizes = torch.tensor([p.shape[0] for p in preds], device=device, dtype=torch.long)
        pred = torch.cat([p.to(device=device, dtype=dtype) for p in preds])  # [N, 2]
        gt = torch.cat([g.to(device=device, dtype=dtype) for g in gts])
        if valids is None:
            valid = torch.ones(pred.shape[0], dtype=torch.bool, device=device)
        else:
            valid = torch.cat([v.to(device=device, dtype=torch.bool).reshape(-1) for v in valids])
        if isinstance(thresholds, Tensor):
            thr = thresholds.to(device=device, dtype=dtype)
        else:
            thr = torch.tensor([float(t) for t in thresholds], device=device, dtype=dtype)
        pair_of_point = torch.repeat_interleave(torch.arange(batch, device=device), sizes)  # [N]

        alphas = torch.tensor(self.alphas, device=device, dtype=dtype)
        err = torch.linalg.vector_norm(pred - gt, dim=-1)  # [N]
        ok = (err.unsqueeze(1) < alphas.unsqueeze(0) * thr[pair_of_point].unsqueeze(1)) & valid.unsqueeze(1)
        correct = torch.zeros(batch, num_alphas, dtype=torch.long, device=device)
        correct.index_add_(0, pair_of_point, ok.long())  # [B, A]
        num_points = torch.zeros(batch, dtype=torch.long, device=device)
        num_points.index_add_(0, pair_of_point, valid.long())

        self.correct.append(correct.reshape(-1).to(self.device))
        self.num_points.append(num_points.to(self.device))
        self.category_index.append(
            torch.tensor([self._category_lookup[str(c)] for c in categories], dtype=torch.long, device=self.device)
        )
        self.pair_key.append(
            torch.tensor([stable_pair_key(p) for p in pair_ids], dtype=torch.long, device=self.device)
        )

    def _sync_dist(self, *args: Any, **kwargs: Any) -> None:
        # torchmetrics replaces an empty list state on a rank that saw no data by a float32 placeholder,
        # whose dtype would not match the long tensors of the other ranks in all_gather: use an empty
        # long tensor instead (the states are restored from the cache after `unsync`).
        for attr in ("correct", "num_points", "category_index", "pair_key"):
            if isinstance(getattr(self, attr), list) and len(getattr(self, attr)) == 0:
                setattr(self, attr, [torch.zeros(0, dtype=torch.long, device=self.device)])
        super()._sync_dist(*args, **kwargs)

    def _cat_state(self, attr: str) -> Tensor:
        value = getattr(self, attr)
        if isinstance(value, list) and len(value) == 0:
            return torch.zeros(0, dtype=torch.long, device=self.device)
        return dim_zero_cat(value).to(torch.long).reshape(-1)

    def compute(self) -> dict[str, Any]:
        """Compute the PCK averages over all de-duplicated pairs.

        Returns:
            ``{"pck": {alpha_key: {"per_point", "per_image", "category_mean", "per_category"}},
            "num_pairs": int, "num_points": int}``.
        """
        num_alphas = len(self.alphas)
        correct = self._cat_state("correct").reshape(-1, num_alphas)
        num_points = self._cat_state("num_points")
        category_index = self._cat_state("category_index")
        pair_key = self._cat_state("pair_key")

        if pair_key.numel():
            unique_keys, inverse = torch.unique(pair_key, return_inverse=True)
            positions = torch.arange(pair_key.numel(), device=pair_key.device)
            first = torch.full((unique_keys.numel(),), pair_key.numel(), dtype=torch.long, device=pair_key.device)
            first = first.scatter_reduce(0, inverse, positions, reduce="amin")
            keep = torch.sort(first).values  # first occurrences, in arrival order
            correct, num_points, category_index = correct[keep], num_points[keep], category_index[keep]

        return {
            "pck": summarize_pck(correct, num_points, category_index, self.categories, self.alphas),
            "num_pairs": int(num_points.numel()),
            "num_points": int(num_points.sum().item()) if num_points.numel() else 0,
        }

