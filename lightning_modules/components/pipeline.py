"""The method end to end, in plain torch: extract, describe (co-PCA and fusion), match, map back.

:class:`FusedCorrespondence` is the part every LightningModule of the collection receives; it composes the
steps that live in their own modules: :mod:`.features` (raw features, the cache), :mod:`.descriptors`
(co-PCA, fusion), :mod:`.keypoints` and :mod:`.matchers` (the transfer), :mod:`.refinements` and
:mod:`.pose_alignment` (test-time refinements). Usable without Lightning::

    pipeline = FusedCorrespondence(SDFeaturizer(), DinoFeaturizer())
    result = pipeline.match(source_image, target_image, source_points, category="cat")  # a PairMatch
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Union

import numpy as np
import torch
from jsonargparse.typing import ClosedUnitInterval, NonNegativeFloat, PositiveInt
from PIL import Image
from torch import nn

from .dense import PixelCorrespondence, pixel_correspondence
from .descriptors import DescriptorSpec, describe_pair, describe_pairs
from .dino_featurizer import DinoFeaturizer
from .features import (
    SOURCES,
    Featurizer,
    ImageFeatures,
    check_sources,
    default_annotation_size,
    extract_features,
    feature_cache,
    pair_features,
    source_maps,
    unique_images,
)
from .image_prep import load_rgb_image, load_scale, load_user_image, upright
from .inputs import check_points
from .keypoints import AnnotationSize, annotation_geometry, check_annotation_size, flow_from_descriptors
from .matchers import KeypointMatcher, NearestNeighbours
from .pose_alignment import PoseAlignment
from .prediction import PredictionSettings, describe_batch, predict_pair
from .projection_head import GatedProjectionHead
from .refinements import MatchRefinement
from .samples import PairSample
from .sd_featurizer import SDFeaturizer

__all__ = ["FusedCorrespondence", "PairMatch", "benchmark_pose_alignment"]


@dataclass(frozen=True)
class PairMatch:
    """The prediction for one pair of images (:meth:`FusedCorrespondence.match`).

    Attributes:
        points: Predicted target points ``[N, 2]`` ``(x, y)`` in original target pixels.
        distance: Feature distance of each match ``[N]``.
        confidence: Softmax probability of each matched cell ``[N]`` (with a refinement configured), else None.
        mutual: Whether each match is a mutual nearest neighbour ``[N]`` (with ``mutual_check``), else None.
        flipped: Whether the mirrored source won (with ``pose_alignment``), else None.
    """

    points: torch.Tensor
    distance: torch.Tensor
    confidence: torch.Tensor | None = None
    mutual: torch.Tensor | None = None
    flipped: bool | None = None


#: What :meth:`FusedCorrespondence.match` takes as an image.
ImageLike = Union[str, os.PathLike, torch.Tensor, Image.Image, np.ndarray]


def as_image_tensor(image: ImageLike) -> torch.Tensor:
    """An RGB image as the uint8 ``[3, H, W]`` tensor the featurizers take: a file path is read with
    :func:`.image_prep.load_rgb_image` as a user's photo (``upright``: its EXIF orientation applied, as the
    own-images command reads it), a PIL image is turned upright too (:func:`.image_prep.upright`) and converted,
    an ``[H, W, 3]`` array is converted, a uint8 tensor is returned as is.

    Raises:
        FileNotFoundError: A path that names no file.
        ValueError: A file that is not an image, or not a 3-channel uint8 image.
    """
    if isinstance(image, (str, os.PathLike)):
        return load_rgb_image(image, upright=True)
    if isinstance(image, Image.Image):
        image = np.asarray(upright(image).convert("RGB"))
    if isinstance(image, np.ndarray):
        if image.ndim != 3 or image.shape[-1] != 3 or image.dtype != np.uint8:
            raise ValueError(f"expected an [H, W, 3] uint8 array, got {image.dtype} {image.shape}")
        image = np.ascontiguousarray(image)
        image = torch.from_numpy(image if image.flags.writeable else image.copy()).permute(2, 0, 1)
    if image.dtype != torch.uint8 or image.ndim != 3 or image.shape[0] != 3:
        raise ValueError(f"expected a uint8 [3, H, W] image tensor, got {image.dtype} {tuple(image.shape)}")
    return image


def _user_image(image: ImageLike, max_side: int | None) -> tuple[torch.Tensor, tuple[int, int]]:
    """:func:`as_image_tensor`, a file read at most ``max_side`` long (:func:`.image_prep.load_user_image`), and
    the ``(width, height)`` of the original image."""
    if isinstance(image, (str, os.PathLike)):
        return load_user_image(image, max_side)
    tensor = as_image_tensor(image)
    return tensor, (int(tensor.shape[-1]), int(tensor.shape[-2]))


class FusedCorrespondence(nn.Module):
    """SD + DINO fused features and nearest-neighbour keypoint transfer ("A Tale of Two Features").

    The part every LightningModule of the collection receives (``pipeline:`` in the configs): features,
    co-PCA and fusion, matching and its test-time refinements, with the feature cache. Plain torch.

    Args:
        sd: SD featurizer, or None for DINO alone.
        dino: DINO featurizer, or None for SD alone.
        alpha: Weight of the SD block in the fusion (0.5 in the paper). With 1 the DINO featurizer is not
            run, with 0 the SD featurizer is not run.
        pca_dims: Co-PCA dimension per SD layer (256 each in the paper); None keeps the raw channels.
        pca_solver: Co-PCA's randomised PCA: ``"torch1.13"`` (default) runs ``torch.pca_lowrank`` as torch 1.13.1,
            which the reference ran, does; ``"torch2.4"`` as torch >= 2.4 does (:data:`.fusion.PCA_SOLVERS`).
        annotation_size: Side of the padded square in which keypoints are mapped to feature cells; defaults to
            the DINO input size when a DINO featurizer is configured (840 in the reference, also for its
            SD-only runs), else the SD input size. ``"original"``: each image's own square (Table 8).
        fusion: How the blocks are combined (``fusion.FUSIONS``; ``concat_l2`` is the paper's).
        feature_cache_gb: Memory for raw per-image features shared by all pairs of the run (on the
            featurizers' device); each image is then extracted once. 0 disables the in-memory cache.
        feature_cache_dir: Folder of an on-disk feature cache (safetensors, keyed by image content and
            feature config) that later runs reuse; None disables it. A relative folder is taken under the run's
            folder (``trainer.default_root_dir``) when the run starts; an absolute one is kept.
        projection_ckpt: A trained projection head (``train.py``'s ``.ckpt`` or a
            :meth:`GatedProjectionHead.save_checkpoint` file) used instead of co-PCA and the fixed fusion; its
            sources decide which featurizers run, and ``alpha``, ``pca_dims`` and ``fusion`` are then unused.
        soft_argmax_window: Beyond the paper (GeoAware-SC): predict the softmax-weighted mean cell of a
            ``(2w+1)^2`` window around the best match (sub-cell predictions); None (default) keeps the cell
            centre of the nearest neighbour, as the paper does.
        soft_argmax_temperature: Softmax temperature over cosine similarities (window and confidence).
        mutual_check: Beyond the paper: record per keypoint whether its match is a mutual nearest neighbour.
            With either refinement on, predictions also hold a ``confidence`` per keypoint.
        pose_alignment: Beyond the paper (GeoAware-SC): also match from each source image's horizontal mirror
            (one more extraction per source image), with left/right keypoint ids swapped, and keep the
            orientation whose instance (bounding box) features agree better; predictions then hold
            ``flipped`` and ``pose_distances`` per pair. Keypoint benchmarks with semantic keypoint ids
            (SPair-71k, CUB-200).
        flip_pairs: Category -> left/right keypoint id pairs for pose alignment (``"*"``: any other category),
            or a table name (``"spair"``, ``"cub"``); None takes the benchmark protocol's table
            (:meth:`use_protocol`).
        matcher: How source keypoints find their target points on the descriptors
            (:class:`.matchers.KeypointMatcher`); None is the paper's :class:`.matchers.NearestNeighbours`.
        featurizers: Beyond the paper: further feature sources by name (any :class:`.features.Featurizer`, e.g.
            a second DINO or a DINOv3), each fused as one more block: its maps merged coarse to fine and resized
            to the grid, L2-normalised and weighted by ``weights[name]`` (the SD block keeps ``alpha``, DINO
            ``1 - alpha``). ``docs/beyond.md``: SD + DINOv2 + DINOv3 is a config.
        weights: The weight of each of ``featurizers`` (0 runs it but leaves its block out).
        eval_size: Renamed ``annotation_size`` (works for a while, with a one-line notice).

    Attributes:
        cache: The per-image feature cache (None: every batch extracts its images anew).
        head: The learned projection head, or None (zero-shot co-PCA and fusion).
        extraction_passes: Images run through each featurizer so far (``{"sd": n, "dino": n}``); with a
            cache, only the images that were not found in it.
    """

    def __init__(
        self,
        sd: SDFeaturizer | None = None,
        dino: DinoFeaturizer | None = None,
        alpha: ClosedUnitInterval = 0.5,
        pca_dims: Sequence[PositiveInt] | None = (256, 256, 256),
        pca_solver: Literal["torch1.13", "torch2.4"] = "torch1.13",
        annotation_size: AnnotationSize | None = None,
        fusion: str = "concat_l2",
        feature_cache_gb: NonNegativeFloat = 4.0,
        feature_cache_dir: str | None = None,
        projection_ckpt: str | None = None,
        soft_argmax_window: int | None = None,
        soft_argmax_temperature: float = 0.04,
        mutual_check: bool = False,
        pose_alignment: bool = False,
        flip_pairs: dict[str, list[list[int]]] | str | None = None,
        matcher: KeypointMatcher | None = None,
        featurizers: dict[str, nn.Module] | None = None,
        weights: dict[str, float] | None = None,
        eval_size: AnnotationSize | None = None,
    ) -> None:
        super().__init__()
        if eval_size is not None:
            if annotation_size is not None:
                raise ValueError("eval_size is the old name of annotation_size: give annotation_size only")
            warnings.warn("eval_size is now annotation_size (the paper's annotation resolution); eval_size works "
                          "for a while", FutureWarning, stacklevel=2)
            annotation_size = eval_size
        self.extra_featurizers = nn.ModuleDict(dict(featurizers or {}))  # registered: they move with the module
        extra_weights = _extra_weights(self.extra_featurizers, weights)
        # the refinement flags configure the matcher: the one object that travels to the transfer
        refinement = MatchRefinement(soft_argmax_window, float(soft_argmax_temperature), bool(mutual_check))
        self.matcher = (matcher if matcher is not None else NearestNeighbours()).refined(refinement)
        self.cache = feature_cache(feature_cache_gb, feature_cache_dir)
        self.align_poses, self.flip_pairs = bool(pose_alignment), flip_pairs
        # the table is known now when given, else from the benchmark (use_protocol)
        self.pose_aligner = PoseAlignment(flip_pairs) if pose_alignment and flip_pairs is not None else None
        self.spec = DescriptorSpec(
            alpha=float(alpha), pca_dims=None if pca_dims is None else tuple(int(d) for d in pca_dims), fusion=fusion,
            pca_solver=pca_solver, extra_weights=extra_weights,
        )
        self.configured = (sd, dino)  # a plain tuple: not registered, so unused featurizers stay where they are
        self.head = None if projection_ckpt is None else GatedProjectionHead.from_checkpoint(projection_ckpt)
        if self.head is not None and extra_weights:
            raise ValueError("a projection head takes its sources (sd, dino); further featurizers are not used there")
        self._select_featurizers(None if self.head is None else list(self.head.sources))
        # keypoints map at the DINO input size whenever DINO is configured, even with alpha 1 (the
        # reference maps them at the DINOv2 size in its SD-only runs too)
        #: ``annotation_size`` as configured (None: the default below); an ablation's rows take their own defaults
        self.annotation_size_setting = check_annotation_size(annotation_size)
        self.annotation_size = self.annotation_size_setting or default_annotation_size(self.sd, dino)
        self.extraction_passes = {"sd": 0, "dino": 0, **{name: 0 for name in self.extra_featurizers}}
        self.register_buffer("_device_marker", torch.empty(0), persistent=False)

    def _select_featurizers(self, sources: Sequence[str] | None) -> None:
        """Keep the featurizers that matter: by ``alpha`` (zero-shot) or by a head's ``sources``."""
        if sources is None:
            uses = {"sd": self.spec.uses_sd, "dino": self.spec.uses_dino}
            why = f"alpha={self.spec.alpha} gives {{0}} features a weight, but no {{0}} featurizer is configured"
        else:
            names = check_sources(sources, "the projection head's sources")
            uses = {name: name in names for name in SOURCES}
            why = f"the projection head's sources {list(names)} need a {{0}} featurizer, but none is configured"
        for name, featurizer in zip(SOURCES, self.configured):
            if featurizer is None and uses[name]:
                raise ValueError(why.format(name))
        self.sd = self.configured[0] if uses["sd"] else None
        self.dino = self.configured[1] if uses["dino"] else None
        if self.sd is not None and sources is None:
            self.spec.layer_positions(self.sd.layers)  # validates pca_dims against the layers now

    def select_sources(self, sources: Sequence[str]) -> None:
        """Run exactly the featurizers a projection head with these ``sources`` needs (before it is built).

        Raises:
            ValueError: A source whose featurizer is not configured.
        """
        self._select_featurizers(sources)

    def use_protocol(self, protocol: Any) -> None:
        """Take what the benchmark decides: the flip table of pose alignment when ``flip_pairs`` is None.

        Raises:
            ValueError: Pose alignment on a dense benchmark, or on one without a left/right keypoint table.
        """
        if self.align_poses:
            self.pose_aligner = benchmark_pose_alignment(self.flip_pairs, protocol)

    @property
    def refinement(self) -> MatchRefinement | None:
        """The test-time refinements the matcher applies (None: the paper's plain transfer)."""
        return self.matcher.refinement

    @property
    def alpha(self) -> float:
        """Weight of the SD block."""
        return self.spec.alpha

    @property
    def device(self) -> torch.device:
        """Device the module lives on (featurizers without weights included)."""
        return self._device_marker.device

    def extract(
        self, images: Sequence[torch.Tensor], categories: Sequence[str], files: Sequence[str] | None = None
    ) -> list[ImageFeatures]:
        """Raw features of a batch of images (each distinct input run at most once per featurizer, cache misses;
        ``files``: each image's identity apart from its prompt, see :func:`.features.run_featurizer`)."""
        features, passes = extract_features(
            self.sd, self.dino, images, categories, self.device, self.cache, files=files, extra=self.extra_featurizers
        )
        for name, count in passes.items():
            self.extraction_passes[name] += count
        return features

    @property
    def grid(self) -> int | None:
        """Side of the descriptor grid: the DINO grid, or None (the finest SD resolution) without DINO."""
        return self.dino.grid_size if self.dino is not None else None

    def describe_pair(self, source: ImageFeatures, target: ImageFeatures) -> torch.Tensor:
        """Fused descriptors of a pair: ``[2, D, G, G]`` (source first)."""
        if self.head is not None:
            return self.describe_images([source, target])
        return describe_pair(source, target, self.spec, self.sd.layers if self.sd is not None else (), self.grid)

    def describe_images(self, images: Sequence[ImageFeatures]) -> torch.Tensor:
        """Descriptors ``[B, D, G, G]`` of a batch of images through the learned head (fp32, differentiable).

        Raises:
            ValueError: No head is configured (zero-shot descriptors exist per pair only: co-PCA is joint).
        """
        if self.head is None:
            raise ValueError("describe_images needs a projection head; zero-shot descriptors come per pair")
        device_type = self.device.type
        with torch.autocast(device_type=device_type, enabled=False):
            return self.head(source_maps(images, list(self.head.sources), self.grid))

    @torch.no_grad()
    def match(
        self,
        source: ImageLike,
        target: ImageLike,
        points: torch.Tensor | Sequence[Sequence[float]],
        category: str = "object",
        keypoint_ids: Sequence[int] | None = None,
        downscale: bool = True,
    ) -> PairMatch:
        """Carry ``points`` from the ``source`` image to the ``target`` image: the whole method (features,
        descriptors, the matcher, and the refinements and pose alignment configured), on the pipeline's device.

        Args:
            source: The source image: a file path, a PIL image, an ``[H, W, 3]`` uint8 array or a uint8
                ``[3, H, W]`` tensor.
            target: The target image.
            points: Source points ``[N, 2]`` ``(x, y)`` in original source pixels (of the image as a photo viewer
                shows it: files and PIL images are turned by their EXIF orientation).
            category: What the images show (the SD prompt's ``{category}``).
            keypoint_ids: The points' semantic ids (pose alignment swaps left and right by them).
            downscale: Read an image FILE whose long side exceeds :meth:`load_side` at that size, on load
                (:func:`.image_prep.load_user_image`: a large JPEG is never decoded whole); the points given and
                returned stay in the original pixels. False reads it whole.

        Returns:
            The typed :class:`PairMatch` (original target pixels).

        Raises:
            ValueError: Points that are not ``[N, 2]`` numbers or lie outside the source, checked by the code
                and with the messages of the own-images command (:func:`.inputs.check_points`).
        """
        max_side = self.load_side() if downscale else None
        (src_image, src_size), (trg_image, trg_size) = (_user_image(source, max_side), _user_image(target, max_side))
        src_scale, trg_scale = load_scale(src_image, src_size), load_scale(trg_image, trg_size)
        src_kps = torch.tensor(check_points(points, src_size, "points"), dtype=torch.float64)
        sample: PairSample = {
            "pair_id": "match", "category": str(category),
            "src_image": src_image, "trg_image": trg_image,
            # the batch's keys of the two images (not files): features are looked up by them
            "src_image_path": "<source>", "trg_image_path": "<target>",
            "src_kps": (src_kps * src_scale).float().reshape(-1, 2),
        }
        if keypoint_ids is not None:
            sample["kps_ids"] = [int(i) for i in keypoint_ids]
        out = self.predict_pairs([sample])[0]
        pred = out["pred_kps"]
        if not torch.equal(trg_scale, torch.ones(2, dtype=torch.float64)):  # back to original target pixels
            pred = (pred.double() / trg_scale.to(pred.device)).to(pred.dtype)
        return PairMatch(
            points=pred, distance=out["distance"], confidence=out.get("confidence"),
            mutual=out.get("mutual"), flipped=bool(out["flipped"]) if "flipped" in out else None,
        )

    def load_side(self) -> int:
        """The longest side :meth:`match` reads a large image file at: twice the largest featurizer input."""
        return 2 * max(int(f.image_size) for f in (self.sd, self.dino) if f is not None)

    def flow(self, source: ImageFeatures, target: ImageFeatures) -> torch.Tensor:
        """Dense flow ``[2, H, W]`` from every target pixel to the source (both images share ``H x W``)."""
        return flow_from_descriptors(self.describe_pair(source, target), source, target)

    def batch_features(
        self, samples: Sequence[PairSample], mirrored_sources: bool = False
    ) -> dict[str, ImageFeatures]:
        """Raw features of every distinct image of a batch of pairs, by :func:`.features.sample_image_key` (file
        and prompt: the SD features of a file seen under two categories come once per prompt, its prompt-free
        features once); each extracted once, via the cache. With ``mirrored_sources`` also the sources' mirrors,
        under :func:`.features.mirrored_key` of their keys."""
        unique = unique_images(samples, mirrored_sources)
        images = list(unique.values())
        features = self.extract([i.image for i in images], [i.category for i in images], [i.file for i in images])
        return dict(zip(unique, features))

    @torch.no_grad()
    def predict_flows(self, samples: Sequence[PairSample]) -> list[torch.Tensor]:
        """Dense flows ``[2, H, W]`` (target pixel -> source pixel) for a batch of same-size image pairs."""
        features = self.batch_features(samples)
        return [self.flow(*pair_features(features, s)) for s in samples]

    @torch.no_grad()
    def predict_pixels(
        self, samples: Sequence[PairSample], resolution: int | None = 256, chunk: int = 4096,
        use_masks: bool = False,
    ) -> list[PixelCorrespondence]:
        """Per-pixel correspondences (every target pixel to its nearest source pixel) of a batch of pairs.

        Args:
            samples: Pair dicts (``src_image``, ``trg_image``, their paths, ``category``; with ``use_masks``
                also ``src_mask`` / ``trg_mask`` where a pair has them).
            resolution: Working resolution (long side in pixels); None matches at the original image size.
            chunk: Target pixels matched at a time.
            use_masks: Restrict matching to the pairs' masks.
        """
        features = self.batch_features(samples)
        out = []
        for sample in samples:
            source, target = pair_features(features, sample)
            descriptors = self.describe_pair(source, target)
            masks = {"source_mask": sample.get("src_mask"), "target_mask": sample.get("trg_mask")} if use_masks else {}
            out.append(pixel_correspondence(
                descriptors[0], descriptors[1],
                annotation_geometry(source, self.annotation_size), annotation_geometry(target, self.annotation_size),
                resolution=resolution, chunk=chunk, **{k: v for k, v in masks.items() if v is not None},
            ))
        return out

    @torch.no_grad()
    def predict_pairs(self, samples: Sequence[PairSample]) -> list[dict[str, Any]]:
        """Predict target keypoints for a batch of pair samples.

        Each image is extracted once per batch even when several pairs share it.

        Args:
            samples: Pair dicts with ``src_image``, ``trg_image`` (uint8 ``[3, H, W]``),
                ``src_image_path``, ``trg_image_path``, ``category`` and ``src_kps`` (``[N, 2]``).

        Returns:
            Per pair: ``pred_kps`` ``[N, 2]`` (original target pixels) and ``distance`` ``[N]``; with a
            refinement also ``confidence`` ``[N]`` (and ``mutual`` ``[N]`` bool when it checks them); with pose
            alignment also ``flipped`` and ``pose_distances`` (:func:`.pose_alignment.pose_aligned_match`).
        """
        if self.align_poses and self.pose_aligner is None:  # never a silent plain run
            raise ValueError(
                "pose_alignment needs its left/right table: give flip_pairs (a table name such as 'spair', or "
                "category -> [[left id, right id], ...]) or call use_protocol(protocol) with the benchmark's"
            )
        features = self.batch_features(samples, mirrored_sources=self.pose_aligner is not None)
        descriptors = describe_batch(features, samples, self.settings)
        return [self.predict_pair(features, s, d) for s, d in zip(samples, descriptors)]

    @property
    def settings(self) -> PredictionSettings:
        """How this pipeline makes one prediction (:class:`.prediction.PredictionSettings`): its descriptors
        (:meth:`describe_pairs`), ``annotation_size``, refinement, matcher and pose alignment."""
        return PredictionSettings(self.describe_pairs, self.annotation_size, self.matcher, self.pose_aligner)

    def describe_pairs(self, pairs: Sequence[tuple[ImageFeatures, ImageFeatures]]) -> list[torch.Tensor]:
        """:meth:`describe_pair` of many pairs: zero-shot, co-PCA runs batched over the pairs
        (:func:`.descriptors.describe_pairs`, the same descriptors as one pair at a time)."""
        if self.head is not None:
            return [self.describe_pair(source, target) for source, target in pairs]
        return describe_pairs(pairs, self.spec, self.sd.layers if self.sd is not None else (), self.grid)

    def predict_pair(
        self, features: Mapping[str, ImageFeatures], sample: PairSample, descriptors: torch.Tensor | None = None
    ) -> dict[str, Any]:
        """One pair's prediction (:meth:`predict_pairs`) from the batch's features by image key:
        :func:`.prediction.predict_pair` with this pipeline's :attr:`settings`; no extraction."""
        return predict_pair(features, sample, self.settings, descriptors)


def _extra_weights(featurizers: Mapping[str, Any], weights: Mapping[str, float] | None) -> tuple[tuple[str, float], ...]:
    """``(name, weight)`` of each further featurizer, checked: every one named in ``weights`` and nothing else.

    Raises:
        ValueError: A featurizer without a weight, a weight without a featurizer, a reserved name, or an
            object that is not a :class:`.features.Featurizer`.
    """
    weights = dict(weights or {})
    for name, featurizer in featurizers.items():
        if name in ("sd", "dino"):
            raise ValueError(f"featurizers.{name}: the name is the {name} slot's; give that one as {name}=")
        if not isinstance(featurizer, Featurizer):
            raise ValueError(f"featurizers.{name}: {type(featurizer).__name__} is not a Featurizer (feature_maps, "
                             "image_size, uses_prompt, cache_key, variant)")
    if set(weights) != set(featurizers):
        raise ValueError(f"weights must give each of featurizers {sorted(featurizers)} its weight, got {sorted(weights)}")
    return tuple((name, float(weights[name])) for name in featurizers)


def benchmark_pose_alignment(flip_pairs: Any, protocol: Any) -> PoseAlignment:
    """The pose alignment of a run: ``flip_pairs`` when given, else the benchmark protocol's table.

    Raises:
        ValueError: A dense benchmark, or one without a left/right keypoint table and no ``flip_pairs``.
    """
    if protocol.metric != "keypoint_pck":
        raise ValueError(f"pose_alignment applies to keypoint benchmarks; {protocol.name} is scored on {protocol.metric}")
    table = flip_pairs if flip_pairs is not None else protocol.flip_pairs
    if table is None:
        raise ValueError(
            f"pose_alignment needs left/right keypoint pairs, and {protocol.name} has no semantic keypoint ids; "
            "a dataset whose samples carry keypoint ids ('kps_ids') can give flip_pairs (category -> [[left id, "
            "right id], ...])"
        )
    return PoseAlignment(table)

