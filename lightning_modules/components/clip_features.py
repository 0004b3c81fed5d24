"""CLIP image embeddings for evaluating instance swapping (supplementary Table 9, Paint-by-Example's protocol).

:class:`CLIPImageEmbedder` wraps a frozen ``transformers.CLIPVisionModelWithProjection`` (default OpenAI
ViT-B/32, the CLIP of Paint-by-Example's CLIP score and of clean-fid's CLIP-based FID) and embeds uint8
images. Preprocessing is done in torch, so no ``CLIPImageProcessor`` (no hub files besides the model) is
needed: the short side is resized to ``image_size`` (bicubic, antialiased, rounded back to 8-bit values as
PIL would), the centre ``image_size`` square is cropped, then pixels in [0, 1] are normalised with
``OPENAI_CLIP_MEAN`` / ``OPENAI_CLIP_STD`` -- the steps of CLIP's own preprocessing and of clean-fid's
``img_preprocess_clip``.

:func:`region_crop` cuts the bounding box of a mask out of an image (the "edited region" of Paint-by-Example's
CLIP score is the bounding box of the edited area).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .captioner import TINY_CLIP_VISION
from .hub import load_pretrained

__all__ = ["CLIP_B32", "CLIPImageEmbedder", "region_crop"]

#: Paint-by-Example's CLIP (and clean-fid's ``clip_vit_b_32``): OpenAI ViT-B/32, 224 px, 512-d embedding.
CLIP_B32 = "openai/clip-vit-base-patch32"

# OpenAI CLIP's preprocessing constants (transformers.image_utils.OPENAI_CLIP_MEAN / _STD: the same numbers,
# written here so that importing this module does not import transformers; tests/test_quick_answers.py)
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def region_crop(image: torch.Tensor, mask: torch.Tensor, fill_outside: bool = False) -> torch.Tensor:
    """The bounding box of ``mask`` cut out of ``image``.

    Args:
        image: uint8 ``[3, H, W]``.
        mask: ``[H, W]`` (non-zero = inside).
        fill_outside: Set the pixels of the box outside the mask to 0 (black); False keeps them.

    Returns:
        uint8 ``[3, h, w]``: rows ``top..bottom`` and columns ``left..right`` of the mask's pixels, inclusive.

    Raises:
        ValueError: If the shapes differ or the mask is empty.
    """
    if image.dim() != 3 or image.shape[0] != 3:
        raise ValueError(f"image must be [3, H, W], got {tuple(image.shape)}")
    if tuple(mask.shape) != tuple(image.shape[-2:]):
        raise ValueError(f"mask {tuple(mask.shape)} must have the image's size {tuple(image.shape[-2:])}")
    mask = mask.to(device=image.device).bool()
    rows, cols = torch.nonzero(mask, as_tuple=True)
    if rows.numel() == 0:
        raise ValueError("cannot crop the region of an empty mask")
    top, bottom, left, right = int(rows.min()), int(rows.max()) + 1, int(cols.min()), int(cols.max()) + 1
    crop = image[:, top:bottom, left:right].clone()
    if fill_outside:
        crop[:, ~mask[top:bottom, left:right]] = 0
    return crop


class CLIPImageEmbedder(nn.Module):
    """Frozen CLIP vision tower: uint8 images -> projected image embeddings (L2-normalised by default).

    Args:
        model_id: Hub id or local directory of a ``CLIPVisionModelWithProjection`` (a full ``CLIPModel``
            checkpoint such as ``openai/clip-vit-base-patch32`` works: its vision tower and
            ``visual_projection`` are loaded). Ignored with ``random_init``.
        random_init: For tests and CPU smoke runs: ``{"clip": {CLIPVisionConfig overrides}, "seed": int}``
            builds a tiny random (seeded) tower from :data:`.captioner.TINY_CLIP_VISION` instead of loading.
        image_size: Side of the square the images are resized and cropped to (default: the model config's
            ``image_size``; another size interpolates the position embeddings).

    Raises:
        ValueError: Without ``model_id`` and ``random_init``.
        ModelLoadError: Naming ``model_id`` when the tower cannot be loaded.
    """

    def __init__(
        self,
        model_id: str | None = CLIP_B32,
        random_init: dict[str, Any] | None = None,
        image_size: int | None = None,
    ) -> None:
        super().__init__()
        if random_init is not None:
            self.model_id = None
            with torch.random.fork_rng(devices=[]):  # seeded without disturbing the caller's random stream
                torch.manual_seed(int(random_init.get("seed", 0)))
                model = _tiny_clip(random_init.get("clip"))
        else:
            if not model_id:
                raise ValueError("CLIPImageEmbedder needs a model_id (hub id or local directory) or random_init")
            from transformers import CLIPVisionModelWithProjection

            self.model_id = str(model_id)
            model = load_pretrained(CLIPVisionModelWithProjection, self.model_id, what="clip_model")
        self.model = model.requires_grad_(False).eval()
        self.image_size = int(image_size) if image_size is not None else int(model.config.image_size)
        if self.image_size <= 0:
            raise ValueError(f"image_size must be positive, got {image_size}")
        self.embed_dim = int(model.config.projection_dim)
        self.register_buffer("mean", torch.tensor(OPENAI_CLIP_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(OPENAI_CLIP_STD).view(1, 3, 1, 1), persistent=False)

    def train(self, mode: bool = True) -> CLIPImageEmbedder:
        """Stay in eval mode: the tower is frozen."""
        return super().train(False)

    def save_pretrained(self, directory: str | Path) -> None:
        """Save the tower (``config.json`` and weights) so that ``CLIPImageEmbedder(directory)`` loads it."""
        self.model.save_pretrained(str(directory))

    def preprocess(self, image: torch.Tensor) -> torch.Tensor:
        """uint8 ``[3, H, W]`` or ``[N, 3, H, W]`` -> normalised float ``[N, 3, S, S]`` (see the module doc)."""
        if image.dim() == 3:
            image = image[None]
        if image.dim() != 4 or image.shape[1] != 3:
            raise ValueError(f"images must be [N, 3, H, W] or [3, H, W], got {tuple(image.shape)}")
        if image.dtype != torch.uint8:
            raise ValueError(f"images must be uint8 (0..255), got {image.dtype}")
        size = self.image_size
        height, width = int(image.shape[-2]), int(image.shape[-1])
        short, long = min(height, width), max(height, width)
        new_long = max(size, int(size * long / short))  # torchvision's / CLIPImageProcessor's rounding
        new_hw = (size, new_long) if height <= width else (new_long, size)
        x = image.to(device=self.mean.device, dtype=torch.float32)
        if (height, width) != new_hw:
            x = F.interpolate(x, size=new_hw, mode="bicubic", antialias=True, align_corners=False)
            x = x.clamp(0.0, 255.0).round()  # CLIP resizes 8-bit images: bicubic overshoot clipped, rounded
        top, left = (new_hw[0] - size) // 2, (new_hw[1] - size) // 2
        x = x[..., top : top + size, left : left + size] / 255.0
        return (x - self.mean) / self.std

    @torch.no_grad()
    def forward(self, images: torch.Tensor | Sequence[torch.Tensor], normalize: bool = True) -> torch.Tensor:
        """Projected CLIP image embeddings.

        Args:
            images: uint8 ``[N, 3, H, W]``, or a sequence of uint8 ``[3, h, w]`` of any sizes (each
                preprocessed on its own).
            normalize: L2-normalise the embeddings (CLIP score); False gives the raw projected embeddings
                (OpenAI CLIP's ``encode_image``, the features of clean-fid's CLIP FID).

        Returns:
            float32 ``[N, D]`` (``D`` = :attr:`embed_dim`) on the tower's device.
        """
        if isinstance(images, torch.Tensor):
            pixels = self.preprocess(images)
        else:
            if len(images) == 0:
                return torch.zeros(0, self.embed_dim, device=self.mean.device)
            pixels = torch.cat([self.preprocess(image) for image in images])
        dtype = next(self.model.parameters()).dtype
        interpolate = self.image_size != int(self.model.config.image_size)
        kwargs = {"interpolate_pos_encoding": True} if interpolate else {}
        embeds = self.model(pixel_values=pixels.to(dtype), **kwargs).image_embeds.float()
        return F.normalize(embeds, dim=-1) if normalize else embeds


def _tiny_clip(overrides: Mapping[str, Any] | None) -> nn.Module:
    """A random CLIP vision tower with projection from :data:`TINY_CLIP_VISION` updated by ``overrides``."""
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    return CLIPVisionModelWithProjection(CLIPVisionConfig(**{**TINY_CLIP_VISION, **(overrides or {})}))
