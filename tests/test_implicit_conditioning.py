"""SDFeaturizer with ODISE's implicit captioner (supplementary Table 5, ``conditioning: implicit``).

The captioner's outputs are computed here directly and compared with what the UNet receives (forward
pre-hooks on the UNet and on its first resnet, which gets the time embedding). As in the reference (ODISE's
``FeatureExtractorBackbone.slide_forward`` -> ``LdmImplicitCaptionerExtractor.forward``), every 512 px
window gets its own CLIP embedding, and the captioner's time term is added with and without a prompt.
"""

from __future__ import annotations

import pytest
import torch

from cubic_resize import resize_channels_last

from lightning_modules.components import ImplicitCaptioner, SDFeaturizer
from lightning_modules.components.captioner import CLIP_MEAN, CLIP_STD

SIZE = 192  # 2x2 windows of 128 px


def _captioner(**overrides) -> ImplicitCaptioner:
    # the tiny SD's prompt embedding is 77 x 32 and its time embedding 4 * 16 = 64 wide
    kwargs = {"random_init": {"seed": 1}, "text_dim": 32, "time_embed_dim": 64, **overrides}
    return ImplicitCaptioner(clip_model_id=None, **kwargs)


@pytest.fixture(scope="module")
def implicit() -> SDFeaturizer:
    return SDFeaturizer(
        model_id=None, random_init={"seed": 0}, layers=(2, 5, 8), image_size=SIZE, crop_size=128,
        conditioning="implicit", captioner=_captioner(),
    )


def _images(n: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(seed))


def _record(featurizer: SDFeaturizer, images: torch.Tensor) -> dict:
    seen: dict = {}
    unet = featurizer.unet

    def on_unet(_m, args, kwargs):
        seen.update(kwargs, timestep=args[1])

    def on_resnet(_m, args):
        seen.setdefault("temb", args[1])

    handles = [unet.register_forward_pre_hook(on_unet, with_kwargs=True),
               unet.down_blocks[0].resnets[0].register_forward_pre_hook(on_resnet)]
    try:
        featurizer(images, ["cat"] * len(images))
    finally:
        for h in handles:
            h.remove()
    return seen


def _crops(images: torch.Tensor) -> torch.Tensor:
    """The 2x2 sliding-window crops (offsets 0 and 64 of 128 px in 192 px), image-major, sliced by hand."""
    return torch.stack([images[:, :, y : y + 128, x : x + 128] for y in (0, 64) for x in (0, 64)], 1).flatten(0, 1)


def _uncond(featurizer: SDFeaturizer) -> torch.Tensor:
    ids = featurizer.tokenizer("", padding="max_length", max_length=77, return_tensors="pt").input_ids
    return featurizer.text_encoder(ids)[0][0]


def test_unet_receives_the_captioner_conditioning_and_time_embedding(implicit: SDFeaturizer) -> None:
    images = _images()
    seen = _record(implicit, images)
    # ODISE's sliding window: the captioner sees each crop the UNet sees, not the whole image
    cond, extra = implicit.captioner(_crops(images), _uncond(implicit))
    assert cond.shape[0] == 8 and not torch.allclose(cond[0], cond[1])  # 4 crops per image, each its own
    torch.testing.assert_close(seen["encoder_hidden_states"], cond)
    assert seen["added_cond_kwargs"] is None
    unet = implicit.unet
    plain = unet.time_embedding(unet.time_proj(seen["timestep"]))
    torch.testing.assert_close(seen["temb"], plain + extra)
    assert extra.abs().max() > 1e-3  # the random gates are open: the check above is not trivial


def test_each_crop_reaches_clip_preprocessed_as_odise_does(implicit: SDFeaturizer) -> None:
    images = _images()
    clip_inputs: list[torch.Tensor] = []
    clip = implicit.captioner.clip
    handle = clip.register_forward_pre_hook(lambda _m, _a, kw: clip_inputs.append(kw["pixel_values"]), with_kwargs=True)
    try:
        implicit(images, ["cat", "cat"])
    finally:
        handle.remove()
    (pixels,) = clip_inputs
    side = implicit.captioner.image_size
    expected = []
    for crop in _crops(images):  # independently: bicubic 128 -> 32 px (no antialias, no clamp), CLIP mean/std
        resized = resize_channels_last(crop.permute(1, 2, 0).numpy(), (side, side))
        expected.append(torch.from_numpy(resized).float().permute(2, 0, 1))
    mean, std = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1), torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    torch.testing.assert_close(pixels, (torch.stack(expected) - mean) / std, rtol=1e-4, atol=1e-4)


def test_prompt_mode_adds_the_captioner_time_term_as_the_reference_does(implicit: SDFeaturizer) -> None:
    """The reference's ``--TEXT_INPUT``: the prompt's states, plus the captioner's time term of each crop."""
    images = _images()
    prompted = implicit.variant(conditioning="prompt", prompt="a photo of {category}")
    seen = _record(prompted, images)
    ids = prompted.tokenizer("a photo of cat", padding="max_length", max_length=77, return_tensors="pt").input_ids
    torch.testing.assert_close(seen["encoder_hidden_states"], prompted.text_encoder(ids)[0].expand(8, -1, -1))
    _cond, extra = prompted.captioner(_crops(images), _uncond(prompted))
    unet = prompted.unet
    torch.testing.assert_close(seen["temb"], unet.time_embedding(unet.time_proj(seen["timestep"])) + extra)
    # without a captioner the same prompt gets no time term, and other features
    plain = SDFeaturizer(model_id=None, random_init={"seed": 0}, layers=(2, 5, 8), image_size=SIZE, crop_size=128)
    seen_plain = _record(plain, images)
    torch.testing.assert_close(seen_plain["encoder_hidden_states"], seen["encoder_hidden_states"])
    torch.testing.assert_close(seen_plain["temb"], unet.time_embedding(unet.time_proj(seen_plain["timestep"])))
    assert not torch.allclose(plain(images, ["cat"] * 2)[0], prompted(images, ["cat"] * 2)[0])


def test_the_time_embedding_hook_is_removed(implicit: SDFeaturizer) -> None:
    implicit(_images(1), ["cat"])
    assert not implicit.unet.time_embedding._forward_hooks


def test_implicit_features_depend_on_the_image_not_the_category(implicit: SDFeaturizer) -> None:
    images = _images(1)
    prompted = implicit.variant(conditioning="prompt")
    assert prompted.unet is implicit.unet and prompted.captioner is implicit.captioner  # shared weights
    a, b = implicit(images, ["cat"]), implicit(images, ["dog"])
    assert all(torch.equal(x, y) for x, y in zip(a, b))  # no prompt involved
    c = prompted(images, ["cat"])
    assert not torch.allclose(a[0], c[0])
    # the same crop content under another image's conditioning gives other features
    seen = _record(implicit, torch.cat([images, _images(1, seed=5)]))
    cond = seen["encoder_hidden_states"]
    assert not torch.allclose(cond[0], cond[4])


def test_implicit_without_captioner_is_an_error() -> None:
    with pytest.raises(ValueError, match="conditioning 'implicit' needs a captioner"):
        SDFeaturizer(model_id=None, random_init={}, image_size=SIZE, crop_size=128, conditioning="implicit")
    plain = SDFeaturizer(model_id=None, random_init={}, image_size=SIZE, crop_size=128)
    with pytest.raises(ValueError, match="conditioning 'implicit' needs a captioner"):
        plain.variant(conditioning="implicit")
    with pytest.raises(ValueError, match="unknown conditioning 'caption'"):
        plain.variant(conditioning="caption")


def test_captioner_of_the_wrong_shape_is_an_error() -> None:
    with pytest.raises(ValueError, match=r"captioner shapes .* do not fit this SD model"):
        SDFeaturizer(model_id=None, random_init={}, image_size=SIZE, crop_size=128,
                     captioner=_captioner(text_dim=768))
    with pytest.raises(ValueError, match=r"time_embed_dim=1280 do not fit"):
        SDFeaturizer(model_id=None, random_init={}, image_size=SIZE, crop_size=128,
                     captioner=_captioner(time_embed_dim=1280))


def test_captioner_without_time_embedding_leaves_the_time_embedding_alone() -> None:
    featurizer = SDFeaturizer(model_id=None, random_init={}, image_size=SIZE, crop_size=128, layers=(2,),
                              conditioning="implicit", captioner=_captioner(time_embed_dim=None))
    seen = _record(featurizer, _images(1))
    unet = featurizer.unet
    torch.testing.assert_close(seen["temb"], unet.time_embedding(unet.time_proj(seen["timestep"])))


def test_sdxl_rejects_the_captioner() -> None:
    with pytest.raises(ValueError, match="SD-XL is not supported"):
        SDFeaturizer(model_id=None, random_init={"architecture": "sdxl"}, image_size=64, sliding_window=False,
                     captioner=_captioner())
