"""DINOv2 ViT token features (transformers), as in "A Tale of Two Features".

The reference takes the "token" facet of block 11 of ViT-B/14: the output of the last transformer block
BEFORE the final LayerNorm, with the CLS (and any register) tokens dropped, on an 840 px input
(60 x 60 patches of 14 px).
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from .hooks import run_and_capture
from .hub import load_pretrained

__all__ = ["DinoFeaturizer"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class DinoFeaturizer(nn.Module):
    """Patch-token features of one ViT block for square images in [0, 1].

    Args:
        model_id: Hub id or local directory of a transformers ``Dinov2Model``. Ignored with ``random_init``.
        layer: 0-based index of the transformer block whose output is taken (11 = last block of ViT-B).
        image_size: Side of the square input; must be a multiple of the patch size (840 -> 60 x 60).
        random_init: Build a tiny random ``Dinov2Model`` from a config (keys of ``Dinov2Config`` plus
            ``seed``) on top of :mod:`.tiny_models` defaults instead of loading weights.
    """

    def __init__(
        self,
        model_id: str | None = "facebook/dinov2-base",
        layer: int = 11,
        image_size: int = 840,
        random_init: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.model_id = None if random_init is not None else model_id  # where the weights came from
        self.model = self._load(model_id, random_init)
        self.model.requires_grad_(False).eval()
        blocks = self.model.encoder.layer
        if not 0 <= layer < len(blocks):
            raise ValueError(f"layer {layer} out of range: the model has {len(blocks)} blocks")
        self.layer = int(layer)
        self.patch_size = int(self.model.config.patch_size)
        if image_size % self.patch_size:
            raise ValueError(f"image_size {image_size} is not a multiple of the patch size {self.patch_size}")
        self.image_size = int(image_size)
        self.num_prefix_tokens = 1 + int(getattr(self.model.config, "num_register_tokens", 0) or 0)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    #: Extraction settings a variant may change; the weights stay shared.
    VARIANT_FIELDS = ("layer", "image_size")

    def variant(self, **overrides: Any) -> DinoFeaturizer:
        """A featurizer sharing this one's weights with another block or input size (ablations).

        Raises:
            ValueError: For a field other than :attr:`VARIANT_FIELDS`, a block out of range or an input
                size that is not a multiple of the patch size.
        """
        unknown = sorted(set(overrides) - set(self.VARIANT_FIELDS))
        if unknown:
            raise ValueError(f"cannot vary {unknown}; a variant may change {list(self.VARIANT_FIELDS)}")
        clone = copy.copy(self)  # shares the ViT
        clone.__dict__ = dict(self.__dict__)
        layer, size = int(overrides.get("layer", self.layer)), int(overrides.get("image_size", self.image_size))
        if not 0 <= layer < len(self.model.encoder.layer):
            raise ValueError(f"layer {layer} out of range: the model has {len(self.model.encoder.layer)} blocks")
        if size % self.patch_size:
            raise ValueError(f"image_size {size} is not a multiple of the patch size {self.patch_size}")
        clone.layer, clone.image_size = layer, size
        return clone

    @staticmethod
    def _load(model_id: str | None, random_init: dict[str, Any] | None) -> nn.Module:
        if random_init is not None:
            from .tiny_models import build_dinov2

            return build_dinov2(random_init)
        if not model_id:
            raise ValueError("DinoFeaturizer needs a model_id (hub id or local directory) or random_init")
        from transformers import Dinov2Model

        return load_pretrained(Dinov2Model, model_id, what="model.init_args.dino.init_args.model_id")

    def save_pretrained(self, directory: str) -> None:
        """Save the ViT so that ``DinoFeaturizer(model_id=directory)`` loads it back."""
        self.model.save_pretrained(directory)

    @property
    def grid_size(self) -> int:
        """Number of patches per side."""
        return self.image_size // self.patch_size

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Extract patch tokens.

        Args:
            images: ``[B, 3, image_size, image_size]`` in [0, 1].

        Returns:
            ``[B, C, grid, grid]`` features of block ``layer`` (before the final norm).
        """
        if images.shape[-1] != self.image_size or images.shape[-2] != self.image_size:
            raise ValueError(f"expected {self.image_size}px square images, got {tuple(images.shape)}")
        pixels = ((images - self.mean) / self.std).to(self.model.dtype)
        block = self.model.encoder.layer[self.layer]
        tokens = run_and_capture(lambda: self.model(pixel_values=pixels), {"block": block})["block"]
        patches = tokens[:, self.num_prefix_tokens :].float()
        grid = self.grid_size
        return patches.transpose(1, 2).reshape(len(images), -1, grid, grid)
