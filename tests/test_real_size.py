"""Real-size architectures (random weights): the paper's feature shapes at the paper's resolutions.

Slow (about a minute on a 2-core CPU): run with ``make test-slow`` or ``pytest -m slow``.
"""

from __future__ import annotations

import pytest
import torch

from lightning_modules.components import DinoFeaturizer, SDFeaturizer
from lightning_modules.components.tiny_models import DINOV2_BASE_SIZED, DINOV3_BASE_SIZED, SD15_SIZED, SD21_SIZED


@pytest.mark.slow
def test_sd15_sized_unet_gives_the_papers_layer_shapes_at_960px() -> None:
    sd = SDFeaturizer(model_id=None, random_init=SD15_SIZED)  # 960 px, 2x2 windows of 512 px
    feats = sd(torch.rand(1, 3, 960, 960), ["cat"])
    assert [tuple(f.shape) for f in feats] == [(1, 1280, 15, 15), (1, 1280, 30, 30), (1, 640, 60, 60)]


@pytest.mark.slow
def test_sd21_sized_unet_at_768px_gives_the_preset_and_dift_layer_shapes() -> None:
    """configs/featurizers/sd21_768.yaml's settings (one 768 px window); layer 6 is DIFT's up-block-1 output."""
    sd = SDFeaturizer(model_id=None, random_init=SD21_SIZED, layers=(2, 5, 6, 8), image_size=768,
                      sliding_window=False)
    assert sd.unet.config.cross_attention_dim == 1024 and sd.unet.config.use_linear_projection
    feats = sd(torch.rand(1, 3, 768, 768), ["cat"])
    assert [tuple(f.shape) for f in feats] == [
        (1, 1280, 12, 12), (1, 1280, 24, 24), (1, 1280, 48, 48), (1, 640, 48, 48)
    ]


@pytest.mark.slow
def test_dinov2_base_sized_vit_gives_60x60_tokens_at_840px() -> None:
    dino = DinoFeaturizer(model_id=None, random_init=DINOV2_BASE_SIZED)
    assert tuple(dino(torch.rand(1, 3, 840, 840)).shape) == (1, 768, 60, 60)


@pytest.mark.slow
def test_dinov3_base_sized_vit_gives_60x60_tokens_at_960px() -> None:
    """configs/featurizers/dinov3_vitb16.yaml's grid: 16 px patches at 960 px, CLS and 4 registers dropped."""
    dino = DinoFeaturizer(model_id=None, random_init=DINOV3_BASE_SIZED, layer=11, image_size=960)
    assert tuple(dino(torch.rand(1, 3, 960, 960)).shape) == (1, 768, 60, 60)
