"""Tiny random models built from configs, for tests, the demo and CPU smoke runs.

They have the same structure as the real ones (a 4-up-block SD UNet with three decoder layers per block,
a KL VAE with an 8x downsampling, a CLIP text encoder, a DINOv2 ViT with patch 14) so every code path of
the pipeline runs, but they are small enough for a 2-core CPU. Weights are random (seeded).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "TINY_UNET",
    "TINY_UNETS",
    "TINY_VAE",
    "TINY_TEXT_ENCODER",
    "TINY_DINOV2",
    "TINY_DINOV3",
    "TINY_VIT",
    "SD15_SIZED",
    "SD21_SIZED",
    "DINOV2_BASE_SIZED",
    "DINOV3_BASE_SIZED",
    "build_sd_components",
    "build_dinov2",
    "write_byte_level_clip_vocab",
]

TINY_UNET: dict[str, Any] = {
    "sample_size": 16,
    "in_channels": 4,
    "out_channels": 4,
    "block_out_channels": [16, 16, 32, 32],
    "layers_per_block": 2,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "cross_attention_dim": 32,
    "attention_head_dim": 4,
    "norm_num_groups": 8,
}
#: UNet structure per SD family, for ``random_init: {architecture: ...}``. ``sdxl``: three up-blocks of
#: three layers, the last without attention, and the "text_time" added conditioning (pooled text
#: embedding + 6 size/crop ids) that needs a second, projecting text encoder. ``bk-sdm-small`` /
#: ``bk-sdm-tiny``: the distilled UNets of BK-SDM (Kim et al. 2023; the supplementary's [6]): no
#: mid-block and one layer fewer per stage (two decoder layers per up-block); tiny also drops the
#: innermost stage (three up-blocks, all with attention).
TINY_UNETS: dict[str, dict[str, Any]] = {
    "sd": TINY_UNET,
    "sdxl": {
        **TINY_UNET,
        "block_out_channels": [16, 32, 32],
        "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
        "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
        "addition_embed_type": "text_time",
        "addition_time_embed_dim": 8,
    },
    # SD 2.x: linear projections in the transformers, per-stage head counts, and attention upcast to fp32
    # (the 768 px stable-diffusion-2-1 sets upcast_attention)
    "sd2": {**TINY_UNET, "attention_head_dim": [2, 2, 4, 4], "use_linear_projection": True, "upcast_attention": True},
    "bk-sdm-small": {**TINY_UNET, "layers_per_block": 1, "mid_block_type": None},
    "bk-sdm-tiny": {
        **TINY_UNET,
        "block_out_channels": [16, 16, 32],
        "layers_per_block": 1,
        "mid_block_type": None,
        "down_block_types": ["CrossAttnDownBlock2D"] * 3,
        "up_block_types": ["CrossAttnUpBlock2D"] * 3,
    },
}
TINY_VAE: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "latent_channels": 4,
    "block_out_channels": [8, 8, 16, 16],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "layers_per_block": 1,
    "norm_num_groups": 8,
    "sample_size": 64,
}
TINY_TEXT_ENCODER: dict[str, Any] = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "max_position_embeddings": 77,
    "projection_dim": 32,
}
#: SD-XL's second, projecting text encoder (wider than the first, like OpenCLIP bigG next to CLIP-L).
TINY_TEXT_ENCODER_2: dict[str, Any] = {**TINY_TEXT_ENCODER, "hidden_size": 48, "projection_dim": 24}
#: Text encoder per SD family where it differs from :data:`TINY_TEXT_ENCODER`: SD 2.x's OpenCLIP ViT-H is
#: wider than SD 1.x's CLIP-L and uses exact GELU instead of quick-GELU.
TINY_TEXT_ENCODERS: dict[str, dict[str, Any]] = {
    "sd2": {**TINY_TEXT_ENCODER, "hidden_size": 48, "hidden_act": "gelu"},
}
#: Scheduler prediction type per SD family (stable-diffusion-2-1 at 768 px is a v-prediction model; the
#: noising of a latent, all the featurizer uses, is the same for every prediction type).
PREDICTION_TYPES: dict[str, str] = {"sd2": "v_prediction"}
TINY_VIT: dict[str, Any] = {
    "hidden_size": 32,
    "num_hidden_layers": 4,
    "num_attention_heads": 2,
    "intermediate_size": 64,
    "patch_size": 16,
    "image_size": 224,
}
TINY_DINOV2: dict[str, Any] = {
    "hidden_size": 32,
    "num_hidden_layers": 4,
    "num_attention_heads": 2,
    "mlp_ratio": 2,
    "patch_size": 14,
    "image_size": 224,
}

#: A tiny DINOv3 ViT (patch 16, 4 register tokens, rotary position embeddings, layer scale), like
#: facebook/dinov3-vitb16-pretrain-lvd1689m in structure.
TINY_DINOV3: dict[str, Any] = {
    "hidden_size": 32,
    "num_hidden_layers": 4,
    "num_attention_heads": 2,
    "intermediate_size": 64,
    "patch_size": 16,
    "num_register_tokens": 4,
}


#: ``random_init`` of an SD featurizer with the architecture of stable-diffusion-v1-5 (its unet, vae and
#: text_encoder config.json on the hub) and random weights: real-size shapes and costs without weights
#: (the slow tests and the CPU throughput benchmark).
SD15_SIZED: dict[str, Any] = {
    "seed": 0,
    "unet": {
        "sample_size": 64,
        "block_out_channels": [320, 640, 1280, 1280],
        "layers_per_block": 2,
        "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
        "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
        "attention_head_dim": 8,
        "norm_num_groups": 32,
    },
    "vae": {"block_out_channels": [128, 256, 512, 512], "layers_per_block": 2, "norm_num_groups": 32,
            "sample_size": 512},
    "text_encoder": {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
                     "num_attention_heads": 12, "projection_dim": 768},
}
#: ``random_init`` of an SD featurizer with the architecture of stable-diffusion-2-1 (the 768 px model: its
#: unet, vae and text_encoder config.json on the hub; OpenCLIP ViT-H's 23 text layers as diffusers ships them).
SD21_SIZED: dict[str, Any] = {
    "seed": 0,
    "architecture": "sd2",
    "unet": {**SD15_SIZED["unet"], "sample_size": 96, "attention_head_dim": [5, 10, 20, 20]},
    "vae": {**SD15_SIZED["vae"], "sample_size": 768},
    "text_encoder": {"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 23,
                     "num_attention_heads": 16, "projection_dim": 512, "hidden_act": "gelu"},
}
#: ``random_init`` of a DINO featurizer with the architecture of DINOv3 ViT-B/16 and random weights.
DINOV3_BASE_SIZED: dict[str, Any] = {"seed": 0, "model_type": "dinov3_vit", "hidden_size": 768, "num_hidden_layers": 12,
                                     "num_attention_heads": 12, "intermediate_size": 3072}
#: ``random_init`` of a DINO featurizer with the architecture of DINOv2 ViT-B/14 and random weights.
DINOV2_BASE_SIZED: dict[str, Any] = {"seed": 0, "hidden_size": 768, "num_hidden_layers": 12,
                                     "num_attention_heads": 12, "mlp_ratio": 4, "patch_size": 14, "image_size": 518}


def _merged(defaults: dict[str, Any], overrides: dict[str, Any] | None) -> dict[str, Any]:
    return {**defaults, **(overrides or {})}


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible map from bytes to printable unicode characters."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    codes, extra = list(printable), 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            codes.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in codes)))


def write_byte_level_clip_vocab(directory: str | Path) -> tuple[Path, Path]:
    """Write a CLIP-format vocabulary with one token per byte (and its end-of-word form), no merges.

    Every string is encodable (as bytes), unlike the 2-token vocabulary that an offline hub id gives.

    Returns:
        Paths of ``vocab.json`` and ``merges.txt``.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    chars = list(_bytes_to_unicode().values())
    tokens = chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"]
    vocab_path, merges_path = directory / "vocab.json", directory / "merges.txt"
    vocab_path.write_text(json.dumps({tok: i for i, tok in enumerate(tokens)}))
    merges_path.write_text("#version: 0.2\n")
    return vocab_path, merges_path


def build_sd_components(random_init: dict[str, Any], tmp_dir: str | Path) -> dict[str, Any]:
    """Build a random SD stack (unet, vae, text_encoder, tokenizer, scheduler) from configs.

    Args:
        random_init: Optional overrides ``{"architecture": "sd", "unet": {...}, "vae": {...},
            "text_encoder": {...}, "text_encoder_2": {...}, "seed": int}`` on top of the tiny defaults of
            this module; ``architecture`` picks the UNet structure from :data:`TINY_UNETS` (``sdxl`` also
            builds ``text_encoder_2`` / ``tokenizer_2``; ``sd2`` takes its text encoder and scheduler
            prediction type from :data:`TINY_TEXT_ENCODERS` and :data:`PREDICTION_TYPES`).
        tmp_dir: Directory for the tokenizer's vocabulary files.

    Returns:
        Component name -> module, like the subfolders of a diffusers pipeline (``text_encoder_2`` and
        ``tokenizer_2`` are None unless the UNet takes SD-XL's added conditioning).
    """
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModelWithProjection

    architecture = random_init.get("architecture", "sd")
    if architecture not in TINY_UNETS:
        raise ValueError(f"random_init.architecture {architecture!r} unknown; choose one of {sorted(TINY_UNETS)}")
    vocab, merges = write_byte_level_clip_vocab(tmp_dir)
    text_cfg = _merged(TINY_TEXT_ENCODERS.get(architecture, TINY_TEXT_ENCODER), random_init.get("text_encoder"))
    unet_cfg = _merged(TINY_UNETS[architecture], random_init.get("unet"))
    xl = unet_cfg.get("addition_embed_type") == "text_time"
    text_2_cfg = _merged(TINY_TEXT_ENCODER_2, random_init.get("text_encoder_2"))
    components: dict[str, Any] = {"text_encoder_2": None, "tokenizer_2": None}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(random_init.get("seed", 0)))
        components["text_encoder"], components["tokenizer"] = _clip_text(text_cfg, vocab, merges)
        if xl:  # SD-XL: both encoders' hidden states are concatenated, the second's pooled projection is added
            components["text_encoder_2"], components["tokenizer_2"] = _clip_text(
                text_2_cfg, vocab, merges, CLIPTextModelWithProjection
            )
            unet_cfg["cross_attention_dim"] = text_cfg["hidden_size"] + text_2_cfg["hidden_size"]
            unet_cfg["projection_class_embeddings_input_dim"] = (
                text_2_cfg["projection_dim"] + 6 * unet_cfg["addition_time_embed_dim"]
            )
        else:
            unet_cfg["cross_attention_dim"] = text_cfg["hidden_size"]
        components["unet"] = UNet2DConditionModel(**unet_cfg)
        components["vae"] = AutoencoderKL(**_merged(TINY_VAE, random_init.get("vae")))
    # SD v1's training schedule: the ldm "linear" betas, i.e. diffusers' scaled_linear 0.00085..0.012.
    # (SD 2.x keeps these betas.)
    components["scheduler"] = DDPMScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        prediction_type=PREDICTION_TYPES.get(architecture, "epsilon"),
    )
    return components


def _clip_text(
    config: dict[str, Any], vocab: Path, merges: Path, model_class: type | None = None
) -> tuple[torch.nn.Module, Any]:
    """A byte-level CLIP tokenizer and a random CLIP text encoder (``CLIPTextModel`` by default)."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    tokenizer = CLIPTokenizer(str(vocab), str(merges))
    model_class = model_class or CLIPTextModel
    encoder = model_class(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            **config,
        )
    )
    return encoder, tokenizer


def build_dinov2(random_init: dict[str, Any]) -> torch.nn.Module:
    """Build a random ViT from the tiny defaults updated by ``random_init`` (and its ``seed``).

    ``model_type: vit`` builds a ``transformers.ViTModel`` (the DINOv1 / iBOT architecture, patch 16)
    instead of a ``Dinov2Model``; ``model_type: dinov2_with_registers`` a ``Dinov2WithRegistersModel``
    (4 register tokens unless ``num_register_tokens`` says otherwise); ``model_type: dinov3_vit`` a
    ``DINOv3ViTModel`` (patch 16, 4 registers, rotary position embeddings; :data:`TINY_DINOV3`).
    """
    from transformers import (
        Dinov2Config,
        Dinov2Model,
        Dinov2WithRegistersConfig,
        Dinov2WithRegistersModel,
        DINOv3ViTConfig,
        DINOv3ViTModel,
        ViTConfig,
        ViTModel,
    )

    overrides = {k: v for k, v in random_init.items() if k not in ("seed", "model_type")}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(random_init.get("seed", 0)))
        if random_init.get("model_type", "dinov2") == "vit":
            cfg = _merged(TINY_VIT, overrides)
            return ViTModel(ViTConfig(**cfg), add_pooling_layer=False)
        if random_init.get("model_type") == "dinov2_with_registers":
            cfg = _merged({**TINY_DINOV2, "num_register_tokens": 4}, overrides)
            return Dinov2WithRegistersModel(Dinov2WithRegistersConfig(**cfg))
        if random_init.get("model_type") == "dinov3_vit":
            cfg = _merged(TINY_DINOV3, overrides)
            return DINOv3ViTModel(DINOv3ViTConfig(**cfg))
        return Dinov2Model(Dinov2Config(**_merged(TINY_DINOV2, overrides)))
