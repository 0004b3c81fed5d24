"""Instance swapping (paper 4.3, supplementary A.8 / B.2): the pixel swap and the DDIM refinement.

Expected pixels are computed here by plain indexing loops; the DDIM tests use the tiny random SD of
``tests/conftest.py`` (``tiny_sd``) at 64 px (8x8 latents), with few steps to stay fast.
"""

from __future__ import annotations

import pytest
import torch

from lightning_modules.components import SDFeaturizer
from lightning_modules.components.ddim import DDIMRefiner
from lightning_modules.components.swap import edge_alpha, swap_instance

SIZE = 64  # refiner input side: 8x8 latents


def _image(height: int, width: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (3, height, width), generator=generator, dtype=torch.uint8)


def _grid(height: int, width: int) -> torch.Tensor:
    """``[H, W, 2]`` float (x, y) of every pixel."""
    ys, xs = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    return torch.stack([xs, ys], dim=-1).float()


def _box_mask(height: int, width: int, top: int, bottom: int, left: int, right: int) -> torch.Tensor:
    mask = torch.zeros(height, width, dtype=torch.bool)
    mask[top:bottom, left:right] = True
    return mask


# ---------------------------------------------------------------- pixel swap


@pytest.mark.parametrize("blend_edges", [0, 3])
def test_swap_leaves_unmasked_pixels_unchanged(blend_edges: int) -> None:
    source, target = _image(20, 24, 0), _image(18, 26, 1)
    generator = torch.Generator().manual_seed(2)
    mask = torch.rand(18, 26, generator=generator) > 0.4
    valid = torch.rand(18, 26, generator=generator) > 0.2
    source_xy = torch.rand(18, 26, 2, generator=generator) * torch.tensor([23.0, 19.0])
    source_xy[~valid] = -1.0
    out = swap_instance(source, target, mask, source_xy, valid, blend_edges=blend_edges)
    region = mask & valid
    assert out.dtype == torch.uint8 and out.shape == target.shape
    assert torch.equal(out[:, ~region], target[:, ~region])  # bit for bit
    if blend_edges == 0:  # and the swapped pixels are the source's
        xy = source_xy.round().long()
        for y, x in region.nonzero().tolist():
            assert torch.equal(out[:, y, x], source[:, xy[y, x, 1], xy[y, x, 0]])
    assert not torch.equal(out, target)


@pytest.mark.parametrize("blend_edges", [0, 2])
def test_swap_identity_correspondence_reproduces_the_image(blend_edges: int) -> None:
    image = _image(15, 22, 3)  # not square: an x/y mix-up would scramble or fail
    everywhere = torch.ones(15, 22, dtype=torch.bool)
    same = swap_instance(image, image, everywhere, _grid(15, 22), everywhere, blend_edges=blend_edges)
    assert torch.equal(same, image)
    # onto a blank target the identity map copies the whole image
    blank = torch.zeros_like(image)
    assert torch.equal(swap_instance(image, blank, everywhere, _grid(15, 22), everywhere), image)


def test_swap_known_shift_copies_shifted_pixels() -> None:
    source, target = _image(16, 20, 4), _image(16, 20, 5)
    dx, dy = 3.3, -2.4  # rounds to (3, -2)
    source_xy = _grid(16, 20) + torch.tensor([dx, dy])
    valid = (source_xy[..., 0] <= 19.4) & (source_xy[..., 1] >= -0.4)
    mask = _box_mask(16, 20, 2, 14, 1, 18)
    out = swap_instance(source, target, mask, source_xy, valid)
    for y in range(16):
        for x in range(20):
            inside = bool(mask[y, x] and valid[y, x])
            expected = source[:, y - 2, x + 3] if inside else target[:, y, x]
            assert torch.equal(out[:, y, x], expected), (y, x)


def test_swap_clamps_out_of_range_and_skips_non_finite_correspondences() -> None:
    source, target = _image(8, 8, 6), _image(8, 8, 7)
    everywhere = torch.ones(8, 8, dtype=torch.bool)
    source_xy = torch.full((8, 8, 2), 100.0)
    source_xy[0, 0] = float("nan")
    out = swap_instance(source, target, everywhere, source_xy, everywhere)
    assert torch.equal(out[:, 0, 0], target[:, 0, 0])
    assert torch.equal(out[:, 1:, 1:], source[:, 7:8, 7:8].expand(3, 7, 7))


def test_swap_feathers_the_region_edge() -> None:
    source = torch.full((3, 12, 12), 240, dtype=torch.uint8)
    target = torch.full((3, 12, 12), 0, dtype=torch.uint8)
    mask = _box_mask(12, 12, 2, 10, 2, 10)
    everywhere = torch.ones(12, 12, dtype=torch.bool)
    out = swap_instance(source, target, mask, _grid(12, 12), everywhere, blend_edges=2)
    assert out[0, 2, 5] == 80  # on the edge: 1/3 of the source
    assert out[0, 3, 5] == 160  # one pixel in: 2/3
    assert out[0, 5, 5] == 240  # two pixels in: the source
    assert out[0, 1, 5] == 0 and out[0, 11, 11] == 0
    hard = swap_instance(source, target, mask, _grid(12, 12), everywhere)
    assert torch.equal(hard[:, mask], source[:, mask])
    assert torch.allclose(edge_alpha(mask, 0), mask.float())


def test_swap_rejects_wrong_inputs() -> None:
    image, everywhere = _image(8, 8, 0), torch.ones(8, 8, dtype=torch.bool)
    with pytest.raises(ValueError, match="uint8"):
        swap_instance(image.float(), image, everywhere, _grid(8, 8), everywhere)
    with pytest.raises(ValueError, match="source_xy"):
        swap_instance(image, image, everywhere, _grid(8, 7), everywhere)


# ---------------------------------------------------------------- DDIM refinement


def _refiner(featurizer: SDFeaturizer, **kwargs) -> DDIMRefiner:
    return DDIMRefiner.from_featurizer(featurizer, image_size=SIZE, **kwargs)


def _relative_error(estimate: torch.Tensor, reference: torch.Tensor) -> float:
    return ((estimate - reference).flatten(1).norm(dim=1) / reference.flatten(1).norm(dim=1)).max().item()


def test_ddim_inversion_then_sampling_reconstructs_the_latent(tiny_sd: SDFeaturizer) -> None:
    """Invert half the schedule, sample back without an edit: the latent comes back.

    Measured max relative L2 error over 2 latents (tiny random UNet, guidance 1, strength 0.5): 0.059 at
    4 steps, 0.043 at 10, 0.021 at 25, 0.013 at 50 (first order in the step size). Tolerance 0.1. At
    strength 1 the random UNet's inversion drifts (0.4-0.9): not tested. Unit-variance latents, as SD's
    scaled latents are (the tiny random VAE's are ~0.04), so the error is relative to a realistic norm.
    """
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    errors = []
    for steps in (4, 10):
        refiner = _refiner(tiny_sd, num_inference_steps=steps, strength=0.5, guidance_scale=1.0)
        embeds = refiner.embed_prompts(["cat", "dog"])
        noisy, trajectory = refiner.invert(latents, embeds)
        assert len(trajectory) == steps // 2 + 1 and torch.equal(trajectory[0], latents)
        assert trajectory[-1] is noisy
        assert _relative_error(noisy, latents) > 0.2  # inversion really noised the latent
        errors.append(_relative_error(refiner.sample(noisy, embeds, start_step=steps - steps // 2), latents))
    assert max(errors) < 0.1, f"reconstruction errors {errors} at 4 and 10 steps (measured 0.059, 0.043)"
    assert errors[1] < errors[0]  # more steps, smaller error


def test_ddim_guidance_uses_the_empty_prompt_as_unconditional(tiny_sd: SDFeaturizer) -> None:
    refiner = _refiner(tiny_sd, guidance_scale=3.0)
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    embeds = refiner.embed_prompts(["cat"])
    t = torch.tensor(500)
    with torch.no_grad():
        cond = tiny_sd.unet(latents, t, encoder_hidden_states=embeds).sample
        empty = tiny_sd._text_embedding("", latents.device)[0][None]
        uncond = tiny_sd.unet(latents, t, encoder_hidden_states=empty).sample
        guided = refiner._predict_noise(latents, t, embeds)
    assert torch.allclose(guided, uncond + 3.0 * (cond - uncond), atol=1e-4)
    assert torch.allclose(_refiner(tiny_sd)._predict_noise(latents, t, embeds), cond, atol=1e-5)


def test_refine_returns_uint8_images_of_the_input_size(tiny_sd: SDFeaturizer) -> None:
    refiner = _refiner(tiny_sd, num_inference_steps=4, strength=0.5)
    images = torch.stack([_image(48, 40, 8), _image(48, 40, 9)])
    refined = refiner.refine(images, ["cat", "dog"])
    assert refined.dtype == torch.uint8 and refined.shape == images.shape
    # the round trip alone (strength 0) differs: the UNet steps changed the image
    assert not torch.equal(refined, _refiner(tiny_sd, strength=0.0).refine(images, ["cat", "dog"]))


def test_refine_at_strength_zero_is_the_vae_round_trip(tiny_sd: SDFeaturizer) -> None:
    refiner = _refiner(tiny_sd, num_inference_steps=4, strength=0.0)
    images = torch.stack([_image(SIZE, SIZE, 10)])
    calls = []
    handle = tiny_sd.unet.register_forward_hook(lambda *_: calls.append(1))
    try:
        refined = refiner.refine(images, ["cat"])
    finally:
        handle.remove()
    assert not calls
    assert torch.equal(refined, refiner.decode(refiner.encode(images)))


def test_refiner_rejects_sdxl_and_bad_settings(tiny_sd: SDFeaturizer) -> None:
    xl = SDFeaturizer(
        model_id=None, random_init={"seed": 0, "architecture": "sdxl"}, layers=(2,), image_size=SIZE,
        sliding_window=False,
    )
    with pytest.raises(ValueError, match="SD-XL"):
        DDIMRefiner.from_featurizer(xl)
    with pytest.raises(ValueError, match="strength"):
        _refiner(tiny_sd, strength=1.5)
    with pytest.raises(ValueError, match="image_size"):
        DDIMRefiner.from_featurizer(tiny_sd, image_size=100)
