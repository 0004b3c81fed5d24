"""ODISE's implicit captioner: a CLIP image embedding turned into an SD prompt embedding.

"A Tale of Two Features" conditions the SD UNet with ODISE's "implicit captioner" by default instead of a
text prompt. A frozen CLIP vision tower embeds the image (the projected image embedding, not
L2-normalised); a learned per-token linear projection maps it to the text encoder's space, and a learned
tanh gate adds it to the embedding of the empty prompt::

    cond = uncond + tanh(alpha_cond) * (W @ prefix + b + positional_embedding)

Optionally a second projection gives an extra embedding that the caller adds to the UNet's time
embedding. The projections and gates are trained by ODISE; they are loaded by parameter-name suffix from
its release checkpoint (e.g. ``odise_label_coco_50e-b67d2efc.pth``).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .hub import load_pretrained, load_weights_file

__all__ = ["CLIP_L14_336", "ImplicitCaptioner", "odise_clip_preprocess"]

#: ODISE's CLIP tower: OpenAI ViT-L/14 at 336 px, 768-d projected image embedding.
CLIP_L14_336 = "openai/clip-vit-large-patch14-336"

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

#: Defaults of the tiny random CLIP vision tower built by ``random_init`` (updated by its ``clip`` dict).
TINY_CLIP_VISION: dict[str, Any] = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "image_size": 32,
    "patch_size": 8,
    "projection_dim": 16,
}


class PositionalLinear(nn.Module):
    """A linear map broadcast over ``seq_len`` tokens, each with its own learned offset.

    ``[B, in_features] -> [B, seq_len, out_features]``; parameter names match ODISE's checkpoint
    (``linear.weight``, ``linear.bias``, ``positional_embedding``).
    """

    def __init__(self, in_features: int, out_features: int, seq_len: int) -> None:
        super().__init__()
        self.linear = nn.Linear(in_features, out_features)
        self.positional_embedding = nn.Parameter(torch.zeros(1, seq_len, out_features))
        nn.init.trunc_normal_(self.positional_embedding, std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x).unsqueeze(1) + self.positional_embedding


class ImplicitCaptioner(nn.Module):
    """ODISE's implicit captioner: images -> SD conditioning (and an optional extra time embedding).

    Args:
        clip_model_id: Hub id or local directory of a ``transformers.CLIPVisionModelWithProjection``
            (ODISE: :data:`CLIP_L14_336`). Ignored with ``random_init``.
        weights: ODISE checkpoint (``.pth`` torch pickle or ``.safetensors``) holding the trained
            ``clip_project``, ``alpha_cond`` (and ``time_embed_project``, ``alpha_cond_time_embed``)
            under any prefix. Required unless ``random_init`` is set.
        text_length: Tokens of the prompt embedding (77 for SD).
        text_dim: Width of the prompt embedding (768 for SD 1.x).
        time_embed_dim: Width of the UNet's time embedding (1280 for SD 1.x); None = no extra time embedding.
        random_init: For tests and CPU smoke runs: ``{"clip": {CLIPVisionConfig overrides}, "seed": int}``
            builds a tiny random (seeded) CLIP tower and random gates instead of loading anything.

    Raises:
        ValueError: Without ``weights`` and ``random_init``, or when ``weights`` does not fit.
        ModelLoadError: If the CLIP tower cannot be loaded.
    """

    def __init__(
        self,
        clip_model_id: str | None = CLIP_L14_336,
        weights: str | None = None,
        text_length: int = 77,
        text_dim: int = 768,
        time_embed_dim: int | None = 1280,
        random_init: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        if weights is None and random_init is None:
            raise ValueError(
                "ImplicitCaptioner needs ODISE's trained projection: set `captioner.init_args.weights: PATH` "
                "to ODISE's checkpoint (e.g. odise_label_coco_50e-b67d2efc.pth). Untrained, its gates are "
                "zero-initialised, so the conditioning would equal the empty prompt's."
            )
        if weights is not None and not Path(weights).is_file():  # fail before loading a large CLIP tower
            raise ValueError(f"captioner weights {weights} not found (captioner.init_args.weights)")
        self.clip_model_id = None if random_init is not None else clip_model_id  # where the tower came from
        self.text_length, self.text_dim = int(text_length), int(text_dim)
        self.time_embed_dim = None if time_embed_dim is None else int(time_embed_dim)
        if random_init is not None:
            with torch.random.fork_rng(devices=[]):  # seeded without disturbing the caller's random stream
                torch.manual_seed(int(random_init.get("seed", 0)))
                self._build(_tiny_clip(random_init.get("clip")), random_gates=True)
        else:
            self._build(_load_clip(clip_model_id))
        if weights is not None:
            self.load_weights(weights)
        self.register_buffer("mean", torch.tensor(CLIP_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(CLIP_STD).view(1, 3, 1, 1), persistent=False)

    def _build(self, clip: nn.Module, random_gates: bool = False) -> None:
        """Attach the frozen tower and create the (ODISE-named) trainable projections and gates.

        ``random_gates`` draws the gates from N(0, 1): ODISE initialises them to zero, so tanh(alpha) = 0
        and the image would have no effect at all; random gates let tests and smoke runs see the image
        change the conditioning. Each gate is drawn right after its projection, so for one seed the
        conditioning does not depend on whether the time embedding is enabled.
        """
        self.clip = clip.requires_grad_(False).eval()
        clip_dim = int(clip.config.projection_dim)
        self.image_size = int(clip.config.image_size)
        self.clip_project = PositionalLinear(clip_dim, self.text_dim, self.text_length)
        self.alpha_cond = nn.Parameter(_gate((1, self.text_length, self.text_dim), random_gates))
        if self.time_embed_dim is not None:
            self.time_embed_project = PositionalLinear(clip_dim, self.time_embed_dim, 1)
            self.alpha_cond_time_embed = nn.Parameter(_gate((self.time_embed_dim,), random_gates))

    def captioner_parameters(self) -> dict[str, nn.Parameter]:
        """The trainable captioner parameters by name (the CLIP tower excluded), as ODISE names them."""
        return {name: p for name, p in self.named_parameters() if not name.startswith("clip.")}

    def train(self, mode: bool = True) -> ImplicitCaptioner:
        """Set the training mode but keep the frozen CLIP tower in eval mode."""
        super().train(mode)
        self.clip.eval()
        return self

    @torch.no_grad()
    def embed_images(self, images: torch.Tensor) -> torch.Tensor:
        """CLIP's projected image embedding ``[B, clip_dim]`` (not normalised) of images in [0, 1].

        The images go through :func:`odise_clip_preprocess` first, as in ODISE's ``ClipAdapter.embed_image``.
        """
        x = odise_clip_preprocess(images, self.image_size, self.mean, self.std)
        dtype = next(self.clip.parameters()).dtype
        return self.clip(pixel_values=x.to(dtype)).image_embeds

    def project(self, prefix: torch.Tensor, uncond: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Gate the projected image embeddings onto the empty prompt (see :meth:`forward`).

        Args:
            prefix: CLIP image embeddings ``[B, clip_dim]``.
            uncond: Empty-prompt embedding ``[text_length, text_dim]`` (or ``[1, text_length, text_dim]``).
        """
        uncond = self._check_uncond(uncond)
        prefix = prefix.to(self.alpha_cond.dtype)
        cond = uncond.to(prefix.dtype) + torch.tanh(self.alpha_cond) * self.clip_project(prefix)
        time = None
        if self.time_embed_dim is not None:
            time = (torch.tanh(self.alpha_cond_time_embed) * self.time_embed_project(prefix)).squeeze(1)
            time = time.to(uncond.dtype)
        return cond.to(uncond.dtype), time

    def forward(self, images: torch.Tensor, uncond: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Conditioning for each image.

        Args:
            images: ``[B, 3, H, W]`` in [0, 1], any size (preprocessed as ODISE does, :func:`odise_clip_preprocess`).
            uncond: The text encoder's embedding of the empty prompt ``""``, ``[text_length, text_dim]``.

        Returns:
            ``(cond [B, text_length, text_dim], time [B, time_embed_dim] or None)`` in ``uncond``'s dtype;
            ``time`` is to be added to the UNet's time embedding.
        """
        return self.project(self.embed_images(images), uncond)

    def _check_uncond(self, uncond: torch.Tensor) -> torch.Tensor:
        if uncond.dim() == 3 and uncond.shape[0] == 1:
            uncond = uncond[0]
        if tuple(uncond.shape) != (self.text_length, self.text_dim):
            raise ValueError(
                f"uncond must be the empty-prompt embedding [{self.text_length}, {self.text_dim}] "
                f"(text_length, text_dim), got {list(uncond.shape)}"
            )
        return uncond

    def load_weights(self, path: str | Path) -> None:
        """Copy the captioner parameters from an ODISE checkpoint, matched by name suffix.

        Raises:
            ValueError: Naming the file and parameter, for an unreadable file, a missing or ambiguous key
                or a shape mismatch.
        """
        state = _read_state_dict(Path(path))
        with torch.no_grad():
            for name, param in self.captioner_parameters().items():
                value = state[_match_key(state, name, path)]
                if tuple(value.shape) != tuple(param.shape):
                    raise ValueError(
                        f"{path}: parameter {name!r} has shape {list(value.shape)} in the checkpoint but "
                        f"{list(param.shape)} here (check text_length, text_dim, time_embed_dim, clip_model_id)"
                    )
                param.copy_(value)


def odise_clip_preprocess(
    images: torch.Tensor, size: int, mean: torch.Tensor, std: torch.Tensor
) -> torch.Tensor:
    """ODISE's CLIP preprocessing of float images in [0, 1] (``ClipAdapter.clip_preprocess``).

    ODISE keeps the first two and the last of open_clip's (2.0.2) eval transforms, applied to a float tensor
    with torchvision 0.14: ``Resize(size, BICUBIC)`` (the short side to ``size``, the long side to
    ``int(size * long / short)``; on tensors torchvision 0.14 does not antialias, and does not clamp float
    images), ``CenterCrop(size)`` (top-left ``round((side - size) / 2)``), and CLIP's mean/std normalisation.
    The sliding-window crops the SD featurizer passes are square, so the crop is a no-op there.

    Args:
        images: ``[B, 3, H, W]`` in [0, 1].
        size: CLIP's input side (336 for ViT-L/14-336).
        mean: CLIP's channel means, broadcastable to ``images``.
        std: CLIP's channel standard deviations.
    """
    x = images.float()
    height, width = x.shape[-2:]
    if min(height, width) != size:
        short, long = sorted((height, width))
        new_long = int(size * long / short)
        new_size = (size, new_long) if height <= width else (new_long, size)
        x = F.interpolate(x, size=new_size, mode="bicubic", align_corners=False, antialias=False)
    height, width = x.shape[-2:]
    top, left = int(round((height - size) / 2.0)), int(round((width - size) / 2.0))
    x = x[..., top : top + size, left : left + size]
    return (x - mean.to(x.device)) / std.to(x.device)


def _gate(shape: tuple[int, ...], random: bool) -> torch.Tensor:
    """A gate ``alpha``: zeros as in ODISE (before loading its trained values), or N(0, 1) samples."""
    return torch.randn(shape) if random else torch.zeros(shape)


def _tiny_clip(overrides: Mapping[str, Any] | None) -> nn.Module:
    """A random CLIP vision tower from :data:`TINY_CLIP_VISION` updated by ``overrides``."""
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    return CLIPVisionModelWithProjection(CLIPVisionConfig(**{**TINY_CLIP_VISION, **(overrides or {})}))


def _load_clip(model_id: str | None) -> nn.Module:
    if not model_id:
        raise ValueError("ImplicitCaptioner needs a clip_model_id (hub id or local directory) or random_init")
    from transformers import CLIPVisionModelWithProjection

    return load_pretrained(CLIPVisionModelWithProjection, model_id, what="captioner.init_args.clip_model_id")


def _read_state_dict(path: Path) -> dict[str, Any]:
    """The flat state dict of a ``.safetensors`` file or a torch checkpoint (unwrapping model/state_dict)."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as err:  # noqa: BLE001 - safetensors raises its own error types
            raise ValueError(f"could not read the captioner weights {path}: {err}") from err
    state = load_weights_file(path, "captioner weights")
    for key in ("model", "state_dict"):
        if isinstance(state, Mapping) and isinstance(state.get(key), Mapping):
            state = state[key]
            break
    if not isinstance(state, Mapping):
        raise ValueError(f"captioner weights {path} hold a {type(state).__name__}, not a state dict")
    return {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}


def _match_key(state: Mapping[str, Any], name: str, path: str | Path) -> str:
    """The unique key of ``state`` equal to ``name`` or ending in ``"." + name``."""
    keys = [k for k in state if k == name or k.endswith("." + name)]
    if len(keys) == 1:
        return keys[0]
    if not keys:
        raise ValueError(f"{path}: no key for the captioner parameter {name!r} (looked for '*.{name}')")
    raise ValueError(f"{path}: the captioner parameter {name!r} is ambiguous, it matches {sorted(keys)}")
