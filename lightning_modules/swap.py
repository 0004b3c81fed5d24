"""Instance swapping (paper 4.3, supplementary A.8/B.2) as a predict-time output.

Thin by design: the masked per-pixel correspondence is the ``pipeline``'s
(:meth:`.components.pipeline.FusedCorrespondence.predict_pixels`; fused, SD-only or DINO-only by its ``alpha``,
as the paper's Fig. 5 compares), the pixel swap is :func:`.components.swap.swap_instance`
and the refinement :class:`.components.ddim.DDIMRefiner` (DDIM inversion of the swapped image, then DDIM
sampling with a prompt naming the category). With ``metrics``, the CLIP score and CLIP-based FID of supplementary
Table 9 (:class:`.swap_metrics.SwapScores`) are computed for the preliminary and the refined swaps.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import lightning as L
import numpy as np
import torch
from jsonargparse.typing import PositiveInt
from PIL import Image
from torch import nn

from .components.clip_features import CLIP_B32, CLIPImageEmbedder, region_crop
from .components.ddim import DDIMRefiner
from .components.dense import resize_nearest
from .components.pipeline import FusedCorrespondence
from .components.swap import swap_instance
from .components.visualize import to_pil_image
from .dense import check_resolution
from .results import RunResults
from .swap_metrics import SwapScores
from .zero_shot import place_feature_caches

__all__ = ["InstanceSwap", "SwapResults", "format_swap_table", "side_by_side"]


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


class InstanceSwap(L.LightningModule):
    """Swap the source instance onto the target instance, then refine with Stable Diffusion.

    For every pair (with ``src_mask`` and ``trg_mask``, e.g. from ``datamodules.MaskedPairsDataModule``): each
    target pixel inside the target mask takes the colour of its nearest source pixel inside the source mask
    (step 1, "preliminary"); the result is then DDIM-inverted over ``refine_strength`` of the schedule and
    sampled back with the prompt (step 2, "refined"). ``predict_step`` returns one record per pair with a
    picture [source | target | preliminary | refined] (``callbacks.PictureWriter`` saves and logs it) and the
    two images as uint8 tensors.

    Args:
        pipeline: The method (:class:`~.components.pipeline.FusedCorrespondence`): fused, SD-only or DINO-only
            by its ``alpha``, as the paper's Fig. 5 compares. Its SD featurizer (configured even when ``alpha``
            is 0) lends the refinement its UNet, VAE and text encoder.
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
        metrics: Score the swaps (supplementary Table 9, Paint-by-Example's protocol): per pair the CLIP score
            between the edited region (bounding box of the target mask in the swapped image) and the reference
            (bounding box of the source mask in the source image), both at the working size, and over all pairs
            the Fréchet distance of their CLIP embeddings (``fid_clip``; meaningless on a handful of pairs),
            for the preliminary and the refined swaps. Written to ``<log_dir>/swap_metrics.json``, printed
            and sent to the loggers (``swap/refined/clip_score``, ...). Table 9's Quality score (GIQA) is not
            computed (see :mod:`.swap_metrics`).
        clip_model: Hub id or local directory of the CLIP of the metrics (Paint-by-Example: ViT-B/32).
        clip_random_init: Tests only: a tiny random CLIP tower instead (see
            :class:`.components.clip_features.CLIPImageEmbedder`).
    """

    def __init__(
        self,
        pipeline: FusedCorrespondence,
        resolution: PositiveInt | None = 256,
        chunk: PositiveInt = 4096,
        blend_edges: int = 0,
        refine: bool = True,
        refine_steps: int = 50,
        refine_strength: float = 0.5,
        guidance_scale: float = 1.0,
        refine_prompt: str = "a photo of {category}",
        refine_size: int = 512,
        picture_height: int = 256,
        metrics: bool = False,
        clip_model: str | None = CLIP_B32,
        clip_random_init: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["pipeline"])
        self.pipeline = pipeline
        self.resolution, self.chunk = check_resolution(resolution), int(chunk)
        sd = pipeline.configured[0]
        if refine and sd is None:
            raise ValueError("refine=True needs an sd featurizer (its UNet, VAE and text encoder); or set refine false")
        self.blend_edges = int(blend_edges)
        self.picture_height = int(picture_height)
        self.refiner = None if not refine else DDIMRefiner.from_featurizer(
            sd, num_inference_steps=refine_steps, strength=refine_strength, guidance_scale=guidance_scale,
            prompt=refine_prompt, image_size=refine_size,
        )
        self.swap_metrics: nn.ModuleDict | None = None
        self.predict_results: SwapResults | None = None
        if metrics:
            embedder = CLIPImageEmbedder(clip_model, random_init=clip_random_init)  # one tower, shared
            self.clip_source = embedder.model_id or "random_init"
            stages = ["preliminary"] + (["refined"] if refine else [])
            self.swap_metrics = nn.ModuleDict({stage: SwapScores(embedder) for stage in stages})

    def setup(self, stage: str) -> None:
        """Instance swapping is a predict-time output only; the disk cache is placed
        (:func:`.zero_shot.place_feature_caches`)."""
        if stage != "predict":
            raise ValueError(f"InstanceSwap runs with `predict` (evaluate.py predict ...), not {stage!r}")
        place_feature_caches(self)

    @staticmethod
    def working_inputs(sample: dict[str, Any], match: Any) -> dict[str, torch.Tensor]:
        """The pair at the correspondence's working sizes: ``source`` / ``target`` uint8 images and
        ``source_mask`` / ``target_mask`` (bool), resized once for the swap and its metrics."""
        for key in ("src_mask", "trg_mask"):
            if sample.get(key) is None:
                raise ValueError(f"pair {sample.get('pair_id')!r} has no {key!r}: instance swapping needs both masks")
        return {
            "source": _resized(sample["src_image"], match.source_size),
            "target": _resized(sample["trg_image"], match.target_size),
            "source_mask": resize_nearest(sample["src_mask"].to(torch.uint8), match.source_size).bool(),
            "target_mask": resize_nearest(sample["trg_mask"].to(torch.uint8), match.target_size).bool(),
        }

    @torch.no_grad()
    def swap(
        self, inputs: dict[str, torch.Tensor], match: Any, category: str
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(preliminary, refined or None)`` uint8 ``[3, Ht, Wt]`` images of one pair at the working size."""
        preliminary = swap_instance(inputs["source"], inputs["target"], inputs["target_mask"], match.source_xy.cpu(),
                                    match.valid.cpu(), self.blend_edges)
        if self.refiner is None:
            return preliminary, None
        refined = self.refiner.refine(preliminary[None].to(self.device), [category])[0].cpu()
        return preliminary, refined

    @torch.no_grad()
    def predict_step(self, batch: list[dict[str, Any]], batch_idx: int, dataloader_idx: int = 0) -> list[dict[str, Any]]:
        """One record per pair: ``pair_id``, ``category``, ``preliminary``, ``refined`` and ``picture``."""
        outputs = []
        matches = self.pipeline.predict_pixels(batch, self.resolution, self.chunk, use_masks=True)
        for sample, match in zip(batch, matches):
            inputs = self.working_inputs(sample, match)
            preliminary, refined = self.swap(inputs, match, sample["category"])
            panels = [sample["src_image"], sample["trg_image"], preliminary] + ([refined] if refined is not None else [])
            outputs.append({
                "pair_id": sample["pair_id"], "category": sample["category"], "preliminary": preliminary,
                "refined": refined, "picture": side_by_side(panels, self.picture_height),
                "caption": f"{sample['pair_id']}: source | target | swapped" + (" | refined" if refined is not None else ""),
            })
            if self.swap_metrics is not None:
                self._update_swap_metrics(sample["pair_id"], inputs, preliminary, refined)
        return outputs

    # --- metrics (supplementary Table 9) ---------------------------------------------------------------------

    def _update_swap_metrics(
        self, pair_id: str, inputs: dict[str, torch.Tensor], preliminary: torch.Tensor, refined: torch.Tensor | None
    ) -> None:
        """Score one pair: edited region (target box of each swap) against the reference (source box)."""
        assert self.swap_metrics is not None
        target_mask, source_mask = inputs["target_mask"], inputs["source_mask"]
        if not target_mask.any() or not source_mask.any():
            warnings.warn(f"swap metrics: pair {pair_id!r} has an empty mask at the working size; "
                          "not scored", stacklevel=2)
            return
        reference = region_crop(inputs["source"], source_mask)
        for stage, image in (("preliminary", preliminary), ("refined", refined)):
            if image is not None and stage in self.swap_metrics:
                self.swap_metrics[stage].update(
                    edited_regions=[region_crop(image, target_mask)], reference_regions=[reference],
                    pair_ids=[pair_id],
                )

    def on_predict_epoch_end(self) -> None:
        """Compute the swap metrics (synchronised across processes) and log them; the run's
        :class:`callbacks.PictureWriter` writes and prints them (:attr:`predict_results`)."""
        if self.swap_metrics is None:
            return
        results = {stage: metric.compute() for stage, metric in self.swap_metrics.items()}
        for metric in self.swap_metrics.values():
            metric.reset()
        self.predict_results = SwapResults({**results, "clip_model": self.clip_source})
        if not self.trainer.is_global_zero:
            return
        flat = {f"swap/{stage}/{key}": float(value) for stage, values in results.items()
                for key, value in values.items()}
        for logger in self.trainer.loggers:
            logger.log_metrics(flat, step=self.trainer.global_step)
            logger.save()


class SwapResults(RunResults):
    """The swap metrics per stage (``preliminary``, ``refined``: ``clip_score``, ``fid_clip``, ``num_pairs``) and
    ``clip_model``, written to ``swap_metrics.json``."""

    filename = "swap_metrics.json"

    def table(self) -> str:
        return format_swap_table({k: v for k, v in self.summary.items() if isinstance(v, dict)})


def format_swap_table(results: dict[str, dict[str, Any]]) -> str:
    """The swap metrics as a small plain-text table (one row per stage)."""
    lines = [f"{'instance swap':<14}{'CLIP score':>12}{'FID (CLIP)':>12}{'pairs':>7}"]
    for stage, values in results.items():
        lines.append(f"{stage:<14}{values['clip_score']:>12.2f}{values['fid_clip']:>12.2f}{values['num_pairs']:>7d}")
    lines.append("(Quality score of Table 9 not computed: it needs GIQA's GMM fitted on real images)")
    return "\n".join(lines) + "\n"
