"""Test-time pose alignment (GeoAware-SC, "Telling Left from Right"): also match from the mirrored source.

Semantic features confuse an object's left and right parts (a cat's left eye with its right eye). The
alignment matches a pair twice, from the source image and from its horizontal mirror, and keeps the
orientation whose instance features agree better with the target's: the lower mean nearest-neighbour
distance from the source instance's cells to the target instance's cells (:func:`instance_nn_distance`).

Mirroring swaps the semantics of symmetric parts: the mirrored cat's left eye is where the original's RIGHT
eye was. So the keypoint with id ``k`` of the mirrored source sits at the mirror image of the original's
keypoint ``partner(k)``, where the per-category flip permutation pairs left and right parts
(:data:`SPAIR_FLIP_PAIRS`); its match in the target is the prediction for target keypoint ``k``. A keypoint
whose partner is not annotated (or not visible) in the pair keeps its original-orientation prediction (as in
GeoAware-SC, which only replaces keypoints whose flipped counterpart is visible).

Choices where GeoAware-SC differs, written down in the README: the instance is the annotated bounding box
(GeoAware-SC uses SAM masks, which we cannot ship), the distance is taken on the descriptor grid (it
upsamples to 64 x 64 first), and mirrored x is ``W - 1 - x`` in pixel-centre coordinates (it uses
``W - x``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from .features import ImageFeatures
from .image_prep import PadResize
from .keypoints import AnnotationSize, annotation_geometry, transfer
from .matchers import KeypointMatcher, PairPrediction

__all__ = [
    "CUB_FLIP_PAIRS",
    "FLIP_TABLES",
    "SPAIR_FLIP_PAIRS",
    "PoseAlignment",
    "box_cells",
    "instance_nn_distance",
    "mirror_box",
    "mirror_points",
    "partner_positions",
    "pose_aligned_match",
]

#: SPair-71k's left/right keypoint pairs per category, in the dataset's own keypoint ids (those of its
#: ``kps_ids``); ids not listed are their own mirror image (nose, tail, ...). The facts of GeoAware-SC's
#: ``SPAIR_FLIP_TRN`` (the table in SPair ids; its test table renumbers bicycle and bus, whose ids 11, 12
#: and 8, 9 are unused).
SPAIR_FLIP_PAIRS: dict[str, tuple[tuple[int, int], ...]] = {
    "aeroplane": ((4, 5), (6, 7), (8, 9), (10, 11), (12, 13), (14, 15), (16, 17), (18, 19), (20, 21)),
    "bicycle": ((2, 3), (6, 7), (9, 10)),
    "bird": ((1, 2), (4, 5), (7, 8), (10, 11), (12, 13), (14, 15)),
    "boat": ((1, 2), (3, 4), (5, 6), (7, 8), (9, 10), (11, 12)),
    "bottle": ((0, 1), (2, 3), (4, 5), (6, 7), (8, 9)),
    "bus": ((0, 1), (2, 3), (5, 6), (10, 20), (13, 23), (11, 21), (14, 24), (12, 22), (15, 25), (16, 17),
            (26, 27), (18, 19), (28, 29)),
    "car": ((0, 1), (2, 3), (6, 7), (10, 20), (13, 23), (11, 21), (14, 24), (12, 22), (15, 25), (16, 17),
            (26, 27), (18, 19), (28, 29)),
    "cat": ((0, 1), (2, 3), (4, 5), (6, 7), (9, 10), (11, 12)),
    "chair": ((0, 1), (2, 3), (4, 5), (6, 7), (8, 9), (10, 11), (12, 13)),
    "cow": ((0, 1), (2, 3), (4, 5), (6, 7), (9, 10), (11, 12), (15, 16), (17, 18), (19, 20)),
    "dog": ((0, 1), (2, 3), (4, 5), (9, 10), (11, 12)),
    "horse": ((0, 1), (2, 3), (4, 5), (6, 7), (10, 11), (12, 13), (16, 17), (18, 19)),
    "motorbike": ((0, 1), (2, 3)),
    "person": ((0, 1), (2, 3), (8, 9), (10, 11), (12, 13), (14, 15), (16, 17), (18, 19)),
    "pottedplant": ((0, 2), (4, 5), (6, 8)),
    "sheep": ((0, 1), (2, 3), (4, 5), (6, 7), (9, 10), (11, 12), (15, 16), (17, 18), (19, 20)),
    "train": ((0, 1), (2, 3), (4, 5), (6, 7), (8, 9), (10, 11), (12, 13), (14, 15), (16, 17)),
    "tvmonitor": ((0, 2), (4, 6), (3, 7), (8, 10), (12, 14), (11, 15)),
}


#: CUB-200-2011's left/right parts (1-based part ids, as the CUB readers number them), for every class:
#: left eye 7 / right eye 11, left leg 8 / right leg 12, left wing 9 / right wing 13.
CUB_FLIP_PAIRS: dict[str, tuple[tuple[int, int], ...]] = {"*": ((7, 11), (8, 12), (9, 13))}

#: Flip tables by name (a benchmark protocol names its table; see ``datamodules.protocols``). The key ``"*"``
#: of a table applies to every category it does not list.
FLIP_TABLES: dict[str, dict[str, tuple[tuple[int, int], ...]]] = {"spair": SPAIR_FLIP_PAIRS, "cub": CUB_FLIP_PAIRS}


def _partner_table(category: str, pairs: Sequence[Sequence[int]]) -> dict[int, int]:
    """``{id: partner id}`` of one category's pairs; every id may appear in one pair only."""
    table: dict[int, int] = {}
    for pair in pairs:
        if len(pair) != 2 or int(pair[0]) == int(pair[1]):
            raise ValueError(f"flip_pairs[{category!r}]: {list(pair)} is not a pair of two distinct keypoint ids")
        a, b = int(pair[0]), int(pair[1])
        if a in table or b in table:
            raise ValueError(f"flip_pairs[{category!r}]: keypoint id {a if a in table else b} is in two pairs")
        table[a], table[b] = b, a
    return table


@dataclass(frozen=True)
class PoseAlignment:
    """Which left/right keypoint ids swap under a horizontal flip, per category.

    Attributes:
        flip_pairs: Category -> pairs of keypoint ids that swap (``"*"``: every category not listed), or the
            name of a table in :data:`FLIP_TABLES` (``"spair"``, the default, or ``"cub"``). A category with
            an empty list has only self-symmetric keypoints.
    """

    flip_pairs: Mapping[str, Sequence[Sequence[int]]] | str = "spair"
    _tables: dict[str, dict[int, int]] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        pairs = self.flip_pairs
        if isinstance(pairs, str):
            if pairs not in FLIP_TABLES:
                raise ValueError(f"unknown flip table {pairs!r}; known: {sorted(FLIP_TABLES)} (or a mapping)")
            pairs = FLIP_TABLES[pairs]
        object.__setattr__(self, "_tables", {str(c): _partner_table(str(c), p) for c, p in pairs.items()})

    def partners(self, category: str) -> dict[int, int]:
        """``{id: partner id}`` of ``category`` (ids not in it are self-symmetric).

        Raises:
            ValueError: The category has no flip pairs (name it, or ``"*"``, in ``flip_pairs``).
        """
        table = self._tables.get(category, self._tables.get("*"))
        if table is None:
            raise ValueError(
                f"pose alignment has no flip pairs for category {category!r} (known: {sorted(self._tables)}); "
                "give them in flip_pairs"
            )
        return table


def partner_positions(
    kps_ids: Sequence[int], partners: Mapping[int, int], valid: torch.Tensor | None = None
) -> torch.Tensor:
    """Position, in the pair's keypoint list, of each keypoint's mirror partner (-1 where it is not usable).

    Args:
        kps_ids: The pair's keypoint ids, one per keypoint position.
        partners: ``{id: partner id}``; an id not in it is its own partner.
        valid: ``[N]`` bool, keypoints annotated in both images (readers that list every part, like CUB's);
            a partner that is not valid is not usable. None: all are.

    Returns:
        ``[N]`` long: ``out[i]`` is the position of ``partners[kps_ids[i]]``, or -1 when it is not listed or not
        valid.
    """
    position = {int(k): i for i, k in enumerate(kps_ids)}
    out = torch.tensor([position.get(partners.get(int(k), int(k)), -1) for k in kps_ids], dtype=torch.long)
    if valid is not None:
        ok = valid.cpu().bool()[out.clamp(min=0)]
        out = torch.where((out >= 0) & ok, out, torch.full_like(out, -1))
    return out


def mirror_points(points: torch.Tensor, width: int) -> torch.Tensor:
    """``[N, 2]`` (x, y) pixel-centre coordinates mirrored in an image ``width`` pixels wide."""
    mirrored = points.clone()
    mirrored[:, 0] = (width - 1) - points[:, 0]
    return mirrored


def mirror_box(box: torch.Tensor, width: int) -> torch.Tensor:
    """An inclusive ``[x1, y1, x2, y2]`` box mirrored in an image ``width`` pixels wide."""
    x1, y1, x2, y2 = box.tolist()
    return box.new_tensor([width - 1 - x2, y1, width - 1 - x1, y2])


def box_cells(geometry: PadResize, box: torch.Tensor | None, grid: int) -> torch.Tensor:
    """Flat cells of a ``grid`` x ``grid`` map over ``geometry``'s square whose centres lie in ``box``.

    Args:
        geometry: The image's map from original pixels to the padded square.
        box: Inclusive ``[x1, y1, x2, y2]`` in original pixels; None is the whole image.
        grid: Cells per side.

    Returns:
        ``[M]`` long, never empty: a box smaller than a cell gives the cell holding its centre.
    """
    if box is None:
        box = torch.tensor([0.0, 0.0, geometry.width - 1.0, geometry.height - 1.0])
    corners = geometry.forward_points(box.float().reshape(2, 2))
    step = geometry.size / grid
    centres = torch.arange(grid, dtype=torch.float32) * step + (step / 2 - 0.5)
    cols = ((centres >= corners[0, 0]) & (centres <= corners[1, 0])).nonzero().flatten()
    rows = ((centres >= corners[0, 1]) & (centres <= corners[1, 1])).nonzero().flatten()
    if len(cols) == 0 or len(rows) == 0:
        centre = torch.floor(corners.mean(dim=0) / step).long().clamp(0, grid - 1)
        return (centre[1] * grid + centre[0]).reshape(1)
    return (rows[:, None] * grid + cols[None, :]).flatten()


def instance_nn_distance(descriptors: torch.Tensor, src_cells: torch.Tensor, trg_cells: torch.Tensor) -> torch.Tensor:
    """Mean, over the source instance's cells, of the L2 distance to the nearest target instance cell.

    Args:
        descriptors: ``[2, D, G, G]`` pair descriptors (source first).
        src_cells: Flat cells of the source instance.
        trg_cells: Flat cells of the target instance.

    Returns:
        A scalar tensor (lower: the two instances' features agree better).
    """
    source = descriptors[0].flatten(1).T[src_cells.to(descriptors.device)].float()
    target = descriptors[1].flatten(1).T[trg_cells.to(descriptors.device)].float()
    return torch.cdist(source, target).amin(dim=1).mean()



def _instance_distance(
    descriptors: torch.Tensor,
    source: ImageFeatures,
    target: ImageFeatures,
    src_box: torch.Tensor | None,
    trg_box: torch.Tensor | None,
    annotation_size: AnnotationSize,
) -> torch.Tensor:
    """:func:`.pose_alignment.instance_nn_distance` over the cells of the two boxes (None: whole image)."""
    grid = descriptors.shape[-1]
    src_cells = box_cells(annotation_geometry(source, annotation_size), src_box, grid)
    trg_cells = box_cells(annotation_geometry(target, annotation_size), trg_box, grid)
    return instance_nn_distance(descriptors, src_cells, trg_cells)


def pose_aligned_match(
    describe: Callable[[ImageFeatures, ImageFeatures], torch.Tensor],
    source: ImageFeatures,
    mirrored_source: ImageFeatures,
    target: ImageFeatures,
    sample: Mapping[str, Any],
    annotation_size: AnnotationSize,
    alignment: PoseAlignment,
    matcher: KeypointMatcher | None = None,
) -> dict[str, torch.Tensor]:
    """Match a pair from the source and from its mirror; keep the orientation whose instances agree better.

    See :mod:`.pose_alignment`. The instances are the pair's boxes in its images' pixels when the sample has
    them (``src_instance_box`` / ``trg_instance_box`` of :class:`.samples.PairSample`), else the whole
    images. A keypoint whose partner is not in ``kps_ids`` or not in ``kps_valid`` keeps the original
    orientation's prediction.

    Args:
        describe: Pair descriptors ``[2, D, G, G]`` of (source features, target features).
        source: Features of the source image.
        mirrored_source: Features of its horizontal mirror.
        target: Features of the target image.
        sample: The pair: ``src_kps``, ``kps_ids`` and ``category`` (the flip pairs), ``kps_valid`` and boxes
            if any.
        annotation_size: Keypoint-to-cell square.
        alignment: The flip pairs per category.
        matcher: The matcher of both transfers, with its refinements (default: nearest neighbours).

    Returns:
        ``pred_kps`` ``[N, 2]``, ``distance`` ``[N]``, the refinement's extras, ``flipped`` (scalar bool: the
        mirror won) and ``pose_distances`` ``[2]`` (instance distance of the original and the mirror).

    Raises:
        ValueError: The sample has no ``kps_ids`` (SPair-71k and CUB-200 name their keypoints) or its category
            no flip pairs.
    """
    if sample.get("kps_ids") is None:
        raise ValueError(
            f"pose alignment needs keypoint ids ('kps_ids') to swap left and right; pair {sample.get('pair_id')!r} "
            "has none (the SPair-71k and CUB-200 readers provide them)"
        )
    partner = partner_positions(sample["kps_ids"], alignment.partners(sample["category"]), sample.get("kps_valid"))
    src_kps = sample["src_kps"].float()
    src_box, trg_box = sample.get("src_instance_box"), sample.get("trg_instance_box")
    descriptors = describe(source, target)
    pred, distance, extras = transfer(descriptors, source, target, src_kps, annotation_size, matcher)
    mirrored = describe(mirrored_source, target)
    # mirrored keypoint k sits where the original's partner of k is, mirrored
    mirrored_kps = mirror_points(src_kps[partner.clamp(min=0)], source.width)
    m_pred, m_distance, m_extras = transfer(mirrored, mirrored_source, target, mirrored_kps, annotation_size, matcher)
    mirrored_box = None if src_box is None else mirror_box(src_box, source.width)
    distances = torch.stack([
        _instance_distance(descriptors, source, target, src_box, trg_box, annotation_size),
        _instance_distance(mirrored, mirrored_source, target, mirrored_box, trg_box, annotation_size),
    ])
    flipped = bool(distances[1] < distances[0])
    if flipped:
        use = (partner >= 0).to(pred.device)
        pred = torch.where(use[:, None], m_pred, pred)
        distance = torch.where(use, m_distance, distance)
        extras = {key: torch.where(use, m_extras[key], value) for key, value in extras.items()}
    return PairPrediction({
        "pred_kps": pred, "distance": distance, **extras,
        "flipped": torch.tensor(flipped), "pose_distances": distances.cpu(),
    }, tuple(extras))
