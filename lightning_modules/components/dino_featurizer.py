"""DINO-family ViT patch features (transformers), as in "A Tale of Two Features".

The reference takes the "token" facet of block 11 of DINOv2 ViT-B/14: the output of the last transformer
block BEFORE the final LayerNorm, with the CLS (and any register) tokens dropped, on an 840 px input
(60 x 60 patches of 14 px). Ablation settings (supplementary Tables 7 and 10): the ``key`` / ``query`` /
``value`` facets (the block's attention projections), other ViTs that ``transformers.AutoModel`` loads
(DINOv1 ``facebook/dino-vitb16``, iBOT converted with :func:`ibot_to_transformers`, DINOv2 with registers,
DINOv3 ViTs), an ensemble of
blocks (Ensemble-ViT: block 9 with the last) and a bilateral filter over the token map (Filter-ViT).

Position embeddings: a ViT learns a fixed ``M x M`` grid of position embeddings (37 x 37 for DINOv2, 14 x 14
for DINOv1 ViT-B/16) and resizes it to the token grid of a larger input. The reference runs the torch-hub
models, whose code resizes with "the +0.1 rule" (``pos_interpolation="hub"``, the default, see
:func:`hub_position_embeddings`); transformers resizes to exactly ``n x n`` (``"exact"``). The sampling
positions differ, so every token differs.
"""

from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .feature_cache import featurizer_fingerprint
from .hooks import run_and_capture
from .hub import load_pretrained, load_weights_file

__all__ = [
    "FACETS",
    "HUB_POSITION_RULES",
    "POS_INTERPOLATIONS",
    "DinoFeaturizer",
    "attention_projection",
    "bilateral_filter",
    "hub_position_embeddings",
    "ibot_to_transformers",
    "vit_blocks",
]

FACETS = ("token", "key", "query", "value")

#: How the learned position grid is resized to the token grid: ``hub`` the rule of the model's original
#: (torch-hub) code, which the reference runs; ``exact`` transformers' own resize to exactly ``n x n``.
POS_INTERPOLATIONS = ("hub", "exact")

#: The torch-hub rule per transformers ``model_type``: ``(offset, antialias)`` of :func:`hub_position_embeddings`.
#: DINOv2 (facebookresearch/dinov2 ``interpolate_offset=0.1``, no antialias) and DINOv1 / iBOT
#: (facebookresearch/dino ``w0 + 0.1``, and the reference's stride-aware ``ViTExtractor._fix_pos_enc``, the
#: same rule on the strided grid) add 0.1; DINOv2 with registers is built by the hub with
#: ``interpolate_offset=0.0, interpolate_antialias=True``, which is what transformers does too. DINOv3 has
#: rotary positions (nothing to resize), so both rules are the same there.
HUB_POSITION_RULES: dict[str, tuple[float, bool]] = {
    "dinov2": (0.1, False),
    "vit": (0.1, False),
    "dinov2_with_registers": (0.0, True),
}
_ROTARY_MODEL_TYPES = ("dinov3_vit",)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def bilateral_filter(
    features: torch.Tensor, window: int = 5, sigma_space: float = 1.0, sigma_range: float = 0.5
) -> torch.Tensor:
    """Edge-preserving smoothing of a token map (Filter-ViT, supplementary Table 10).

    Each token becomes the weighted mean of its ``window x window`` neighbours, with weights
    ``exp(-d_space^2 / 2 sigma_space^2) * exp(-||f_i - f_j||^2 / 2 sigma_range^2)``, the range term on
    L2-normalised features (so ``sigma_range`` is in units of unit-vector distance); borders replicate.

    Args:
        features: ``[B, C, H, W]``.
        window: Odd neighbourhood side.
        sigma_space: Spatial Gaussian width in cells.
        sigma_range: Feature-similarity Gaussian width.
    """
    if window < 1 or window % 2 == 0:
        raise ValueError(f"bilateral window must be a positive odd number, got {window}")
    b, c, h, w = features.shape
    pad = window // 2
    unit = features / features.norm(dim=1, keepdim=True).clamp_min(1e-12)
    neighbours = F.unfold(F.pad(features, (pad,) * 4, mode="replicate"), window).view(b, c, window * window, h * w)
    unit_nb = F.unfold(F.pad(unit, (pad,) * 4, mode="replicate"), window).view(b, c, window * window, h * w)
    offsets = torch.arange(window, device=features.device, dtype=features.dtype) - pad
    space = (offsets.view(-1, 1) ** 2 + offsets.view(1, -1) ** 2).flatten()
    weights = torch.exp(-space / (2 * sigma_space**2)).view(1, -1, 1) * torch.exp(
        -((unit_nb - unit.view(b, c, 1, h * w)) ** 2).sum(1) / (2 * sigma_range**2)
    )
    out = (neighbours * weights.unsqueeze(1)).sum(2) / weights.sum(1, keepdim=True)
    return out.view(b, c, h, w)


def hub_position_embeddings(
    position_embeddings: torch.Tensor, grid: int, offset: float = 0.1, antialias: bool = False
) -> torch.Tensor:
    """Resize a ViT's learned position embeddings to a ``grid x grid`` token grid with the torch-hub rule.

    The patch part ``[1, M*M, D]`` is resized bicubically (``align_corners=False``) with
    ``scale_factor = (grid + offset) / M`` and the output cropped by the floor to ``grid`` (the
    "+0.1" rule of DINO's and DINOv2's code: the sampling positions are those of a ``(grid + 0.1)``-wide
    output, not of a ``grid``-wide one); ``offset = 0`` resizes to exactly ``grid x grid``. The class
    embedding is kept. The resize runs in float32 and returns the input's dtype. Inputs are square here,
    so the hub code's swapped (width, height) scale factors do not matter.

    Args:
        position_embeddings: ``[1, 1 + M*M, D]``, the class token's first.
        grid: Tokens per side of the input.
        offset: 0.1 for DINOv2 and DINOv1 / iBOT, 0.0 for DINOv2 with registers.
        antialias: ``interpolate``'s antialias flag (True only for DINOv2 with registers).

    Returns:
        ``[1, 1 + grid*grid, D]``; the input itself when ``grid == M``.
    """
    cls_embedding, patch = position_embeddings[:, :1], position_embeddings[:, 1:]
    side = int(round(math.sqrt(patch.shape[1])))
    if side * side != patch.shape[1]:
        raise ValueError(f"position embeddings of {patch.shape[1]} patches do not form a square grid")
    if grid == side:
        return position_embeddings
    patch = patch.reshape(1, side, side, -1).permute(0, 3, 1, 2).float()
    if offset:
        factor = (grid + offset) / side
        resized = F.interpolate(patch, scale_factor=(factor, factor), mode="bicubic", align_corners=False, antialias=antialias)
    else:
        resized = F.interpolate(patch, size=(grid, grid), mode="bicubic", align_corners=False, antialias=antialias)
    if resized.shape[-2:] != (grid, grid):  # cannot happen for offset < 1; guards a misuse
        raise ValueError(f"the hub rule gave a {tuple(resized.shape[-2:])} grid for {grid} tokens per side")
    resized = resized.to(position_embeddings.dtype).permute(0, 2, 3, 1).reshape(1, grid * grid, -1)
    return torch.cat([cls_embedding, resized], dim=1)


@contextlib.contextmanager
def _position_rule(model: nn.Module, pos_interpolation: str) -> Iterator[None]:
    """While the block runs, make ``model.embeddings`` resize its position grid with the hub rule.

    transformers' ViT, DINOv2 and DINOv2-with-registers embeddings call
    ``self.interpolate_pos_encoding(embeddings, height, width)``; an instance attribute shadows that
    method for this forward pass only (variants share the model, and may use the other rule).
    """
    model_type = model.config.model_type
    if pos_interpolation == "exact" or model_type in _ROTARY_MODEL_TYPES:
        yield
        return
    offset, antialias = HUB_POSITION_RULES[model_type]
    embeddings = model.embeddings
    patch = int(model.config.patch_size)

    def interpolate(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
        if height != width:
            raise ValueError(f"the hub position rule is implemented for square inputs, got {height}x{width}")
        return hub_position_embeddings(embeddings.position_embeddings, height // patch, offset, antialias)

    embeddings.interpolate_pos_encoding = interpolate
    try:
        yield
    finally:
        del embeddings.interpolate_pos_encoding


def vit_blocks(model: nn.Module) -> nn.ModuleList:
    """The transformer blocks of a transformers ViT (``encoder.layer`` before v5, ``layers`` since; DINOv3:
    ``model.layer``)."""
    encoder = getattr(model, "encoder", None)
    if encoder is not None and hasattr(encoder, "layer"):
        return encoder.layer
    inner = getattr(model, "model", None)  # DINOv3ViTModel keeps its encoder under `model`
    if inner is not None and hasattr(inner, "layer"):
        return inner.layer
    return model.layers


def attention_projection(block: nn.Module, facet: str) -> nn.Module:
    """The query / key / value projection of a ViT block, in either transformers layout."""
    attention = block.attention
    new, old = {"query": ("q_proj", "query"), "key": ("k_proj", "key"), "value": ("v_proj", "value")}[facet]
    if hasattr(attention, new):
        return getattr(attention, new)
    return getattr(attention.attention, old)


def ibot_to_transformers(state_dict: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """Map an iBOT / DINO (timm-style ViT) checkpoint to the keys of a ``transformers.ViTModel``.

    Accepts the released ``checkpoint_teacher.pth`` layout (optionally under ``teacher`` /
    ``state_dict`` and with ``module.`` / ``backbone.`` prefixes); the fused ``qkv`` projection is split
    into query, key and value; projection heads are dropped. Targets the layout of ``model`` (the
    transformers v5 ``layers.i.attention.q_proj`` names, or the older ``encoder.layer.i.attention...``).
    """
    for key in ("teacher", "state_dict", "model"):
        if key in state_dict and isinstance(state_dict[key], dict):
            state_dict = state_dict[key]
    v5 = any(k.startswith("layers.") for k in model.state_dict())
    block_prefix = "layers" if v5 else "encoder.layer"
    qkv_names = ("q_proj", "k_proj", "v_proj") if v5 else ("query", "key", "value")
    qkv_module = "attention" if v5 else "attention.attention"
    per_block = {
        "norm1": "layernorm_before", "norm2": "layernorm_after",
        "attn.proj": "attention.o_proj" if v5 else "attention.output.dense",
        "mlp.fc1": "mlp.fc1" if v5 else "intermediate.dense", "mlp.fc2": "mlp.fc2" if v5 else "output.dense",
    }
    simple = {
        "cls_token": "embeddings.cls_token",
        "pos_embed": "embeddings.position_embeddings",
        "patch_embed.proj.weight": "embeddings.patch_embeddings.projection.weight",
        "patch_embed.proj.bias": "embeddings.patch_embeddings.projection.bias",
        "norm.weight": "layernorm.weight",
        "norm.bias": "layernorm.bias",
    }
    out: dict[str, torch.Tensor] = {}
    for raw_key, value in state_dict.items():
        key = raw_key
        for prefix in ("module.", "backbone."):
            key = key[len(prefix):] if key.startswith(prefix) else key
        if key in simple:
            out[simple[key]] = value
            continue
        parts = key.split(".")
        if parts[0] != "blocks":
            continue  # heads, masked-token embeddings: not part of the backbone
        base, rest = f"{block_prefix}.{parts[1]}.", ".".join(parts[2:])
        if rest.startswith("attn.qkv."):
            kind = rest.split(".")[-1]
            for name, chunk in zip(qkv_names, value.chunk(3, dim=0)):
                out[f"{base}{qkv_module}.{name}.{kind}"] = chunk
            continue
        module, kind = rest.rsplit(".", 1)
        if module not in per_block:
            raise ValueError(f"unexpected key {raw_key!r} in the iBOT/DINO checkpoint")
        out[f"{base}{per_block[module]}.{kind}"] = value
    return out


class DinoFeaturizer(nn.Module):
    """Patch features of one (or several) ViT blocks for square images in [0, 1].

    Args:
        model_id: Hub id or local directory of a transformers ViT: DINOv2 (``facebook/dinov2-base``,
            ``-small``, ``-large``, ``-giant``), DINOv1 (``facebook/dino-vitb16``) or any ViT
            ``transformers.AutoModel`` loads. Ignored with ``random_init``.
        layer: 0-based index of the transformer block whose output is taken (11 = last block of ViT-B).
        image_size: Side of the square input; must be a multiple of the patch size (840 -> 60 x 60).
        random_init: Build a tiny random ViT from a config (keys of ``Dinov2Config``, or of ``ViTConfig``
            with ``model_type: vit``, plus ``seed``) on top of :mod:`.tiny_models` defaults.
        facet: ``token`` (the block output, the paper's), or the block's attention ``key`` / ``query`` /
            ``value`` projections.
        ensemble_layers: Further blocks whose tokens are concatenated after ``layer``'s, each block
            L2-normalised per token first (Ensemble-ViT: ``layer: 11, ensemble_layers: [9]``).
        bilateral_window: Odd window of a bilateral filter over the token map (Filter-ViT); 0 = off.
        bilateral_sigma_space: Spatial width of that filter, in cells.
        bilateral_sigma_range: Feature-similarity width of that filter.
        checkpoint: A timm-style ViT checkpoint (the iBOT release's ``checkpoint_teacher.pth``) whose
            weights replace ``model_id``'s after :func:`ibot_to_transformers`; ``model_id`` then only gives
            the architecture (``facebook/dino-vitb16`` for iBOT ViT-B/16).
        pos_interpolation: How the learned position grid is resized to the token grid (see
            :data:`POS_INTERPOLATIONS`): ``hub`` (default) the rule of the model's torch-hub code, which the
            reference runs (:data:`HUB_POSITION_RULES`); ``exact`` transformers' own resize. No effect when
            the grid already has the model's size, nor for DINOv3 (rotary positions).
    """

    def __init__(
        self,
        model_id: str | None = "facebook/dinov2-base",
        layer: int = 11,
        image_size: int = 840,
        random_init: dict[str, Any] | None = None,
        facet: str = "token",
        ensemble_layers: list[int] | None = None,
        bilateral_window: int = 0,
        bilateral_sigma_space: float = 1.0,
        bilateral_sigma_range: float = 0.5,
        checkpoint: str | None = None,
        pos_interpolation: str = "hub",
    ) -> None:
        super().__init__()
        self.model_id = None if random_init is not None else model_id  # where the weights came from
        self.model = self._load(model_id, random_init)
        if checkpoint is not None:
            self._load_checkpoint(checkpoint)
        self.model.requires_grad_(False).eval()
        self.patch_size = int(self.model.config.patch_size)
        self.num_prefix_tokens = 1 + int(getattr(self.model.config, "num_register_tokens", 0) or 0)
        self.layer, self.image_size, self.facet = int(layer), int(image_size), facet
        self.ensemble_layers = [int(i) for i in (ensemble_layers or [])]
        self.bilateral_window = int(bilateral_window)
        self.bilateral_sigma_space, self.bilateral_sigma_range = float(bilateral_sigma_space), float(bilateral_sigma_range)
        self.pos_interpolation = pos_interpolation
        self._validate()
        self._digests: dict[str, str] = {}  # weight digest for the feature cache, shared with variants
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    #: Extraction settings a variant may change; the weights stay shared.
    VARIANT_FIELDS = (
        "layer", "image_size", "facet", "ensemble_layers", "bilateral_window", "bilateral_sigma_space",
        "bilateral_sigma_range", "pos_interpolation",
    )

    #: An image's features do not depend on its category: one pass per file (:func:`.features.run_featurizer`).
    uses_prompt = False

    def cache_key(self, category: str = "") -> str:
        """What an image's features depend on besides its pixels (see :mod:`.feature_cache`); not the
        category."""
        settings = {name: getattr(self, name) for name in self.VARIANT_FIELDS}
        return featurizer_fingerprint("DinoFeaturizer", settings, {"model": self.model}, self._digests)

    def _validate(self) -> None:
        blocks = len(vit_blocks(self.model))
        for layer in (self.layer, *self.ensemble_layers):
            if not 0 <= layer < blocks:
                raise ValueError(f"layer {layer} out of range: the model has {blocks} blocks")
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} is not a multiple of the patch size {self.patch_size}")
        if self.facet not in FACETS:
            raise ValueError(f"unknown facet {self.facet!r}; choose one of {list(FACETS)}")
        if self.bilateral_window and self.bilateral_window % 2 == 0:
            raise ValueError(f"bilateral_window must be odd (or 0 = off), got {self.bilateral_window}")
        if self.pos_interpolation not in POS_INTERPOLATIONS:
            raise ValueError(
                f"unknown pos_interpolation {self.pos_interpolation!r}; choose one of {list(POS_INTERPOLATIONS)}"
            )
        model_type = self.model.config.model_type
        known = (*HUB_POSITION_RULES, *_ROTARY_MODEL_TYPES)
        if self.pos_interpolation == "hub" and model_type not in known:
            raise ValueError(
                f"no torch-hub position rule is known for model_type {model_type!r} (known: {list(known)}); "
                "set pos_interpolation: exact to use transformers' own"
            )

    def variant(self, **overrides: Any) -> DinoFeaturizer:
        """A featurizer sharing this one's weights with other extraction settings (ablations).

        Raises:
            ValueError: For a field other than :attr:`VARIANT_FIELDS` or an invalid setting.
        """
        unknown = sorted(set(overrides) - set(self.VARIANT_FIELDS))
        if unknown:
            raise ValueError(f"cannot vary {unknown}; a variant may change {list(self.VARIANT_FIELDS)}")
        clone = copy.copy(self)  # shares the ViT
        clone.__dict__ = dict(self.__dict__)
        for name, value in overrides.items():
            setattr(clone, name, [int(i) for i in value or []] if name == "ensemble_layers" else value)
        clone._validate()
        return clone

    @staticmethod
    def _load(model_id: str | None, random_init: dict[str, Any] | None) -> nn.Module:
        if random_init is not None:
            from .tiny_models import build_dinov2

            return build_dinov2(random_init)
        if not model_id:
            raise ValueError("DinoFeaturizer needs a model_id (hub id or local directory) or random_init")
        from transformers import AutoModel

        return load_pretrained(AutoModel, model_id, what="model.pipeline.dino.model_id")

    def _load_checkpoint(self, path: str) -> None:
        """Replace the weights with a converted timm-style (iBOT / DINO) checkpoint."""
        raw = load_weights_file(path, "ViT checkpoint")
        try:
            result = self.model.load_state_dict(ibot_to_transformers(raw, self.model), strict=False)
        except RuntimeError as err:  # shape mismatches
            raise ValueError(f"checkpoint {path} does not fit the architecture of {self.model_id!r}: {err}") from err
        missing = [k for k in result.missing_keys if "pooler" not in k]
        if missing or result.unexpected_keys:
            raise ValueError(
                f"checkpoint {path} does not fit the architecture of {self.model_id!r}: missing {missing[:5]}, "
                f"unexpected {list(result.unexpected_keys)[:5]}"
            )

    def save_pretrained(self, directory: str) -> None:
        """Save the ViT so that ``DinoFeaturizer(model_id=directory)`` loads it back."""
        self.model.save_pretrained(directory)

    @property
    def grid_size(self) -> int:
        """Number of patches per side."""
        return self.image_size // self.patch_size

    def _facet_module(self, layer: int) -> nn.Module:
        block = vit_blocks(self.model)[layer]
        return block if self.facet == "token" else attention_projection(block, self.facet)

    def feature_maps(self, images: torch.Tensor, categories: Sequence[str] = ()) -> list[torch.Tensor]:
        """:class:`.features.Featurizer`'s call: the one patch-token map ``[B, C, G, G]`` (no prompt)."""
        return [self(images)]

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Extract patch tokens.

        Args:
            images: ``[B, 3, image_size, image_size]`` in [0, 1].

        Returns:
            ``[B, C, grid, grid]`` features of block ``layer`` (before the final norm), ensembles
            concatenated along channels, bilateral-filtered when configured.
        """
        if images.shape[-1] != self.image_size or images.shape[-2] != self.image_size:
            raise ValueError(f"expected {self.image_size}px square images, got {tuple(images.shape)}")
        pixels = ((images - self.mean) / self.std).to(self.model.dtype)
        layers = [self.layer, *self.ensemble_layers]
        # DINOv2 interpolates its position embeddings by itself and DINOv3 has rotary ones; ViT must be asked
        kwargs = {"interpolate_pos_encoding": True} if self.model.config.model_type == "vit" else {}
        with _position_rule(self.model, self.pos_interpolation):
            captured = run_and_capture(
                lambda: self.model(pixel_values=pixels, **kwargs), {str(i): self._facet_module(i) for i in layers}
            )
        grid = self.grid_size
        maps = [
            captured[str(i)][:, self.num_prefix_tokens :].float().transpose(1, 2).reshape(len(images), -1, grid, grid)
            for i in layers
        ]
        features = maps[0] if len(maps) == 1 else torch.cat([m / m.norm(dim=1, keepdim=True).clamp_min(1e-12) for m in maps], 1)
        if self.bilateral_window:
            features = bilateral_filter(
                features, self.bilateral_window, self.bilateral_sigma_space, self.bilateral_sigma_range
            )
        return features
