"""Matchers: how source points find their target points on a pair's descriptor grids.

The pipeline's ``matcher`` (config key ``pipeline.matcher``; default :class:`NearestNeighbours`, the paper's).
A new matcher is one subclass of :class:`KeypointMatcher`, named in the config by its ``class_path``. Its
test-time refinements (window soft-argmax, mutual check: :class:`.refinements.MatchRefinement`) are its own
options: the one object that travels from the config to the transfer. The pipeline's ``soft_argmax_window``,
``soft_argmax_temperature`` and ``mutual_check`` flags (and an ablation row's) configure them through
:meth:`KeypointMatcher.refined`. Plain torch.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

from torch import Tensor

from .matching import transfer_keypoints
from .refinements import MatchRefinement, refined_transfer

__all__ = ["REFINEMENT_EXTRAS", "KeypointMatcher", "Matches", "NearestNeighbours", "PairPrediction", "point_extras"]


class PairPrediction(dict):
    """A pair's prediction (:func:`.prediction.predict_pair`): a dict of tensors (``pred_kps``, ``distance``, the
    matcher's per-point extras, pose alignment's ``flipped`` and ``pose_distances``), which also knows which of
    its entries are the matcher's per-point extras (:attr:`Matches.extras`): the writers write every one of them,
    in that order, under its name.

    Attributes:
        point_extras: The names of the matcher's per-point extras among the entries.
    """

    def __init__(self, entries: dict, point_extras: tuple[str, ...] = ()) -> None:
        super().__init__(entries)
        self.point_extras = tuple(point_extras)


#: The per-point extras of the paper's matcher with refinements: what a prediction given as a plain dict (not a
#: :class:`PairPrediction`) is read for, as before the matchers named their own.
REFINEMENT_EXTRAS = ("confidence", "mutual")


def point_extras(prediction: Mapping[str, Any]) -> tuple[str, ...]:
    """The names of a prediction's per-point extras: :attr:`PairPrediction.point_extras`, or, for a plain dict,
    those of :data:`REFINEMENT_EXTRAS` it holds."""
    if isinstance(prediction, PairPrediction):
        return prediction.point_extras
    return tuple(key for key in REFINEMENT_EXTRAS if key in prediction)


class Matches(NamedTuple):
    """What a matcher returns (a tuple: ``points, distance, extras = matcher(...)`` works).

    Attributes:
        points: ``[N, 2]`` matches in the padded target square.
        distance: ``[N]`` feature distance of each match.
        extras: Per-point ``[N]`` tensors the matcher records (``confidence``, ``mutual``, or a matcher's own):
            every one is written to ``predictions.jsonl`` and ``matches.jsonl``, under its name.
    """

    points: Tensor
    distance: Tensor
    extras: dict[str, Tensor]


class KeypointMatcher:
    """Where each source point lands on the target, from a pair's descriptor grids.

    Subclasses implement :meth:`__call__`. Points are in the padded squares the descriptors cover (sides
    ``source_size`` / ``target_size`` pixels; a cell ``c`` of a ``G``-cell side is centred at
    ``c * size / G + size / (2 G) - 0.5``, see :mod:`.matching`). The caller maps original pixels in and out.

    Attributes:
        refinement: The test-time refinements this matcher applies (None: none).
    """

    refinement: MatchRefinement | None = None

    def __call__(self, source: Tensor, target: Tensor, points: Tensor, source_size: int, target_size: int) -> Matches:
        """Match ``points`` ``[N, 2]`` from the ``[D, G, G]`` source grid to the target grid.

        Args:
            source: Source descriptors ``[D, G, G]`` (fp32).
            target: Target descriptors ``[D, G, G]`` (fp32).
            points: Source points ``[N, 2]`` ``(x, y)`` in the padded source square.
            source_size: Side of the padded source square in pixels.
            target_size: Side of the padded target square in pixels.

        Returns:
            The :class:`Matches` (a 3-tuple).
        """
        raise NotImplementedError

    def refined(self, refinement: MatchRefinement | None) -> KeypointMatcher:
        """This matcher with the test-time ``refinement`` of a config's flags (or an ablation row's); None or an
        inactive refinement keeps the matcher as it is. A matcher that can refine overrides it.

        Raises:
            ValueError: Refinements asked of a matcher that has none.
        """
        if refinement is None or not refinement.active:
            return self
        raise ValueError(f"{type(self).__name__} takes no test-time refinements (soft_argmax_window, mutual_check): "
                         "leave those flags unset or use a matcher that refines (NearestNeighbours)")


class NearestNeighbours(KeypointMatcher):
    """The paper's matcher: each source point's cell goes to its L2 nearest target cell, predicted at that cell's
    centre (:func:`.matching.transfer_keypoints`); with refinements, :func:`.refinements.refined_transfer`
    (window soft-argmax, mutual check, confidence) on the same nearest neighbours.

    Args:
        soft_argmax_window: Beyond the paper (GeoAware-SC): the softmax-weighted mean cell of a ``(2w+1)^2``
            window around the best match; None keeps the cell centre.
        soft_argmax_temperature: Softmax temperature over cosine similarities (window and confidence).
        mutual_check: Beyond the paper: record whether each match is a mutual nearest neighbour. With either
            refinement on, each match also records a ``confidence``.
    """

    def __init__(self, soft_argmax_window: int | None = None, soft_argmax_temperature: float = 0.04,
                 mutual_check: bool = False) -> None:
        refinement = MatchRefinement(soft_argmax_window, float(soft_argmax_temperature), bool(mutual_check))
        self.refinement = refinement if refinement.active else None

    def __call__(self, source: Tensor, target: Tensor, points: Tensor, source_size: int, target_size: int) -> Matches:
        if self.refinement is None:
            predicted, distance = transfer_keypoints(source, target, points, source_size, target_size)
            return Matches(predicted, distance, {})
        return Matches(*refined_transfer(source, target, points, source_size, target_size, self.refinement))

    def refined(self, refinement: MatchRefinement | None) -> KeypointMatcher:
        """A nearest-neighbour matcher with ``refinement`` (None or inactive: this one as it is)."""
        if refinement is None or not refinement.active:
            return self
        return NearestNeighbours(refinement.soft_argmax_window, refinement.soft_argmax_temperature,
                                 refinement.mutual_check)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.refinement or ''})"
