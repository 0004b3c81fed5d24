"""Instance swapping (paper 4.3, supplementary A.8/B.2) as a predict-time output.

Thin by design: the masked per-pixel correspondence is :class:`.dense.DenseCorrespondence`'s (fused, SD-only or
DINO-only by ``alpha``, as the paper's Fig. 5 compares), the pixel swap is :func:`.components.swap.swap_instance`
and the refinement :class:`.components.ddim.DDIMRefiner` (DDIM inversion of the swapped image, then DDIM
sampling with a prompt naming the category).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image

from .components.ddim import DDIMRefiner
from .components.dense import resize_nearest
from .components.dino_featurizer import DinoFeaturizer
from .components.pipeline import EvalSize
from .components.sd_featurizer import SDFeaturizer
from .components.swap import swap_instance
from .components.visualize import to_pil_image
from .dense import DenseCorrespondence

__all__ = ["InstanceSwap", "side_by_side"]


def side_by_side(images: Sequence[Any], height: int) -> Image.Image:
    """The images resized to ``height`` (aspect kept) and placed left to right on one canvas."""
    pictures = [to_pil_image(image) for image in images]
    pictures = [p.resize((max(1, round(p.width * height / p.height)), height), Image.Resampling.LANCZOS)
                for p in pictures]
    canvas = Image.new("RGB", (sum(p.width for p in pictures), height), "white")
    left = 0
    for picture in pictures:
        canvas.paste(picture, (left, 0))
        left += picture.width
    return canvas


def _resized(image: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """uint8 ``[3, H, W]`` resized (LANCZOS) to ``(h, w)``."""
    picture = to_pil_image(image).resize((size[1], size[0]), Image.Resampling.LANCZOS)
    return torch.from_numpy(np.array(picture)).permute(2, 0, 1).contiguous()


class InstanceSwap(DenseCorrespondence):
    """Swap the source instance onto the target instance, then refine with Stable Diffusion.

    For every pair (with ``src_mask`` and ``trg_mask``, e.g. from ``datamodules.MaskedPairsDataModule``): each
    target pixel inside the target mask takes the colour of its nearest source pixel inside the source mask
    (step 1, "preliminary"); the result is then DDIM-inverted over ``refine_strength`` of the schedule and
    sampled back with the prompt (step 2, "refined"). ``predict_step`` returns one record per pair with a
    picture [source | target | preliminary | refined] (``callbacks.PictureWriter`` saves and logs it) and the
    two images as uint8 tensors.

    Args:
        sd: SD featurizer: features (unless ``alpha`` is 0) and the refinement's UNet, VAE and text encoder.
        dino: DINO featurizer (unless ``alpha`` is 1).
        alpha: Weight of the SD block: 0.5 fused, 1 SD only, 0 DINO only.
        pca_dims: Co-PCA dimension per SD layer.
        eval_size: Side of the padded square of the descriptors (default: the DINO input size).
        fusion: How SD and DINO blocks are combined.
        feature_cache_gb: Memory of the per-image feature cache.
        feature_cache_dir: Folder of an on-disk feature cache.
        projection_ckpt: A trained projection head instead of co-PCA and the fixed fusion.
        resolution: Working resolution (long side) of the matching and of the preliminary swap.
        chunk: Target pixels matched at a time.
        blend_edges: Feathering of the swapped region's edge in pixels (0: off).
        refine: Run step 2 (needs ``sd``); False keeps the preliminary swap only.
        refine_steps: DDIM steps of the full schedule.
        refine_strength: Fraction of the schedule inverted and re-sampled.
        guidance_scale: Classifier-free guidance of the sampling (1: none).
        refine_prompt: Prompt template, ``{category}`` replaced by the pair's category.
        refine_size: Side of the square the refinement runs at (512 for SD 1.5).
        picture_height: Height of each panel of the picture.
    """

    def __init__(
        self,
        sd: SDFeaturizer | None = None,
        dino: DinoFeaturizer | None = None,
        alpha: float = 0.5,
        pca_dims: Sequence[int] | None = (256, 256, 256),
        eval_size: EvalSize | None = None,
        fusion: str = "concat_l2",
        feature_cache_gb: float = 4.0,
        feature_cache_dir: str | None = None,
        projection_ckpt: str | None = None,
        resolution: int | None = 256,
        chunk: int = 4096,
        blend_edges: int = 0,
        refine: bool = True,
        refine_steps: int = 50,
        refine_strength: float = 0.5,
        guidance_scale: float = 1.0,
        refine_prompt: str = "a photo of {category}",
        refine_size: int = 512,
        picture_height: int = 256,
    ) -> None:
        super().__init__(
            sd=sd, dino=dino, alpha=alpha, pca_dims=pca_dims, eval_size=eval_size, fusion=fusion,
            feature_cache_gb=feature_cache_gb, feature_cache_dir=feature_cache_dir, projection_ckpt=projection_ckpt,
            resolution=resolution, chunk=chunk, use_masks=True,
        )
        if refine and sd is None:
            raise ValueError("refine=True needs an sd featurizer (its UNet, VAE and text encoder); or set refine false")
        self.blend_edges = int(blend_edges)
        self.picture_height = int(picture_height)
        self.refiner = None if not refine else DDIMRefiner.from_featurizer(
            sd, num_inference_steps=refine_steps, strength=refine_strength, guidance_scale=guidance_scale,
            prompt=refine_prompt, image_size=refine_size,
        )

    def setup(self, stage: str) -> None:
        """Instance swapping is a predict-time output only."""
        if stage != "predict":
            raise ValueError(f"InstanceSwap runs with `predict` (evaluate.py predict ...), not {stage!r}")

    @torch.no_grad()
    def swap(self, sample: dict[str, Any], match: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(preliminary, refined or None)`` uint8 ``[3, Ht, Wt]`` images of one pair at the working size."""
        for key in ("src_mask", "trg_mask"):
            if sample.get(key) is None:
                raise ValueError(f"pair {sample.get('pair_id')!r} has no {key!r}: instance swapping needs both masks")
        source = _resized(sample["src_image"], match.source_size)
        target = _resized(sample["trg_image"], match.target_size)
        mask = resize_nearest(sample["trg_mask"].to(torch.uint8), match.target_size).bool()
        preliminary = swap_instance(source, target, mask, match.source_xy.cpu(), match.valid.cpu(), self.blend_edges)
        if self.refiner is None:
            return preliminary, None
        refined = self.refiner.refine(preliminary[None].to(self.device), [sample["category"]])[0].cpu()
        return preliminary, refined

    @torch.no_grad()
    def predict_step(self, batch: list[dict[str, Any]], batch_idx: int, dataloader_idx: int = 0) -> list[dict[str, Any]]:
        """One record per pair: ``pair_id``, ``category``, ``preliminary``, ``refined`` and ``picture``."""
        outputs = []
        for sample, match in zip(batch, self._correspondences(batch)):
            preliminary, refined = self.swap(sample, match)
            panels = [sample["src_image"], sample["trg_image"], preliminary] + ([refined] if refined is not None else [])
            outputs.append({
                "pair_id": sample["pair_id"], "category": sample["category"], "preliminary": preliminary,
                "refined": refined, "picture": side_by_side(panels, self.picture_height),
                "caption": f"{sample['pair_id']}: source | target | swapped" + (" | refined" if refined is not None else ""),
            })
        return outputs
