"""SDFeaturizer with ODISE's implicit captioner (supplementary Table 5, ``conditioning: implicit``).

The captioner's outputs are computed here directly and compared with what the UNet receives (forward
pre-hooks on the UNet and on its first resnet, which gets the time embedding).
"""

from __future__ import annotations

import pytest
import torch

from lightning_modules.components import ImplicitCaptioner, SDFeaturizer

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


def test_unet_receives_the_captioner_conditioning_and_time_embedding(implicit: SDFeaturizer) -> None:
    images = _images()
    seen = _record(implicit, images)
    ids = implicit.tokenizer("", padding="max_length", max_length=77, return_tensors="pt").input_ids
    uncond = implicit.text_encoder(ids)[0][0]
    cond, extra = implicit.captioner(images, uncond)
    # image-major: each image's conditioning repeated for its 4 windows
    torch.testing.assert_close(seen["encoder_hidden_states"], cond.repeat_interleave(4, dim=0))
    assert seen["added_cond_kwargs"] is None
    unet = implicit.unet
    plain = unet.time_embedding(unet.time_proj(seen["timestep"]))
    torch.testing.assert_close(seen["temb"], plain + extra.repeat_interleave(4, dim=0))
    assert extra.abs().max() > 1e-3  # the random gates are open: the check above is not trivial


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
