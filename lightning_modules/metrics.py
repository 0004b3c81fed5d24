"""Percentage of Correct Keypoints (PCK) as a torchmetrics ``Metric`` plus a functional twin.

This module depends on ``torch`` and ``torchmetrics`` only (never on ``lightning``), so the
metric can be used in plain PyTorch code as well as inside a LightningModule.

Semantics (see ``docs/protocols.md``):

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
first occurrence of each key, in key order (not arrival order), so N processes give exactly the
single-process numbers, bit for bit.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

from .components.pck import alpha_value as _alpha_value
from .components.pck import alphas_tensor as _alphas_tensor
from .components.pck import check_point_shapes as _check_points
from .components.pck import compute_dtype as _compute_dtype
from .components.pck import keypoint_correct, within

__all__ = [
    "PCK",
    "DenseFlowPCK",
    "dense_flow_counts",
    "summarize_dense",
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


# --------------------------------------------------------------------------------------------------
# functional twin
# --------------------------------------------------------------------------------------------------
def pair_correct_counts(
    pred: Tensor,
    gt: Tensor,
    threshold: float | Tensor,
    alphas: Sequence[float] | Tensor,
    valid: Tensor | None = None,
    inclusive: bool = False,
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
    correct = keypoint_correct(pred, gt, threshold, alphas, valid, inclusive)
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
    groups: Mapping[str, Tensor] | None = None,
) -> dict[str, dict[str, Any]]:
    """Turn per-pair counts into the PCK averages.

    Args:
        correct: ``[P, A]`` number of correct points per pair and alpha.
        num_points: ``[P]`` number of valid points per pair.
        category_index: ``[P]`` index into ``categories`` per pair.
        categories: The category names.
        alphas: The ``A`` alpha values (used for the keys, see :func:`format_alpha`).
        groups: Optional per-pair integer levels ``{name: [P]}`` (e.g. SPair-71k's
            ``viewpoint_variation``); negative levels are "unknown" and skipped.

    Returns:
        ``{format_alpha(a): {"per_point": float, "per_image": float, "category_mean": float,
        "weighted": float, "per_category": {name: float}}}`` plus, with ``groups``,
        ``"per_variation": {name: {level: {"per_point", "per_image", "num_pairs"}}}``; values in percent
        as Python floats. ``weighted`` is the mean of the per-category PCK weighted by each category's
        number of pairs. Averages over an empty set are NaN; categories with no points are omitted.
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
        cat_pairs = torch.zeros(num_categories, dtype=torch.float64, device=correct.device)
        cat_pairs.index_add_(0, category_index, torch.ones_like(num_points))
        weights = cat_pairs[present].unsqueeze(1)
        weighted = (per_category[present] * weights).sum(0) / weights.sum()
    else:
        category_mean = torch.full((num_alphas,), float("nan"), dtype=torch.float64, device=correct.device)
        weighted = category_mean.clone()

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
            "weighted": float(weighted[j]),
            "per_category": {
                str(name): float(per_category_l[c][j]) for c, name in enumerate(categories) if present_l[c]
            },
        }
    if groups:
        variations = {name: _group_pck(correct, num_points, levels) for name, levels in groups.items()}
        for j, alpha in enumerate(alphas):
            result[format_alpha(alpha)]["per_variation"] = {
                name: {level: {k: (v[j] if k != "num_pairs" else v) for k, v in stats.items()}
                       for level, stats in by_level.items()}
                for name, by_level in variations.items()
            }
    return result


def _group_pck(correct: Tensor, num_points: Tensor, levels: Tensor) -> dict[str, dict[str, Any]]:
    """Per-point and per-image PCK ``[A]`` (as lists) of the pairs at each non-negative level."""
    levels = levels.reshape(-1).to(device=correct.device, dtype=torch.long)
    out: dict[str, dict[str, Any]] = {}
    for level in sorted(int(v) for v in torch.unique(levels) if v >= 0):
        rows = (levels == level) & (num_points > 0)
        c, n = correct[rows], num_points[rows]
        out[str(level)] = {
            "per_point": _nan_percent(c.sum(0), n.sum().expand(c.shape[1])).tolist(),
            "per_image": (100.0 * c / n.unsqueeze(1)).mean(0).tolist(),
            "num_pairs": int(rows.sum()),
        }
    return out


def pck(
    preds: list[Tensor],
    gts: list[Tensor],
    thresholds: Sequence[float] | Tensor,
    categories: Sequence[str],
    alphas: Sequence[float],
    valids: list[Tensor] | None = None,
    inclusive: bool = False,
    groups: Mapping[str, Sequence[int]] | None = None,
) -> dict[str, dict[str, Any]]:
    """Convenience PCK over a list of pairs (no de-duplication).

    Args:
        preds: Per pair predicted points ``[N_i, 2]``.
        gts: Per pair ground-truth points ``[N_i, 2]``.
        thresholds: Per pair PCK thresholds.
        categories: Per pair category names; the category list is their sorted unique set.
        alphas: Alpha values.
        valids: Optional per pair ``[N_i]`` bool masks.
        inclusive: ``<=`` instead of ``<`` (see :func:`keypoint_correct`).
        groups: Optional per pair integer levels ``{name: [P]}`` (see :func:`summarize_pck`).

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
        c, n = pair_correct_counts(
            preds[i], gts[i], thresholds[i], alphas, None if valids is None else valids[i], inclusive
        )
        rows.append(c.cpu())
        counts.append(n)
    correct = torch.stack(rows) if rows else torch.zeros(0, len(alphas), dtype=torch.long)
    return summarize_pck(
        correct,
        torch.tensor(counts, dtype=torch.long),
        torch.tensor([lookup[c] for c in categories], dtype=torch.long),
        names,
        alphas,
        None if groups is None else {k: torch.tensor(list(v), dtype=torch.long) for k, v in groups.items()},
    )


# --------------------------------------------------------------------------------------------------
# torchmetrics Metric
# --------------------------------------------------------------------------------------------------
class TypedListStates(Metric):
    """A torchmetrics ``Metric`` whose states are ``"cat"`` lists of tensors of fixed dtypes.

    Subclasses name them in ``_state_dtypes`` (``{state: dtype}``, a class attribute or a property). This base
    keeps a rank that saw no data from breaking ``all_gather`` and concatenates a state with its dtype.
    """

    def _sync_dist(self, *args: Any, **kwargs: Any) -> None:
        # torchmetrics replaces an empty list state on a rank that saw no data by a float32 placeholder,
        # whose dtype would not match the other ranks' tensors in all_gather: use an empty tensor of the
        # state's dtype instead (the states are restored from the cache after `unsync`).
        for attr, dtype in self._state_dtypes.items():
            if isinstance(getattr(self, attr), list) and len(getattr(self, attr)) == 0:
                setattr(self, attr, [torch.zeros(0, dtype=dtype, device=self.device)])
        super()._sync_dist(*args, **kwargs)

    def _add_list_states(self) -> None:
        """Register every state of ``_state_dtypes`` as an empty ``"cat"`` list (call from ``__init__``)."""
        for name in self._state_dtypes:
            self.add_state(name, default=[], dist_reduce_fx="cat")

    def _cat_states(self) -> dict[str, Tensor]:
        """Every state concatenated (see :meth:`_cat_state`), by name."""
        return {attr: self._cat_state(attr) for attr in self._state_dtypes}

    def _cat_state(self, attr: str) -> Tensor:
        """The state ``attr`` concatenated into one flat tensor of its dtype (empty when nothing was added)."""
        value, dtype = getattr(self, attr), self._state_dtypes[attr]
        if isinstance(value, list) and len(value) == 0:
            return torch.zeros(0, dtype=dtype, device=self.device)
        return dim_zero_cat(value).to(dtype).reshape(-1)


class PairCounts(TypedListStates):
    """Per-pair counts scored at each alpha, the state :class:`PCK` and :class:`DenseFlowPCK` share.

    States (``dist_reduce_fx="cat"`` lists of long tensors on the metric's device): ``correct`` (per pair
    ``[A]`` counts, stored flattened), ``num_points``, ``category_index``, ``pair_key`` (:func:`stable_pair_key`
    of the pair id) and one per group. :meth:`_deduplicated` keeps each pair key's first occurrence.

    Args:
        alphas: The alpha values.
        categories: The known category (or dataset) names; updates reject any other name.
        groups: Names of per-pair integer attributes to break the results down by.
        inclusive: ``<=`` instead of the keypoint convention's strict ``<``.
        **kwargs: Forwarded to :class:`torchmetrics.Metric`.
    """

    full_state_update: bool = False
    higher_is_better: bool = True
    is_differentiable: bool = False

    def __init__(
        self,
        alphas: Sequence[float],
        categories: Sequence[str],
        groups: Sequence[str] = (),
        inclusive: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.groups: tuple[str, ...] = tuple(groups)
        self.inclusive = inclusive
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
        for i in range(len(self.groups)):
            self.add_state(f"group_{i}", default=[], dist_reduce_fx="cat")

    def _check_categories(self, categories: Sequence[str]) -> None:
        unknown = sorted({str(c) for c in categories} - self._category_lookup.keys())
        if unknown:
            raise ValueError(f"Unknown categor{'y' if len(unknown) == 1 else 'ies'} {unknown}; known: {list(self.categories)}.")

    def _append_pairs(
        self,
        correct: Tensor,
        num_points: Tensor,
        categories: Sequence[str],
        pair_ids: Sequence[str],
        groups: Mapping[str, Sequence[int]] | None = None,
    ) -> None:
        """Store per-pair counts: ``correct [B, A]``, ``num_points [B]`` and the pairs' labels."""
        batch = len(pair_ids)
        self.correct.append(correct.reshape(-1).to(device=self.device, dtype=torch.long))
        self.num_points.append(num_points.to(device=self.device, dtype=torch.long))
        self.category_index.append(
            torch.tensor([self._category_lookup[str(c)] for c in categories], dtype=torch.long, device=self.device)
        )
        self.pair_key.append(
            torch.tensor([stable_pair_key(p) for p in pair_ids], dtype=torch.long, device=self.device)
        )
        for i, name in enumerate(self.groups):
            levels = (groups or {}).get(name, [-1] * batch)
            getattr(self, f"group_{i}").append(torch.tensor(list(levels), dtype=torch.long, device=self.device))


    @property
    def _group_states(self) -> list[str]:
        return [f"group_{i}" for i in range(len(self.groups))]

    @property
    def _state_dtypes(self) -> dict[str, torch.dtype]:
        names = ("correct", "num_points", "category_index", "pair_key", *self._group_states)
        return {name: torch.long for name in names}


    def _deduplicated(self) -> dict[str, Tensor]:
        """Every per-pair state, concatenated, each pair key's first occurrence only, sorted by pair key.

        The canonical order (by key, not by arrival) makes the float sums of :meth:`compute` independent of
        how the pairs were split over processes and batches, so N processes give bit-identical numbers.
        """
        states = self._cat_states()
        states["correct"] = states["correct"].reshape(-1, len(self.alphas))
        pair_key = states["pair_key"]
        if pair_key.numel():
            unique_keys, inverse = torch.unique(pair_key, return_inverse=True)  # sorted keys
            positions = torch.arange(pair_key.numel(), device=pair_key.device)
            first = torch.full((unique_keys.numel(),), pair_key.numel(), dtype=torch.long, device=pair_key.device)
            keep = first.scatter_reduce(0, inverse, positions, reduce="amin")  # first occurrence of each sorted key
            states = {attr: value[keep] for attr, value in states.items()}
        return states


class PCK(PairCounts):
    """Percentage of Correct Keypoints with per-point, per-image and category-mean averages.

    States (all ``dist_reduce_fx="cat"`` lists of long tensors, created on the metric's device):
    ``correct`` (per pair ``[A]`` counts, stored flattened), ``num_points``, ``category_index`` and
    ``pair_key`` (:func:`stable_pair_key` of the pair id). ``compute()`` de-duplicates pairs by key,
    keeping the first occurrence, so that a pair scored twice counts once (our evaluation sampler does not
    pad, see ``datamodules.samplers``; a padded ``DistributedSampler`` or a user's own loop might repeat pairs).

    ``compute()`` returns ``{"pck": {format_alpha(a): {"per_point", "per_image", "category_mean",
    "per_category": {...}}}, "num_pairs": int, "num_points": int}``, values in percent. With no
    update (or no valid point) the averages are NaN and ``per_category`` is empty.

    Args:
        alphas: The alpha values, e.g. ``(0.01, 0.05, 0.1)`` for SPair-71k.
        categories: The known category names; ``update`` rejects any other name.
        groups: Names of per-pair integer attributes to break the PCK down by (SPair-71k:
            ``viewpoint_variation``, ``scale_variation``, ``truncation``, ``occlusion``).
        inclusive: ``<=`` instead of the keypoint convention's strict ``<``.
        **kwargs: Forwarded to :class:`torchmetrics.Metric`.

    Example:
        >>> metric = PCK(alphas=[0.1], categories=["cat", "dog"])
        >>> metric.update(preds=[torch.tensor([[0.0, 0.0]])], gts=[torch.tensor([[3.0, 4.0]])], thresholds=[100.0],
        ...               categories=["cat"], pair_ids=["p0"])
        >>> metric.compute()["pck"]["0.1"]["per_point"]
        100.0
    """

    def update(
        self,
        *,
        preds: list[Tensor],
        gts: list[Tensor],
        thresholds: Tensor | Sequence[float],
        categories: Sequence[str],
        pair_ids: Sequence[str],
        valids: list[Tensor] | None = None,
        groups: Mapping[str, Sequence[int]] | None = None,
    ) -> None:
        """Add a batch of pairs.

        Args:
            preds: Per pair predicted points ``[N_i, 2]`` (original pixels).
            gts: Per pair ground-truth points ``[N_i, 2]``.
            thresholds: Per pair PCK thresholds, ``[B]``.
            categories: Per pair category names (must be among the metric's categories).
            pair_ids: Per pair stable identifiers (used for de-duplication).
            valids: Optional per pair ``[N_i]`` bool masks.
            groups: Per pair level of each of the metric's ``groups`` (missing -> -1, "unknown").

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
        self._check_categories(categories)
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

        ok = keypoint_correct(pred, gt, thr[pair_of_point], self.alphas, valid, self.inclusive).T  # [N, A]
        correct = torch.zeros(batch, num_alphas, dtype=torch.long, device=device)
        correct.index_add_(0, pair_of_point, ok.long())  # [B, A]
        num_points = torch.zeros(batch, dtype=torch.long, device=device)
        num_points.index_add_(0, pair_of_point, valid.long())

        self._append_pairs(correct, num_points, categories, pair_ids, groups)

    def compute(self) -> dict[str, Any]:
        """Compute the PCK averages over all de-duplicated pairs.

        Returns:
            ``{"pck": {alpha_key: {"per_point", "per_image", "category_mean", "per_category"}},
            "num_pairs": int, "num_points": int}``.
        """
        states = self._deduplicated()
        correct, num_points, category_index = states["correct"], states["num_points"], states["category_index"]
        levels = {name: states[attr] for name, attr in zip(self.groups, self._group_states)}
        return {
            "pck": summarize_pck(correct, num_points, category_index, self.categories, self.alphas, levels or None),
            "num_pairs": int(num_points.numel()),
            "num_points": int(num_points.sum().item()) if num_points.numel() else 0,
        }



# --------------------------------------------------------------------------------------------------
# dense flow (TSS)
# --------------------------------------------------------------------------------------------------
def dense_flow_counts(
    flow: Tensor,
    flow_gt: Tensor,
    mask: Tensor,
    threshold: float | Tensor,
    alphas: Sequence[float] | Tensor,
    inclusive: bool = True,
) -> tuple[Tensor, int, float]:
    """Per-image dense flow scores: pixels within ``alpha * threshold``, valid pixels and summed EPE.

    Args:
        flow: Estimated flow ``[2, H, W]`` (target pixel + flow = source pixel).
        flow_gt: Ground-truth flow ``[2, H, W]``.
        mask: ``[H, W]`` bool, the pixels with a ground-truth correspondence.
        threshold: The image's PCK normaliser in pixels (TSS: max side of the source image).
        alphas: ``A`` alpha values.
        inclusive: ``epe <= alpha * threshold`` (the dense-flow convention) instead of ``<``.

    Returns:
        ``(correct [A] long, num_valid, epe_sum)``.
    """
    if flow.shape != flow_gt.shape or flow.shape[0] != 2 or mask.shape != flow.shape[1:]:
        raise ValueError(
            f"flow {tuple(flow.shape)}, ground truth {tuple(flow_gt.shape)} and mask {tuple(mask.shape)} must be "
            "[2, H, W], [2, H, W] and [H, W]"
        )
    dtype = _compute_dtype(flow.device)
    valid = mask.to(device=flow.device, dtype=torch.bool)
    epe = torch.linalg.vector_norm(flow.to(dtype) - flow_gt.to(device=flow.device, dtype=dtype), dim=0)[valid]
    bound = _alphas_tensor(alphas, flow.device, dtype) * float(threshold)
    correct = within(epe.unsqueeze(0), bound.unsqueeze(1), inclusive).sum(dim=1)
    return correct.long(), int(valid.sum()), float(epe.sum())


def summarize_dense(
    correct: Tensor, num_valid: Tensor, epe_sum: Tensor, dataset_index: Tensor, datasets: Sequence[str],
    alphas: Sequence[float],
) -> dict[str, Any]:
    """Dense flow averages in percent: ``per_image`` (the papers' number), ``per_pixel``, ``per_dataset``
    (per-image average within each dataset) and ``dataset_mean``; plus the average end-point error."""
    rows = num_valid > 0
    correct, num_valid = correct[rows].to(torch.float64), num_valid[rows].to(torch.float64)
    epe_sum, dataset_index = epe_sum[rows].to(torch.float64), dataset_index[rows]
    image_pck = 100.0 * correct / num_valid.unsqueeze(1)  # [P, A]
    image_epe = epe_sum / num_valid
    present = [i for i in range(len(datasets)) if bool((dataset_index == i).any())]
    per_dataset = {datasets[i]: image_pck[dataset_index == i].mean(0) for i in present}
    nan = torch.full((len(alphas),), float("nan"), dtype=torch.float64)
    pck_out = {}
    for j, alpha in enumerate(alphas):
        pck_out[format_alpha(alpha)] = {
            "per_image": float(image_pck[:, j].mean()) if len(image_pck) else float("nan"),
            "per_pixel": float(_nan_percent(correct[:, j].sum(), num_valid.sum())),
            "dataset_mean": float(torch.stack(list(per_dataset.values())).mean(0)[j]) if per_dataset else float(nan[j]),
            "per_dataset": {name: float(values[j]) for name, values in per_dataset.items()},
        }
    return {
        "pck": pck_out,
        "aepe": {
            "per_image": float(image_epe.mean()) if len(image_epe) else float("nan"),
            "per_dataset": {datasets[i]: float(image_epe[dataset_index == i].mean()) for i in present},
        },
    }


class DenseFlowPCK(PairCounts):
    """PCK and end-point error of dense flow over valid pixels, per image, grouped by dataset (TSS).

    Same de-duplication by pair key as :class:`PCK`. ``compute()`` returns :func:`summarize_dense`'s
    dictionary plus ``num_pairs`` and ``num_pixels``.

    Args:
        alphas: The alpha values (TSS: ``(0.05,)``).
        datasets: Names of the sub-datasets the images belong to (TSS: FG3DCar, JODS, PASCAL).
        inclusive: ``<=`` (the dense-flow convention of TSS evaluations) instead of ``<``.
    """

    def __init__(self, alphas: Sequence[float], datasets: Sequence[str], inclusive: bool = True, **kwargs: Any):
        super().__init__(alphas, datasets, inclusive=inclusive, **kwargs)
        self.add_state("epe_sum", default=[], dist_reduce_fx="cat")

    @property
    def _state_dtypes(self) -> dict[str, torch.dtype]:
        return {**super()._state_dtypes, "epe_sum": torch.float64}

    def update(
        self,
        *,
        datasets: Sequence[str],
        pair_ids: Sequence[str],
        flows: list[Tensor] | None = None,
        flows_gt: list[Tensor] | None = None,
        masks: list[Tensor] | None = None,
        thresholds: Sequence[float] | Tensor | None = None,
        counts: Sequence[tuple[Tensor, int, float]] | None = None,
    ) -> None:
        """Add a batch of images: estimated and ground-truth flows ``[2, H, W]``, valid masks ``[H, W]`` and
        thresholds, or their ``counts`` already scored by :func:`dense_flow_counts` (with this metric's alphas)."""
        if counts is None:
            if flows is None or flows_gt is None or masks is None or thresholds is None:
                raise ValueError("DenseFlowPCK.update takes flows, flows_gt, masks and thresholds, or counts")
            counts = [
                dense_flow_counts(f, g, m, float(t), self.alphas, self.inclusive)
                for f, g, m, t in zip(flows, flows_gt, masks, thresholds)
            ]
        self._check_categories(datasets)
        if not counts:
            return
        self._append_pairs(
            torch.stack([c[0] for c in counts]), torch.tensor([c[1] for c in counts]), datasets, pair_ids
        )
        self.epe_sum.append(torch.tensor([c[2] for c in counts], dtype=torch.float64, device=self.device))

    def update_counts(
        self, *, counts: Sequence[tuple[Tensor, int, float]], datasets: Sequence[str], pair_ids: Sequence[str]
    ) -> None:
        """Add images already scored by :func:`dense_flow_counts`: :meth:`update` with ``counts`` (through
        torchmetrics' update, which counts the call and clears a cached ``compute``)."""
        self.update(counts=counts, datasets=datasets, pair_ids=pair_ids)

    def compute(self) -> dict[str, Any]:
        """Dense PCK and AEPE over all de-duplicated images."""
        states = self._deduplicated()
        summary = summarize_dense(
            states["correct"], states["num_points"], states["epe_sum"], states["category_index"],
            self.categories, self.alphas,
        )
        return {**summary, "num_pairs": int(states["num_points"].numel()), "num_pixels": int(states["num_points"].sum())}
