"""SD families beyond SD 1.x/2.x (supplementary Table 6): SD-XL and the distilled BK-SDM-small/tiny UNets.

Tiny random stand-ins with the real structures (``tiny_models.TINY_UNETS``). Expected values are computed
independently: the UNet's inputs are recorded by a forward pre-hook and compared with text-encoder
outputs computed here, and module outputs are recorded by plain forward hooks.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lightning_modules.components import SDFeaturizer, decoder_layer_source
from lightning_modules.components.sd_featurizer import _hidden_channels

SIZE = 64  # one window: latent 8x8


def _featurizer(architecture: str, layers, seed: int = 0, **kwargs) -> SDFeaturizer:
    return SDFeaturizer(
        model_id=None, random_init={"architecture": architecture, "seed": seed}, layers=layers,
        image_size=SIZE, sliding_window=False, **kwargs,
    )


def _images(n: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def xl() -> SDFeaturizer:
    return _featurizer("sdxl", (2, 5, 8))


def _unet_kwargs(featurizer: SDFeaturizer, images: torch.Tensor, categories: list[str]) -> dict:
    seen: dict = {}

    def record(_module, args, kwargs):
        seen.update(kwargs, sample=args[0])

    handle = featurizer.unet.register_forward_pre_hook(record, with_kwargs=True)
    try:
        featurizer(images, categories)
    finally:
        handle.remove()
    return seen


def _ids(tokenizer, encoder, prompt: str) -> torch.Tensor:
    length = min(tokenizer.model_max_length, encoder.config.max_position_embeddings)
    return tokenizer(prompt, padding="max_length", max_length=length, truncation=True, return_tensors="pt").input_ids


# ------------------------------------------------------------------------------------------------ SD-XL


def test_xl_structure_and_layer_shapes(xl: SDFeaturizer) -> None:
    assert xl.is_xl and xl.num_decoder_layers == 9 and xl.text_encoder_2 is not None
    feats = xl(_images(), ["cat", "dog"])
    # latent 8 -> down to 4 -> 2: layer 2 at 2x2 (32 ch), layer 5 at 4x4 (32 ch), layer 8 at 8x8 (16 ch)
    assert [tuple(f.shape) for f in feats] == [(2, 32, 2, 2), (2, 32, 4, 4), (2, 16, 8, 8)]
    with pytest.raises(ValueError, match="decoder layer 9 out of range: this UNet has 9 decoder layers"):
        xl.variant(layers=[9])


def test_xl_is_conditioned_like_the_sdxl_pipeline(xl: SDFeaturizer) -> None:
    """Penultimate hidden states of both encoders concatenated; encoder 2's pooled projection; size ids."""
    seen = _unet_kwargs(xl, _images(), ["cat", "dog"])
    expected_hidden, expected_pooled = [], []
    for category in ("cat", "dog"):
        prompt = f"a photo of {category}"
        one = xl.text_encoder(_ids(xl.tokenizer, xl.text_encoder, prompt), output_hidden_states=True)
        two = xl.text_encoder_2(_ids(xl.tokenizer_2, xl.text_encoder_2, prompt), output_hidden_states=True)
        expected_hidden.append(torch.cat([one.hidden_states[-2][0], two.hidden_states[-2][0]], dim=-1))
        expected_pooled.append(two.text_embeds[0])
    hidden = seen["encoder_hidden_states"]
    assert hidden.shape == (2, 77, 32 + 48)
    torch.testing.assert_close(hidden, torch.stack(expected_hidden))
    added = seen["added_cond_kwargs"]
    torch.testing.assert_close(added["text_embeds"], torch.stack(expected_pooled))
    assert added["time_ids"].tolist() == [[SIZE, SIZE, 0, 0, SIZE, SIZE]] * 2


def test_xl_size_ids_are_those_of_the_crop() -> None:
    windowed = SDFeaturizer(
        model_id=None, random_init={"architecture": "sdxl"}, layers=(2,), image_size=96, crop_size=64
    )
    seen = _unet_kwargs(windowed, torch.rand(1, 3, 96, 96), ["cat"])
    assert seen["added_cond_kwargs"]["time_ids"].tolist() == [[64, 64, 0, 0, 64, 64]] * 4  # 4 windows


def test_xl_pooled_embedding_changes_the_features(xl: SDFeaturizer, monkeypatch: pytest.MonkeyPatch) -> None:
    images = _images(1)
    base = xl(images, ["cat"])
    xl._prompt_cache.clear()
    hidden, pooled = xl._text_embedding("a photo of cat", images.device)
    monkeypatch.setitem(xl._prompt_cache, "a photo of cat", (hidden, pooled + 1.0))
    changed = xl(images, ["cat"])
    assert not torch.allclose(base[0], changed[0])


def test_xl_round_trips_through_a_local_directory(xl: SDFeaturizer, tmp_path: Path) -> None:
    xl.save_pretrained(tmp_path / "sdxl")
    assert (tmp_path / "sdxl" / "text_encoder_2").is_dir() and (tmp_path / "sdxl" / "tokenizer_2").is_dir()
    loaded = SDFeaturizer(model_id=str(tmp_path / "sdxl"), layers=(2, 5, 8), image_size=SIZE, sliding_window=False)
    assert loaded.is_xl
    images = _images()
    for a, b in zip(xl(images, ["cat", "dog"]), loaded(images, ["cat", "dog"])):
        torch.testing.assert_close(a, b)


# --------------------------------------------------------------------------------------- BK-SDM (distilled)


@pytest.mark.parametrize(("architecture", "layers", "shapes"), [
    ("bk-sdm-small", 8, [(1, 32, 1, 1), (1, 32, 2, 2), (1, 16, 4, 4)]),
    ("bk-sdm-tiny", 6, [(1, 32, 2, 2), (1, 16, 4, 4), (1, 16, 8, 8)]),
])
def test_distilled_unets_number_two_layers_per_up_block(architecture, layers, shapes) -> None:
    featurizer = _featurizer(architecture, (1, 3, 5))
    assert featurizer.unet.mid_block is None and featurizer.num_decoder_layers == layers
    assert [len(block.resnets) for block in featurizer.unet.up_blocks] == [2] * (layers // 2)
    assert [tuple(f.shape) for f in featurizer(_images(1), ["cat"])] == shapes


@pytest.mark.parametrize("architecture", ["bk-sdm-small", "bk-sdm-tiny"])
def test_layer_zero_without_mid_block_is_the_last_down_block_output(architecture: str) -> None:
    featurizer = _featurizer(architecture, (0, 1))  # layer 1 makes the first decoder layer run
    unet = featurizer.unet
    assert decoder_layer_source(unet, 0) is unet.down_blocks[-1]
    entering: list[torch.Tensor] = []
    handle = unet.up_blocks[0].resnets[0].register_forward_pre_hook(lambda _m, args: entering.append(args[0]))
    try:
        feature, _ = featurizer(_images(1), ["cat"])
    finally:
        handle.remove()
    hidden = _hidden_channels(unet, 0)
    # the first decoder resnet receives cat(hidden state, skip): its first channels are our feature
    torch.testing.assert_close(feature, entering[0][:, :hidden].float())
    assert hidden == unet.down_blocks[-1].resnets[-1].out_channels


def test_distilled_round_trips_through_a_local_directory(tmp_path: Path) -> None:
    small = _featurizer("bk-sdm-small", (1, 3, 5), seed=3)
    small.save_pretrained(tmp_path / "small")
    loaded = SDFeaturizer(model_id=str(tmp_path / "small"), layers=(1, 3, 5), image_size=SIZE, sliding_window=False)
    assert loaded.unet.mid_block is None and not loaded.is_xl and loaded.text_encoder_2 is None
    for a, b in zip(small(_images(1), ["cat"]), loaded(_images(1), ["cat"])):
        torch.testing.assert_close(a, b)


def test_unknown_architecture_is_an_error() -> None:
    with pytest.raises(ValueError, match="random_init.architecture 'sd3' unknown"):
        _featurizer("sd3", (1,))


# ----------------------------------------------------------------------------------- SD 2-1 (768 px preset)


def test_sd2_structure_text_encoder_and_v_prediction_scheduler() -> None:
    sd2 = _featurizer("sd2", (2, 5, 8))
    unet = sd2.unet
    assert unet.config.use_linear_projection and unet.config.upcast_attention
    transformer = unet.up_blocks[1].attentions[0]
    assert isinstance(transformer.proj_in, torch.nn.Linear)  # SD 1.x uses 1x1 convolutions here
    assert sd2.text_encoder.config.hidden_size == 48 == unet.config.cross_attention_dim
    assert sd2.text_encoder.config.hidden_act == "gelu"
    assert sd2.scheduler.config.prediction_type == "v_prediction"
    # conditioned on the text encoder's last hidden state, as diffusers' SD 2 pipeline does
    seen = _unet_kwargs(sd2, _images(1), ["cat"])
    ids = _ids(sd2.tokenizer, sd2.text_encoder, "a photo of cat")
    torch.testing.assert_close(seen["encoder_hidden_states"][0], sd2.text_encoder(ids).last_hidden_state[0])


def test_sd21_768_preset_loads_a_local_directory_at_768_px(tmp_path: Path) -> None:
    """configs/featurizers/sd21_768.yaml with its hub id swapped for a saved tiny SD 2 stand-in."""
    from omegaconf import OmegaConf

    preset = OmegaConf.to_container(OmegaConf.load(Path(__file__).resolve().parents[1] / "configs" / "featurizers"
                                                   / "sd21_768.yaml"))
    args = preset["init_args"]
    assert args["model_id"] == "stabilityai/stable-diffusion-2-1"
    assert (args["image_size"], args["sliding_window"], args["layers"], args["timestep"]) == (768, False, [2, 5, 8], 100)
    built = SDFeaturizer(**{**args, "model_id": None, "random_init": {"architecture": "sd2", "seed": 6}})
    built.save_pretrained(tmp_path / "sd21")
    loaded = SDFeaturizer(**{**args, "model_id": str(tmp_path / "sd21")})
    assert loaded.scheduler.config.prediction_type == "v_prediction" and loaded.unet.config.use_linear_projection
    images = torch.rand(1, 3, 768, 768, generator=torch.Generator().manual_seed(0))
    features = loaded(images, ["cat"])
    # one 768 px window: latent 96 x 96, so layers 2 / 5 / 8 at 12 / 24 / 48 cells (real SD 2-1: 1280 / 1280 / 640 ch)
    assert [tuple(f.shape) for f in features] == [(1, 32, 12, 12), (1, 32, 24, 24), (1, 16, 48, 48)]
    for a, b in zip(built(images, ["cat"]), features):
        torch.testing.assert_close(a, b)
