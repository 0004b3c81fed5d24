"""How one keypoint prediction is made from a batch's raw features: one typed settings object and the functions
that use it, shared by :class:`.pipeline.FusedCorrespondence` and by every row of an ablation
(:class:`.ablation.AblationCorrespondence`).

A run is made of featurizers and a cache (which extract each image once); a prediction is made of descriptors
(co-PCA and fusion by a :class:`.descriptors.DescriptorSpec`, or a learned head), the keypoint transfer by a
matcher (which holds its own refinements), and optionally pose alignment. :class:`PredictionSettings` holds
the second part; :func:`predict_pairs` runs it over features extracted once for the batch. Zero-shot descriptors of a batch are
computed together (:func:`.descriptors.describe_pairs`: co-PCA batched over the pairs, the same descriptors as
one pair at a time). Plain torch.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .features import ImageFeatures, mirrored_key, pair_features, sample_image_key
from .keypoints import AnnotationSize, transfer
from .matchers import KeypointMatcher, PairPrediction
from .pose_alignment import PoseAlignment, pose_aligned_match
from .samples import PairSample

__all__ = ["PredictionSettings", "describe_batch", "predict_pair", "predict_pairs"]

#: Descriptors ``[2, D, G, G]`` of each ``(source, target)`` features pair, in order.
DescribePairs = Callable[[Sequence[tuple[ImageFeatures, ImageFeatures]]], list[torch.Tensor]]


@dataclass(frozen=True)
class PredictionSettings:
    """How one prediction is made from raw features.

    Attributes:
        describe_pairs: The descriptors of a batch of feature pairs (co-PCA and fusion by a spec, or a head).
        annotation_size: The square in which keypoints meet the feature grid (:func:`.keypoints.annotation_geometry`).
        matcher: How source keypoints find their target points, with its test-time refinements (soft-argmax
            window, mutual check); None: the paper's plain nearest neighbours.
        pose_aligner: Matches from the source's mirror too and keeps the better orientation (its flip table),
            or None (the ``pose_alignment`` flag of a pipeline or row builds it).
    """

    describe_pairs: DescribePairs
    annotation_size: AnnotationSize
    matcher: KeypointMatcher | None = None
    pose_aligner: PoseAlignment | None = None

    def describe_pair(self, source: ImageFeatures, target: ImageFeatures) -> torch.Tensor:
        """Descriptors ``[2, D, G, G]`` of one pair."""
        return self.describe_pairs([(source, target)])[0]


def describe_batch(
    features: Mapping[str, ImageFeatures], samples: Sequence[PairSample], settings: PredictionSettings
) -> list[torch.Tensor | None]:
    """The descriptors of every pair of a batch at once, or None per pair with pose alignment (each pair then
    describes both orientations of its source, :func:`predict_pair`)."""
    if settings.pose_aligner is not None:
        return [None] * len(samples)
    return list(settings.describe_pairs([pair_features(features, s) for s in samples]))


def predict_pair(
    features: Mapping[str, ImageFeatures],
    sample: PairSample,
    settings: PredictionSettings,
    descriptors: torch.Tensor | None = None,
) -> dict[str, Any]:
    """One pair's prediction from the batch's features by image key (:func:`.features.sample_image_key`): its
    descriptors (as given, else described), the transfer and, when set, the refinements and the pose
    alignment; no extraction.

    Returns:
        ``pred_kps`` ``[N, 2]`` (original target pixels) and ``distance`` ``[N]``; the matcher's per-point
        extras (with a refinement ``confidence`` ``[N]``, and ``mutual`` ``[N]`` bool when it checks them), named
        in order by :attr:`.matchers.PairPrediction.point_extras`; with pose alignment also ``flipped`` and
        ``pose_distances`` (:func:`.pose_alignment.pose_aligned_match`).
    """
    source, target = pair_features(features, sample)
    if settings.pose_aligner is not None:
        mirrored = features[mirrored_key(sample_image_key(sample, "src"))]
        return pose_aligned_match(
            settings.describe_pair, source, mirrored, target, sample, settings.annotation_size, settings.pose_aligner,
            settings.matcher,
        )
    if descriptors is None:
        descriptors = settings.describe_pair(source, target)
    pred, distance, extras = transfer(
        descriptors, source, target, sample["src_kps"], settings.annotation_size, settings.matcher
    )
    return PairPrediction({"pred_kps": pred, "distance": distance, **extras}, tuple(extras))


def predict_pairs(
    features: Mapping[str, ImageFeatures], samples: Sequence[PairSample], settings: PredictionSettings
) -> list[dict[str, Any]]:
    """:func:`predict_pair` of every pair of a batch, zero-shot descriptors computed together
    (:func:`describe_batch`)."""
    return [predict_pair(features, s, settings, d) for s, d in zip(samples, describe_batch(features, samples, settings))]
