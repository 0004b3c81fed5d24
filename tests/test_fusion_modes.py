"""Every fusion mode against its hand formula, and the validation of ``DescriptorSpec``.

Small random tensors only (no featurizer): fast and exact.
"""

from __future__ import annotations

import pytest
import torch

from lightning_modules.components.fusion import (
    FUSIONS,
    co_pca,
    fuse,
    l2_normalize,
    merge_layers,
)
from lightning_modules.components.descriptors import DescriptorSpec, describe_pair
from lightning_modules.components.features import ImageFeatures


def _maps(c_sd: int = 6, c_dino: int = 6, size: int = 4, batch: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    sd = torch.randn(batch, c_sd, size, size, generator=g) * 3 + 1
    dino = torch.randn(batch, c_dino, size, size, generator=g) * 0.5 - 2
    return sd, dino


def _unit(t: torch.Tensor) -> torch.Tensor:
    """Per-token L2 normalisation along channels, written out (no shared helper)."""
    norms = torch.sqrt((t * t).sum(dim=1, keepdim=True))
    return t / norms


def test_the_four_modes_are_the_documented_ones() -> None:
    assert set(FUSIONS) == {"concat_l2", "concat", "sum_l2", "sum"}


def test_l2_normalize_gives_unit_tokens_along_dim_1() -> None:
    sd, _ = _maps()
    out = l2_normalize(sd)
    torch.testing.assert_close(out.norm(dim=1), torch.ones(2, 4, 4))
    torch.testing.assert_close(out, _unit(sd))
    # the zero vector stays zero (eps clamp), never NaN
    assert torch.equal(l2_normalize(torch.zeros(1, 3, 2, 2)), torch.zeros(1, 3, 2, 2))


@pytest.mark.parametrize("alpha", [0.5, 0.3, 0.8])
def test_concat_l2_is_paper_eq2(alpha) -> None:
    sd, dino = _maps(c_sd=5, c_dino=7)
    out = fuse(sd, dino, alpha, "concat_l2")
    expected = torch.cat([alpha * _unit(sd), (1 - alpha) * _unit(dino)], dim=1)
    assert out.shape == (2, 12, 4, 4)
    torch.testing.assert_close(out, expected)
    # block norms are alpha and 1 - alpha for every token
    torch.testing.assert_close(out[:, :5].norm(dim=1), torch.full((2, 4, 4), alpha))
    torch.testing.assert_close(out[:, 5:].norm(dim=1), torch.full((2, 4, 4), 1 - alpha))


@pytest.mark.parametrize("alpha", [0.5, 0.3, 0.9])
def test_concat_is_raw_cat_without_weights(alpha) -> None:
    sd, dino = _maps(c_sd=5, c_dino=7)
    assert torch.equal(fuse(sd, dino, alpha, "concat"), torch.cat([sd, dino], dim=1))


@pytest.mark.parametrize("alpha", [0.5, 0.2])
def test_sum_is_raw_sum_without_weights(alpha) -> None:
    sd, dino = _maps()
    assert torch.equal(fuse(sd, dino, alpha, "sum"), sd + dino)


@pytest.mark.parametrize("alpha", [0.5, 0.25, 0.7])
def test_sum_l2_is_weighted_sum_of_unit_tokens(alpha) -> None:
    sd, dino = _maps()
    out = fuse(sd, dino, alpha, "sum_l2")
    assert out.shape == sd.shape
    torch.testing.assert_close(out, alpha * _unit(sd) + (1 - alpha) * _unit(dino))


@pytest.mark.parametrize("mode", FUSIONS)
def test_alpha_one_and_zero_keep_a_single_block(mode) -> None:
    sd, dino = _maps(c_sd=6, c_dino=6)
    normalised = mode.endswith("_l2")
    expected_sd = _unit(sd) if normalised else sd
    expected_dino = _unit(dino) if normalised else dino
    for args, expected in (
        ((sd, dino, 1.0), expected_sd),
        ((sd, None, 1.0), expected_sd),
        ((sd, None, 0.5), expected_sd),  # no DINO map: the SD map alone, whatever alpha
        ((sd, dino, 0.0), expected_dino),
        ((None, dino, 0.0), expected_dino),
        ((None, dino, 0.5), expected_dino),
    ):
        out = fuse(*args, mode=mode)
        assert out.shape == expected.shape  # one block, not a zero-weighted second block
        if normalised:
            torch.testing.assert_close(out, expected)
        else:
            assert torch.equal(out, expected)  # raw: the map itself, untouched


def test_single_block_of_raw_modes_is_the_input_itself() -> None:
    sd, dino = _maps()
    assert torch.equal(fuse(sd, dino, 1.0, "concat"), sd)
    assert torch.equal(fuse(sd, dino, 0.0, "sum"), dino)


def test_unknown_mode_is_a_clear_error() -> None:
    sd, dino = _maps()
    with pytest.raises(ValueError, match=r"unknown fusion 'product'.*concat_l2"):
        fuse(sd, dino, 0.5, "product")


@pytest.mark.parametrize("mode", ["sum", "sum_l2"])
def test_sums_need_equal_channels(mode) -> None:
    sd, dino = _maps(c_sd=5, c_dino=7)
    with pytest.raises(ValueError, match=rf"fusion '{mode}' needs equal channels, got SD 5 and DINO 7"):
        fuse(sd, dino, 0.5, mode)
    # single-block use of a sum mode has nothing to add up: no channel check
    assert fuse(sd, dino, 1.0, mode).shape == sd.shape


@pytest.mark.parametrize("mode", FUSIONS)
def test_spatial_mismatch_is_a_clear_error(mode) -> None:
    sd, _ = _maps(size=4)
    _, dino = _maps(size=5)
    with pytest.raises(ValueError, match="differ in size"):
        fuse(sd, dino, 0.5, mode)


@pytest.mark.parametrize("alpha", [-0.1, 1.5])
def test_fuse_rejects_alpha_outside_unit_interval(alpha) -> None:
    sd, dino = _maps()
    with pytest.raises(ValueError, match=r"alpha must be in \[0, 1\]"):
        fuse(sd, dino, alpha)


def test_nothing_to_fuse_is_an_error() -> None:
    sd, dino = _maps()
    with pytest.raises(ValueError, match="nothing to fuse"):
        fuse(None, None, 0.5)
    with pytest.raises(ValueError, match="nothing to fuse"):
        fuse(sd, None, 0.0)  # SD given no weight and no DINO map
    with pytest.raises(ValueError, match="nothing to fuse"):
        fuse(None, dino, 1.0)


# ---------------------------------------------------------------------------------------------- DescriptorSpec


def test_descriptor_spec_defaults_are_the_papers() -> None:
    spec = DescriptorSpec()
    assert (spec.alpha, spec.pca_dims, spec.fusion, spec.sd_layers) == (0.5, (256, 256, 256), "concat_l2", None)
    assert spec.uses_sd and spec.uses_dino
    assert DescriptorSpec(alpha=1.0).uses_sd and not DescriptorSpec(alpha=1.0).uses_dino
    assert DescriptorSpec(alpha=0.0).uses_dino and not DescriptorSpec(alpha=0.0).uses_sd


@pytest.mark.parametrize("alpha", [-0.01, 1.01, 2.0])
def test_descriptor_spec_rejects_bad_alpha(alpha) -> None:
    with pytest.raises(ValueError, match=r"alpha must be in \[0, 1\]"):
        DescriptorSpec(alpha=alpha)


def test_descriptor_spec_rejects_unknown_fusion() -> None:
    with pytest.raises(ValueError, match=r"unknown fusion 'mean'; choose one of"):
        DescriptorSpec(fusion="mean")


@pytest.mark.parametrize("fusion", FUSIONS)
def test_descriptor_spec_accepts_every_mode(fusion) -> None:
    assert DescriptorSpec(fusion=fusion).fusion == fusion


def test_layer_positions() -> None:
    extracted = [2, 5, 8]
    assert DescriptorSpec().layer_positions(extracted) == [0, 1, 2]
    assert DescriptorSpec(pca_dims=None).layer_positions(extracted) == [0, 1, 2]
    assert DescriptorSpec(pca_dims=(64,), sd_layers=(5,)).layer_positions(extracted) == [1]
    assert DescriptorSpec(pca_dims=(64, 32), sd_layers=(8, 2)).layer_positions(extracted) == [2, 0]
    assert DescriptorSpec(pca_dims=None, sd_layers=(2, 8)).layer_positions(extracted) == [0, 2]
    assert DescriptorSpec(pca_dims=(16,)).layer_positions([5]) == [0]


def test_layer_positions_checks_pca_dims_against_used_layers() -> None:
    with pytest.raises(ValueError, match=r"pca_dims \[256, 256, 256\] must have one entry per used SD layer \[5\]"):
        DescriptorSpec(sd_layers=(5,)).layer_positions([2, 5, 8])
    with pytest.raises(ValueError, match=r"one entry per used SD layer \[2, 5, 8\]"):
        DescriptorSpec(pca_dims=(256, 256)).layer_positions([2, 5, 8])


def test_layer_positions_rejects_layers_not_extracted() -> None:
    with pytest.raises(ValueError, match=r"SD layers \[3, 11\] were not extracted \(extracted: \[2, 5, 8\]\)"):
        DescriptorSpec(pca_dims=None, sd_layers=(11, 5, 3)).layer_positions([2, 5, 8])


# ------------------------------------------------------------------------------------ describe_pair per mode


def _features(seed: int, sd_shapes=((6, 2), (4, 4)), dino_channels: int = 10, grid: int = 4) -> ImageFeatures:
    g = torch.Generator().manual_seed(seed)
    sd = [torch.randn(c, s, s, generator=g) for c, s in sd_shapes]
    return ImageFeatures(sd=sd, dino=torch.randn(dino_channels, grid, grid, generator=g), width=40, height=30)


@pytest.mark.parametrize("mode", ["concat_l2", "concat", "sum_l2", "sum"])
def test_describe_pair_applies_the_spec_fusion_after_pca_and_merge(mode) -> None:
    """describe_pair = co-PCA of each used layer over the pair, coarse-to-fine merge, then ``fuse``."""
    src, trg = _features(1), _features(2)
    spec = DescriptorSpec(alpha=0.4, pca_dims=(6, 4), fusion=mode)  # 6 + 4 = 10 = DINO channels
    out = describe_pair(src, trg, spec, sd_layer_ids=(2, 5), grid=4)
    pairs = [co_pca(torch.stack([src.sd[i], trg.sd[i]]), d) for i, d in zip((0, 1), (6, 4))]
    sd_block = merge_layers(pairs, 4)
    dino_block = torch.stack([src.dino, trg.dino])
    expected = {
        "concat_l2": torch.cat([0.4 * _unit(sd_block), 0.6 * _unit(dino_block)], dim=1),
        "concat": torch.cat([sd_block, dino_block], dim=1),
        "sum_l2": 0.4 * _unit(sd_block) + 0.6 * _unit(dino_block),
        "sum": sd_block + dino_block,
    }[mode]
    assert out.shape == expected.shape
    torch.testing.assert_close(out, expected)


def test_describe_pair_layer_subset_without_pca_uses_raw_channels() -> None:
    src, trg = _features(3), _features(4)
    spec = DescriptorSpec(alpha=1.0, pca_dims=None, fusion="concat", sd_layers=(5,))
    out = describe_pair(src, trg, spec, sd_layer_ids=(2, 5))
    assert torch.equal(out, torch.stack([src.sd[1], trg.sd[1]]))
    spec = DescriptorSpec(alpha=0.0, fusion="concat")
    assert torch.equal(describe_pair(src, trg, spec, sd_layer_ids=(2, 5)), torch.stack([src.dino, trg.dino]))
