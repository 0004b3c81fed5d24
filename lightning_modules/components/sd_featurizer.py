"""Stable Diffusion UNet decoder features (diffusers), as in "A Tale of Two Features".

One image -> VAE latent -> noised once at a fixed timestep with one fixed Gaussian noise -> one UNet
pass conditioned on a prompt -> the decoder features entering the requested decoder layers.

Decoder layer numbering follows the reference (ODISE/ldm ``output_blocks``): the decoder layers are the
up-blocks' layers (resnet + cross-attention) in order, 0..11 for SD 1.x/2.x (4 up-blocks of 3), 0..8 for
SD-XL (3 of 3), 0..7 for BK-SDM-small and 0..5 for BK-SDM-tiny (2 per up-block, no mid-block). "Layer i"
is the hidden state ENTERING decoder layer i, before its skip concatenation, i.e. the output of decoder
layer i-1 (its resnet, plus its cross-attention where the up-block has one); for the first layer of an
up-block it is the previous up-block's (upsampled) output, and for layer 0 the mid-block output (the
last down-block's output in UNets without a mid-block). For SD at 960 px the paper's layers 2, 5, 8 are
1280 ch at 15x15, 1280 ch at 30x30 and 640 ch at 60x60.

SD-XL (a UNet with ``addition_embed_type="text_time"``) is conditioned as diffusers' SD-XL pipeline does:
the penultimate hidden states of both text encoders concatenated, plus the second encoder's pooled
projection and the size/crop ids ``(side, side, 0, 0, side, side)`` of the processed crop.
"""

from __future__ import annotations

import contextlib
import copy
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .captioner import ImplicitCaptioner
from .feature_cache import featurizer_fingerprint, model_config
from .hooks import run_and_capture
from .hub import check_tokenizer, load_pretrained

__all__ = [
    "CONDITIONINGS",
    "LOCATIONS",
    "SDFeaturizer",
    "WholePrompt",
    "prompt_identity",
    "capture_points",
    "decoder_layer_position",
    "decoder_layer_source",
]

SD15 = "stable-diffusion-v1-5/stable-diffusion-v1-5"


#: Where a "layer i" feature is taken (supplementary Table 2), all at the boundary entering decoder layer i:
#: ``decoder`` the hidden state (the paper's), ``encoder`` the skip connection concatenated to it,
#: ``encoder_decoder`` both, ``conv`` the resnet output of layer i-1, ``attn`` the self-attention output of
#: layer i-1 (before its residual, projection, cross-attention and feed-forward).
LOCATIONS = ("decoder", "encoder", "encoder_decoder", "conv", "attn")

#: How the UNet is conditioned (supplementary Table 5): ``prompt`` the text prompt template (the paper's
#: "explicit captioner"), ``implicit`` ODISE's implicit captioner (a CLIP image embedding, see
#: :class:`.captioner.ImplicitCaptioner`).
CONDITIONINGS = ("prompt", "implicit")


class WholePrompt(str):
    """A category that is already the whole SD prompt: :meth:`SDFeaturizer.prompt_for` uses it as is instead
    of filling the ``prompt`` template (a pair of one's own images may give its own prompt)."""


def prompt_identity(category: str) -> tuple[bool, str]:
    """What decides an image's SD prompt: its text and whether it is a :class:`WholePrompt` (which equals the
    plain category of the same text as a ``str``, but is another prompt). Compare and key categories by this."""
    return isinstance(category, WholePrompt), str(category)


def decoder_layer_position(unet: nn.Module, index: int) -> tuple[int, int]:
    """(up-block, layer within it) of decoder layer ``index``; ValueError if out of range."""
    per_block = [len(block.resnets) for block in unet.up_blocks]
    if not 0 <= index < sum(per_block):
        raise ValueError(f"decoder layer {index} out of range: this UNet has {sum(per_block)} decoder layers")
    block_idx, layer = 0, index
    while layer >= per_block[block_idx]:
        layer -= per_block[block_idx]
        block_idx += 1
    return block_idx, layer


def decoder_layer_source(unet: nn.Module, index: int) -> nn.Module:
    """Return the module whose output is the hidden state entering decoder layer ``index``.

    Args:
        unet: A diffusers ``UNet2DConditionModel``.
        index: Decoder layer index in ``[0, num_up_blocks * layers_per_up_block)``.

    Raises:
        ValueError: If ``index`` is out of range for this UNet.
    """
    block_idx, layer = decoder_layer_position(unet, index)
    block = unet.up_blocks[block_idx]
    if layer == 0:
        if block_idx > 0:
            return unet.up_blocks[block_idx - 1]
        # distilled UNets (BK-SDM) have no mid-block: the decoder starts from the last down-block
        return unet.mid_block if unet.mid_block is not None else unet.down_blocks[-1]
    attentions = getattr(block, "attentions", None)
    return attentions[layer - 1] if attentions else block.resnets[layer - 1]


def _previous_layer(unet: nn.Module, index: int, location: str) -> tuple[nn.Module, nn.Module | None]:
    """The resnet and the transformer (or None) of decoder layer ``index - 1``."""
    if index == 0:
        raise ValueError(f"location {location!r} needs a decoder layer before layer 0")
    block_idx, layer = decoder_layer_position(unet, index - 1)
    block = unet.up_blocks[block_idx]
    attentions = getattr(block, "attentions", None)
    return block.resnets[layer], attentions[layer] if attentions else None


def capture_points(unet: nn.Module, index: int, location: str) -> tuple[str, nn.Module]:
    """How to capture layer ``index`` at ``location``: (``"output"`` or ``"input"``, module)."""
    if location == "decoder":
        return "output", decoder_layer_source(unet, index)
    if location in ("encoder", "encoder_decoder"):
        block_idx, layer = decoder_layer_position(unet, index)
        return "input", unet.up_blocks[block_idx].resnets[layer]  # its input is cat(hidden, skip)
    resnet, transformer = _previous_layer(unet, index, location)
    if location == "conv":
        return "output", resnet
    if location == "attn":
        if transformer is None:
            raise ValueError(f"decoder layer {index - 1} has no attention, so layer {index} has no 'attn' feature")
        return "output", transformer.transformer_blocks[0].attn1
    raise ValueError(f"unknown location {location!r}; choose one of {list(LOCATIONS)}")


def _hidden_channels(unet: nn.Module, index: int) -> int:
    """Channels of the decoder hidden state entering layer ``index`` (the part before the skip)."""
    block_idx, layer = decoder_layer_position(unet, index)
    if layer > 0:
        return unet.up_blocks[block_idx].resnets[layer - 1].out_channels
    if block_idx > 0:
        return unet.up_blocks[block_idx - 1].resnets[-1].out_channels
    first = unet.mid_block if unet.mid_block is not None else unet.down_blocks[-1]
    return first.resnets[-1].out_channels


@contextlib.contextmanager
def _added_time_embedding(unet: nn.Module, extra: torch.Tensor | None) -> Iterator[None]:
    """Add ``extra`` ``[B, D]`` to the UNet's time embedding while the block runs (ODISE's ``cond_emb``)."""
    if extra is None:
        yield
        return
    handle = unet.time_embedding.register_forward_hook(lambda _module, _inputs, output: output + extra)
    try:
        yield
    finally:
        handle.remove()


def _token_ids(tokenizer: Any, encoder: nn.Module, prompt: str, device: torch.device) -> torch.Tensor:
    """``[1, L]`` padded token ids of a prompt for ``encoder``."""
    # A tokenizer saved without model_max_length reports a huge sentinel: the encoder decides.
    length = min(tokenizer.model_max_length, encoder.config.max_position_embeddings)
    ids = tokenizer(prompt, padding="max_length", max_length=length, truncation=True, return_tensors="pt").input_ids
    return ids.to(device)


class SDFeaturizer(nn.Module):
    """Stable Diffusion decoder features for square images in [0, 1].

    Args:
        model_id: Hub id or local directory of a diffusers SD pipeline (``unet``, ``vae``,
            ``text_encoder``, ``tokenizer``, ``scheduler`` subfolders). Ignored when ``random_init`` is set.
        layers: Decoder layer indices (see module docstring); the paper uses 2, 5, 8.
        timestep: Diffusion timestep of the single noisy pass (of 1000). As in the reference (ODISE's
            ``LdmExtractor``), every ``t >= 0`` adds the noise, ``t = 0`` too (with coefficient
            ``sqrt(1 - alpha_bar_0)``, 0.029 for SD's betas); ``-1`` is the clean latent, the UNet told ``t = 0``
            (ODISE's ``t < 0``).
        image_size: Side of the square input (the reference uses 960).
        sliding_window: Process the image as a 2x2 grid of ``crop_size`` crops at offsets 0 and
            ``image_size - crop_size`` and average the overlapping features, as the reference does.
        crop_size: Crop side for the sliding window (512 for SD v1).
        prompt: Prompt template; ``{category}`` is replaced by the pair's category. ``""`` is the empty
            prompt, ``"a photo of {category}"`` the paper's explicit captioner.
        ensemble_size: Number of noises whose features are averaged (1 in the paper, 8 in DIFT).
        seed: Seed of the fixed noise. Every image gets the same noise, independent of batch order.
        location: Where each layer's feature is taken (supplementary Table 2): ``decoder`` (the paper's),
            ``encoder``, ``encoder_decoder``, ``conv`` or ``attn`` (see :data:`LOCATIONS`).
        conditioning: ``prompt`` (the template above, the "explicit captioner") or ``implicit`` (the
            ``captioner``'s image-based conditioning; the prompt is then unused).
        captioner: ODISE's implicit captioner, needed for ``conditioning="implicit"`` (SD 1.x only). As in
            ODISE's sliding window, it sees each crop the UNet sees (every window gets its own CLIP
            embedding). With ``conditioning="implicit"`` its conditioning replaces the prompt's. Its extra
            time embedding (when it has one) is added to the UNet's in BOTH conditionings, as the
            reference does with and without ``--TEXT_INPUT``; without a captioner there is none.
        random_init: Build tiny random components from configs instead of loading weights:
            ``{"unet": {...}, "vae": {...}, "text_encoder": {...}, "seed": 0}`` overriding
            :mod:`.tiny_models` defaults. For tests, the demo and CPU smoke runs.
    """

    def __init__(
        self,
        model_id: str | None = SD15,
        layers: Sequence[int] = (2, 5, 8),
        timestep: int = 100,
        image_size: int = 960,
        sliding_window: bool = True,
        crop_size: int = 512,
        prompt: str = "a photo of {category}",
        ensemble_size: int = 1,
        seed: int = 42,
        random_init: dict[str, Any] | None = None,
        location: str = "decoder",
        conditioning: str = "prompt",
        captioner: ImplicitCaptioner | None = None,
    ) -> None:
        super().__init__()
        if ensemble_size < 1:
            raise ValueError(f"ensemble_size must be >= 1, got {ensemble_size}")
        if sliding_window and not 0 < crop_size <= image_size:
            raise ValueError(f"crop_size {crop_size} must be in (0, image_size={image_size}]")
        self.layers = [int(i) for i in layers]
        self.timestep = int(timestep)
        self.image_size = int(image_size)
        self.sliding_window = sliding_window
        self.crop_size = int(crop_size)
        self.prompt = prompt
        self.ensemble_size = int(ensemble_size)
        self.seed = int(seed)
        self.model_id = None if random_init is not None else model_id  # where the weights came from
        components = self._load(model_id, random_init)
        self.unet, self.vae, self.text_encoder = components["unet"], components["vae"], components["text_encoder"]
        self.tokenizer, self.scheduler = components["tokenizer"], components["scheduler"]
        # SD-XL's second (projecting) text encoder; None for the single-encoder families
        self.text_encoder_2, self.tokenizer_2 = components.get("text_encoder_2"), components.get("tokenizer_2")
        if self.is_xl and self.text_encoder_2 is None:
            raise ValueError("this UNet takes SD-XL's added conditioning but no text_encoder_2 was loaded")
        for module in (self.unet, self.vae, self.text_encoder, self.text_encoder_2):
            if module is not None:
                module.requires_grad_(False).eval()
        self._check_timestep()
        self.location = location
        self._sources = self._capture_plan()
        self._prompt_cache: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = {}
        self.captioner = captioner
        if captioner is not None:
            self._check_captioner(captioner)
        self.conditioning = conditioning
        self._check_conditioning()
        self._digests: dict[str, str] = {}  # weight digests for the feature cache, shared with variants

    #: Extraction settings a variant may change; the weights stay shared.
    VARIANT_FIELDS = (
        "layers", "timestep", "image_size", "sliding_window", "crop_size", "prompt", "ensemble_size", "seed",
        "location", "conditioning",
    )

    def variant(self, **overrides: Any) -> SDFeaturizer:
        """A featurizer sharing this one's weights with other extraction settings (ablations).

        Args:
            **overrides: Any of :attr:`VARIANT_FIELDS` (e.g. ``timestep=50``, ``image_size=512``).

        Raises:
            ValueError: For a field that is not an extraction setting (weights cannot change here).
        """
        unknown = sorted(set(overrides) - set(self.VARIANT_FIELDS))
        if unknown:
            raise ValueError(f"cannot vary {unknown}; a variant may change {list(self.VARIANT_FIELDS)}")
        clone = copy.copy(self)  # shares the weight modules
        clone.__dict__ = dict(self.__dict__)
        for name, value in overrides.items():
            setattr(clone, name, [int(i) for i in value] if name == "layers" else value)
        clone._sources = clone._capture_plan()
        clone._prompt_cache = {}
        clone._check_conditioning()
        clone._check_timestep()
        return clone

    def cache_key(self, category: str) -> str:
        """What an image's features depend on besides its pixels (see :mod:`.feature_cache`): settings,
        model configs and weights, and the prompt (when the conditioning uses one)."""
        settings: dict[str, Any] = {name: getattr(self, name) for name in self.VARIANT_FIELDS if name != "prompt"}
        settings["scheduler"] = model_config(self.scheduler.config)
        modules = {
            "unet": self.unet, "vae": self.vae, "text_encoder": self.text_encoder,
            "text_encoder_2": self.text_encoder_2, "captioner": self.captioner,
        }
        fingerprint = featurizer_fingerprint("SDFeaturizer", settings, modules, self._digests)
        prompt = self.prompt_for(category) if self.uses_prompt else ""
        return f"{fingerprint}:{prompt}"

    def _check_timestep(self) -> None:
        if not -1 <= self.timestep < self.scheduler.config.num_train_timesteps:
            raise ValueError(
                f"timestep {self.timestep} outside [-1, {self.scheduler.config.num_train_timesteps}) (-1: no noise)"
            )

    def _check_conditioning(self) -> None:
        if self.conditioning not in CONDITIONINGS:
            raise ValueError(f"unknown conditioning {self.conditioning!r}; choose one of {list(CONDITIONINGS)}")
        if self.conditioning == "implicit" and self.captioner is None:
            raise ValueError(
                "conditioning 'implicit' needs a captioner (sd.init_args.captioner: an ImplicitCaptioner with "
                "ODISE's weights)"
            )

    def _check_captioner(self, captioner: ImplicitCaptioner) -> None:
        """The captioner must produce this UNet's prompt-embedding and time-embedding shapes."""
        if self.is_xl:
            raise ValueError("the implicit captioner conditions SD 1.x UNets; SD-XL is not supported")
        uncond = self._text_embedding("", torch.device("cpu"))[0]
        time_dim = self.unet.time_embedding.linear_2.out_features
        expected = (tuple(uncond.shape), time_dim)
        got = ((captioner.text_length, captioner.text_dim), captioner.time_embed_dim)
        if got[0] != expected[0] or got[1] not in (None, time_dim):
            raise ValueError(
                f"captioner shapes (text_length, text_dim)={got[0]}, time_embed_dim={got[1]} do not fit this SD "
                f"model: its prompt embedding is {expected[0]} and its time embedding {time_dim} wide "
                "(set captioner.init_args.text_length / text_dim / time_embed_dim)"
            )

    @property
    def is_xl(self) -> bool:
        """Whether the UNet takes SD-XL's added conditioning (pooled text embedding and size ids)."""
        return getattr(self.unet.config, "addition_embed_type", None) == "text_time"

    @property
    def num_decoder_layers(self) -> int:
        """Number of decoder layers of this UNet (12 for SD 1.x/2.x, 9 for SD-XL)."""
        return sum(len(block.resnets) for block in self.unet.up_blocks)

    def _capture_plan(self) -> dict[str, tuple[str, nn.Module]]:
        if self.location not in LOCATIONS:
            raise ValueError(f"unknown location {self.location!r}; choose one of {list(LOCATIONS)}")
        return {str(i): capture_points(self.unet, i, self.location) for i in self.layers}

    def _layer_feature(self, index: int, raw: torch.Tensor) -> torch.Tensor:
        """Turn a captured activation into a ``[B, C, h, w]`` map for ``self.location``."""
        if self.location == "encoder":
            return raw[:, _hidden_channels(self.unet, index) :]
        if self.location == "attn":  # [B, h*w, C] tokens of a square crop
            side = int(round(raw.shape[1] ** 0.5))
            return raw.transpose(1, 2).reshape(raw.shape[0], raw.shape[2], side, side)
        return raw

    @staticmethod
    def _load(model_id: str | None, random_init: dict[str, Any] | None) -> dict[str, Any]:
        if random_init is not None:
            from .tiny_models import build_sd_components

            with tempfile.TemporaryDirectory() as tmp:
                return build_sd_components(random_init, tmp)
        if not model_id:
            raise ValueError("SDFeaturizer needs a model_id (hub id or local directory) or random_init")
        from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
        from transformers import CLIPTextModel, CLIPTokenizer

        field = "model.pipeline.sd.model_id"
        components = {
            "unet": load_pretrained(UNet2DConditionModel, model_id, "unet", field),
            "vae": load_pretrained(AutoencoderKL, model_id, "vae", field),
            "text_encoder": load_pretrained(CLIPTextModel, model_id, "text_encoder", field),
            "tokenizer": load_pretrained(CLIPTokenizer, model_id, "tokenizer", field),
            # SD-XL ships an Euler scheduler config; only its betas are used here, as DDPM's add_noise
            "scheduler": load_pretrained(DDPMScheduler, model_id, "scheduler", field),
        }
        check_tokenizer(components["tokenizer"], model_id)
        if getattr(components["unet"].config, "addition_embed_type", None) == "text_time":
            from transformers import CLIPTextModelWithProjection

            components["text_encoder_2"] = load_pretrained(
                CLIPTextModelWithProjection, model_id, "text_encoder_2", field
            )
            components["tokenizer_2"] = load_pretrained(CLIPTokenizer, model_id, "tokenizer_2", field)
            check_tokenizer(components["tokenizer_2"], model_id)
        return components

    def save_pretrained(self, directory: str | Path) -> None:
        """Write the components in the diffusers pipeline layout, loadable with ``model_id=directory``."""
        directory = Path(directory)
        for name in ("unet", "vae", "text_encoder", "tokenizer", "scheduler", "text_encoder_2", "tokenizer_2"):
            if getattr(self, name) is not None:
                getattr(self, name).save_pretrained(directory / name)

    @property
    def uses_prompt(self) -> bool:
        """Whether an image's features depend on its category (the prompt): not with the implicit captioner."""
        return self.conditioning == "prompt"

    def prompt_for(self, category: str) -> str:
        """The prompt of an image of ``category`` (a :class:`WholePrompt` is returned as it is)."""
        if isinstance(category, WholePrompt):
            return str(category)
        return self.prompt.replace("{category}", category)

    @torch.no_grad()
    def _text_embedding(self, prompt: str, device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(hidden states [L, D], pooled projection [P] or None)`` of a prompt, as the pipelines build them.

        SD 1.x/2.x: the last hidden state of the text encoder. SD-XL: the penultimate hidden states of both
        encoders concatenated, and the second encoder's pooled projection.
        """
        # Prompts repeat across images (one per category): encode each once.
        if prompt not in self._prompt_cache:
            if not self.is_xl:
                hidden = self.text_encoder(_token_ids(self.tokenizer, self.text_encoder, prompt, device))[0][0]
                self._prompt_cache[prompt] = (hidden, None)
            else:
                pairs = ((self.tokenizer, self.text_encoder), (self.tokenizer_2, self.text_encoder_2))
                first, second = (
                    encoder(_token_ids(tokenizer, encoder, prompt, device), output_hidden_states=True)
                    for tokenizer, encoder in pairs
                )
                hidden = torch.cat([first.hidden_states[-2][0], second.hidden_states[-2][0]], dim=-1)
                self._prompt_cache[prompt] = (hidden, second.text_embeds[0])
        hidden, pooled = self._prompt_cache[prompt]
        return hidden.to(device), None if pooled is None else pooled.to(device)

    def _captioner_conditioning(
        self, crops: torch.Tensor, dtype: torch.dtype
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """The captioner's prompt states ``[N, L, D]`` and extra time embedding ``[N, T]`` of each crop.

        ``(None, None)`` without a captioner, and without a CLIP pass when neither output would be used
        (prompt conditioning and a captioner without a time projection).
        """
        captioner = self.captioner
        if captioner is None or (self.conditioning == "prompt" and captioner.time_embed_dim is None):
            return None, None
        uncond = self._text_embedding("", crops.device)[0]
        cond, time_extra = captioner(crops, uncond)
        return cond.to(dtype), None if time_extra is None else time_extra.to(dtype)

    def _conditioning(
        self, categories: Sequence[str], windows: int, side: int, device: torch.device, dtype: torch.dtype
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor] | None]:
        """Prompt conditioning of every crop (image-major): text states ``[B * windows, L, D]`` and, for
        SD-XL, the ``added_cond_kwargs`` (pooled text embeddings and the crop's size/crop/target ids)."""
        prompts = [self._text_embedding(self.prompt_for(c), device) for c in categories]
        text = torch.stack([hidden for hidden, _ in prompts]).repeat_interleave(windows, dim=0).to(dtype)
        if not self.is_xl:
            return text, None
        pooled = torch.stack([p for _, p in prompts]).repeat_interleave(windows, dim=0).to(dtype)  # type: ignore[misc]
        time_ids = pooled.new_tensor([side, side, 0, 0, side, side]).expand(len(pooled), 6)
        return text, {"text_embeds": pooled, "time_ids": time_ids}

    def _window_offsets(self) -> list[tuple[int, int]]:
        if not self.sliding_window:
            return [(0, 0)]
        far = self.image_size - self.crop_size
        starts = [0] if far == 0 else [0, far]
        return [(y, x) for y in starts for x in starts]

    def _noise(self, latent_shape: torch.Size, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        # Drawn on the CPU from a private generator: the same noise on every device and in every batch.
        generator = torch.Generator().manual_seed(self.seed)
        noise = torch.randn((self.ensemble_size, *latent_shape[1:]), generator=generator)
        return noise.to(device=device, dtype=dtype)

    def feature_maps(self, images: torch.Tensor, categories: Sequence[str]) -> list[torch.Tensor]:
        """:class:`.features.Featurizer`'s call: one map ``[B, C_i, h_i, w_i]`` per requested decoder layer."""
        return self(images, categories)

    @torch.no_grad()
    def forward(self, images: torch.Tensor, categories: Sequence[str]) -> list[torch.Tensor]:
        """Extract decoder features.

        Args:
            images: ``[B, 3, image_size, image_size]`` in [0, 1] (see ``pad_resize_image``).
            categories: One category name per image (fills the prompt template).

        Returns:
            One tensor ``[B, C_i, h_i, w_i]`` per requested layer, in the order of ``layers``.
        """
        if images.shape[-1] != self.image_size or images.shape[-2] != self.image_size:
            raise ValueError(f"expected {self.image_size}px square images, got {tuple(images.shape)}")
        if len(categories) != len(images):
            raise ValueError(f"got {len(categories)} categories for {len(images)} images: one per image")
        offsets = self._window_offsets()
        side = self.crop_size if self.sliding_window else self.image_size
        crops = torch.stack([images[:, :, y : y + side, x : x + side] for y, x in offsets], dim=1)
        crops = crops.flatten(0, 1)  # [B * windows, 3, side, side], image-major
        dtype = self.vae.dtype
        latents = self.vae.encode(crops.to(dtype) * 2 - 1).latent_dist.mean * self.vae.config.scaling_factor
        implicit_text, time_extra = self._captioner_conditioning(crops, dtype)
        if self.conditioning == "implicit":
            text, added = implicit_text, None
        else:
            text, added = self._conditioning(categories, len(offsets), side, images.device, dtype)
        clean = self.timestep < 0  # ODISE: no noise only below 0, and the UNet is told t = 0
        t = torch.full((latents.shape[0],), max(self.timestep, 0), device=images.device, dtype=torch.long)
        noises = self._noise(latents.shape, images.device, latents.dtype)
        summed: list[torch.Tensor] | None = None
        for noise in noises:
            noisy = latents if clean else self.scheduler.add_noise(latents, noise.expand_as(latents), t)
            with _added_time_embedding(self.unet, time_extra):
                feats = run_and_capture(
                    lambda: self.unet(noisy, t, encoder_hidden_states=text, added_cond_kwargs=added),  # noqa: B023
                    {k: m for k, (mode, m) in self._sources.items() if mode == "output"},
                    inputs={k: m for k, (mode, m) in self._sources.items() if mode == "input"},
                )
            layer_feats = [self._layer_feature(i, feats[str(i)]).float() for i in self.layers]
            summed = layer_feats if summed is None else [a + b for a, b in zip(summed, layer_feats)]
        assert summed is not None
        return [self._stitch(f / self.ensemble_size, len(images), offsets, side) for f in summed]

    def _stitch(
        self, feats: torch.Tensor, batch: int, offsets: list[tuple[int, int]], side: int
    ) -> torch.Tensor:
        """Average window features into the full-image feature map."""
        if len(offsets) == 1:
            return feats
        crop_res = feats.shape[-1]
        full_res, remainder = divmod(self.image_size * crop_res, side)
        if remainder or any((o * crop_res) % side for pair in offsets for o in pair):
            raise ValueError(
                f"sliding window offsets {offsets} of {side}px crops do not fall on the {crop_res}x{crop_res} "
                f"feature grid; choose image_size - crop_size as a multiple of {side // crop_res}"
            )
        feats = feats.unflatten(0, (batch, len(offsets)))
        out = feats.new_zeros(batch, feats.shape[2], full_res, full_res)
        count = feats.new_zeros(1, 1, full_res, full_res)
        for k, (y, x) in enumerate(offsets):
            fy, fx = y * crop_res // side, x * crop_res // side
            out[:, :, fy : fy + crop_res, fx : fx + crop_res] += feats[:, k]
            count[:, :, fy : fy + crop_res, fx : fx + crop_res] += 1
        return out / count
