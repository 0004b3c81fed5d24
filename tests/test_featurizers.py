"""Tests for the SD and DINOv2 featurizers (sd_featurizer, dino_featurizer, hooks, hub).

All models are tiny and random (``tests/conftest.py``); nothing touches the network. Expected values are
computed independently of the code under test: with forward PRE-hooks that record what a module receives,
with the raw ``Dinov2Model`` outputs, or by averaging crop features by hand.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from torch import nn

from lightning_modules.components import DinoFeaturizer, SDFeaturizer, decoder_layer_source
from lightning_modules.components.dino_featurizer import IMAGENET_MEAN, IMAGENET_STD
from lightning_modules.components.hooks import first_tensor, run_and_capture
from lightning_modules.components.hub import ModelLoadError, check_tokenizer, load_pretrained

SD_LAYERS_128 = (0, 2, 8, 9, 11)  # layer 11 forces the decoder through up_blocks[3]


# --------------------------------------------------------------------------------------------- helpers


def _images(n: int, size: int, seed: int) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


@contextmanager
def _pre_hook(module: nn.Module, record: Callable[[tuple], None]) -> Iterator[None]:
    handle = module.register_forward_pre_hook(lambda _m, inputs: record(inputs))
    try:
        yield
    finally:
        handle.remove()


@contextmanager
def _count_calls(module: nn.Module, counter: list[int]) -> Iterator[None]:
    """Count the times ``module`` STARTS its forward (a pre-hook fires even if the pass is aborted inside)."""
    with _pre_hook(module, lambda _inputs: counter.append(1)):
        yield


def _assert_differs(a: torch.Tensor, b: torch.Tensor, min_diff: float = 1e-4) -> None:
    assert a.shape == b.shape
    assert (a - b).abs().max().item() > min_diff


# --------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def sd128() -> SDFeaturizer:
    """Same weights as ``tiny_sd`` (same random_init seed), one 128 px window, layers up to 11."""
    return SDFeaturizer(
        model_id=None, random_init={"seed": 0}, image_size=128, sliding_window=False, layers=SD_LAYERS_128
    )


@pytest.fixture(scope="module")
def saved_sd(tiny_sd: SDFeaturizer, tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("sd_pipeline")
    tiny_sd.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def img192() -> torch.Tensor:
    return _images(2, 192, seed=1)


@pytest.fixture(scope="module")
def base192(tiny_sd: SDFeaturizer, img192: torch.Tensor) -> list[torch.Tensor]:
    """``tiny_sd`` features of ``img192`` with categories cat, dog (seed 42, timestep 100)."""
    return tiny_sd(img192, ["cat", "dog"])


def test_sd128_has_the_weights_of_tiny_sd(tiny_sd: SDFeaturizer, sd128: SDFeaturizer) -> None:
    # Several tests compare the two featurizers: they only prove something if the weights are shared.
    for name in ("unet", "vae", "text_encoder"):
        a, b = getattr(tiny_sd, name).state_dict(), getattr(sd128, name).state_dict()
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a)
    assert tiny_sd.seed == sd128.seed


# --------------------------------------------------------------------------------------------- 1. shapes


def test_sd_layer_shapes(base192: list[torch.Tensor]) -> None:
    feats = base192
    assert isinstance(feats, list)
    assert [tuple(f.shape) for f in feats] == [(2, 32, 3, 3), (2, 32, 6, 6), (2, 16, 12, 12)]
    assert all(f.dtype == torch.float32 and torch.isfinite(f).all() for f in feats)


def test_sd_layers_returned_in_requested_order(sd128: SDFeaturizer) -> None:
    feats = sd128(_images(1, 128, seed=2), ["cat"])
    assert [tuple(f.shape) for f in feats] == [
        (1, 32, 2, 2),  # 0: mid-block output
        (1, 32, 2, 2),  # 2
        (1, 16, 8, 8),  # 8
        (1, 16, 16, 16),  # 9: up_blocks[2] output, upsampled
        (1, 16, 16, 16),  # 11
    ]


def test_sd_rejects_wrong_image_size(tiny_sd: SDFeaturizer) -> None:
    with pytest.raises(ValueError, match="192"):
        tiny_sd(torch.rand(1, 3, 128, 128), ["cat"])


# --------------------------------------------------------------------------------------------- 2. location


def test_decoder_layer_source_modules(tiny_sd: SDFeaturizer) -> None:
    unet = tiny_sd.unet
    assert [len(b.resnets) for b in unet.up_blocks] == [3, 3, 3, 3]
    assert not hasattr(unet.up_blocks[0], "attentions")  # UpBlock2D
    assert decoder_layer_source(unet, 0) is unet.mid_block
    assert decoder_layer_source(unet, 1) is unet.up_blocks[0].resnets[0]
    assert decoder_layer_source(unet, 2) is unet.up_blocks[0].resnets[1]
    assert decoder_layer_source(unet, 3) is unet.up_blocks[0]
    assert decoder_layer_source(unet, 4) is unet.up_blocks[1].attentions[0]
    assert decoder_layer_source(unet, 5) is unet.up_blocks[1].attentions[1]
    assert decoder_layer_source(unet, 8) is unet.up_blocks[2].attentions[1]
    assert decoder_layer_source(unet, 9) is unet.up_blocks[2]
    assert decoder_layer_source(unet, 11) is unet.up_blocks[3].attentions[1]
    for bad in (-1, 12, 100):
        with pytest.raises(ValueError, match="out of range"):
            decoder_layer_source(unet, bad)


def test_out_of_range_layer_rejected_at_construction() -> None:
    with pytest.raises(ValueError, match="out of range"):
        SDFeaturizer(model_id=None, random_init={"seed": 0}, image_size=128, sliding_window=False, layers=(12,))


def test_sd_features_are_the_hidden_state_entering_the_layer_before_skip_concat(sd128: SDFeaturizer) -> None:
    """Layer i == first C channels of the input of decoder layer i's resnet (input = cat([h, skip]))."""
    unet = sd128.unet
    # The resnet that IS decoder layer i (the one that receives the concatenated input).
    entering = {
        0: unet.up_blocks[0].resnets[0],
        2: unet.up_blocks[0].resnets[2],
        8: unet.up_blocks[2].resnets[2],
        9: unet.up_blocks[3].resnets[0],
    }
    recorded: dict[int, torch.Tensor] = {}

    def recorder(layer: int) -> Callable[[tuple], None]:
        def record(inputs: tuple) -> None:
            recorded[layer] = inputs[0].detach().clone()

        return record

    images = _images(2, 128, seed=3)
    with (
        _pre_hook(entering[0], recorder(0)),
        _pre_hook(entering[2], recorder(2)),
        _pre_hook(entering[8], recorder(8)),
        _pre_hook(entering[9], recorder(9)),
    ):
        feats = dict(zip(SD_LAYERS_128, sd128(images, ["cat", "dog"])))

    assert sorted(recorded) == [0, 2, 8, 9]  # layer 11 forced the pass through all of them
    for layer, inp in recorded.items():
        f = feats[layer]
        channels = f.shape[1]
        assert inp.shape[0] == 2 and inp.shape[-2:] == f.shape[-2:]
        assert inp.shape[1] > channels, "the resnet input must be the skip-concatenated tensor"
        torch.testing.assert_close(f, inp[:, :channels].float(), rtol=0, atol=0)
        # ... and not the skip half
        _assert_differs(f, inp[:, -channels:].float())


# --------------------------------------------------------------------------------------------- 3. early stop


def test_sd_stops_after_last_requested_layer(tiny_sd: SDFeaturizer, sd128: SDFeaturizer) -> None:
    x192, x128 = _images(1, 192, seed=4), _images(1, 128, seed=4)

    last_block, after_8, attn_8 = [], [], []
    with (
        _count_calls(tiny_sd.unet.up_blocks[3], last_block),
        _count_calls(tiny_sd.unet.up_blocks[2].resnets[2], after_8),
        _count_calls(tiny_sd.unet.up_blocks[2].attentions[1], attn_8),
    ):
        tiny_sd(x192, ["cat"])  # layers (2, 5, 8)
    assert len(attn_8) == 1  # the source of layer 8 ran (once, on all 4 crops at once) ...
    assert len(after_8) == 0  # ... and nothing after it
    assert len(last_block) == 0

    last_block, after_11, conv_out = [], [], []
    with (
        _count_calls(sd128.unet.up_blocks[3], last_block),
        _count_calls(sd128.unet.up_blocks[3].resnets[2], after_11),
        _count_calls(sd128.unet.conv_out, conv_out),
    ):
        sd128(x128, ["cat"])  # up to layer 11
    assert len(last_block) == 1
    assert len(after_11) == 0 and len(conv_out) == 0


# --------------------------------------------------------------------------------------------- hooks


def test_run_and_capture_stops_early_and_cleans_up() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2), nn.Linear(2, 2))
    x = torch.randn(5, 3)
    ran_last: list[int] = []
    with _count_calls(net[3], ran_last):
        got = run_and_capture(lambda: net(x), {"a": net[0], "c": net[2]})
        assert len(ran_last) == 0
        full = run_and_capture(lambda: net(x), {"a": net[0], "c": net[2]}, stop_early=False)
        assert len(ran_last) == 1
    expected_a = net[0](x)
    torch.testing.assert_close(got["a"], expected_a)
    torch.testing.assert_close(got["c"], net[2](net[1](expected_a)))
    torch.testing.assert_close(full["c"], got["c"])
    assert all(not m._forward_hooks for m in net)


def test_run_and_capture_reports_modules_that_never_ran() -> None:
    net = nn.Sequential(nn.Linear(3, 3))
    unused = nn.Linear(3, 3)
    with pytest.raises(RuntimeError, match="unused"):
        run_and_capture(lambda: net(torch.randn(1, 3)), {"used": net[0], "unused": unused})
    assert not net[0]._forward_hooks and not unused._forward_hooks


def test_first_tensor() -> None:
    t = torch.ones(2)

    class Out:
        sample = t

    assert first_tensor(t) is t
    assert first_tensor((t, torch.zeros(1))) is t
    assert first_tensor([(t,)]) is t
    assert first_tensor(Out()) is t
    with pytest.raises(TypeError):
        first_tensor(3)


# --------------------------------------------------------------------------------------------- 4. windows


def test_sliding_window_with_crop_equal_to_image_is_a_single_pass(
    sd128: SDFeaturizer, monkeypatch: pytest.MonkeyPatch
) -> None:
    images = _images(2, 128, seed=5)
    plain = sd128(images, ["cat", "dog"])
    batch_sizes: list[int] = []
    monkeypatch.setattr(sd128, "sliding_window", True)
    monkeypatch.setattr(sd128, "crop_size", 128)
    with _pre_hook(sd128.unet, lambda inputs: batch_sizes.append(inputs[0].shape[0])):
        windowed = sd128(images, ["cat", "dog"])
    assert batch_sizes == [2]  # one window per image, not 4 copies
    for a, b in zip(plain, windowed):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def _stitch_by_hand(crop_feats: dict[tuple[int, int], torch.Tensor], cell_offset: int, full: int) -> torch.Tensor:
    """Average of the crops covering each cell, one cell at a time."""
    some = next(iter(crop_feats.values()))
    res = some.shape[-1]
    out = torch.zeros(some.shape[0], some.shape[1], full, full)
    for r in range(full):
        for c in range(full):
            covering = [
                f[:, :, r - oy * cell_offset, c - ox * cell_offset]
                for (oy, ox), f in crop_feats.items()
                if 0 <= r - oy * cell_offset < res and 0 <= c - ox * cell_offset < res
            ]
            out[:, :, r, c] = torch.stack(covering).mean(0)
    return out


def test_sliding_window_stitches_crop_features(
    base192: list[torch.Tensor], sd128: SDFeaturizer, img192: torch.Tensor
) -> None:
    full2, _full5, full8 = base192

    # Each of the 4 crops (offsets 0 and 64 px) run on its own, by a non-window 128 px featurizer.
    grid = [(0, 0), (0, 1), (1, 0), (1, 1)]
    crops = torch.cat([img192[:, :, 64 * oy : 64 * oy + 128, 64 * ox : 64 * ox + 128] for oy, ox in grid])
    feats = dict(zip(SD_LAYERS_128, sd128(crops, ["cat", "dog"] * 4)))
    crop8 = {g: feats[8][2 * k : 2 * k + 2] for k, g in enumerate(grid)}
    crop2 = {g: feats[2][2 * k : 2 * k + 2] for k, g in enumerate(grid)}
    tol = {"rtol": 1e-4, "atol": 1e-5}

    # Layer 8: 8x8 per crop, 16 px per cell, offset 64 px = 4 cells, 12x12 in all.
    # Top-left 4x4 block is covered by the top-left crop only.
    torch.testing.assert_close(full8[:, :, :4, :4], crop8[0, 0][:, :, :4, :4], **tol)
    # Bottom-right 4x4 block by the bottom-right crop only.
    torch.testing.assert_close(full8[:, :, 8:, 8:], crop8[1, 1][:, :, 4:, 4:], **tol)
    # Centre cell (5, 6) is covered by all four crops.
    centre = (crop8[0, 0][:, :, 5, 6] + crop8[0, 1][:, :, 5, 2] + crop8[1, 0][:, :, 1, 6] + crop8[1, 1][:, :, 1, 2]) / 4
    torch.testing.assert_close(full8[:, :, 5, 6], centre, **tol)
    # Cell (1, 6): top edge, covered by the two top crops.
    torch.testing.assert_close(full8[:, :, 1, 6], (crop8[0, 0][:, :, 1, 6] + crop8[0, 1][:, :, 1, 2]) / 2, **tol)
    # The whole map.
    torch.testing.assert_close(full8, _stitch_by_hand(crop8, 4, 12), **tol)
    # The overlap really mixes different crop features (the test above would be vacuous otherwise).
    _assert_differs(crop8[0, 0][:, :, 5, 6], crop8[1, 1][:, :, 1, 2])

    # Layer 2: 2x2 per crop, 64 px per cell, offset 1 cell, 3x3 in all.
    torch.testing.assert_close(full2[:, :, 0, 0], crop2[0, 0][:, :, 0, 0], **tol)
    torch.testing.assert_close(full2, _stitch_by_hand(crop2, 1, 3), **tol)


def test_sliding_window_offsets_must_fall_on_the_feature_grid(
    tiny_sd: SDFeaturizer, monkeypatch: pytest.MonkeyPatch
) -> None:
    # 160 px with 128 px crops: offset 32 px. Layer 2 has 64 px cells -> not on the grid.
    monkeypatch.setattr(tiny_sd, "image_size", 160)
    with pytest.raises(ValueError, match="feature grid"):
        tiny_sd(_images(1, 160, seed=6), ["cat"])


def test_sliding_window_offset_on_a_fine_grid_is_accepted() -> None:
    # Same offset of 32 px, but layer 8 has 16 px cells: 2 cells, a 10x10 map.
    featurizer = SDFeaturizer(model_id=None, random_init={"seed": 0}, image_size=160, crop_size=128, layers=(8,))
    (feats,) = featurizer(_images(1, 160, seed=6), ["cat"])
    assert tuple(feats.shape) == (1, 16, 10, 10)


def test_crop_larger_than_image_rejected() -> None:
    with pytest.raises(ValueError, match="crop_size"):
        SDFeaturizer(model_id=None, random_init={"seed": 0}, image_size=128, crop_size=256)


# --------------------------------------------------------------------------------------------- 5. noise


def test_same_input_gives_same_features(
    tiny_sd: SDFeaturizer, img192: torch.Tensor, base192: list[torch.Tensor]
) -> None:
    again = tiny_sd(img192, ["cat", "dog"])
    for a, b in zip(again, base192):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_noise_seed_and_timestep(
    tiny_sd: SDFeaturizer, img192: torch.Tensor, base192: list[torch.Tensor], monkeypatch: pytest.MonkeyPatch
) -> None:
    x = img192[:1]
    assert tiny_sd.timestep == 100 and tiny_sd.seed == 42
    seed42 = [f[:1] for f in base192]
    monkeypatch.setattr(tiny_sd, "seed", 7)
    seed7 = tiny_sd(x, ["cat"])
    for a, b in zip(seed42, seed7):
        _assert_differs(a, b)

    monkeypatch.setattr(tiny_sd, "timestep", -1)  # ODISE's t < 0: the clean latent
    clean7 = tiny_sd(x, ["cat"])
    monkeypatch.setattr(tiny_sd, "seed", 42)
    clean42 = tiny_sd(x, ["cat"])
    for a, b, noisy in zip(clean7, clean42, seed42):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
        _assert_differs(a, noisy)  # timestep -1 really is a different (noise-free) input
    monkeypatch.setattr(tiny_sd, "timestep", 0)  # the reference adds the noise at t = 0 too
    zero42 = tiny_sd(x, ["cat"])
    monkeypatch.setattr(tiny_sd, "seed", 7)
    for a, b, clean in zip(zero42, tiny_sd(x, ["cat"]), clean42):
        _assert_differs(a, b)
        _assert_differs(a, clean)


def _ldm_alphas_cumprod() -> torch.Tensor:
    """ODISE's "ldm_linear" schedule (``create_gaussian_diffusion(noise_schedule="ldm_linear")``): betas
    ``linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000) ** 2`` in float64, and their cumulative alphas."""
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    return torch.cumprod(1 - betas, dim=0)


@pytest.mark.parametrize("timestep", [-1, 0, 100])
def test_the_unet_input_follows_odise_q_sample(tiny_sd: SDFeaturizer, img192: torch.Tensor, timestep: int,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """ODISE's ``LdmExtractor.forward``: ``t < 0`` feeds the clean latent with ``t = 0``; any ``t >= 0`` feeds
    ``q_sample(x, t, noise) = sqrt(a_t) x + sqrt(1 - a_t) noise`` with the shared noise (an independent
    transcription of the rule, with the schedule computed here)."""
    seen: dict[str, torch.Tensor] = {}

    def on_unet(module, args, kwargs):
        seen["sample"], seen["t"] = args[0].detach().clone(), args[1].detach().clone()

    monkeypatch.setattr(tiny_sd, "timestep", timestep)
    handle = tiny_sd.unet.register_forward_pre_hook(on_unet, with_kwargs=True)
    try:
        tiny_sd(img192[:1], ["cat"])
        sample, t = seen["sample"], seen["t"]
        monkeypatch.setattr(tiny_sd, "timestep", -1)
        tiny_sd(img192[:1], ["cat"])
        clean = seen["sample"]
    finally:
        handle.remove()
    assert torch.equal(t, torch.full_like(t, max(timestep, 0)))
    noise = torch.randn(clean.shape[1:], generator=torch.Generator().manual_seed(tiny_sd.seed)).expand_as(clean)
    if timestep < 0:
        assert torch.equal(sample, clean)
        return
    a_t = _ldm_alphas_cumprod()[timestep]
    expected = (a_t.sqrt() * clean.double() + (1 - a_t).sqrt() * noise.double()).float()
    torch.testing.assert_close(sample, expected, rtol=0, atol=1e-5)
    if timestep == 0:  # sqrt(1 - alpha_bar_0) = sqrt(beta_0) = 0.029: small, but not nothing
        assert float((1 - a_t).sqrt()) == pytest.approx(0.0292, abs=1e-4)
        assert (sample - clean).abs().max() > 0.01


def test_features_do_not_depend_on_batch_composition(
    tiny_sd: SDFeaturizer, img192: torch.Tensor, base192: list[torch.Tensor]
) -> None:
    alone = tiny_sd(img192[1:], ["dog"])  # B alone vs B second in the batch [A, B]
    for single, batch in zip(alone, base192):
        torch.testing.assert_close(batch[1:], single, rtol=0, atol=1e-5)


def test_every_image_gets_the_same_noise(sd128: SDFeaturizer) -> None:
    x = _images(1, 128, seed=8)
    twice = sd128(torch.cat([x, x]), ["cat", "cat"])
    for f in twice:
        torch.testing.assert_close(f[0], f[1], rtol=0, atol=1e-5)


# --------------------------------------------------------------------------------------------- 6. ensemble


def test_ensemble_is_the_mean_of_single_noise_runs(
    tiny_sd: SDFeaturizer, img192: torch.Tensor, monkeypatch: pytest.MonkeyPatch
) -> None:
    x = img192[:1]
    original_noise = tiny_sd._noise
    drawn: list[torch.Tensor] = []

    def spy(*args, **kwargs):
        noise = original_noise(*args, **kwargs)
        drawn.append(noise.clone())
        return noise

    monkeypatch.setattr(tiny_sd, "ensemble_size", 2)
    monkeypatch.setattr(tiny_sd, "_noise", spy)
    ensemble = tiny_sd(x, ["cat"])
    assert len(drawn) == 1
    noises = drawn[0]
    assert tuple(noises.shape) == (2, 4, 16, 16)  # one [4, 16, 16] latent noise per member
    _assert_differs(noises[0], noises[1])

    monkeypatch.setattr(tiny_sd, "ensemble_size", 1)
    singles = []
    for k in range(2):
        monkeypatch.setattr(
            tiny_sd, "_noise", lambda shape, device, dtype, k=k: noises[k : k + 1].to(device=device, dtype=dtype)
        )
        singles.append(tiny_sd(x, ["cat"]))
    for ens, s0, s1 in zip(ensemble, *singles):
        torch.testing.assert_close(ens, (s0 + s1) / 2, rtol=1e-5, atol=1e-6)
        _assert_differs(ens, s0)


def test_ensemble_noise_is_drawn_from_the_seed(tiny_sd: SDFeaturizer, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tiny_sd, "ensemble_size", 3)
    shape = torch.Size([8, 4, 16, 16])
    noise = tiny_sd._noise(shape, torch.device("cpu"), torch.float32)
    expected = torch.randn((3, 4, 16, 16), generator=torch.Generator().manual_seed(tiny_sd.seed))
    torch.testing.assert_close(noise, expected, rtol=0, atol=0)


# --------------------------------------------------------------------------------------------- 7. prompt


def test_prompt_template(tiny_sd: SDFeaturizer) -> None:
    assert tiny_sd.prompt == "a photo of {category}"
    assert tiny_sd.prompt_for("cat") == "a photo of cat"
    assert tiny_sd.prompt_for("potted plant") == "a photo of potted plant"


def test_category_conditions_the_features(
    tiny_sd: SDFeaturizer, img192: torch.Tensor, monkeypatch: pytest.MonkeyPatch
) -> None:
    x = torch.cat([img192[:1], img192[:1]])  # the same image twice
    explicit = tiny_sd(x, ["cat", "dog"])
    for f in explicit:
        _assert_differs(f[0], f[1])
    monkeypatch.setattr(tiny_sd, "prompt", "")
    assert tiny_sd.prompt_for("cat") == ""
    empty = tiny_sd(x, ["cat", "dog"])
    for f, e in zip(explicit, empty):
        torch.testing.assert_close(e[0], e[1], rtol=0, atol=0)
        _assert_differs(e[0], f[0])


def test_prompt_embeddings_are_cached(sd128: SDFeaturizer, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sd128, "_prompt_cache", {})
    x = _images(2, 128, seed=9)
    calls: list[int] = []
    with _count_calls(sd128.text_encoder, calls):
        first = sd128(x, ["cat", "cat"])
        assert len(calls) == 1  # one encoding for the two images of the same category
        second = sd128(x, ["cat", "cat"])
        assert len(calls) == 1  # none for a repeated prompt
        sd128(x[:1], ["dog"])
        assert len(calls) == 2
    assert set(sd128._prompt_cache) == {"a photo of cat", "a photo of dog"}
    for a, b in zip(first, second):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


# --------------------------------------------------------------------------------------------- 8. DINO


def test_dino_shape(tiny_dino: DinoFeaturizer) -> None:
    feats = tiny_dino(_images(2, 224, seed=10))
    assert tuple(feats.shape) == (2, 32, 16, 16)
    assert tiny_dino.grid_size == 16


def test_dino_features_are_block_output_before_norm_without_cls(tiny_dino: DinoFeaturizer) -> None:
    x = _images(2, 224, seed=11)
    feats = tiny_dino(x)
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    assert IMAGENET_MEAN == (0.485, 0.456, 0.406) and IMAGENET_STD == (0.229, 0.224, 0.225)
    with torch.no_grad():
        out = tiny_dino.model(pixel_values=(x - mean) / std, output_hidden_states=True)
        unnormalised = tiny_dino.model(pixel_values=x, output_hidden_states=True)
    assert len(out.hidden_states) == 5  # embeddings + 4 blocks
    tokens = out.hidden_states[3 + 1]
    assert tokens.shape[1] == 1 + 16 * 16
    patches = tokens[:, 1:]
    # Token k is the patch at row k // 16, column k % 16.
    for k in (0, 1, 15, 16, 17, 100, 255):
        torch.testing.assert_close(feats[:, :, k // 16, k % 16], patches[:, k], rtol=1e-5, atol=1e-5)
    expected = patches.reshape(2, 16, 16, 32).permute(0, 3, 1, 2)
    torch.testing.assert_close(feats, expected, rtol=1e-5, atol=1e-5)
    # Before the final LayerNorm, with ImageNet normalisation.
    final = out.last_hidden_state[:, 1:].reshape(2, 16, 16, 32).permute(0, 3, 1, 2)
    _assert_differs(feats, final)
    _assert_differs(feats, unnormalised.hidden_states[4][:, 1:].reshape(2, 16, 16, 32).permute(0, 3, 1, 2))


def test_dino_earlier_layer_stops_early(tiny_dino: DinoFeaturizer) -> None:
    layer1 = DinoFeaturizer(model_id=None, random_init={"seed": 0, "num_hidden_layers": 4}, layer=1, image_size=224)
    x = _images(1, 224, seed=12)
    late, norm = [], []
    with _count_calls(layer1.model.encoder.layer[3], late), _count_calls(layer1.model.layernorm, norm):
        feats = layer1(x)
    assert late == [] and norm == []
    with torch.no_grad():
        out = tiny_dino.model(pixel_values=(x - tiny_dino.mean) / tiny_dino.std, output_hidden_states=True)
    expected = out.hidden_states[2][:, 1:].reshape(1, 16, 16, 32).permute(0, 3, 1, 2)
    torch.testing.assert_close(feats, expected, rtol=1e-5, atol=1e-5)


def test_dino_other_image_size_interpolates_positions(tiny_dino: DinoFeaturizer) -> None:
    # transformers' own resize; the default hub rule is checked in test_position_rule.py
    small = DinoFeaturizer(model_id=None, random_init={"seed": 0, "num_hidden_layers": 4}, layer=3, image_size=112,
                           pos_interpolation="exact")
    x = _images(1, 112, seed=13)
    feats = small(x)
    assert tuple(feats.shape) == (1, 32, 8, 8)
    with torch.no_grad():
        out = tiny_dino.model(pixel_values=(x - tiny_dino.mean) / tiny_dino.std, output_hidden_states=True)
    torch.testing.assert_close(feats, out.hidden_states[4][:, 1:].reshape(1, 8, 8, 32).permute(0, 3, 1, 2))


def test_dino_argument_errors(tiny_dino: DinoFeaturizer) -> None:
    cfg = {"seed": 0, "num_hidden_layers": 4}
    with pytest.raises(ValueError, match="multiple of the patch size"):
        DinoFeaturizer(model_id=None, random_init=cfg, layer=3, image_size=100)
    for bad in (4, -1):
        with pytest.raises(ValueError, match="out of range"):
            DinoFeaturizer(model_id=None, random_init=cfg, layer=bad, image_size=224)
    with pytest.raises(ValueError, match="224"):
        tiny_dino(torch.rand(1, 3, 112, 112))
    with pytest.raises(ValueError, match="model_id"):
        DinoFeaturizer(model_id=None)


# --------------------------------------------------------------------------------------------- 9. round trip


def test_sd_from_pretrained_round_trip(
    tiny_sd: SDFeaturizer, saved_sd: Path, img192: torch.Tensor, base192: list[torch.Tensor]
) -> None:
    for sub in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
        assert (saved_sd / sub).is_dir()
    loaded = SDFeaturizer(model_id=str(saved_sd), image_size=192, crop_size=128)
    assert loaded.tokenizer("a photo of cat").input_ids == tiny_sd.tokenizer("a photo of cat").input_ids
    assert loaded.scheduler.config.num_train_timesteps == 1000
    torch.testing.assert_close(loaded.scheduler.alphas_cumprod, tiny_sd.scheduler.alphas_cumprod)
    for a, b in zip(loaded(img192, ["cat", "dog"]), base192):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_dino_from_pretrained_round_trip(tiny_dino: DinoFeaturizer, tmp_path: Path) -> None:
    tiny_dino.save_pretrained(str(tmp_path))
    loaded = DinoFeaturizer(model_id=str(tmp_path), layer=3, image_size=224)
    x = _images(1, 224, seed=14)
    torch.testing.assert_close(loaded(x), tiny_dino(x), rtol=0, atol=1e-6)
    # the same weights and config, built or loaded, saved or not: one feature-cache key (save_pretrained writes
    # `architectures` and `dtype` into the config; they made the fixture's key change for the tests after it)
    fresh = DinoFeaturizer(model_id=None, random_init={"seed": 0, "num_hidden_layers": 4}, layer=3, image_size=224)
    assert loaded.cache_key() == tiny_dino.cache_key() == fresh.cache_key()


# --------------------------------------------------------------------------------------------- 10. errors


def _assert_actionable(message: str, model_id: str) -> None:
    assert model_id in message
    assert "local" in message and "director" in message  # says to pass a local directory
    assert "--local-dir" in message
    assert "HF_HUB_OFFLINE" in message  # conftest sets it: the message explains it


@pytest.mark.filterwarnings("ignore:The `local_dir_use_symlinks` argument is deprecated")
def test_missing_sd_model_raises_model_load_error() -> None:
    with pytest.raises(ModelLoadError) as info:
        SDFeaturizer(model_id="no-such-org/no-such-model")
    _assert_actionable(str(info.value), "no-such-org/no-such-model")
    assert "model.pipeline.sd.model_id" in str(info.value)
    assert isinstance(info.value, OSError)


def test_missing_dino_model_raises_model_load_error() -> None:
    with pytest.raises(ModelLoadError) as info:
        DinoFeaturizer(model_id="no-such-org/no-such-dino")
    _assert_actionable(str(info.value), "no-such-org/no-such-dino")
    assert "model.pipeline.dino.model_id" in str(info.value)


class _FakeComponent:
    """Stands in for a diffusers/transformers class: no hub, no network."""

    calls: list[tuple[str, dict]] = []
    error: Exception | None = None

    @classmethod
    def from_pretrained(cls, model_id: str, **kwargs):
        if cls.error is not None:
            raise cls.error
        cls.calls.append((model_id, kwargs))
        return "loaded"


def test_load_pretrained_passes_subfolder_and_kwargs(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_FakeComponent, "calls", [])
    assert load_pretrained(_FakeComponent, "org/model", "unet", "field", torch_dtype="x") == "loaded"
    assert load_pretrained(_FakeComponent, "/some/dir") == "loaded"
    assert _FakeComponent.calls == [("org/model", {"subfolder": "unet", "torch_dtype": "x"}), ("/some/dir", {})]


def test_load_pretrained_error_message(monkeypatch: pytest.MonkeyPatch) -> None:
    original = FileNotFoundError("nothing here")
    monkeypatch.setattr(_FakeComponent, "error", original)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    with pytest.raises(ModelLoadError) as info:
        load_pretrained(_FakeComponent, "org/model", "vae", "cfg.field")
    message = str(info.value)
    assert info.value.__cause__ is original
    for part in ("_FakeComponent", "'org/model'", "subfolder 'vae'", "cfg.field", "FileNotFoundError", "nothing here"):
        assert part in message
    assert "`hf download org/model --include '*.json' --include '*.txt'" in message
    assert "--exclude '*.ckpt'" in message and message.count("--local-dir DIR`") == 1
    assert "HF_HUB_OFFLINE" not in message  # online: no offline hint
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError, match="HF_HUB_OFFLINE is set"):
        load_pretrained(_FakeComponent, "org/model", "vae")


@pytest.mark.parametrize("value", ["no", "off", "FALSE"])  # huggingface_hub: only 1/ON/YES/TRUE are offline
def test_load_pretrained_offline_hint_follows_huggingface_hub_parsing(
    value: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_FakeComponent, "error", OSError("unreachable"))
    monkeypatch.setenv("HF_HUB_OFFLINE", value)
    with pytest.raises(ModelLoadError) as info:
        load_pretrained(_FakeComponent, "org/model")
    assert "HF_HUB_OFFLINE is set" not in str(info.value)


def test_sd_needs_model_id_or_random_init() -> None:
    with pytest.raises(ValueError, match="model_id"):
        SDFeaturizer(model_id=None)
    with pytest.raises(ValueError, match="model_id"):
        SDFeaturizer(model_id="")


def test_broken_tokenizer_is_rejected(saved_sd: Path, tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(saved_sd, broken)
    tok = broken / "tokenizer"
    for f in tok.iterdir():
        if f.name != "tokenizer_config.json":
            f.unlink()
    (tok / "vocab.json").write_text(json.dumps({"<|startoftext|>": 0, "<|endoftext|>": 1}))
    (tok / "merges.txt").write_text("#version: 0.2\n")
    config = json.loads((tok / "tokenizer_config.json").read_text())
    config.pop("added_tokens_decoder", None)
    (tok / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError) as info:
        SDFeaturizer(model_id=str(broken), image_size=192, crop_size=128)
    message = str(info.value)
    assert "tokenizer" in message and "broken" in message
    assert str(broken) in message
    assert "vocab.json" in message and "merges.txt" in message


def test_check_tokenizer_accepts_the_byte_level_tokenizer(tiny_sd: SDFeaturizer) -> None:
    check_tokenizer(tiny_sd.tokenizer, "tiny")  # no exception
    ids = tiny_sd.tokenizer("a photo of a cat", add_special_tokens=False).input_ids
    assert len(set(ids)) > 3


def test_check_tokenizer_rejects_a_tokenizer_mapping_words_to_unknown() -> None:
    class Degenerate:
        unk_token_id, bos_token_id, eos_token_id, pad_token_id = 1, 0, 1, 1

        def __len__(self) -> int:
            return 1000

        def __call__(self, text: str, add_special_tokens: bool = True):
            return type("Enc", (), {"input_ids": [1] * len(text.split())})()

    with pytest.raises(ModelLoadError, match="broken"):
        check_tokenizer(Degenerate(), "some/id")


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"timestep": 1000}, "timestep"),
        ({"timestep": -2}, r"timestep -2 outside \[-1, 1000\) \(-1: no noise\)"),  # -1: the clean latent
        ({"ensemble_size": 0}, "ensemble_size"),
    ],
)
def test_sd_argument_errors(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        SDFeaturizer(model_id=None, random_init={"seed": 0}, image_size=128, sliding_window=False, **kwargs)


class MeanColourFeaturizer:
    """A user's feature source, not an SD or DINO class: a 4 x 4 grid of mean colours (two 'layers')."""

    image_size = 32
    uses_prompt = False

    def __init__(self) -> None:
        self.calls = 0

    def feature_maps(self, images, categories):  # noqa: ANN001, ANN201
        self.calls += 1
        coarse = torch.nn.functional.avg_pool2d(images, 8)
        return [coarse, torch.nn.functional.avg_pool2d(images, 16)]

    def cache_key(self, category: str) -> str:
        return "mean-colour-4x4"

    def variant(self, **overrides):  # noqa: ANN003, ANN201
        return self


def test_any_featurizer_runs_through_the_one_extraction_path(tiny_sd, tiny_dino) -> None:
    """The pipeline calls a feature source through the Featurizer protocol (``feature_maps``), never by its
    class: SD and DINO satisfy it, and a class of one's own runs through ``run_featurizer`` with the feature
    cache (each distinct image once) unchanged."""
    from lightning_modules.components.feature_cache import FeatureCache
    from lightning_modules.components.features import Featurizer, run_featurizer

    assert isinstance(tiny_sd, Featurizer) and isinstance(tiny_dino, Featurizer)
    own = MeanColourFeaturizer()
    assert isinstance(own, Featurizer)
    images = [torch.full((3, 20, 30), 255, dtype=torch.uint8), torch.zeros(3, 40, 40, dtype=torch.uint8)]
    cache = FeatureCache(memory_bytes=1 << 20)
    features, passes = run_featurizer(own, [images[0], images[1], images[0]], ["a", "b", "c"], torch.device("cpu"),
                                      cache, files=["x.jpg", "y.jpg", "x.jpg"])
    assert passes == 2 and own.calls == 1 and len(features) == 3
    assert [tuple(t.shape) for t in features[0]] == [(3, 4, 4), (3, 2, 2)]
    assert torch.equal(features[0][0], features[2][0]) and float(features[1][0].max()) == 0.0
    again, passes = run_featurizer(own, images, ["a", "b"], torch.device("cpu"), cache, files=["x.jpg", "y.jpg"])
    assert passes == 0 and own.calls == 1 and torch.equal(again[0][1], features[0][1])
    dino_maps = tiny_dino.feature_maps(torch.zeros(1, 3, tiny_dino.image_size, tiny_dino.image_size), ["cat"])
    assert len(dino_maps) == 1 and dino_maps[0].shape[-1] == tiny_dino.grid_size
