"""Raw per-image features: which images a batch needs, one featurizer pass per image (via the cache).

Plain torch. The descriptors of a pair are made from these in :mod:`.descriptors` (or by a learned head from
:func:`source_maps`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Protocol, runtime_checkable

import torch

from .dino_featurizer import DinoFeaturizer
from .feature_cache import FeatureCache, image_digest
from .image_prep import pad_resize_image
from .fusion import merge_layers
from .samples import PairSample
from .sd_featurizer import SDFeaturizer, prompt_identity

__all__ = [
    "SOURCES",
    "BatchImage",
    "Featurizer",
    "ImageFeatures",
    "check_sources",
    "default_annotation_size",
    "extract_features",
    "feature_cache",
    "image_key",
    "mirrored_key",
    "pair_features",
    "run_featurizer",
    "sample_image_key",
    "source_maps",
    "unique_images",
]


@dataclass
class ImageFeatures:
    """Raw (pre-PCA) features of one image.

    Attributes:
        sd: One ``[C_i, h_i, w_i]`` map per SD layer, or None when SD is not used.
        dino: ``[C, G, G]`` DINO map, or None when DINO is not used.
        width: Original image width.
        height: Original image height.
        extra: The maps of each further featurizer of the pipeline (``FusedCorrespondence(featurizers=...)``),
            by its name: one ``[C_i, h_i, w_i]`` per map it extracts.
    """

    sd: list[torch.Tensor] | None
    dino: torch.Tensor | None
    width: int
    height: int
    extra: dict[str, list[torch.Tensor]] = field(default_factory=dict)


@runtime_checkable
class Featurizer(Protocol):
    """What the pipeline needs of a feature source (:class:`.sd_featurizer.SDFeaturizer`,
    :class:`.dino_featurizer.DinoFeaturizer`, or one of yours): it is run through :func:`run_featurizer` (one pass
    per distinct input, via the feature cache) without the pipeline knowing its class.

    Attributes:
        image_size: Side of the padded square input (:func:`.image_prep.pad_resize_image`).
        uses_prompt: Whether its features depend on the prompt (then an image is run once per prompt).
    """

    image_size: int
    uses_prompt: bool

    def feature_maps(self, images: torch.Tensor, categories: Sequence[str]) -> list[torch.Tensor]:
        """Maps ``[B, C_i, h_i, w_i]`` (one per layer it extracts) of ``[B, 3, image_size, image_size]`` images in
        [0, 1]; ``categories`` are the images' prompts' categories."""
        ...

    def cache_key(self, category: str) -> str:
        """What its features depend on besides the image (weights, settings, the prompt where it uses one)."""
        ...

    def variant(self, **overrides: Any) -> Featurizer:
        """The same weights with other extraction settings (an ablation's variants)."""
        ...


class BatchImage(NamedTuple):
    """One distinct image of a batch of pairs (:func:`unique_images`).

    Attributes:
        image: uint8 ``[3, H, W]``.
        category: The category (or :class:`.sd_featurizer.WholePrompt`) it is seen under: the SD prompt.
        file: Its identity apart from the prompt (the sample's image path, or the mirror's
            :func:`mirrored_key`): featurizers that use no prompt run once per file.
    """

    image: torch.Tensor
    category: str
    file: str


def image_key(path: str, category: str) -> str:
    """The identity of an image among a batch's features: its file AND its prompt.

    A benchmark can name one file under two categories (a PF-Pascal photo holds a dining table and a
    motorbike); its SD features differ by prompt, so each (file, prompt) is an image of its own. Look a
    pair's features up with :func:`sample_image_key`.
    """
    whole, text = prompt_identity(category)
    return f"{path}\x00{'prompt' if whole else 'category'}:{text}"


def sample_image_key(sample: PairSample, side: str) -> str:
    """:func:`image_key` of a pair's ``"src"`` or ``"trg"`` image."""
    return image_key(sample[f"{side}_image_path"], sample["category"])


def pair_features(features: Mapping[str, Any], sample: PairSample) -> tuple[Any, Any]:
    """A pair's source and target entries out of a batch's, keyed by :func:`sample_image_key` (features,
    descriptors)."""
    return features[sample_image_key(sample, "src")], features[sample_image_key(sample, "trg")]


def mirrored_key(key: str) -> str:
    """The key of an image's horizontal mirror among a batch's features (:func:`unique_images`)."""
    return f"{key}#mirrored"


def unique_images(samples: Sequence[PairSample], mirrored_sources: bool = False) -> dict[str, BatchImage]:
    """Every distinct image of a batch of pairs: ``{image key: BatchImage}`` (:func:`image_key`: the same
    file under two categories is two images, whose prompt-free features are still extracted once).

    Args:
        samples: Pair dicts.
        mirrored_sources: Also each source image's horizontal mirror, under :func:`mirrored_key` (pose
            alignment).
    """
    unique: dict[str, BatchImage] = {}
    for s in samples:
        for side in ("src", "trg"):
            path = s[f"{side}_image_path"]
            unique.setdefault(sample_image_key(s, side), BatchImage(s[f"{side}_image"], s["category"], path))
    if mirrored_sources:
        for s in samples:
            key = sample_image_key(s, "src")
            unique.setdefault(
                mirrored_key(key), BatchImage(s["src_image"].flip(-1), s["category"], mirrored_key(s["src_image_path"]))
            )
    return unique


def _precision(device: torch.device) -> str:
    """The autocast state features are computed under (part of a cache key: it changes the numbers)."""
    if torch.is_autocast_enabled(device.type):
        return f"autocast-{torch.get_autocast_dtype(device.type)}"
    return "exact"


@torch.no_grad()
def run_featurizer(
    featurizer: Featurizer,
    images: Sequence[torch.Tensor],
    categories: Sequence[str],
    device: torch.device,
    cache: FeatureCache | None = None,
    image_keys: Sequence[str] | None = None,
    files: Sequence[str] | None = None,
) -> tuple[list[tuple[torch.Tensor, ...]], int]:
    """One featurizer's raw features of each image (its :meth:`Featurizer.feature_maps`: SD one map per layer,
    DINO one map), via ``cache``.

    Each distinct input is run once: by ``(file, prompt)`` for a featurizer that uses the prompt
    (``featurizer.uses_prompt``), by file for one that does not (DINO, SD with the implicit captioner).

    Args:
        featurizer: Any :class:`Featurizer` (SD, DINO, or one of yours).
        images: uint8 ``[3, H, W]`` tensors of any sizes.
        categories: Category of each image (the SD prompt).
        device: Where the featurizer lives.
        cache: Reuse features computed before (in memory or on disk); None computes every image.
        image_keys: Content hashes of the images (:func:`.feature_cache.image_digest`), if known.
        files: Identity of each image apart from its prompt (entries with equal files hold the same pixels);
            None takes every entry as its own file.

    Returns:
        ``(features per image, number of images actually run through the featurizer)``.
    """
    if not images:
        return [], 0
    uses_prompt = bool(featurizer.uses_prompt)
    identities = [
        (i if files is None else files[i], prompt_identity(categories[i]) if uses_prompt else None)
        for i in range(len(images))
    ]
    first: dict[tuple, int] = {}
    for i, identity in enumerate(identities):
        first.setdefault(identity, i)
    distinct = list(first.values())
    slot = {identity: n for n, identity in enumerate(first)}

    def compute(indices: list[int]) -> list[tuple[torch.Tensor, ...]]:
        chosen = [distinct[i] for i in indices]
        batch = torch.stack([pad_resize_image(images[i], featurizer.image_size)[0] for i in chosen]).to(device)
        if hasattr(featurizer, "feature_maps"):
            layers = featurizer.feature_maps(batch, [categories[i] for i in chosen])
        else:  # the DINO contract of before the protocol, kept for a while: forward(images) -> one map
            layers = [featurizer(batch)]
        return [tuple(layer[j] for layer in layers) for j in range(len(chosen))]

    if cache is None:
        computed, passes = compute(list(range(len(distinct)))), len(distinct)
    else:
        digests = [image_keys[i] if image_keys else image_digest(images[i]) for i in distinct]
        precision = _precision(device)
        per_prompt = {prompt_identity(categories[i]): categories[i] for i in distinct}  # not a set: see WholePrompt
        suffixes = {identity: featurizer.cache_key(cat) for identity, cat in per_prompt.items()}
        keys = [
            f"{digest}|{suffixes[prompt_identity(categories[i])]}|{precision}" for digest, i in zip(digests, distinct)
        ]
        computed, passes = cache.fetch(keys, compute, device)
    return [computed[slot[identity]] for identity in identities], passes


def extract_features(
    sd: SDFeaturizer | None,
    dino: DinoFeaturizer | None,
    images: Sequence[torch.Tensor],
    categories: Sequence[str],
    device: torch.device,
    cache: FeatureCache | None = None,
    image_keys: Sequence[str] | None = None,
    files: Sequence[str] | None = None,
    extra: Mapping[str, Featurizer] | None = None,
) -> tuple[list[ImageFeatures], dict[str, int]]:
    """Run the given featurizers on a batch of images (at most one pass per distinct input per featurizer).

    Args:
        sd: SD featurizer or None.
        dino: DINO featurizer or None.
        images: uint8 ``[3, H, W]`` tensors of any sizes.
        categories: Category of each image (for the SD prompt).
        device: Where the featurizers live.
        cache: Per-image feature cache; None extracts every image.
        image_keys: Content hashes of the images, if already known.
        files: Identity of each image apart from its prompt (:func:`run_featurizer`); None: all distinct.
        extra: Further featurizers by name (:attr:`ImageFeatures.extra`).

    Returns:
        ``(features per image, {"sd": passes, "dino": passes, <extra name>: passes, ...})`` where passes count
        the inputs that were really run (cache misses).
    """
    if cache is not None and image_keys is None:
        image_keys = [image_digest(img) for img in images]
    run = {
        name: run_featurizer(featurizer, images, categories, device, cache, image_keys, files) if featurizer else (None, 0)
        for name, featurizer in (("sd", sd), ("dino", dino))
    }
    for name, featurizer in (extra or {}).items():
        if name in run:
            raise ValueError(f"a further featurizer may not be named {name!r} (the sd and dino slots have that name)")
        run[name] = run_featurizer(featurizer, images, categories, device, cache, image_keys, files)
    (sd_maps, _), (dino_maps, _) = run["sd"], run["dino"]
    features = [
        ImageFeatures(
            sd=None if sd_maps is None else list(sd_maps[i]),
            dino=None if dino_maps is None else dino_maps[i][0],
            width=int(img.shape[-1]),
            height=int(img.shape[-2]),
            extra={name: list(run[name][0][i]) for name in (extra or {})},
        )
        for i, img in enumerate(images)
    ]
    return features, {name: passes for name, (_, passes) in run.items()}


def feature_cache(
    memory_gb: float, directory: str | None, flag: str = "--model.pipeline.feature_cache_dir"
) -> FeatureCache | None:
    """The per-image feature cache of a run: ``memory_gb`` in memory (0 = none), ``directory`` on disk (None or
    ``"None"``: none). A relative ``directory`` is taken under the run's folder when the run starts
    (:meth:`.FeatureCache.resolve_under`). ``flag`` is the setting's command-line flag (named in warnings).

    ``"None"`` is what jsonargparse passes for ``--model.pipeline.feature_cache_dir null`` (a value two class
    levels down given ``null`` on the command line arrives as the text ``None``): it means no disk cache, never
    a folder named ``None``.
    """
    if memory_gb < 0:
        raise ValueError(f"feature_cache_gb must be >= 0, got {memory_gb}")
    if directory == "None":
        directory = None
    if memory_gb == 0 and directory is None:
        return None
    return FeatureCache(memory_bytes=int(memory_gb * (1 << 30)), directory=directory, flag=flag)


def default_annotation_size(sd: SDFeaturizer | None, dino: DinoFeaturizer | None) -> int:
    """The keypoint-mapping square: the DINO input size when DINO is used (the reference), else SD's."""
    if dino is not None:
        return int(dino.image_size)
    if sd is not None:
        return int(sd.image_size)
    raise ValueError("no featurizer configured")


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
