"""DINO position embeddings: the torch-hub "+0.1" rule the reference runs (default) and transformers' own.

The reference's DINOv2 (torch hub) resizes its 37 x 37 position grid to n x n with
``scale_factor = (n + 0.1) / 37``, bicubic, no antialias; DINOv1 / iBOT (facebookresearch/dino, and the
reference's stride-aware ``ViTExtractor._fix_pos_enc``) do the same on their 14 x 14 grid. transformers
resizes to exactly n x n. Here the rule is recomputed independently (``cubic_resize``, float64) and put into
a copy of the model whose grid then already fits, so transformers does no resizing of its own.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from cubic_resize import resize_channels_last
from transformers import AutoModel

from lightning_modules.components import DinoFeaturizer
from lightning_modules.components.dino_featurizer import hub_position_embeddings


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def _images(size: int, n: int = 2) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(7))


def _tokens(model: torch.nn.Module, featurizer: DinoFeaturizer, images: torch.Tensor, block: int) -> torch.Tensor:
    """Block ``block``'s output tokens (CLS dropped) as a ``[B, C, n, n]`` map, straight from transformers."""
    pixels = (images - featurizer.mean) / featurizer.std
    kwargs = {"interpolate_pos_encoding": True} if model.config.model_type == "vit" else {}
    with torch.no_grad():
        hidden = model(pixel_values=pixels, output_hidden_states=True, **kwargs).hidden_states[block + 1]
    grid = featurizer.grid_size
    return hidden[:, 1:].transpose(1, 2).reshape(len(images), -1, grid, grid)


@pytest.mark.parametrize("model_type", ["dinov2", "vit"])
def test_hub_rule_matches_an_independent_implementation(tmp_path: Path, model_type: str) -> None:
    built = DinoFeaturizer(model_id=None, random_init={"seed": 3, "num_hidden_layers": 2, "model_type": model_type},
                           layer=1, image_size=224)
    built.save_pretrained(str(tmp_path))  # the production path: from_pretrained of a saved model
    patch = built.patch_size
    size = 20 * patch  # 20 x 20 tokens from a 16 x 16 (DINOv2) or 14 x 14 (ViT/16) position grid
    featurizer = DinoFeaturizer(model_id=str(tmp_path), layer=1, image_size=size)
    assert featurizer.pos_interpolation == "hub"  # the default
    images = _images(size)
    features = featurizer(images)

    model = AutoModel.from_pretrained(str(tmp_path)).eval()
    pos = model.embeddings.position_embeddings.detach()
    side, n = math.isqrt(pos.shape[1] - 1), featurizer.grid_size
    grid = pos[0, 1:].reshape(side, side, -1).numpy()
    resized = resize_channels_last(grid, (n, n), scale_factor=(n + 0.1) / side)
    new = torch.cat([pos[:, :1], torch.from_numpy(resized).float().reshape(1, n * n, -1)], dim=1)
    model.embeddings.position_embeddings = torch.nn.Parameter(new)  # fits the grid: transformers keeps it
    expected = _tokens(model, featurizer, images, block=1)
    assert _relative(features, expected) < 1e-5

    exact = featurizer.variant(pos_interpolation="exact")
    plain = _tokens(AutoModel.from_pretrained(str(tmp_path)).eval(), featurizer, images, block=1)
    torch.testing.assert_close(exact(images), plain, rtol=1e-5, atol=1e-5)  # "exact" is transformers' own
    assert _relative(features, plain) > 1e-3  # the two rules give other tokens


def test_hub_rule_samples_other_positions_than_an_exact_resize() -> None:
    pos = torch.randn(1, 1 + 37 * 37, 8, generator=torch.Generator().manual_seed(0))
    hub = hub_position_embeddings(pos, 60)
    exact = hub_position_embeddings(pos, 60, offset=0.0)
    assert hub.shape == exact.shape == (1, 1 + 60 * 60, 8)
    assert torch.equal(hub[:, 0], pos[:, 0])  # the class embedding is kept
    assert _relative(hub, exact) > 1e-2
    reference = resize_channels_last(pos[0, 1:].reshape(37, 37, 8).numpy(), (60, 60), scale_factor=60.1 / 37)
    np.testing.assert_allclose(hub[0, 1:].reshape(60, 60, 8).numpy(), reference, rtol=1e-4, atol=1e-5)
    assert hub_position_embeddings(pos, 37) is pos  # the model's own grid: nothing to resize


@pytest.mark.parametrize("model_type", ["dinov2_with_registers", "dinov3_vit"])
def test_registers_and_rotary_models_have_one_rule(model_type: str) -> None:
    """The hub builds DINOv2-with-registers with offset 0 and antialias, as transformers does; DINOv3's
    positions are rotary. For both, ``hub`` and ``exact`` are the same tokens."""
    size = 320 if model_type == "dinov3_vit" else 280
    featurizer = DinoFeaturizer(model_id=None, random_init={"seed": 0, "model_type": model_type, "num_hidden_layers": 2},
                                layer=1, image_size=size)
    images = _images(size, n=1)
    assert torch.equal(featurizer(images), featurizer.variant(pos_interpolation="exact")(images))


def test_position_rule_is_scoped_to_the_forward_pass() -> None:
    featurizer = DinoFeaturizer(model_id=None, random_init={"seed": 0, "num_hidden_layers": 2}, layer=1, image_size=280)
    featurizer(_images(280, n=1))
    assert "interpolate_pos_encoding" not in vars(featurizer.model.embeddings)  # the method is not left patched
    with pytest.raises(ValueError, match="unknown pos_interpolation 'nearest'"):
        featurizer.variant(pos_interpolation="nearest")
    assert featurizer.cache_key() != featurizer.variant(pos_interpolation="exact").cache_key()


def test_reference_differences_benchmark_smoke(tmp_path: Path) -> None:
    """benchmarks/reference_differences.py --tiny: the figures the README quotes, at toy size."""
    import importlib.util

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "reference_differences.py"
    spec = importlib.util.spec_from_file_location("reference_differences", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = tmp_path / "differences.json"
    results = module.main(["--tiny", "--out", str(out)])
    assert json.loads(out.read_text()) == results
    dino = results["dino_position_rule"]
    assert (dino["position_grid"], dino["token_grid"]) == (16, 20)
    for grid in ("random_init", "sinusoidal"):
        assert 1e-4 < dino[grid]["relative_token_difference"] < 0.5
        assert 0 <= dino[grid]["nn_matches_changed"] <= 1
    solver = results["co_pca_solver"]
    for layer in ("s5", "s4", "s3"):
        assert 0 <= solver[layer]["nn_cells_changed_by_solver"] <= 1
        assert 0 < solver[layer]["nn_cells_changed_by_test_matrix_seed"] <= 1
    assert solver["s4"]["nn_cells_changed_by_solver"] > 0  # 200 tokens, 96 channels > 16 components: only 1.13 transposes
    draw = results["spair_subset_draw"]
    assert draw["draws"] == 360 == draw["distinct_pairs"] + draw["repeated_draws"]
    assert 0 <= draw["in_common_with_uniform_seed0"] <= draw["distinct_pairs"]
