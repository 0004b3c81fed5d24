"""Keypoints on a pair's descriptors: the map from original pixels to feature cells and back, and the one
transfer skeleton every keypoint prediction goes through (:func:`transfer`). Plain torch.
"""

from __future__ import annotations

from typing import Literal, Union

import torch

from .features import ImageFeatures
from .image_prep import PadResize
from .matchers import KeypointMatcher, NearestNeighbours
from .matching import dense_flow, points_to_cells

__all__ = [
    "AnnotationSize",
    "annotation_geometry",
    "cell_distances",
    "check_annotation_size",
    "flow_from_descriptors",
    "keypoint_cells",
    "transfer",
]

#: The square in which keypoints are mapped to feature cells (the "annotation resolution" of Table 8): a
#: side in pixels, or ``"original"`` for each image's own padded square (its long side, no resize).
AnnotationSize = Union[int, Literal["original"]]


def check_annotation_size(
    annotation_size: AnnotationSize | None, field: str = "annotation_size"
) -> AnnotationSize | None:
    """Validate an ``annotation_size`` setting: a positive int, ``"original"`` or None (the default)."""
    if annotation_size is None or annotation_size == "original":
        return annotation_size
    if isinstance(annotation_size, str) or int(annotation_size) <= 0:
        raise ValueError(f"{field} must be a positive number of pixels or 'original', got {annotation_size!r}")
    return int(annotation_size)


def annotation_geometry(features: ImageFeatures, annotation_size: AnnotationSize) -> PadResize:
    """The map from an image's original pixels to the square where its keypoints meet the feature grid.

    An int is the padded model-input convention of the reference (resize the long side to ``annotation_size``,
    pad to a centred square). ``"original"`` keeps the annotation in original pixels: the image's own
    long side is the square, only the centring offset is applied.
    """
    size = max(features.width, features.height) if annotation_size == "original" else int(annotation_size)
    return PadResize(features.width, features.height, size)


def transfer(
    descriptors: torch.Tensor,
    source: ImageFeatures,
    target: ImageFeatures,
    src_kps: torch.Tensor,
    annotation_size: AnnotationSize,
    matcher: KeypointMatcher | None = None,
) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """Transfer source keypoints (original pixels) to the target with a pair's descriptors ``[2, D, G, G]``.

    The keypoints are mapped into the padded ``annotation_size`` square (:func:`annotation_geometry`), matched there
    by ``matcher`` (default :class:`.matchers.NearestNeighbours`; its test-time refinements are its own) in fp32,
    and mapped back to original target pixels.

    Returns:
        ``(predicted [N, 2] original target pixels, distance [N], extras)``: the matcher's per-point extras
        (``confidence``, ``mutual``: empty without a refinement).
    """
    src_geo, trg_geo = annotation_geometry(source, annotation_size), annotation_geometry(target, annotation_size)
    points = src_geo.forward_points(src_kps.to(descriptors.device).float())
    with torch.autocast(device_type=descriptors.device.type, enabled=False):
        predicted, distance, extras = (matcher or NearestNeighbours())(
            descriptors[0], descriptors[1], points, src_geo.size, trg_geo.size
        )
    return trg_geo.inverse_points(predicted), distance, extras


def keypoint_cells(
    features: ImageFeatures, kps: torch.Tensor, annotation_size: AnnotationSize, grid: int
) -> torch.Tensor:
    """Flat feature-grid cell of each keypoint (original pixels) of an image."""
    geometry = annotation_geometry(features, annotation_size)
    return points_to_cells(geometry.forward_points(kps.float()), geometry.size, grid)


def cell_distances(descriptors: torch.Tensor, src_cells: torch.Tensor) -> torch.Tensor:
    """L2 feature distance ``[N, G*G]`` from each source cell's descriptor to every target cell."""
    source, target = descriptors[0].flatten(1).T, descriptors[1].flatten(1).T
    return torch.cdist(source[src_cells].float(), target.float())


def flow_from_descriptors(descriptors: torch.Tensor, source: ImageFeatures, target: ImageFeatures) -> torch.Tensor:
    """Dense flow ``[2, H, W]`` from every target pixel to the source (both images share ``H x W``)."""
    if (source.width, source.height) != (target.width, target.height):
        raise ValueError(
            f"dense flow needs images of one size (pad them first): source {source.width}x{source.height}, "
            f"target {target.width}x{target.height}"
        )
    with torch.autocast(device_type=descriptors.device.type, enabled=False):
        return dense_flow(descriptors[0], descriptors[1], target.height, target.width)
