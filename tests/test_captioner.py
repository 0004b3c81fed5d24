"""ODISE's implicit captioner: shapes, the gating formula, weight loading by suffix, errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from cubic_resize import resize_channels_last
from safetensors.torch import save_file

from lightning_modules.components.captioner import CLIP_MEAN, CLIP_STD, ImplicitCaptioner

TEXT_DIM, TIME_DIM, LENGTH = 32, 64, 77
PREFIX = "backbone.feature_extractor."


class NotATensor:
    """A non-tensor object that ``torch.load(weights_only=True)`` refuses."""


def make(seed: int = 0, time_embed_dim: int | None = TIME_DIM, **kwargs) -> ImplicitCaptioner:
    return ImplicitCaptioner(
        text_dim=TEXT_DIM, time_embed_dim=time_embed_dim, random_init={"seed": seed}, **kwargs
    )


@pytest.fixture(scope="module")
def captioner() -> ImplicitCaptioner:
    return make(0)


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.rand(2, 3, 40, 40, generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def uncond() -> torch.Tensor:
    return torch.randn(LENGTH, TEXT_DIM, generator=torch.Generator().manual_seed(2))


def odise_state(model: ImplicitCaptioner) -> dict[str, torch.Tensor]:
    """The captioner parameters under ODISE's prefix, plus unrelated keys as in the real checkpoint."""
    state = {PREFIX + k: v.detach().clone() for k, v in model.captioner_parameters().items()}
    state["backbone.feature_extractor.clip.clip.visual.proj"] = torch.randn(4, 4)
    state["sem_seg_head.predictor.weight"] = torch.randn(3, 3)
    return state


def test_shapes(captioner, images, uncond):
    cond, time = captioner(images, uncond)
    assert cond.shape == (2, LENGTH, TEXT_DIM) and time.shape == (2, TIME_DIM)
    assert cond.dtype == uncond.dtype and torch.isfinite(cond).all() and torch.isfinite(time).all()
    cond2, time2 = make(0, time_embed_dim=None)(images, uncond)
    assert time2 is None
    torch.testing.assert_close(cond2, cond)  # same seed, the time embedding is extra
    with pytest.raises(ValueError, match=r"\[77, 32\]"):
        captioner(images, uncond[:10])


def test_zero_gates_give_empty_prompt(images, uncond):
    model = make(3)
    with torch.no_grad():
        model.alpha_cond.zero_()
        model.alpha_cond_time_embed.zero_()
    cond, time = model(images, uncond)
    assert torch.equal(cond, uncond.expand(2, -1, -1))
    assert torch.equal(time, torch.zeros(2, TIME_DIM))


def _odise_pixels(images: torch.Tensor, size: int = 32) -> torch.Tensor:
    """ODISE's CLIP input, computed independently: bicubic (no antialias, no clamp) short side to ``size``,
    centre crop, CLIP normalisation."""
    out = []
    for image in images:
        height, width = image.shape[-2:]
        short, long = min(height, width), max(height, width)
        new = (size, int(size * long / short)) if height <= width else (int(size * long / short), size)
        resized = torch.from_numpy(resize_channels_last(image.permute(1, 2, 0).numpy(), new)).float().permute(2, 0, 1)
        top, left = round((new[0] - size) / 2), round((new[1] - size) / 2)
        out.append(resized[:, top : top + size, left : left + size])
    pixels = torch.stack(out)
    return (pixels - torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)) / torch.tensor(CLIP_STD).view(1, 3, 1, 1)


@pytest.mark.parametrize("shape", [(40, 40), (40, 64), (72, 48)])
def test_clip_input_is_odises_preprocessing(captioner, shape):
    images = torch.rand(2, 3, *shape, generator=torch.Generator().manual_seed(3))
    seen = {}
    handle = captioner.clip.register_forward_pre_hook(lambda _m, _a, kw: seen.update(kw), with_kwargs=True)
    try:
        captioner.embed_images(images)
    finally:
        handle.remove()
    assert seen["pixel_values"].shape == (2, 3, 32, 32)
    torch.testing.assert_close(seen["pixel_values"], _odise_pixels(images), rtol=1e-4, atol=1e-4)
    # bicubic overshoots [0, 1] and ODISE does not clamp a float image: neither do we
    assert seen["pixel_values"].amax() > (1 - CLIP_MEAN[0]) / CLIP_STD[0] or seen["pixel_values"].amin() < -CLIP_MEAN[0] / CLIP_STD[0]


def test_formula_against_independent_computation(captioner, images, uncond):
    pixels = _odise_pixels(images)
    with torch.no_grad():
        prefix = captioner.clip(pixel_values=pixels).image_embeds  # [2, 16]
    assert prefix.shape == (2, 16)
    torch.testing.assert_close(captioner.embed_images(images), prefix)

    p = {k: v.detach() for k, v in captioner.captioner_parameters().items()}
    proj = prefix @ p["clip_project.linear.weight"].T + p["clip_project.linear.bias"]  # [2, 32]
    expected = uncond + torch.tanh(p["alpha_cond"]) * (proj[:, None] + p["clip_project.positional_embedding"])
    t_proj = prefix @ p["time_embed_project.linear.weight"].T + p["time_embed_project.linear.bias"]
    expected_time = torch.tanh(p["alpha_cond_time_embed"]) * (t_proj + p["time_embed_project.positional_embedding"][0])
    with torch.no_grad():
        cond, time = captioner(images, uncond)
    torch.testing.assert_close(cond, expected)
    torch.testing.assert_close(time, expected_time)
    assert (cond - uncond).abs().mean() > 1e-3  # random gates: the image visibly changes the conditioning


def test_known_prefix(captioner, uncond):
    # A hand-made prefix through project(): cond[b, t] = uncond[t] + tanh(a[t]) * (W e_b + b + pos[t]).
    prefix = torch.zeros(2, 16)
    prefix[0, 3], prefix[1, 5] = 1.0, -2.0
    with torch.no_grad():
        cond, _ = captioner.project(prefix, uncond)
    w, b = captioner.clip_project.linear.weight, captioner.clip_project.linear.bias
    gate, pos = torch.tanh(captioner.alpha_cond[0]), captioner.clip_project.positional_embedding[0]
    torch.testing.assert_close(cond[0], uncond + gate * (w[:, 3] + b + pos))
    torch.testing.assert_close(cond[1], uncond + gate * (-2.0 * w[:, 5] + b + pos))


def test_images_matter(captioner, images, uncond):
    with torch.no_grad():
        cond, time = captioner(images, uncond)
    assert (cond[0] - cond[1]).abs().max() > 1e-3
    assert (time[0] - time[1]).abs().max() > 1e-3
    # The same image twice gives the same conditioning (batching does not mix images).
    with torch.no_grad():
        again, _ = captioner(images[[0, 0]], uncond)
    torch.testing.assert_close(again[1], cond[0])


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_load_weights(captioner, images, uncond, tmp_path: Path, suffix: str):
    path = tmp_path / f"odise{suffix}"
    state = odise_state(captioner)
    if suffix == ".pth":
        torch.save({"model": state, "iteration": 5}, path)
    else:
        save_file(state, str(path))
    other = make(7, weights=None)
    assert not torch.equal(other.alpha_cond, captioner.alpha_cond)
    other.load_weights(path)
    for name, param in captioner.captioner_parameters().items():
        assert torch.equal(other.captioner_parameters()[name], param), name
    # The CLIP towers differ (seeds 0 and 7), so copy the tower too before comparing the outputs.
    other.clip.load_state_dict(captioner.clip.state_dict())
    with torch.no_grad():
        for got, want in zip(other(images, uncond), captioner(images, uncond)):
            torch.testing.assert_close(got, want)


def test_state_dict_key_and_constructor(captioner, tmp_path: Path):
    path = tmp_path / "ckpt.pt"
    torch.save({"state_dict": odise_state(captioner)}, path)
    loaded = make(9, weights=str(path))
    torch.testing.assert_close(loaded.alpha_cond, captioner.alpha_cond)


def test_load_errors(captioner, tmp_path: Path):
    state = odise_state(captioner)
    missing = {k: v for k, v in state.items() if not k.endswith("alpha_cond")}
    torch.save({"model": missing}, tmp_path / "missing.pth")
    with pytest.raises(ValueError, match=r"missing\.pth.*'alpha_cond'"):
        make(1).load_weights(tmp_path / "missing.pth")

    wrong = dict(state)
    wrong[PREFIX + "clip_project.linear.weight"] = torch.zeros(TEXT_DIM, 8)
    torch.save({"model": wrong}, tmp_path / "shape.pth")
    with pytest.raises(ValueError, match=r"shape\.pth.*'clip_project\.linear\.weight'.*\[32, 8\].*\[32, 16\]"):
        make(1).load_weights(tmp_path / "shape.pth")

    ambiguous = dict(state)
    ambiguous["other_head.alpha_cond_time_embed"] = torch.zeros(TIME_DIM)
    torch.save({"model": ambiguous}, tmp_path / "ambiguous.pth")
    with pytest.raises(ValueError, match=r"ambiguous\.pth.*'alpha_cond_time_embed'.*ambiguous"):
        make(1).load_weights(tmp_path / "ambiguous.pth")

    torch.save({"model": state, "meta": NotATensor()}, tmp_path / "pickle.pth")
    with pytest.raises(ValueError, match=r"pickle\.pth.*weights_only"):
        make(1).load_weights(tmp_path / "pickle.pth")

    # Without the time embedding its checkpoint keys are simply not needed.
    torch.save({"model": state}, tmp_path / "full.pth")
    make(1, time_embed_dim=None).load_weights(tmp_path / "full.pth")


def test_needs_weights():
    with pytest.raises(ValueError, match=r"captioner\.init_args\.weights.*empty prompt"):
        ImplicitCaptioner(text_dim=TEXT_DIM)


def test_from_pretrained_directory(captioner, images, uncond, tmp_path: Path):
    captioner.clip.save_pretrained(tmp_path / "clip")
    ckpt = tmp_path / "odise.pth"
    torch.save({"model": odise_state(captioner)}, ckpt)
    loaded = ImplicitCaptioner(
        clip_model_id=str(tmp_path / "clip"), weights=str(ckpt), text_dim=TEXT_DIM, time_embed_dim=TIME_DIM
    )
    assert loaded.clip_model_id == str(tmp_path / "clip") and not loaded.clip.training
    assert not any(p.requires_grad for p in loaded.clip.parameters())
    with torch.no_grad():
        for got, want in zip(loaded(images, uncond), captioner(images, uncond)):
            torch.testing.assert_close(got, want)


def test_missing_files_name_the_field(tmp_path: Path):
    with pytest.raises(ValueError, match=r"w\.pth not found.*captioner\.init_args\.weights"):
        ImplicitCaptioner(clip_model_id=str(tmp_path / "nope"), weights=str(tmp_path / "w.pth"), text_dim=TEXT_DIM)
    (tmp_path / "w.pth").touch()
    with pytest.raises(OSError, match=r"captioner\.init_args\.clip_model_id"):
        ImplicitCaptioner(clip_model_id=str(tmp_path / "nope"), weights=str(tmp_path / "w.pth"), text_dim=TEXT_DIM)


def test_trainable_parameters_and_train_mode(captioner):
    names = {n for n, p in captioner.named_parameters() if p.requires_grad}
    assert names == {
        "alpha_cond", "alpha_cond_time_embed", "clip_project.linear.weight", "clip_project.linear.bias",
        "clip_project.positional_embedding", "time_embed_project.linear.weight", "time_embed_project.linear.bias",
        "time_embed_project.positional_embedding",
    }
    captioner.train()
    assert captioner.training and not captioner.clip.training
    captioner.eval()
