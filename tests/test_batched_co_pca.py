"""Batched co-PCA (issue 18): a batch of pairs reduced with one set of batched calls gives, on the CPU, exactly
the descriptors and predictions of the per-pair path, on every fixture."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from datamodules import CUBASICDataset, PFPascalDataset, PFWillowDataset, SPairDataset, write_synthetic_spair
from datamodules.cub import write_synthetic_cub
from datamodules.own_images import ImagePairsDataset, read_image_pairs, write_example_photos
from datamodules.pfpascal import write_synthetic_pfpascal
from datamodules.pfwillow import write_synthetic_pfwillow
from lightning_modules.components import DinoFeaturizer, FusedCorrespondence, SDFeaturizer
from lightning_modules.components.fusion import co_pca, co_pca_batch, orthonormal_basis


@pytest.mark.parametrize("shape", [(2, 32, 8, 8), (2, 640, 6, 6), (1, 12, 5, 5)])
def test_co_pca_batch_is_co_pca_of_each_pair_bit_for_bit(shape: tuple[int, ...]) -> None:
    pairs = torch.randn(4, *shape, generator=torch.Generator().manual_seed(1))
    batched = co_pca_batch(pairs, 16)
    assert torch.equal(batched, torch.stack([co_pca(pair, 16) for pair in pairs]))
    assert batched.shape == (4, shape[0], min(16, shape[1], shape[0] * shape[2] * shape[3]), *shape[2:])


def test_each_pair_is_reduced_on_its_own() -> None:
    pairs = torch.randn(3, 2, 24, 6, 6, generator=torch.Generator().manual_seed(2))
    pairs[1] *= 100.0  # a pair of another scale must not change its neighbours' projections
    pairs[1] += 5.0
    batched = co_pca_batch(pairs, 8)
    assert torch.equal(batched[0], co_pca(pairs[0], 8)) and torch.equal(batched[2], co_pca(pairs[2], 8))


def test_orthonormal_basis_of_a_batch_is_each_matrix_basis() -> None:
    x = torch.randn(3, 50, 6, generator=torch.Generator().manual_seed(3))
    assert torch.equal(orthonormal_basis(x), torch.stack([orthonormal_basis(m) for m in x]))


def _fixtures(tmp: Path) -> dict[str, object]:
    """Every keypoint reader on a generated root, and own images."""
    return {
        "spair": SPairDataset(write_synthetic_spair(tmp / "spair", categories=("cat", "dog"), pairs_per_category=3,
                                                    image_size=(96, 72)), split="test"),
        "pfpascal": PFPascalDataset(write_synthetic_pfpascal(tmp / "pfpascal")[0]),
        "pfwillow": PFWillowDataset(write_synthetic_pfwillow(tmp / "pfwillow")[0]),
        "cub": CUBASICDataset(write_synthetic_cub(tmp / "cub"), categories=[1, 2]),
        "own_images": ImagePairsDataset(read_image_pairs(pairs=str(write_example_photos(tmp / "own")))),
    }


@pytest.mark.parametrize(
    "knobs",
    [{}, {"alpha": 1.0}, {"alpha": 0.0}, {"mutual_check": True, "soft_argmax_window": 1}, {"pca_dims": None}],
    ids=["fused", "sd_only", "dino_only", "refinements", "raw_sd"],
)
def test_batched_predictions_equal_the_per_pair_path_on_every_fixture(
    knobs: dict, tiny_sd: SDFeaturizer, tiny_dino: DinoFeaturizer, tmp_path: Path
) -> None:
    pipeline = FusedCorrespondence(tiny_sd, tiny_dino, **{"pca_dims": (16, 16, 8), **knobs})
    for name, dataset in _fixtures(tmp_path).items():
        samples = [dataset[i] for i in range(min(len(dataset), 4))]
        batched = pipeline.predict_pairs(samples)
        for sample, together in zip(samples, batched):
            alone = pipeline.predict_pairs([sample])[0]
            assert together.keys() == alone.keys(), name
            for key in together:
                assert torch.equal(together[key], alone[key]), f"{name} {sample['pair_id']}: {key}"


def test_one_file_under_two_categories_is_two_images(tiny_sd: SDFeaturizer, tiny_dino: DinoFeaturizer,
                                                     tmp_path: Path) -> None:
    from lightning_modules.components.features import unique_images

    pairs = read_image_pairs(pairs=str(write_example_photos(tmp_path)))  # source.png: "toy", "object", a prompt
    assert len({p["source"] for p in pairs}) == 1 and len({str(p["category"]) for p in pairs}) == 3
    samples = [ImagePairsDataset(pairs)[i] for i in range(3)]
    assert len(unique_images(samples)) == 6  # the source under three prompts, three targets
    pipeline = FusedCorrespondence(tiny_sd, tiny_dino, pca_dims=(16, 16, 8), feature_cache_gb=0)
    together = pipeline.predict_pairs(samples)
    assert pipeline.extraction_passes == {"sd": 6, "dino": 4}  # DINO sees the source file once
    alone = [FusedCorrespondence(tiny_sd, tiny_dino, pca_dims=(16, 16, 8)).predict_pairs([s])[0] for s in samples]
    assert all(torch.equal(a["pred_kps"], b["pred_kps"]) for a, b in zip(together, alone))
