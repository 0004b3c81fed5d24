"""Any number of featurizers fused: a further feature source is a config entry (``model.pipeline.featurizers``
with its ``weights``), fused as one more block; the paper's two-featurizer run is the case without any."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import evaluate
from datamodules import SPairDataset, write_synthetic_spair
from lightning_modules.components import DinoFeaturizer, FusedCorrespondence
from lightning_modules.components.features import pair_features

from conftest import CONFIGS, CPU_ARGS, SPAIR_CONFIG, TINY_OVERLAY


@pytest.fixture(scope="module")
def samples(tmp_path_factory) -> list[dict]:
    root = write_synthetic_spair(tmp_path_factory.mktemp("spair"), categories=("cat",), pairs_per_category=2,
                                 image_size=(96, 72))
    dataset = SPairDataset(root, split="test")
    return [dataset[0], dataset[1]]


@pytest.fixture(scope="module")
def third() -> DinoFeaturizer:
    """A third feature source: another tiny ViT (48 channels, its own grid of 8 x 8 at 112 px)."""
    return DinoFeaturizer(model_id=None, random_init={"seed": 5, "num_hidden_layers": 2, "hidden_size": 48}, layer=1,
                          image_size=112)


def test_a_third_featurizer_is_one_more_block(tiny_sd, tiny_dino, third, samples) -> None:
    two = FusedCorrespondence(tiny_sd, tiny_dino, pca_dims=(8, 8, 8))
    silent = FusedCorrespondence(tiny_sd, tiny_dino, pca_dims=(8, 8, 8), featurizers={"third": third},
                                 weights={"third": 0.0})
    fused = FusedCorrespondence(tiny_sd, tiny_dino, pca_dims=(8, 8, 8), featurizers={"third": third},
                                weights={"third": 0.5})
    plain = two.predict_pairs(samples)
    for a, b in zip(plain, silent.predict_pairs(samples)):  # weight 0: run, but the descriptors are the paper's
        assert torch.equal(a["pred_kps"], b["pred_kps"]) and torch.equal(a["distance"], b["distance"])
    assert silent.extraction_passes == {"sd": 3, "dino": 3, "third": 3}  # 3 distinct images, one pass each
    features = fused.batch_features(samples)
    descriptors = fused.describe_pair(*pair_features(features, samples[0]))
    assert descriptors.shape == (2, 24 + 32 + 48, 16, 16)  # SD co-PCA 8 x 3, DINO 32, the third's 48 on DINO's grid
    assert torch.equal(descriptors[:, :56], two.describe_pair(*pair_features(features, samples[0])))
    assert torch.allclose(descriptors[:, 56:].norm(dim=1), torch.full((2, 16, 16), 0.5))  # weight x unit tokens
    assert any(not torch.equal(a["pred_kps"], b["pred_kps"]) for a, b in zip(plain, fused.predict_pairs(samples)))


def test_further_featurizers_are_checked_where_they_are_given(tiny_sd, tiny_dino, third) -> None:
    with pytest.raises(ValueError, match=r"weights must give each of featurizers \['third'\] its weight"):
        FusedCorrespondence(tiny_sd, tiny_dino, featurizers={"third": third})
    with pytest.raises(ValueError, match="featurizers.dino: the name is the dino slot's"):
        FusedCorrespondence(tiny_sd, tiny_dino, featurizers={"dino": third}, weights={"dino": 1.0})
    with pytest.raises(ValueError, match="must be >= 0"):
        FusedCorrespondence(tiny_sd, tiny_dino, featurizers={"third": third}, weights={"third": -1.0})


def test_sd_dinov2_and_dinov3_fused_is_a_config(tmp_path: Path, monkeypatch) -> None:
    """``configs/overlays/fuse_dinov3.yaml`` on the tiny models (its tiny DINOv3 stand-in given on the command
    line, as the overlay's comment says): the run extracts every image once per featurizer and scores it."""
    monkeypatch.chdir(tmp_path)
    root = write_synthetic_spair(tmp_path / "spair", categories=("cat",), pairs_per_category=2, image_size=(96, 72))
    out = tmp_path / "out"
    evaluate.main(["test", "--config", SPAIR_CONFIG, "--config", TINY_OVERLAY, "--config",
                   str(CONFIGS / "overlays" / "fuse_dinov3.yaml"), "--model.pipeline.featurizers",
                   json.dumps({"dinov3": str(CONFIGS / "featurizers" / "tiny_dinov3.yaml")}), "--data.root", str(root),
                   *CPU_ARGS, "--trainer.default_root_dir", str(out)])
    results = json.loads((out / "results.json").read_text())
    assert results["extraction_passes"] == {"sd": 3, "dino": 3, "dinov3": 3} and results["num_pairs"] == 2
    assert (out / "predictions.jsonl").read_text().count("\n") == 2
