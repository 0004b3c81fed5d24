"""Supplementary Table 2: where a layer's feature is taken (decoder, encoder, both, conv, self-attention)."""

from __future__ import annotations

import pytest
import torch

from lightning_modules.components import SDFeaturizer


@pytest.fixture(scope="module")
def sd128() -> SDFeaturizer:
    """Tiny SD without sliding window, so hooks see exactly the featurizer's maps."""
    return SDFeaturizer(model_id=None, random_init={"seed": 0}, image_size=128, sliding_window=False, layers=[5])


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    torch.manual_seed(0)
    return torch.rand(2, 3, 128, 128)


def test_encoder_and_decoder_are_the_two_halves_of_the_concatenated_input(sd128, images) -> None:
    both = sd128.variant(location="encoder_decoder")(images, ["cat", "dog"])[0]
    decoder = sd128(images, ["cat", "dog"])[0]
    encoder = sd128.variant(location="encoder")(images, ["cat", "dog"])[0]
    hidden = decoder.shape[1]  # 32 channels of the decoder state, then the 16 skip channels
    assert both.shape[1] == hidden + encoder.shape[1] == 48
    assert torch.equal(both[:, :hidden], decoder) and torch.equal(both[:, hidden:], encoder)
    assert not torch.allclose(encoder[:, : min(16, hidden)], decoder[:, :16])


def test_conv_and_attn_are_the_sublayers_of_the_previous_decoder_layer(sd128, images) -> None:
    block = sd128.unet.up_blocks[1]  # layer 5 = up-block 1, layer 2: its previous layer is (block 1, layer 1)
    seen: dict[str, torch.Tensor] = {}
    handles = [
        block.resnets[1].register_forward_hook(lambda m, i, o: seen.__setitem__("conv", o)),
        block.attentions[1].transformer_blocks[0].attn1.register_forward_hook(
            lambda m, i, o: seen.__setitem__("attn", o)
        ),
    ]
    try:
        conv = sd128.variant(location="conv")(images, ["cat", "dog"])[0]
        attn = sd128.variant(location="attn")(images, ["cat", "dog"])[0]
    finally:
        for handle in handles:
            handle.remove()
    assert torch.equal(conv, seen["conv"].float())
    tokens = seen["attn"]  # [B, h*w, C] -> [B, C, h, w], row-major
    assert attn.shape == (2, tokens.shape[2], 4, 4)
    assert torch.equal(attn[:, :, 1, 2], tokens[:, 1 * 4 + 2].float())
    decoder = sd128(images, ["cat", "dog"])[0]
    assert not torch.allclose(conv, decoder) and not torch.allclose(attn, decoder)


def test_location_errors(sd128) -> None:
    with pytest.raises(ValueError, match="no attention"):
        sd128.variant(location="attn", layers=[2])  # layer 1 sits in an up-block without attention
    with pytest.raises(ValueError, match="unknown location"):
        sd128.variant(location="middle")
    with pytest.raises(ValueError, match="before layer 0"):
        sd128.variant(location="conv", layers=[0])
