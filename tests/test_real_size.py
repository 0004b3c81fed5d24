"""Real-size architectures (random weights): the paper's feature shapes at the paper's resolutions.

Slow (about a minute on a 2-core CPU): run with ``make test-slow`` or ``pytest -m slow``.
"""

from __future__ import annotations

import pytest
import torch

from lightning_modules.components import DinoFeaturizer, SDFeaturizer

# Architecture of stable-diffusion-v1-5 (unet/vae/text_encoder config.json on the hub), without weights.
SD15_ARCHITECTURE = {
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
DINOV2_BASE = {"seed": 0, "hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12, "mlp_ratio": 4,
               "patch_size": 14, "image_size": 518}


@pytest.mark.slow
def test_sd15_sized_unet_gives_the_papers_layer_shapes_at_960px() -> None:
    sd = SDFeaturizer(model_id=None, random_init=SD15_ARCHITECTURE)  # 960 px, 2x2 windows of 512 px
    feats = sd(torch.rand(1, 3, 960, 960), ["cat"])
    assert [tuple(f.shape) for f in feats] == [(1, 1280, 15, 15), (1, 1280, 30, 30), (1, 640, 60, 60)]


@pytest.mark.slow
def test_dinov2_base_sized_vit_gives_60x60_tokens_at_840px() -> None:
    dino = DinoFeaturizer(model_id=None, random_init=DINOV2_BASE)
    assert tuple(dino(torch.rand(1, 3, 840, 840)).shape) == (1, 768, 60, 60)
