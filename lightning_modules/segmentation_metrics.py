"""DAVIS video object segmentation scores: region similarity J, boundary F-measure F, and their mean J&F.

A torchmetrics ``Metric`` (:class:`JAndF`) over a functional twin (:func:`region_similarity`,
:func:`boundary_f_measure`, :func:`frame_scores`, :func:`summarize_j_and_f`, :func:`j_and_f`). NumPy and
SciPy do the per-mask work, on the CPU.

Semantics follow the DAVIS 2017 toolkit (``davis2017-evaluation``, ``davis2017/metrics.py`` and
``davis2017/evaluation.py``, semi-supervised task):

* **J** of one object in one frame is the IoU of the predicted and ground-truth masks of that object; void
  pixels (when given) count in neither intersection nor union; both masks empty gives 1.
* **F** matches the one-pixel-wide boundaries of both masks (``seg2bmap``) within
  ``ceil(bound_th * image diagonal)`` pixels (``bound_th >= 1`` is a number of pixels) -- a binary dilation by
  a disk of that radius -- and is the harmonic mean of the boundary precision and recall. Empty boundaries:
  both empty gives 1; exactly one empty gives 0 (precision 1 and recall 0, or the reverse).
* Objects are the ids ``1..num_objects`` of a sequence (the toolkit takes ``num_objects`` from the first
  frame's annotation); a pixel of any other label (background 0, another object, the void label 255) is not
  that object. As in the toolkit the void label is background by default (its void mask is built from the
  binary per-object masks, so it is always empty); pass ``void_label=255`` to exclude such pixels instead.
* Per object, J and F are averaged over the frames scored; ``J_mean`` / ``F_mean`` are the means over all
  (sequence, object) pairs and ``JF_mean = (J_mean + F_mean) / 2`` -- the toolkit's ``J&F-Mean``. Note the
  toolkit scores frames ``1 .. T-2`` of a ``T``-frame sequence (never the first nor the last one).

Distributed evaluation: :class:`JAndF` stores one row per (frame, object) with the stable 64-bit key of
the frame's pair id (:func:`lightning_modules.metrics.stable_pair_key`); ``compute()`` keeps the first
occurrence of every (pair key, object), so the duplicates of a padded ``DistributedSampler`` never count,
and sums with :func:`math.fsum` over rows sorted by key, so neither the arrival order nor the split over
processes changes a bit of the result.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from scipy import ndimage
from torch import Tensor

from .metrics import TypedListStates, stable_pair_key

__all__ = [
    "JAndF",
    "boundary_f_measure",
    "boundary_precision_recall",
    "disk",
    "first_occurrence",
    "frame_scores",
    "j_and_f",
    "region_similarity",
    "seg2bmap",
    "summarize_j_and_f",
]

MaskLike = Tensor | np.ndarray


# --------------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------------
def _as_array(x: MaskLike, name: str) -> np.ndarray:
    """A 2-D NumPy array (tensors are detached and moved to the CPU)."""
    array = x.detach().cpu().numpy() if isinstance(x, Tensor) else np.asarray(x)
    if array.ndim != 2:
        raise ValueError(f"`{name}` must be a 2-D [H, W] mask, got shape {tuple(array.shape)}.")
    return array


def _masks(pred: MaskLike, gt: MaskLike, void: MaskLike | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``pred``, ``gt`` and ``void`` as bool arrays of one shape (void all False when None)."""
    p, g = _as_array(pred, "pred").astype(bool), _as_array(gt, "gt").astype(bool)
    if p.shape != g.shape:
        raise ValueError(f"`pred` {tuple(p.shape)} and `gt` {tuple(g.shape)} must have the same shape.")
    if void is None:
        return p, g, np.zeros_like(g)
    v = _as_array(void, "void").astype(bool)
    if v.shape != g.shape:
        raise ValueError(f"`void` {tuple(v.shape)} must have the shape of `gt` {tuple(g.shape)}.")
    return p, g, v


def disk(radius: int) -> np.ndarray:
    """Disk structuring element of ``radius`` (``skimage.morphology.disk``): offsets with dx^2 + dy^2 <= r^2."""
    radius = int(radius)
    offsets = np.arange(-radius, radius + 1)
    return offsets[:, None] ** 2 + offsets[None, :] ** 2 <= radius**2


def seg2bmap(seg: MaskLike) -> np.ndarray:
    """One-pixel-wide boundary map of a binary mask (the DAVIS toolkit's ``_seg2bmap``, same size).

    A pixel is a boundary pixel when it differs from its east, south or south-east neighbour (pixels past
    the image count as background), the boundary lying half a pixel towards the origin; in the last row only
    the east neighbour counts, in the last column only the south one, and the bottom-right pixel never.

    Args:
        seg: ``[H, W]`` mask (non-zero = foreground).

    Returns:
        bool ``[H, W]`` boundary map.
    """
    seg = _as_array(seg, "seg").astype(bool)
    east, south, south_east = np.zeros_like(seg), np.zeros_like(seg), np.zeros_like(seg)
    east[:, :-1] = seg[:, 1:]
    south[:-1, :] = seg[1:, :]
    south_east[:-1, :-1] = seg[1:, 1:]
    bmap = (seg ^ east) | (seg ^ south) | (seg ^ south_east)
    bmap[-1, :] = seg[-1, :] ^ east[-1, :]
    bmap[:, -1] = seg[:, -1] ^ south[:, -1]
    bmap[-1, -1] = False
    return bmap


def _bound_pixels(shape: tuple[int, int], bound_th: float) -> int:
    """Matching tolerance in pixels: ``int(bound_th)`` when >= 1, else ``ceil(bound_th * diagonal)``."""
    if bound_th >= 1:
        return int(bound_th)
    # sqrt of the exact integer sum, as np.linalg.norm(shape) in the toolkit: the same float, the same ceil
    return int(math.ceil(bound_th * math.sqrt(shape[0] ** 2 + shape[1] ** 2)))


def _dilated_within(target: np.ndarray, probe: np.ndarray, radius: int) -> np.ndarray:
    """``binary_dilation(target, disk(radius))`` at the True pixels of ``probe`` (both non-empty).

    The dilation by a disk is the set of pixels within Euclidean distance ``radius`` of ``target``; it is
    computed by a distance transform on the bounding box of both maps (every pixel asked about and every
    pixel of ``target`` lies inside it, so cropping changes nothing), much faster than a dilation by a
    17 x 17 disk over a 480p frame.
    """
    rows, cols = np.nonzero(target | probe)
    top, bottom, left, right = rows.min(), rows.max() + 1, cols.min(), cols.max() + 1
    window = (slice(top, bottom), slice(left, right))
    distance = ndimage.distance_transform_edt(~target[window])
    # squared distances are integers, so comparing squared values is exact
    return np.rint(distance[probe[window]] ** 2) <= radius**2


# --------------------------------------------------------------------------------------------------
# functional twin
# --------------------------------------------------------------------------------------------------
def region_similarity(pred: MaskLike, gt: MaskLike, void: MaskLike | None = None) -> float:
    """Region similarity J: the IoU of a predicted and a ground-truth mask of one object.

    Args:
        pred: ``[H, W]`` predicted mask (non-zero = object).
        gt: ``[H, W]`` ground-truth mask.
        void: Optional ``[H, W]`` mask of pixels to ignore.

    Returns:
        ``|pred & gt| / |pred | gt|`` over the non-void pixels; 1.0 when the union is empty (the toolkit's
        convention: an absent object predicted absent is perfect).
    """
    p, g, v = _masks(pred, gt, void)
    keep = ~v
    union = int(np.count_nonzero((p | g) & keep))
    if union == 0:
        return 1.0
    return int(np.count_nonzero(p & g & keep)) / union


def boundary_precision_recall(
    pred: MaskLike, gt: MaskLike, void: MaskLike | None = None, bound_th: float = 0.008
) -> tuple[float, float]:
    """Boundary precision and recall of the DAVIS F-measure (see :func:`boundary_f_measure`).

    Returns:
        ``(precision, recall)``: the fraction of predicted boundary pixels within the tolerance of a
        ground-truth boundary pixel, and the reverse. Empty boundaries follow the toolkit: both empty
        ``(1, 1)``, only the prediction's ``(1, 0)``, only the ground truth's ``(0, 1)``.
    """
    p, g, v = _masks(pred, gt, void)
    radius = _bound_pixels(g.shape, bound_th)
    p, g = p & ~v, g & ~v
    rows, cols = np.nonzero(p | g)
    if rows.size == 0:
        return 1.0, 1.0
    # Crop to both masks' bounding box plus a one-pixel background margin: seg2bmap is local (a pixel and
    # its east/south/south-east neighbours), and its last-row/column rule gives the same zeros on a
    # background margin as the general rule, so the crop's boundaries are exactly the image's.
    top, left = max(int(rows.min()) - 1, 0), max(int(cols.min()) - 1, 0)
    bottom, right = min(int(rows.max()) + 2, g.shape[0]), min(int(cols.max()) + 2, g.shape[1])
    pred_boundary = seg2bmap(p[top:bottom, left:right])
    gt_boundary = seg2bmap(g[top:bottom, left:right])
    n_pred, n_gt = int(pred_boundary.sum()), int(gt_boundary.sum())
    if n_pred == 0 and n_gt == 0:
        return 1.0, 1.0
    if n_pred == 0:
        return 1.0, 0.0
    if n_gt == 0:
        return 0.0, 1.0
    precision = int(_dilated_within(gt_boundary, pred_boundary, radius).sum()) / n_pred
    recall = int(_dilated_within(pred_boundary, gt_boundary, radius).sum()) / n_gt
    return precision, recall


def boundary_f_measure(pred: MaskLike, gt: MaskLike, void: MaskLike | None = None, bound_th: float = 0.008) -> float:
    """Boundary F-measure F of one object mask (the DAVIS toolkit's ``f_measure``).

    Boundaries are the :func:`seg2bmap` maps of both masks (void pixels removed first); a boundary pixel
    matches when a boundary pixel of the other mask lies within ``ceil(bound_th * sqrt(H^2 + W^2))`` pixels
    (Euclidean, i.e. inside the binary dilation by a disk of that radius; ``bound_th >= 1`` is the radius).

    Args:
        pred: ``[H, W]`` predicted mask.
        gt: ``[H, W]`` ground-truth mask.
        void: Optional ``[H, W]`` mask of pixels to ignore.
        bound_th: Tolerance as a fraction of the image diagonal (DAVIS: 0.008), or whole pixels when >= 1.

    Returns:
        ``2 P R / (P + R)`` (0 when ``P + R == 0``), with ``P, R`` from :func:`boundary_precision_recall`:
        1.0 when both boundaries are empty, 0.0 when exactly one is.
    """
    precision, recall = boundary_precision_recall(pred, gt, void, bound_th)
    if precision + recall == 0:
        return 0.0
    return 2.0 * precision * recall / (precision + recall)


def frame_scores(
    pred_labels: MaskLike,
    gt_labels: MaskLike,
    num_objects: int,
    void_label: int | None = None,
    bound_th: float = 0.008,
) -> tuple[list[float], list[float]]:
    """J and F of every object ``1..num_objects`` of one frame.

    Args:
        pred_labels: ``[H, W]`` predicted object ids.
        gt_labels: ``[H, W]`` ground-truth object ids (0 background).
        num_objects: Number of objects of the sequence.
        void_label: Ground-truth label of pixels to ignore (e.g. 255); None treats them as background,
            as the DAVIS toolkit does.
        bound_th: See :func:`boundary_f_measure`.

    Returns:
        ``(J per object, F per object)``, two lists of ``num_objects`` floats.
    """
    pred, gt = _as_array(pred_labels, "pred_labels"), _as_array(gt_labels, "gt_labels")
    if pred.shape != gt.shape:
        raise ValueError(f"`pred_labels` {tuple(pred.shape)} and `gt_labels` {tuple(gt.shape)} must have the same shape.")
    if isinstance(num_objects, bool) or int(num_objects) != num_objects or num_objects < 0:
        raise ValueError(f"`num_objects` must be a non-negative int, got {num_objects!r}.")
    void = None if void_label is None else gt == void_label
    js, fs = [], []
    for obj in range(1, int(num_objects) + 1):
        p, g = pred == obj, gt == obj
        js.append(region_similarity(p, g, void))
        fs.append(boundary_f_measure(p, g, void, bound_th))
    return js, fs


def summarize_j_and_f(
    j: Tensor | Sequence[float],
    f: Tensor | Sequence[float],
    sequence_index: Tensor | Sequence[int],
    object_id: Tensor | Sequence[int],
    sequences: Sequence[str],
    pair_key: Tensor | Sequence[int] | None = None,
) -> dict[str, Any]:
    """Turn per-(frame, object) scores into the DAVIS averages (rows in any order: sums are exact, fsum).

    Args:
        j: ``[R]`` region similarity per row (one row per frame and object).
        f: ``[R]`` boundary F-measure per row.
        sequence_index: ``[R]`` index into ``sequences`` of each row.
        object_id: ``[R]`` object id (1-based) of each row.
        sequences: Sequence names.
        pair_key: Optional ``[R]`` frame key of each row, to count a sequence's distinct frames (without it,
            the most rows any one object of the sequence has).

    Returns:
        ``{"J_mean", "F_mean", "JF_mean", "per_sequence": {name: {"J_mean", "F_mean", "JF_mean",
        "num_objects", "num_frames"}}, "per_object": {"<name>_<id>": {"J_mean", "F_mean"}}, "num_frames",
        "num_objects"}``. Per object: the mean over its frames; per sequence: the mean over its objects;
        overall: the mean over all (sequence, object) pairs; ``JF_mean = (J_mean + F_mean) / 2``. Means over
        nothing are NaN and sequences without rows are omitted.
    """
    j_l, f_l = _float_list(j), _float_list(f)
    seq_l, obj_l = _int_list(sequence_index), _int_list(object_id)
    key_l = None if pair_key is None else _int_list(pair_key)
    if not (len(j_l) == len(f_l) == len(seq_l) == len(obj_l)) or (key_l is not None and len(key_l) != len(j_l)):
        raise ValueError("`j`, `f`, `sequence_index`, `object_id` (and `pair_key`) must have the same length.")
    if seq_l and (min(seq_l) < 0 or max(seq_l) >= len(sequences)):
        raise ValueError(f"`sequence_index` out of range for {len(sequences)} sequences.")

    per_object_rows: dict[tuple[int, int], tuple[list[float], list[float]]] = {}
    for jv, fv, s, o in zip(j_l, f_l, seq_l, obj_l):
        js, fs = per_object_rows.setdefault((s, o), ([], []))
        js.append(jv)
        fs.append(fv)
    frames: dict[int, int] = {}
    if key_l is not None:
        for s, frame_keys in _group(seq_l, key_l).items():
            frames[s] = len(set(frame_keys))
    else:
        for (s, _), (js, _) in per_object_rows.items():
            frames[s] = max(frames.get(s, 0), len(js))

    per_object: dict[str, dict[str, float]] = {}
    object_means: dict[int, list[tuple[float, float]]] = {}
    for s, o in sorted(per_object_rows):
        js, fs = per_object_rows[(s, o)]
        means = (math.fsum(js) / len(js), math.fsum(fs) / len(fs))
        per_object[f"{sequences[s]}_{o}"] = {"J_mean": means[0], "F_mean": means[1]}
        object_means.setdefault(s, []).append(means)

    per_sequence: dict[str, dict[str, Any]] = {}
    for s in sorted(object_means, key=lambda i: str(sequences[i])):
        jm, fm = _mean([m[0] for m in object_means[s]]), _mean([m[1] for m in object_means[s]])
        per_sequence[str(sequences[s])] = {
            "J_mean": jm, "F_mean": fm, "JF_mean": (jm + fm) / 2,
            "num_objects": len(object_means[s]), "num_frames": frames[s],
        }

    all_means = [m for s in sorted(object_means) for m in object_means[s]]
    j_mean, f_mean = _mean([m[0] for m in all_means]), _mean([m[1] for m in all_means])
    return {
        "J_mean": j_mean,
        "F_mean": f_mean,
        "JF_mean": (j_mean + f_mean) / 2,
        "per_sequence": per_sequence,
        "per_object": per_object,
        "num_frames": sum(v["num_frames"] for v in per_sequence.values()),
        "num_objects": len(all_means),
    }


def _group(groups: list[int], values: list[Any]) -> dict[int, list[Any]]:
    out: dict[int, list[Any]] = {}
    for g, v in zip(groups, values):
        out.setdefault(g, []).append(v)
    return out


def _mean(values: list[float]) -> float:
    return math.fsum(values) / len(values) if values else float("nan")


def _float_list(values: Tensor | Sequence[float]) -> list[float]:
    return [float(v) for v in (values.reshape(-1).tolist() if isinstance(values, Tensor) else values)]


def _int_list(values: Tensor | Sequence[int]) -> list[int]:
    return [int(v) for v in (values.reshape(-1).tolist() if isinstance(values, Tensor) else values)]


def j_and_f(
    pred_labels: Sequence[MaskLike],
    gt_labels: Sequence[MaskLike],
    sequences: Sequence[str],
    num_objects: Sequence[int],
    void_label: int | None = None,
    bound_th: float = 0.008,
) -> dict[str, Any]:
    """Convenience J&F over a list of frames (no de-duplication): :func:`frame_scores` of every frame, then
    :func:`summarize_j_and_f` (the sequence list is the sorted unique set of ``sequences``)."""
    if not (len(pred_labels) == len(gt_labels) == len(sequences) == len(num_objects)):
        raise ValueError("`pred_labels`, `gt_labels`, `sequences` and `num_objects` must have the same length.")
    names = sorted(set(map(str, sequences)))
    lookup = {name: i for i, name in enumerate(names)}
    j, f, seq, obj, key = [], [], [], [], []
    for frame, (pred, gt, name, n) in enumerate(zip(pred_labels, gt_labels, sequences, num_objects)):
        js, fs = frame_scores(pred, gt, n, void_label, bound_th)
        j += js
        f += fs
        seq += [lookup[str(name)]] * len(js)
        obj += list(range(1, len(js) + 1))
        key += [frame] * len(js)
    return summarize_j_and_f(j, f, seq, obj, names, key)


def first_occurrence(keys: Tensor) -> Tensor:
    """Indices of the first occurrence of every distinct row of ``keys`` (``[N]`` or ``[N, K]`` integers),
    in sorted key order (lexicographic for rows), so the result does not depend on the arrival order."""
    if keys.numel() == 0:
        return torch.zeros(0, dtype=torch.long, device=keys.device)
    unique, inverse = torch.unique(keys, dim=0, sorted=True, return_inverse=True)
    positions = torch.arange(keys.shape[0], device=keys.device)
    first = torch.full((unique.shape[0],), keys.shape[0], dtype=torch.long, device=keys.device)
    return first.scatter_reduce(0, inverse, positions, reduce="amin")


# --------------------------------------------------------------------------------------------------
# torchmetrics Metric
# --------------------------------------------------------------------------------------------------
class JAndF(TypedListStates):
    """DAVIS region similarity J, boundary F-measure F and J&F, per sequence and overall.

    States (``dist_reduce_fx="cat"`` lists, one row per scored (frame, object), on the metric's device):
    ``pair_key`` (:func:`~lightning_modules.metrics.stable_pair_key` of the frame's pair id), ``object_id``,
    ``sequence_index`` (long) and ``j`` / ``f`` (float64). ``compute()`` keeps the first occurrence of every
    (pair key, object id), in key order, then returns :func:`summarize_j_and_f`'s dictionary::

        {"J_mean", "F_mean", "JF_mean",
         "per_sequence": {seq: {"J_mean", "F_mean", "JF_mean", "num_objects", "num_frames"}},
         "per_object": {"<seq>_<id>": {"J_mean", "F_mean"}}, "num_frames", "num_objects"}

    Values are fractions in [0, 1] (the toolkit's scale); NaN and empty dicts with no update.

    Args:
        sequences: The known sequence names (every rank must know all of them); ``update`` rejects others.
        void_label: Ground-truth label of pixels to ignore; None (default) treats it as background, as the
            DAVIS toolkit does.
        bound_th: Boundary tolerance of F (DAVIS: 0.008 of the image diagonal).
        **kwargs: Forwarded to :class:`torchmetrics.Metric`.
    """

    full_state_update: bool = False
    higher_is_better: bool = True
    is_differentiable: bool = False

    _state_dtypes = {
        "pair_key": torch.long,
        "object_id": torch.long,
        "sequence_index": torch.long,
        "j": torch.float64,
        "f": torch.float64,
    }

    def __init__(
        self,
        sequences: Sequence[str],
        void_label: int | None = None,
        bound_th: float = 0.008,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if isinstance(sequences, str):
            raise ValueError("`sequences` must be a sequence of names, not a single string.")
        self.sequences: tuple[str, ...] = tuple(str(s) for s in sequences)
        if len(set(self.sequences)) != len(self.sequences):
            raise ValueError(f"`sequences` contains duplicates: {list(self.sequences)}.")
        self._sequence_lookup = {name: i for i, name in enumerate(self.sequences)}
        self.void_label = void_label
        self.bound_th = float(bound_th)
        self._add_list_states()

    def update(
        self,
        *,
        pred_labels: Sequence[Tensor],
        gt_labels: Sequence[Tensor],
        sequences: Sequence[str],
        pair_ids: Sequence[str],
        num_objects: Sequence[int],
    ) -> None:
        """Score a batch of frames: every object ``1..num_objects[i]`` of frame ``i``.

        Args:
            pred_labels: Per frame predicted object ids ``[H, W]``.
            gt_labels: Per frame ground-truth object ids ``[H, W]``.
            sequences: Per frame sequence name (one of the metric's ``sequences``).
            pair_ids: Per frame stable identifier (``"<seq>/<frame>"``; used for de-duplication).
            num_objects: Per frame number of objects of its sequence.

        Raises:
            ValueError: On length or shape mismatches or an unknown sequence.
        """
        if isinstance(sequences, str) or isinstance(pair_ids, str):
            raise ValueError("`sequences` and `pair_ids` must be sequences of strings, one per frame.")
        batch = len(pred_labels)
        if not (len(gt_labels) == len(sequences) == len(pair_ids) == len(num_objects) == batch):
            raise ValueError(
                "`pred_labels`, `gt_labels`, `sequences`, `pair_ids` and `num_objects` must have the same length, "
                f"got {batch}, {len(gt_labels)}, {len(sequences)}, {len(pair_ids)}, {len(num_objects)}."
            )
        unknown = sorted({str(s) for s in sequences} - self._sequence_lookup.keys())
        if unknown:
            raise ValueError(f"Unknown sequence{'s' if len(unknown) > 1 else ''} {unknown}; known: {list(self.sequences)}.")
        rows: dict[str, list[float]] = {name: [] for name in self._state_dtypes}
        for pred, gt, seq, pair_id, n in zip(pred_labels, gt_labels, sequences, pair_ids, num_objects):
            js, fs = frame_scores(pred, gt, int(n), self.void_label, self.bound_th)
            rows["j"] += js
            rows["f"] += fs
            rows["object_id"] += range(1, len(js) + 1)
            rows["pair_key"] += [stable_pair_key(pair_id)] * len(js)
            rows["sequence_index"] += [self._sequence_lookup[str(seq)]] * len(js)
        if not rows["j"]:
            return
        for name, dtype in self._state_dtypes.items():
            getattr(self, name).append(torch.tensor(rows[name], dtype=dtype, device=self.device))

    def _deduplicated(self) -> dict[str, Tensor]:
        """Every state, concatenated, the first occurrence of each (pair key, object id) only, in key order."""
        states = self._cat_states()
        keep = first_occurrence(torch.stack([states["pair_key"], states["object_id"]], dim=1))
        return {name: value[keep] for name, value in states.items()}

    def compute(self) -> dict[str, Any]:
        """The DAVIS averages over all de-duplicated (frame, object) rows (see the class docstring)."""
        s = self._deduplicated()
        return summarize_j_and_f(s["j"], s["f"], s["sequence_index"], s["object_id"], self.sequences, s["pair_key"])
