"""A pair's descriptors from its raw features: layer choice, co-PCA (or a learned per-layer projection),
merging the SD layers, and the fusion with DINO. Plain torch; fp32 even under autocast.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .features import ImageFeatures
from .fusion import FUSIONS, PCA_SOLVERS, co_pca_batch, fuse, fuse_blocks, merge_layers
from .hub import load_weights_file

__all__ = ["DescriptorSpec", "describe_pair", "describe_pairs", "project_layer"]


@dataclass(frozen=True)
class DescriptorSpec:
    """Everything that turns raw features into descriptors (no extraction involved).

    Attributes:
        alpha: Weight of the SD block (1 = SD only, 0 = DINO only).
        pca_dims: Co-PCA dimension per used SD layer; None keeps the raw channels.
        fusion: One of ``fusion.FUSIONS`` (``concat_l2`` is the paper's).
        sd_layers: The extracted SD layer ids to use (None: all that were extracted).
        layer_projection: A fixed per-layer linear map used instead of co-PCA (supplementary Table 3: the
            ODISE projection layer): a ``torch.save``d dict ``{"<layer>.weight": [d, C], "<layer>.bias": [d]}``
            applied to every token of that layer (a 1x1 convolution).
        pca_solver: Co-PCA's randomised PCA, as torch 1.13.1 (``"torch1.13"``, the reference's) or torch >= 2.4
            (``"torch2.4"``) runs ``pca_lowrank`` (:data:`.fusion.PCA_SOLVERS`).
        extra_weights: ``(name, weight)`` of each further featurizer's block (:attr:`.features.ImageFeatures.extra`:
            its maps merged coarse to fine and resized to the grid, without co-PCA), fused with the SD block
            (weight ``alpha``) and the DINO block (``1 - alpha``) by :func:`.fusion.fuse_blocks`.
    """

    alpha: float = 0.5
    pca_dims: tuple[int, ...] | None = (256, 256, 256)
    fusion: str = "concat_l2"
    sd_layers: tuple[int, ...] | None = None
    layer_projection: str | None = None
    pca_solver: str = "torch1.13"
    extra_weights: tuple[tuple[str, float], ...] = ()

    def __post_init__(self) -> None:
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {self.alpha}")
        if self.fusion not in FUSIONS:
            raise ValueError(f"unknown fusion {self.fusion!r}; choose one of {list(FUSIONS)}")
        if self.pca_solver not in PCA_SOLVERS:
            raise ValueError(f"unknown pca_solver {self.pca_solver!r}; choose one of {list(PCA_SOLVERS)}")
        if any(not weight >= 0 for _, weight in self.extra_weights):
            raise ValueError(f"the further featurizers' weights must be >= 0, got {dict(self.extra_weights)}")

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
        if self.layer_projection is None and self.pca_dims is not None and len(self.pca_dims) != len(positions):
            used = [extracted[i] for i in positions]
            raise ValueError(f"pca_dims {list(self.pca_dims)} must have one entry per used SD layer {used}")
        return positions


@functools.lru_cache(maxsize=8)
def _projection_weights(path: str) -> dict[str, torch.Tensor]:
    weights = load_weights_file(path, "projection state dict")
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
    return describe_pairs([(source, target)], spec, sd_layer_ids, grid)[0]


def _shapes(pair: tuple[ImageFeatures, ImageFeatures]) -> tuple:
    """What must agree for pairs to be stacked: every map's shape, on both sides."""
    return tuple(
        (tuple(t.shape for t in f.sd) if f.sd is not None else None, tuple(f.dino.shape) if f.dino is not None else None,
         tuple((name, tuple(t.shape for t in maps)) for name, maps in sorted(f.extra.items())))
        for f in pair
    )


def describe_pairs(
    pairs: Sequence[tuple[ImageFeatures, ImageFeatures]],
    spec: DescriptorSpec,
    sd_layer_ids: Sequence[int] = (),
    grid: int | None = None,
) -> list[torch.Tensor]:
    """:func:`describe_pair` of many pairs at once: pairs whose maps share their shapes (after the resize and
    padding, all pairs of a benchmark do) are stacked, and co-PCA runs once per layer for the whole stack
    (:func:`.fusion.co_pca_batch`, each pair still reduced on its own) instead of once per layer and pair.

    Returns:
        ``[2, D, G, G]`` per pair, in the order given.
    """
    groups: dict[tuple, list[int]] = {}
    for index, pair in enumerate(pairs):
        groups.setdefault(_shapes(pair), []).append(index)
    out: list[torch.Tensor | None] = [None] * len(pairs)
    for members in groups.values():
        stacked = _describe_stack([pairs[i] for i in members], spec, sd_layer_ids, grid)
        for i, descriptors in zip(members, stacked):
            out[i] = descriptors
    return out  # type: ignore[return-value]


def _describe_stack(
    pairs: Sequence[tuple[ImageFeatures, ImageFeatures]], spec: DescriptorSpec, sd_layer_ids: Sequence[int],
    grid: int | None,
) -> torch.Tensor:
    """Descriptors ``[B, 2, D, G, G]`` of pairs whose maps share their shapes."""
    first = pairs[0][0]
    device_type = (first.dino if first.dino is not None else first.sd[0]).device.type  # type: ignore[index]
    batch = len(pairs)
    with torch.autocast(device_type=device_type, enabled=False):
        sd_block = None
        if spec.uses_sd:
            if any(f.sd is None for pair in pairs for f in pair):
                raise ValueError(f"alpha={spec.alpha} needs SD features, but none were extracted")
            positions = spec.layer_positions(sd_layer_ids or range(len(first.sd)))
            layers = [torch.stack([torch.stack([s.sd[i], t.sd[i]]) for s, t in pairs]).float() for i in positions]
            if spec.layer_projection is not None:
                ids = [list(sd_layer_ids or range(len(first.sd)))[i] for i in positions]
                layers = [project_layer(layer.flatten(0, 1), spec.layer_projection, layer_id).unflatten(0, (batch, 2))
                          for layer, layer_id in zip(layers, ids)]
            elif spec.pca_dims is not None:
                layers = [
                    co_pca_batch(layer, dim, solver=spec.pca_solver) for layer, dim in zip(layers, spec.pca_dims)
                ]
            sd_block = merge_layers([layer.flatten(0, 1) for layer in layers], grid)
        dino_block = None
        if spec.uses_dino:
            if any(f.dino is None for pair in pairs for f in pair):
                raise ValueError(f"alpha={spec.alpha} needs DINO features, but none were extracted")
            dino_block = torch.stack([torch.stack([s.dino, t.dino]) for s, t in pairs]).float().flatten(0, 1)
        if not spec.extra_weights:
            return fuse(sd_block, dino_block, spec.alpha, spec.fusion).unflatten(0, (batch, 2))
        side = grid or (sd_block if sd_block is not None else dino_block).shape[-1]  # type: ignore[union-attr]
        blocks = [(sd_block, spec.alpha), (dino_block, 1 - spec.alpha)]
        for name, weight in spec.extra_weights:
            if any(name not in f.extra for pair in pairs for f in pair):
                raise ValueError(f"featurizer {name!r} has a weight, but its features were not extracted")
            maps = [torch.stack([torch.stack([s.extra[name][i], t.extra[name][i]]) for s, t in pairs]).float()
                    for i in range(len(first.extra[name]))]
            blocks.append((merge_layers([m.flatten(0, 1) for m in maps], side), weight))
        return fuse_blocks([(b, w) for b, w in blocks if b is not None], spec.fusion).unflatten(0, (batch, 2))
