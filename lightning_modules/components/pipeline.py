"""The zero-shot method end to end, in plain torch: extract, co-PCA, fuse, match, map back.

Usable without Lightning::

    pipeline = FusedCorrespondence(SDFeaturizer(), DinoFeaturizer())
    predictions = pipeline.predict_pairs(samples)  # samples as returned by datamodules.SPairDataset
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Union

import torch
from jsonargparse.typing import ClosedUnitInterval, NonNegativeFloat, PositiveInt
from torch import nn

from .dense import PixelCorrespondence, pixel_correspondence
from .dino_featurizer import DinoFeaturizer
from .feature_cache import FeatureCache, image_digest
from .fusion import FUSIONS, co_pca, fuse, merge_layers
from .image_prep import PadResize, pad_resize_image
from .matching import dense_flow, points_to_cells, transfer_keypoints
from .pose_alignment import PoseAlignment, box_cells, instance_nn_distance, mirror_box, mirror_points, partner_positions
from .projection_head import GatedProjectionHead
from .refinements import MatchRefinement, refined_transfer
from .sd_featurizer import SDFeaturizer

__all__ = [
    "DescriptorSpec",
    "FusedCorrespondence",
    "ImageFeatures",
    "cell_distances",
    "EvalSize",
    "annotation_geometry",
    "check_eval_size",
    "keypoint_cells",
    "describe_pair",
    "extract_features",
    "flow_from_descriptors",
    "match_keypoints",
    "match_keypoints_refined",
    "mirrored_key",
    "pose_aligned_match",
    "project_layer",
    "run_featurizer",
    "SOURCES",
    "source_maps",
    "transfer",
    "unique_images",
]


#: The square in which keypoints are mapped to feature cells (the "annotation resolution" of Table 8): a
#: side in pixels, or ``"original"`` for each image's own padded square (its long side, no resize).
EvalSize = Union[int, Literal["original"]]


@dataclass
class ImageFeatures:
    """Raw (pre-PCA) features of one image.

    Attributes:
        sd: One ``[C_i, h_i, w_i]`` map per SD layer, or None when SD is not used.
        dino: ``[C, G, G]`` DINO map, or None when DINO is not used.
        width: Original image width.
        height: Original image height.
    """

    sd: list[torch.Tensor] | None
    dino: torch.Tensor | None
    width: int
    height: int


@dataclass(frozen=True)
class DescriptorSpec:
    """Everything that turns raw features into descriptors (no extraction involved).

    Attributes:
        alpha: Weight of the SD block (1 = SD only, 0 = DINO only).
        pca_dims: Co-PCA dimension per used SD layer; None keeps the raw channels.
        fusion: One of ``fusion.FUSIONS`` (``concat_l2`` is the paper's).
        sd_layers: The extracted SD layer ids to use (None: all that were extracted).
        projection: A learned per-layer projection used instead of co-PCA (supplementary Table 3: the
            ODISE projection layer): a ``torch.save``d dict ``{"<layer>.weight": [d, C], "<layer>.bias": [d]}``
            applied to every token of that layer (a 1x1 convolution).
    """

    alpha: float = 0.5
    pca_dims: tuple[int, ...] | None = (256, 256, 256)
    fusion: str = "concat_l2"
    sd_layers: tuple[int, ...] | None = None
    projection: str | None = None

    def __post_init__(self) -> None:
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {self.alpha}")
        if self.fusion not in FUSIONS:
            raise ValueError(f"unknown fusion {self.fusion!r}; choose one of {list(FUSIONS)}")

    @property
    def uses_sd(self) -> bool:
        """Whether SD features get a weight."""
        return self.alpha > 0

    @property
    def uses_dino(self) -> bool:
        """Whether DINO features get a weight."""
        return self.alpha < 1

    def layer_positions(self, extracted: Sequence[int]) -> list[int]:
        """Positions, in the extracted layer list, of the layers this spec uses."""
        if self.sd_layers is None:
            positions = list(range(len(extracted)))
        else:
            missing = sorted(set(self.sd_layers) - set(extracted))
            if missing:
                raise ValueError(f"SD layers {missing} were not extracted (extracted: {list(extracted)})")
            positions = [list(extracted).index(layer) for layer in self.sd_layers]
        if self.projection is None and self.pca_dims is not None and len(self.pca_dims) != len(positions):
            used = [extracted[i] for i in positions]
            raise ValueError(f"pca_dims {list(self.pca_dims)} must have one entry per used SD layer {used}")
        return positions


@functools.lru_cache(maxsize=8)
def _projection_weights(path: str) -> dict[str, torch.Tensor]:
    try:
        weights = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError) as err:
        raise ValueError(f"could not read the projection state dict {path}: {err}") from err
    if not isinstance(weights, dict):
        raise ValueError(f"projection file {path} must hold a dict of tensors, got {type(weights).__name__}")
    return weights


def project_layer(pair: torch.Tensor, path: str, layer: int) -> torch.Tensor:
    """Apply the learned projection of ``layer`` from ``path`` to ``[2, C, H, W]`` features."""
    weights = _projection_weights(path)
    weight, bias = weights.get(f"{layer}.weight"), weights.get(f"{layer}.bias")
    if weight is None or weight.ndim != 2 or weight.shape[1] != pair.shape[1]:
        found = None if weight is None else tuple(weight.shape)
        raise ValueError(
            f"projection {path}: '{layer}.weight' must be [d, {pair.shape[1]}] for SD layer {layer}, found {found}"
        )
    out = torch.einsum("dc,nchw->ndhw", weight.to(pair), pair)
    return out if bias is None else out + bias.to(pair).view(1, -1, 1, 1)


def mirrored_key(path: str) -> str:
    """The key of an image's horizontal mirror among a batch's features (:func:`unique_images`)."""
    return f"{path}#mirrored"


def unique_images(
    samples: Sequence[Mapping[str, Any]], mirrored_sources: bool = False
) -> dict[str, tuple[torch.Tensor, str]]:
    """Every distinct image of a batch of pairs, by path: ``{path: (uint8 image, category)}``.

    Args:
        samples: Pair dicts.
        mirrored_sources: Also each source image's horizontal mirror, under :func:`mirrored_key` (pose
            alignment).
    """
    unique: dict[str, tuple[torch.Tensor, str]] = {}
    for s in samples:
        unique.setdefault(s["src_image_path"], (s["src_image"], s["category"]))
        unique.setdefault(s["trg_image_path"], (s["trg_image"], s["category"]))
    if mirrored_sources:
        for s in samples:
            unique.setdefault(mirrored_key(s["src_image_path"]), (s["src_image"].flip(-1), s["category"]))
    return unique


def _precision(device: torch.device) -> str:
    """The autocast state features are computed under (part of a cache key: it changes the numbers)."""
    if torch.is_autocast_enabled(device.type):
        return f"autocast-{torch.get_autocast_dtype(device.type)}"
    return "exact"


@torch.no_grad()
def run_featurizer(
    featurizer: SDFeaturizer | DinoFeaturizer,
    images: Sequence[torch.Tensor],
    categories: Sequence[str],
    device: torch.device,
    cache: FeatureCache | None = None,
    image_keys: Sequence[str] | None = None,
) -> tuple[list[tuple[torch.Tensor, ...]], int]:
    """One featurizer's raw features of each image (SD: one map per layer; DINO: one map), via ``cache``.

    Args:
        featurizer: The SD or DINO featurizer.
        images: uint8 ``[3, H, W]`` tensors of any sizes.
        categories: Category of each image (the SD prompt).
        device: Where the featurizer lives.
        cache: Reuse features computed before (in memory or on disk); None computes every image.
        image_keys: Content hashes of the images (:func:`.feature_cache.image_digest`), if known.

    Returns:
        ``(features per image, number of images actually run through the featurizer)``.
    """

    def compute(indices: list[int]) -> list[tuple[torch.Tensor, ...]]:
        batch = torch.stack([pad_resize_image(images[i], featurizer.image_size)[0] for i in indices]).to(device)
        if isinstance(featurizer, SDFeaturizer):
            layers = featurizer(batch, [categories[i] for i in indices])
            return [tuple(layer[j] for layer in layers) for j in range(len(indices))]
        maps = featurizer(batch)
        return [(maps[j],) for j in range(len(indices))]

    if not images:
        return [], 0
    if cache is None:
        return compute(list(range(len(images)))), len(images)
    image_keys = image_keys or [image_digest(img) for img in images]
    precision = _precision(device)
    per_category = {cat: featurizer.cache_key(cat) for cat in set(categories)}
    keys = [f"{key}|{per_category[cat]}|{precision}" for key, cat in zip(image_keys, categories)]
    return cache.fetch(keys, compute, device)


def extract_features(
    sd: SDFeaturizer | None,
    dino: DinoFeaturizer | None,
    images: Sequence[torch.Tensor],
    categories: Sequence[str],
    device: torch.device,
    cache: FeatureCache | None = None,
    image_keys: Sequence[str] | None = None,
) -> tuple[list[ImageFeatures], dict[str, int]]:
    """Run the given featurizers on a batch of images (at most one pass per image per featurizer).

    Args:
        sd: SD featurizer or None.
        dino: DINO featurizer or None.
        images: uint8 ``[3, H, W]`` tensors of any sizes.
        categories: Category of each image (for the SD prompt).
        device: Where the featurizers live.
        cache: Per-image feature cache; None extracts every image.
        image_keys: Content hashes of the images, if already known.

    Returns:
        ``(features per image, {"sd": passes, "dino": passes})`` where passes count the images that
        were really run (cache misses).
    """
    if cache is not None and image_keys is None:
        image_keys = [image_digest(img) for img in images]
    sd_maps, sd_passes = run_featurizer(sd, images, categories, device, cache, image_keys) if sd else (None, 0)
    dino_maps, dino_passes = (
        run_featurizer(dino, images, categories, device, cache, image_keys) if dino else (None, 0)
    )
    features = [
        ImageFeatures(
            sd=None if sd_maps is None else list(sd_maps[i]),
            dino=None if dino_maps is None else dino_maps[i][0],
            width=int(img.shape[-1]),
            height=int(img.shape[-2]),
        )
        for i, img in enumerate(images)
    ]
    return features, {"sd": sd_passes, "dino": dino_passes}


def describe_pair(
    source: ImageFeatures,
    target: ImageFeatures,
    spec: DescriptorSpec,
    sd_layer_ids: Sequence[int] = (),
    grid: int | None = None,
) -> torch.Tensor:
    """Fused descriptors of a pair, ``[2, D, G, G]`` (source first), in fp32 even under autocast.

    Args:
        source: Raw features of the source image.
        target: Raw features of the target image.
        spec: Layers, co-PCA, fusion and alpha.
        sd_layer_ids: The layer ids of ``source.sd`` (the SD featurizer's ``layers``).
        grid: Output grid side (the DINO grid); None keeps the finest SD resolution.
    """
    device_type = (source.dino if source.dino is not None else source.sd[0]).device.type  # type: ignore[index]
    with torch.autocast(device_type=device_type, enabled=False):
        sd_block = None
        if spec.uses_sd:
            if source.sd is None or target.sd is None:
                raise ValueError(f"alpha={spec.alpha} needs SD features, but none were extracted")
            positions = spec.layer_positions(sd_layer_ids or range(len(source.sd)))
            pairs = [torch.stack([source.sd[i], target.sd[i]]).float() for i in positions]
            if spec.projection is not None:
                ids = [list(sd_layer_ids or range(len(source.sd)))[i] for i in positions]
                pairs = [project_layer(pair, spec.projection, layer) for pair, layer in zip(pairs, ids)]
            elif spec.pca_dims is not None:
                pairs = [co_pca(pair, dim) for pair, dim in zip(pairs, spec.pca_dims)]
            sd_block = merge_layers(pairs, grid)
        dino_block = None
        if spec.uses_dino:
            if source.dino is None or target.dino is None:
                raise ValueError(f"alpha={spec.alpha} needs DINO features, but none were extracted")
            dino_block = torch.stack([source.dino, target.dino]).float()
        return fuse(sd_block, dino_block, spec.alpha, spec.fusion)


#: Feature sources a learned head (:class:`.projection_head.GatedProjectionHead`) can take, by name.
SOURCES = ("sd", "dino")


def check_sources(sources: Sequence[str], field: str = "sources") -> tuple[str, ...]:
    """Validate source names: a non-empty subset of :data:`SOURCES`, without repeats."""
    names = tuple(str(name) for name in sources)
    unknown = [name for name in names if name not in SOURCES]
    if not names or unknown or len(set(names)) != len(names):
        raise ValueError(f"{field} must be distinct names out of {list(SOURCES)}, got {list(names)}")
    return names


def source_maps(
    images: Sequence[ImageFeatures], sources: Sequence[str], grid: int | None = None
) -> dict[str, torch.Tensor]:
    """The raw inputs of a learned head for a batch of images: ``{source: [B, C, G, G]}`` in fp32.

    ``"sd"`` is every extracted SD layer, merged coarse to fine and resized to ``grid`` as the zero-shot
    method does (:func:`.fusion.merge_layers`) but without co-PCA (the head learns the projection);
    ``"dino"`` is the DINO map.

    Args:
        images: Raw features of each image.
        sources: Names out of :data:`SOURCES`.
        grid: Output grid side (the DINO grid); None keeps the finest SD resolution.
    """
    maps = {}
    for name in check_sources(sources):
        missing = [i for i, image in enumerate(images) if getattr(image, name) is None]
        if missing:
            raise ValueError(f"source {name!r} was not extracted (no {name} featurizer configured)")
        if name == "sd":
            layers = [torch.stack([image.sd[i] for image in images]).float() for i in range(len(images[0].sd))]
            maps[name] = merge_layers(layers, grid)
        else:
            maps[name] = torch.stack([image.dino for image in images]).float()
    return maps


def check_eval_size(eval_size: EvalSize | None, field: str = "eval_size") -> EvalSize | None:
    """Validate an ``eval_size`` setting: a positive int, ``"original"`` or None (the default)."""
    if eval_size is None or eval_size == "original":
        return eval_size
    if isinstance(eval_size, str) or int(eval_size) <= 0:
        raise ValueError(f"{field} must be a positive number of pixels or 'original', got {eval_size!r}")
    return int(eval_size)


def annotation_geometry(features: ImageFeatures, eval_size: EvalSize) -> PadResize:
    """The map from an image's original pixels to the square where its keypoints meet the feature grid.

    An int is the padded model-input convention of the reference (resize the long side to ``eval_size``,
    pad to a centred square). ``"original"`` keeps the annotation in original pixels: the image's own
    long side is the square, only the centring offset is applied.
    """
    size = max(features.width, features.height) if eval_size == "original" else int(eval_size)
    return PadResize(features.width, features.height, size)


def match_keypoints(
    descriptors: torch.Tensor, source: ImageFeatures, target: ImageFeatures, src_kps: torch.Tensor, eval_size: EvalSize
) -> tuple[torch.Tensor, torch.Tensor]:
    """Transfer source keypoints (original pixels) with a pair's descriptors.

    Returns:
        ``(predicted [N, 2] in original target pixels, feature distance of each match [N])``.
    """
    src_geo, trg_geo = annotation_geometry(source, eval_size), annotation_geometry(target, eval_size)
    points = src_geo.forward_points(src_kps.to(descriptors.device).float())
    with torch.autocast(device_type=descriptors.device.type, enabled=False):
        predicted, distance = transfer_keypoints(descriptors[0], descriptors[1], points, src_geo.size, trg_geo.size)
    return trg_geo.inverse_points(predicted), distance


def match_keypoints_refined(
    descriptors: torch.Tensor,
    source: ImageFeatures,
    target: ImageFeatures,
    src_kps: torch.Tensor,
    eval_size: EvalSize,
    refinement: MatchRefinement,
) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """:func:`match_keypoints` with test-time refinements (:mod:`.refinements`).

    Returns:
        ``(predicted [N, 2] original target pixels, distance [N], extras)``; ``extras`` holds ``confidence``
        and, with ``refinement.mutual_check``, ``mutual``.
    """
    src_geo, trg_geo = annotation_geometry(source, eval_size), annotation_geometry(target, eval_size)
    points = src_geo.forward_points(src_kps.to(descriptors.device).float())
    with torch.autocast(device_type=descriptors.device.type, enabled=False):
        predicted, distance, extras = refined_transfer(
            descriptors[0], descriptors[1], points, src_geo.size, trg_geo.size, refinement
        )
    return trg_geo.inverse_points(predicted), distance, extras


def transfer(
    descriptors: torch.Tensor,
    source: ImageFeatures,
    target: ImageFeatures,
    src_kps: torch.Tensor,
    eval_size: EvalSize,
    refinement: MatchRefinement | None = None,
) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """:func:`match_keypoints`, or :func:`match_keypoints_refined` when ``refinement`` is active.

    Returns:
        ``(predicted [N, 2] original target pixels, distance [N], extras)``; ``extras`` is empty without a
        refinement.
    """
    if refinement is None or not refinement.active:
        pred, distance = match_keypoints(descriptors, source, target, src_kps, eval_size)
        return pred, distance, {}
    return match_keypoints_refined(descriptors, source, target, src_kps, eval_size, refinement)


def _instance_distance(
    descriptors: torch.Tensor,
    source: ImageFeatures,
    target: ImageFeatures,
    src_box: torch.Tensor | None,
    trg_box: torch.Tensor | None,
    eval_size: EvalSize,
) -> torch.Tensor:
    """:func:`.pose_alignment.instance_nn_distance` over the cells of the two boxes (None: whole image)."""
    grid = descriptors.shape[-1]
    src_cells = box_cells(annotation_geometry(source, eval_size), src_box, grid)
    trg_cells = box_cells(annotation_geometry(target, eval_size), trg_box, grid)
    return instance_nn_distance(descriptors, src_cells, trg_cells)


def pose_aligned_match(
    describe: Callable[[ImageFeatures, ImageFeatures], torch.Tensor],
    source: ImageFeatures,
    mirrored_source: ImageFeatures,
    target: ImageFeatures,
    sample: Mapping[str, Any],
    eval_size: EvalSize,
    alignment: PoseAlignment,
    refinement: MatchRefinement | None = None,
) -> dict[str, torch.Tensor]:
    """Match a pair from the source and from its mirror; keep the orientation whose instances agree better.

    See :mod:`.pose_alignment`. The instances are the pair's boxes in its images' pixels when the sample has
    them (``src_instance_box`` / ``trg_instance_box``, else ``src_bbox`` / ``trg_bbox``), else the whole
    images. A keypoint whose partner is not in ``kps_ids`` or not in ``kps_valid`` keeps the original
    orientation's prediction.

    Args:
        describe: Pair descriptors ``[2, D, G, G]`` of (source features, target features).
        source: Features of the source image.
        mirrored_source: Features of its horizontal mirror.
        target: Features of the target image.
        sample: The pair: ``src_kps``, ``kps_ids`` and ``category`` (the flip pairs), ``kps_valid`` and boxes
            if any.
        eval_size: Keypoint-to-cell square.
        alignment: The flip pairs per category.
        refinement: Refinements of both transfers.

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
    src_box, trg_box = (sample.get(f"{side}_instance_box", sample.get(f"{side}_bbox")) for side in ("src", "trg"))
    descriptors = describe(source, target)
    pred, distance, extras = transfer(descriptors, source, target, src_kps, eval_size, refinement)
    mirrored = describe(mirrored_source, target)
    # mirrored keypoint k sits where the original's partner of k is, mirrored
    mirrored_kps = mirror_points(src_kps[partner.clamp(min=0)], source.width)
    m_pred, m_distance, m_extras = transfer(mirrored, mirrored_source, target, mirrored_kps, eval_size, refinement)
    mirrored_box = None if src_box is None else mirror_box(src_box, source.width)
    distances = torch.stack([
        _instance_distance(descriptors, source, target, src_box, trg_box, eval_size),
        _instance_distance(mirrored, mirrored_source, target, mirrored_box, trg_box, eval_size),
    ])
    flipped = bool(distances[1] < distances[0])
    if flipped:
        use = (partner >= 0).to(pred.device)
        pred = torch.where(use[:, None], m_pred, pred)
        distance = torch.where(use, m_distance, distance)
        extras = {key: torch.where(use, m_extras[key], value) for key, value in extras.items()}
    return {
        "pred_kps": pred, "distance": distance, **extras,
        "flipped": torch.tensor(flipped), "pose_distances": distances.cpu(),
    }


def keypoint_cells(features: ImageFeatures, kps: torch.Tensor, eval_size: EvalSize, grid: int) -> torch.Tensor:
    """Flat feature-grid cell of each keypoint (original pixels) of an image."""
    geometry = annotation_geometry(features, eval_size)
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
        eval_size: Side of the padded square in which keypoints are mapped to feature cells; defaults to
            the DINO input size when a DINO featurizer is configured (840 in the reference, also for its
            SD-only runs), else the SD input size. ``"original"``: each image's own square (Table 8).
        fusion: How the blocks are combined (``fusion.FUSIONS``; ``concat_l2`` is the paper's).
        feature_cache_gb: Memory for raw per-image features shared by all pairs of the run (on the
            featurizers' device); each image is then extracted once. 0 disables the in-memory cache.
        feature_cache_dir: Folder of an on-disk feature cache (safetensors, keyed by image content and
            feature config) that later runs reuse; None disables it.
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
        eval_size: EvalSize | None = None,
        fusion: str = "concat_l2",
        feature_cache_gb: NonNegativeFloat = 4.0,
        feature_cache_dir: str | None = None,
        projection_ckpt: str | None = None,
        soft_argmax_window: int | None = None,
        soft_argmax_temperature: float = 0.04,
        mutual_check: bool = False,
        pose_alignment: bool = False,
        flip_pairs: dict[str, list[list[int]]] | str | None = None,
    ) -> None:
        super().__init__()
        self.cache = feature_cache(feature_cache_gb, feature_cache_dir)
        refinement = MatchRefinement(soft_argmax_window, float(soft_argmax_temperature), bool(mutual_check))
        self.refinement = refinement if refinement.active else None
        self.align_poses, self.flip_pairs = bool(pose_alignment), flip_pairs
        # the table is known now when given, else from the benchmark (use_protocol)
        self.pose_alignment = PoseAlignment(flip_pairs) if pose_alignment and flip_pairs is not None else None
        self.spec = DescriptorSpec(
            alpha=float(alpha), pca_dims=None if pca_dims is None else tuple(int(d) for d in pca_dims), fusion=fusion
        )
        self.configured = (sd, dino)  # a plain tuple: not registered, so unused featurizers stay where they are
        self.head = None if projection_ckpt is None else GatedProjectionHead.from_checkpoint(projection_ckpt)
        self._select_featurizers(None if self.head is None else list(self.head.sources))
        # keypoints map at the DINO input size whenever DINO is configured, even with alpha 1 (the
        # reference maps them at the DINOv2 size in its SD-only runs too)
        self.eval_size = check_eval_size(eval_size) or default_eval_size(self.sd, dino)
        self.extraction_passes = {"sd": 0, "dino": 0}
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
            self.pose_alignment = benchmark_pose_alignment(self.flip_pairs, protocol)

    @property
    def alpha(self) -> float:
        """Weight of the SD block."""
        return self.spec.alpha

    @property
    def device(self) -> torch.device:
        """Device the module lives on (featurizers without weights included)."""
        return self._device_marker.device

    def extract(self, images: Sequence[torch.Tensor], categories: Sequence[str]) -> list[ImageFeatures]:
        """Raw features of a batch of images (each image run at most once per featurizer, cache misses)."""
        features, passes = extract_features(self.sd, self.dino, images, categories, self.device, self.cache)
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

    def match(
        self, source: ImageFeatures, target: ImageFeatures, src_kps: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Transfer source keypoints (original pixels) to the target image.

        Returns:
            ``(predicted [N, 2] in original target pixels, feature distance of each match [N])``.
        """
        return match_keypoints(self.describe_pair(source, target), source, target, src_kps, self.eval_size)

    def flow(self, source: ImageFeatures, target: ImageFeatures) -> torch.Tensor:
        """Dense flow ``[2, H, W]`` from every target pixel to the source (both images share ``H x W``)."""
        return flow_from_descriptors(self.describe_pair(source, target), source, target)

    def features_by_path(
        self, samples: Sequence[Mapping[str, Any]], mirrored_sources: bool = False
    ) -> dict[str, ImageFeatures]:
        """Raw features of every distinct image of a batch of pairs, by path (each extracted once, via the cache);
        with ``mirrored_sources`` also the sources' mirrors, under :func:`mirrored_key`."""
        unique = unique_images(samples, mirrored_sources)
        return dict(zip(unique, self.extract([v[0] for v in unique.values()], [v[1] for v in unique.values()])))

    @torch.no_grad()
    def predict_flows(self, samples: Sequence[Mapping[str, Any]]) -> list[torch.Tensor]:
        """Dense flows ``[2, H, W]`` (target pixel -> source pixel) for a batch of same-size image pairs."""
        features = self.features_by_path(samples)
        return [self.flow(features[s["src_image_path"]], features[s["trg_image_path"]]) for s in samples]

    @torch.no_grad()
    def predict_pixels(
        self, samples: Sequence[Mapping[str, Any]], resolution: int | None = 256, chunk: int = 4096,
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
        features = self.features_by_path(samples)
        out = []
        for sample in samples:
            source, target = features[sample["src_image_path"]], features[sample["trg_image_path"]]
            descriptors = self.describe_pair(source, target)
            masks = {"source_mask": sample.get("src_mask"), "target_mask": sample.get("trg_mask")} if use_masks else {}
            out.append(pixel_correspondence(
                descriptors[0], descriptors[1],
                annotation_geometry(source, self.eval_size), annotation_geometry(target, self.eval_size),
                resolution=resolution, chunk=chunk, **{k: v for k, v in masks.items() if v is not None},
            ))
        return out

    @torch.no_grad()
    def predict_pairs(self, samples: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
        """Predict target keypoints for a batch of pair samples.

        Each image is extracted once per batch even when several pairs share it.

        Args:
            samples: Pair dicts with ``src_image``, ``trg_image`` (uint8 ``[3, H, W]``),
                ``src_image_path``, ``trg_image_path``, ``category`` and ``src_kps`` (``[N, 2]``).

        Returns:
            Per pair: ``pred_kps`` ``[N, 2]`` (original target pixels) and ``distance`` ``[N]``; with a
            refinement also ``confidence`` ``[N]`` (and ``mutual`` ``[N]`` bool when it checks them); with pose
            alignment also ``flipped`` and ``pose_distances`` (:func:`pose_aligned_match`).
        """
        features = self.features_by_path(samples, mirrored_sources=self.pose_alignment is not None)
        return [self.predict_pair(features, s) for s in samples]

    def predict_pair(self, features: Mapping[str, ImageFeatures], sample: Mapping[str, Any]) -> dict[str, Any]:
        """One pair's prediction (:meth:`predict_pairs`) from the batch's features by path: descriptors, the
        transfer and, when configured, the refinements and the pose alignment; no extraction."""
        source, target = features[sample["src_image_path"]], features[sample["trg_image_path"]]
        if self.pose_alignment is not None:
            mirrored = features[mirrored_key(sample["src_image_path"])]
            return pose_aligned_match(
                self.describe_pair, source, mirrored, target, sample, self.eval_size, self.pose_alignment,
                self.refinement,
            )
        pred, distance, extras = transfer(
            self.describe_pair(source, target), source, target, sample["src_kps"], self.eval_size, self.refinement
        )
        return {"pred_kps": pred, "distance": distance, **extras}


def feature_cache(memory_gb: float, directory: str | None) -> FeatureCache | None:
    """The per-image feature cache of a run: ``memory_gb`` in memory (0 = none), ``directory`` on disk."""
    if memory_gb < 0:
        raise ValueError(f"feature_cache_gb must be >= 0, got {memory_gb}")
    if memory_gb == 0 and directory is None:
        return None
    return FeatureCache(memory_bytes=int(memory_gb * (1 << 30)), directory=directory)


def benchmark_pose_alignment(flip_pairs: Any, protocol: Any) -> PoseAlignment:
    """The pose alignment of a run: ``flip_pairs`` when given, else the benchmark protocol's table.

    Raises:
        ValueError: A dense benchmark, or one without a left/right keypoint table and no ``flip_pairs``.
    """
    if protocol.dense:
        raise ValueError(f"pose_alignment applies to keypoint benchmarks; {protocol.name} is scored on dense flow")
    table = flip_pairs if flip_pairs is not None else protocol.flip_pairs
    if table is None:
        raise ValueError(
            f"pose_alignment needs left/right keypoint pairs, and {protocol.name} has no semantic keypoint ids; "
            "a dataset whose samples carry keypoint ids ('kps_ids') can give flip_pairs (category -> [[left id, "
            "right id], ...])"
        )
    return PoseAlignment(table)


def default_eval_size(sd: SDFeaturizer | None, dino: DinoFeaturizer | None) -> int:
    """The keypoint-mapping square: the DINO input size when DINO is used (the reference), else SD's."""
    if dino is not None:
        return int(dino.image_size)
    if sd is not None:
        return int(sd.image_size)
    raise ValueError("no featurizer configured")
