"""Matchers: how source points find their target points on a pair's descriptor grids.

The pipeline's ``matcher`` (config key ``pipeline.matcher``; default :class:`NearestNeighbours`, the paper's).
A new matcher is one subclass of :class:`KeypointMatcher`, named in the config by its ``class_path``.
Plain torch.
"""

from __future__ import annotations

from torch import Tensor

from .matching import transfer_keypoints
from .refinements import MatchRefinement, refined_transfer

__all__ = ["KeypointMatcher", "Matches", "NearestNeighbours"]

#: What a matcher returns: ``(points [N, 2] in the padded target square, distance [N], extras)``.
Matches = tuple[Tensor, Tensor, dict[str, Tensor]]


class KeypointMatcher:
    """Where each source point lands on the target, from a pair's descriptor grids.

    Subclasses implement :meth:`__call__`. Points are in the padded squares the descriptors cover (sides
    ``source_size`` / ``target_size`` pixels; a cell ``c`` of a ``G``-cell side is centred at
    ``c * size / G + size / (2 G) - 0.5``, see :mod:`.matching`). The caller maps original pixels in and out.
    """

    def __call__(
        self, source: Tensor, target: Tensor, points: Tensor, source_size: int, target_size: int,
        refinement: MatchRefinement | None = None,
    ) -> Matches:
        """Match ``points`` ``[N, 2]`` from the ``[D, G, G]`` source grid to the target grid.

        Args:
            source: Source descriptors ``[D, G, G]`` (fp32).
            target: Target descriptors ``[D, G, G]`` (fp32).
            points: Source points ``[N, 2]`` ``(x, y)`` in the padded source square.
            source_size: Side of the padded source square in pixels.
            target_size: Side of the padded target square in pixels.
            refinement: The test-time refinements configured on the pipeline (None: none); a matcher that
                cannot apply one should raise.

        Returns:
            ``(points [N, 2] in the padded target square, distance [N] of each match, extras)``: ``extras``
            are per-point tensors ``[N]`` written to ``predictions.jsonl`` (``confidence``, ``mutual``).
        """
        raise NotImplementedError


class NearestNeighbours(KeypointMatcher):
    """The paper's matcher: each source point's cell goes to its L2 nearest target cell, predicted at that cell's
    centre (:func:`.matching.transfer_keypoints`); with a refinement, :func:`.refinements.refined_transfer`
    (window soft-argmax, mutual check, confidence) on the same nearest neighbours."""

    def __call__(
        self, source: Tensor, target: Tensor, points: Tensor, source_size: int, target_size: int,
        refinement: MatchRefinement | None = None,
    ) -> Matches:
        if refinement is None or not refinement.active:
            predicted, distance = transfer_keypoints(source, target, points, source_size, target_size)
            return predicted, distance, {}
        return refined_transfer(source, target, points, source_size, target_size, refinement)

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"
