"""Instance swapping, step 2: Stable Diffusion refinement by DDIM inversion and DDIM sampling.

The pixel-swapped image (:func:`.swap.swap_instance`) is encoded to a VAE latent, inverted with DDIM
(eta = 0) over the first ``int(strength * num_inference_steps)`` steps of the schedule, conditioned on a
prompt naming the category, then sampled back along the same timesteps and decoded. Without an edit,
inversion followed by sampling reconstructs the latent (up to the usual DDIM-inversion approximation: each
inversion step evaluates the UNet at the latent it starts from). ``strength`` 0 is the VAE round trip.

The reference repository leaves this refinement as a TODO; the procedure here follows the paper's
description with diffusers' ``DDIMScheduler`` / ``DDIMInverseScheduler`` built from the UNet's training
schedule (the featurizer's scheduler config). SD 1.x/2.x only: SD-XL's added conditioning is not built.
Everything is deterministic (eta = 0), so there is no seed.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

if TYPE_CHECKING:
    from .sd_featurizer import SDFeaturizer

__all__ = ["DDIMRefiner", "ddim_scheduler_config"]


def ddim_scheduler_config(training_config: Mapping[str, Any]) -> dict[str, Any]:
    """DDIM (and inverse DDIM) settings from a UNet's training schedule config.

    The betas, ``num_train_timesteps``, ``prediction_type``, ``steps_offset`` and ``timestep_spacing`` come
    from ``training_config``. Overrides: ``clip_sample`` is off (latents are not in [-1, 1]; SD's shipped
    configs say the same), ``set_alpha_to_one`` defaults to False as in SD 1.x/2.x's shipped configs (a
    DDPM config lacks the field), and ``linspace`` spacing, which the inverse scheduler lacks, becomes
    ``leading`` so that both schedulers walk the same timesteps.
    """
    config = {k: v for k, v in dict(training_config).items() if not k.startswith("_")}
    config["clip_sample"] = False
    config["thresholding"] = False  # the inverse scheduler has no thresholding
    config.setdefault("set_alpha_to_one", False)
    if config.get("timestep_spacing", "leading") not in ("leading", "trailing"):
        config["timestep_spacing"] = "leading"
    return config


def _build_scheduler(scheduler_class: type, config: Mapping[str, Any]) -> Any:
    """``scheduler_class`` from the fields of ``config`` it takes (the rest would only be logged as unused)."""
    accepted = inspect.signature(scheduler_class.__init__).parameters
    return scheduler_class.from_config({k: v for k, v in config.items() if k in accepted})


def _token_ids(tokenizer: Any, encoder: nn.Module, prompt: str) -> torch.Tensor:
    """``[1, L]`` padded token ids (as the featurizer builds them)."""
    length = min(tokenizer.model_max_length, encoder.config.max_position_embeddings)
    return tokenizer(prompt, padding="max_length", max_length=length, truncation=True, return_tensors="pt").input_ids


def _resize_uint8(images: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear (antialiased) resize of uint8 ``[B, 3, H, W]``; the same tensor when the size matches."""
    if tuple(images.shape[-2:]) == size:
        return images
    resized = F.interpolate(images.float(), size=size, mode="bilinear", align_corners=False, antialias=True)
    return resized.round().clamp(0, 255).to(torch.uint8)


def _check_images(images: torch.Tensor) -> None:
    if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"expected uint8 [B, 3, H, W] images, got {images.dtype} {tuple(images.shape)}")


class DDIMRefiner(nn.Module):
    """DDIM inversion then DDIM sampling of images with a Stable Diffusion 1.x/2.x UNet.

    Shares its weights with the components it is given (e.g. an :class:`.sd_featurizer.SDFeaturizer`'s,
    see :meth:`from_featurizer`). Device and dtype follow the UNet; the scheduler arithmetic runs in
    float32.

    Args:
        unet: A diffusers ``UNet2DConditionModel`` (not SD-XL).
        vae: The matching ``AutoencoderKL``.
        text_encoder: The CLIP text encoder.
        tokenizer: Its tokenizer.
        scheduler_config: The UNet's training schedule config (e.g. ``featurizer.scheduler.config``); see
            :func:`ddim_scheduler_config`.
        num_inference_steps: DDIM steps of the full schedule.
        strength: Fraction of the schedule inverted and re-sampled: the latent is inverted over
            ``int(strength * num_inference_steps)`` steps, then sampled back. 0 returns the VAE round trip.
        guidance_scale: Classifier-free guidance scale; 1 means none (one UNet pass per step), above 1 the
            empty prompt is the unconditional branch.
        prompt: Prompt template; ``{category}`` is replaced by each image's category.
        image_size: Side of the square the images are resized to for SD (a multiple of the UNet input's
            total downsampling, 64 for SD); the refined images are resized back.

    Raises:
        ValueError: For an SD-XL UNet or out-of-range settings.
    """

    def __init__(
        self,
        unet: nn.Module,
        vae: nn.Module,
        text_encoder: nn.Module,
        tokenizer: Any,
        scheduler_config: Mapping[str, Any],
        num_inference_steps: int = 50,
        strength: float = 0.5,
        guidance_scale: float = 1.0,
        prompt: str = "a photo of {category}",
        image_size: int = 512,
    ) -> None:
        super().__init__()
        from diffusers import DDIMInverseScheduler, DDIMScheduler

        if getattr(unet.config, "addition_embed_type", None) == "text_time":
            raise ValueError(
                "DDIMRefiner supports SD 1.x/2.x UNets only: this is an SD-XL UNet (addition_embed_type "
                "'text_time'), whose pooled text embedding and size ids the refiner does not build"
            )
        self.unet, self.vae, self.text_encoder, self.tokenizer = unet, vae, text_encoder, tokenizer
        self.num_inference_steps = int(num_inference_steps)
        self.strength = float(strength)
        self.guidance_scale = float(guidance_scale)
        self.prompt = prompt
        self.image_size = int(image_size)
        self._check_settings()
        config = ddim_scheduler_config(scheduler_config)
        self.scheduler = _build_scheduler(DDIMScheduler, config)
        self.inverse_scheduler = _build_scheduler(DDIMInverseScheduler, config)
        self._prompt_cache: dict[str, torch.Tensor] = {}

    @classmethod
    def from_featurizer(cls, featurizer: SDFeaturizer, **kwargs: Any) -> DDIMRefiner:
        """A refiner sharing an SD featurizer's UNet, VAE, text encoder, tokenizer and training schedule.

        Args:
            featurizer: An SD 1.x/2.x :class:`.sd_featurizer.SDFeaturizer`.
            **kwargs: The refiner's settings (``num_inference_steps``, ``strength``, ...).
        """
        return cls(
            featurizer.unet, featurizer.vae, featurizer.text_encoder, featurizer.tokenizer,
            featurizer.scheduler.config, **kwargs,
        )

    def _check_settings(self) -> None:
        if self.num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be >= 1, got {self.num_inference_steps}")
        if not 0.0 <= self.strength <= 1.0:
            raise ValueError(f"strength must be in [0, 1], got {self.strength}")
        if self.guidance_scale < 1.0:
            raise ValueError(f"guidance_scale must be >= 1 (1 = no guidance), got {self.guidance_scale}")
        factor = 2 ** (len(self.vae.config.block_out_channels) - 1) * 2 ** (len(self.unet.down_blocks) - 1)
        if self.image_size <= 0 or self.image_size % factor:
            raise ValueError(f"image_size must be a positive multiple of {factor} for this VAE + UNet, "
                             f"got {self.image_size}")

    @property
    def device(self) -> torch.device:
        """The UNet's device."""
        return next(self.unet.parameters()).device

    @property
    def inversion_steps(self) -> int:
        """DDIM steps inverted and re-sampled: ``int(strength * num_inference_steps)`` (diffusers' img2img)."""
        return min(int(self.strength * self.num_inference_steps), self.num_inference_steps)

    def prompt_for(self, category: str) -> str:
        """The prompt of an image of ``category``."""
        return self.prompt.replace("{category}", category)

    @torch.no_grad()
    def _embed(self, prompt: str) -> torch.Tensor:
        """``[L, D]`` last hidden state of the text encoder for one prompt (cached)."""
        if prompt not in self._prompt_cache:
            encoder_device = next(self.text_encoder.parameters()).device
            ids = _token_ids(self.tokenizer, self.text_encoder, prompt).to(encoder_device)
            self._prompt_cache[prompt] = self.text_encoder(ids)[0][0]
        return self._prompt_cache[prompt].to(self.device)

    def embed_prompts(self, categories: Sequence[str]) -> torch.Tensor:
        """``[B, L, D]`` prompt embeddings, one per category (the template filled in)."""
        return torch.stack([self._embed(self.prompt_for(c)) for c in categories])

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """VAE posterior mean times the scaling factor, as the featurizer encodes.

        Args:
            images: ``[B, 3, H, W]`` uint8 (H, W multiples of the VAE's downsampling).

        Returns:
            ``[B, C, H / f, W / f]`` float32 latents on the UNet's device.
        """
        _check_images(images)
        pixels = images.to(self.device).float() / 255 * 2 - 1
        latent = self.vae.encode(pixels.to(self.vae.dtype)).latent_dist.mean
        return latent.float() * self.vae.config.scaling_factor

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """``[B, 3, H, W]`` uint8 images of latents (the inverse of :meth:`encode`'s scaling)."""
        scaled = (latents / self.vae.config.scaling_factor).to(self.device, self.vae.dtype)
        pixels = self.vae.decode(scaled).sample.float().clamp(-1, 1)
        return ((pixels + 1) * 127.5).round().to(torch.uint8)

    def _unet_noise(self, latents: torch.Tensor, t: torch.Tensor, embeds: torch.Tensor) -> torch.Tensor:
        dtype = self.unet.dtype
        out = self.unet(latents.to(dtype), t.to(self.device), encoder_hidden_states=embeds.to(dtype)).sample
        return out.float()

    def _predict_noise(self, latents: torch.Tensor, t: torch.Tensor, prompt_embeds: torch.Tensor) -> torch.Tensor:
        """The UNet's output at ``t``, with classifier-free guidance when ``guidance_scale > 1``."""
        if self.guidance_scale == 1.0:
            return self._unet_noise(latents, t, prompt_embeds)
        uncond = self._embed("").to(prompt_embeds.dtype).expand_as(prompt_embeds)
        both = self._unet_noise(torch.cat([latents, latents]), t, torch.cat([uncond, prompt_embeds]))
        unconditional, conditional = both.chunk(2)
        return unconditional + self.guidance_scale * (conditional - unconditional)

    @torch.no_grad()
    def invert(
        self, latents: torch.Tensor, prompt_embeds: torch.Tensor, num_steps: int | None = None
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """DDIM inversion (eta = 0) along the first ``num_steps`` timesteps of the schedule, ascending.

        Args:
            latents: ``[B, C, h, w]`` clean latents (:meth:`encode`).
            prompt_embeds: ``[B, L, D]`` (:meth:`embed_prompts`).
            num_steps: Steps to invert; :attr:`inversion_steps` by default.

        Returns:
            ``(noisy latents, trajectory)``: the latents after the last step, and the ``num_steps + 1``
            latents from the input (first) to the noisy ones (last).
        """
        steps = self.inversion_steps if num_steps is None else int(num_steps)
        if not 0 <= steps <= self.num_inference_steps:
            raise ValueError(f"num_steps must be in [0, {self.num_inference_steps}], got {steps}")
        self.inverse_scheduler.set_timesteps(self.num_inference_steps)
        sample = latents.float().to(self.device)
        trajectory = [sample]
        for t in self.inverse_scheduler.timesteps[:steps]:
            noise = self._predict_noise(sample, t, prompt_embeds)
            sample = self.inverse_scheduler.step(noise, t, sample).prev_sample
            trajectory.append(sample)
        return sample, trajectory

    @torch.no_grad()
    def sample(self, latents: torch.Tensor, prompt_embeds: torch.Tensor, start_step: int) -> torch.Tensor:
        """DDIM sampling (eta = 0) from position ``start_step`` of the descending schedule to the end.

        Args:
            latents: ``[B, C, h, w]`` noisy latents at that position (after inverting
                ``num_inference_steps - start_step`` steps; 0 starts at the top of the schedule).
            prompt_embeds: ``[B, L, D]`` (:meth:`embed_prompts`).
            start_step: Index into the ``num_inference_steps`` sampling timesteps; equal to it runs no step.

        Returns:
            ``[B, C, h, w]`` float32 clean latents.
        """
        if not 0 <= start_step <= self.num_inference_steps:
            raise ValueError(f"start_step must be in [0, {self.num_inference_steps}], got {start_step}")
        self.scheduler.set_timesteps(self.num_inference_steps)
        sample = latents.float().to(self.device)
        for t in self.scheduler.timesteps[start_step:]:
            noise = self._predict_noise(sample, t, prompt_embeds)
            sample = self.scheduler.step(noise, t, sample, eta=0.0).prev_sample
        return sample

    @torch.no_grad()
    def refine(self, images: torch.Tensor, categories: Sequence[str]) -> torch.Tensor:
        """Encode, invert, sample back and decode images (e.g. pixel-swapped ones).

        Args:
            images: ``[B, 3, H, W]`` uint8; resized to ``image_size`` square for SD and back.
            categories: One category per image (fills the prompt template).

        Returns:
            ``[B, 3, H, W]`` uint8 refined images on the input's device.
        """
        _check_images(images)
        if len(categories) != len(images):
            raise ValueError(f"got {len(categories)} categories for {len(images)} images: one per image")
        size = tuple(images.shape[-2:])
        latents = self.encode(_resize_uint8(images, (self.image_size, self.image_size)))
        embeds = self.embed_prompts(categories)
        steps = self.inversion_steps
        noisy, _ = self.invert(latents, embeds, steps)
        refined = self.decode(self.sample(noisy, embeds, self.num_inference_steps - steps))
        return _resize_uint8(refined, size).to(images.device)  # type: ignore[arg-type]
