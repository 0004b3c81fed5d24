"""Instance-swap metrics of supplementary Table 9: CLIP score and CLIP-based FID on a tiny random CLIP.

The CLIP towers are tiny random ``CLIPVisionModelWithProjection`` models (32 px, 16-d embeddings); expected
values are hand-computed or come from an independent formula (``scipy.linalg.sqrtm``).
"""

from __future__ import annotations

import json
import math

import lightning as L
import numpy as np
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger
from scipy import linalg

from callbacks import PictureWriter
from datamodules import MaskedPairsDataModule, MaskedPairsDataset, write_synthetic_masked_pairs
from lightning_modules import InstanceSwap
from lightning_modules.components import FusedCorrespondence
from lightning_modules.components.clip_features import CLIPImageEmbedder, region_crop
from lightning_modules.components.hub import ModelLoadError
from lightning_modules.swap_metrics import SwapScores, clip_image_score, frechet_distance

TINY_CLIP = {"seed": 0}


def _image(height: int, width: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (3, height, width), generator=generator, dtype=torch.uint8)


@pytest.fixture(scope="module")
def embedder() -> CLIPImageEmbedder:
    return CLIPImageEmbedder(model_id=None, random_init=TINY_CLIP)


# ---------------------------------------------------------------- functional


def test_clip_image_score_is_100_times_the_clipped_cosine() -> None:
    a = torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0], [3.0, 4.0]])
    b = torch.tensor([[2.0, 0.0], [0.0, 5.0], [-1.0, 0.0], [4.0, 3.0]])
    scores = clip_image_score(a, b)
    # identical direction -> 100, orthogonal -> 0, negative cosine -> clipped to 0, cos = 24 / 25
    assert scores.tolist() == pytest.approx([100.0, 0.0, 0.0, 96.0])
    with pytest.raises(ValueError, match=r"\[N, D\]"):
        clip_image_score(a, b[:2])


def test_region_crop_is_the_mask_bounding_box_and_rejects_an_empty_mask() -> None:
    image = _image(10, 12, 0)
    mask = torch.zeros(10, 12, dtype=torch.bool)
    mask[2, 3] = mask[6, 8] = mask[4, 5] = True  # box rows 2..6, cols 3..8
    crop = region_crop(image, mask)
    assert crop.dtype == torch.uint8 and torch.equal(crop, image[:, 2:7, 3:9])
    filled = region_crop(image, mask, fill_outside=True)
    assert filled.shape == (3, 5, 6)
    assert torch.equal(filled[:, 0, 0], image[:, 2, 3]) and torch.equal(filled[:, 2, 2], image[:, 4, 5])
    assert int(filled[:, 1, 1].sum()) == 0 and int((filled.sum(0) > 0).sum()) <= 3  # only the 3 mask pixels kept
    with pytest.raises(ValueError, match="empty mask"):
        region_crop(image, torch.zeros(10, 12, dtype=torch.bool))
    with pytest.raises(ValueError, match="size"):
        region_crop(image, torch.ones(10, 11, dtype=torch.bool))


def test_frechet_distance_matches_the_sqrtm_formula() -> None:
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(40, 5, generator=generator, dtype=torch.float64)
    b = torch.randn(30, 5, generator=generator, dtype=torch.float64) * 1.5 + 0.3
    mu_a, mu_b = a.mean(0).numpy(), b.mean(0).numpy()
    cov_a, cov_b = np.cov(a.numpy(), rowvar=False), np.cov(b.numpy(), rowvar=False)
    root = linalg.sqrtm(cov_a @ cov_b).real  # pytorch-fid's formula, full-rank covariances here
    expected = float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b) - 2 * np.trace(root))
    assert frechet_distance(a, b) == pytest.approx(expected, rel=1e-9)
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-9)
    assert math.isnan(frechet_distance(a[:1], b))


# ---------------------------------------------------------------- CLIP embedder


def test_clip_embedder_round_trips_a_local_directory_and_outputs_unit_vectors(embedder, tmp_path) -> None:
    images = torch.stack([_image(40, 56, 1), _image(40, 56, 2), _image(40, 56, 3)])
    embeds = embedder(images)
    assert embeds.shape == (3, 16) and embeds.dtype == torch.float32
    assert torch.allclose(embeds.norm(dim=-1), torch.ones(3), atol=1e-5)
    assert not torch.allclose(embeds[0], embeds[1])  # the image matters
    raw = embedder(images, normalize=False)
    assert torch.allclose(torch.nn.functional.normalize(raw, dim=-1), embeds, atol=1e-6)
    assert not torch.allclose(raw.norm(dim=-1), torch.ones(3), atol=1e-3)
    # a list of differently sized images: each preprocessed alone, same result as the batch for equal sizes
    assert torch.allclose(embedder(list(images)), embeds, atol=1e-6)
    assert embedder([_image(20, 9, 4), _image(33, 70, 5)]).shape == (2, 16)

    embedder.save_pretrained(tmp_path / "clip")
    loaded = CLIPImageEmbedder(model_id=str(tmp_path / "clip"))
    assert loaded.model_id == str(tmp_path / "clip") and loaded.image_size == 32 and loaded.embed_dim == 16
    assert torch.equal(loaded(images), embeds)
    assert not any(p.requires_grad for p in loaded.parameters()) and not loaded.train().training


def test_clip_embedder_preprocessing_resizes_the_short_side_and_centre_crops(embedder) -> None:
    wide = _image(32, 64, 6)  # short side already 32: only the centre crop
    pixels = embedder.preprocess(wide)
    mean = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(3, 1, 1)
    std = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(3, 1, 1)
    expected = (wide[:, :, 16:48].float() / 255 - mean) / std
    assert pixels.shape == (1, 3, 32, 32) and torch.allclose(pixels[0], expected, atol=1e-6)
    assert embedder.preprocess(_image(100, 50, 7)).shape == (1, 3, 32, 32)


def test_clip_embedder_errors_name_the_model(tmp_path) -> None:
    missing = str(tmp_path / "no-clip-here")
    with pytest.raises(ModelLoadError, match="no-clip-here"):
        CLIPImageEmbedder(model_id=missing)
    with pytest.raises(ValueError, match="model_id"):
        CLIPImageEmbedder(model_id=None)


# ---------------------------------------------------------------- metric


def test_swap_scores_identical_regions_score_100_and_fid_zero(embedder) -> None:
    regions = [_image(20 + i, 30 - i, 10 + i) for i in range(6)]
    metric = SwapScores(embedder)
    metric.update(edited_regions=regions[:4], reference_regions=regions[:4], pair_ids=[f"p{i}" for i in range(4)])
    metric.update(edited_regions=regions[4:], reference_regions=[r.clone() for r in regions[4:]], pair_ids=["p4", "p5"])
    results = metric.compute()
    assert results["num_pairs"] == 6
    assert results["clip_score"] == pytest.approx(100.0, abs=1e-3)
    assert results["fid_clip"] == pytest.approx(0.0, abs=1e-6)

    others = [_image(25, 25, 30 + i) // 2 for i in range(6)]  # other (darker) regions: lower score, positive FID
    other = SwapScores(embedder)
    other.update(edited_regions=regions, reference_regions=others, pair_ids=[f"p{i}" for i in range(6)])
    results = other.compute()
    edited, reference = embedder(regions, normalize=False), embedder(others, normalize=False)
    assert results["clip_score"] == pytest.approx(float(clip_image_score(edited, reference).mean()), rel=1e-5)
    assert results["clip_score"] < 100.0
    assert results["fid_clip"] == pytest.approx(frechet_distance(edited, reference), rel=1e-5)
    assert results["fid_clip"] > 0.0


def test_swap_scores_count_a_repeated_pair_once(embedder) -> None:
    a, b, c = _image(24, 24, 20), _image(24, 24, 21), _image(24, 24, 22)
    metric = SwapScores(embedder)
    metric.update(edited_regions=[a, a], reference_regions=[b, c], pair_ids=["p0", "p1"])
    metric.update(
        edited_regions=[a], reference_regions=[a], pair_ids=["p0"],
    )  # a padded DistributedSampler's duplicate of p0: ignored
    results = metric.compute()
    expected = clip_image_score(embedder([a, a]), embedder([b, c])).double().mean().item()
    assert results["num_pairs"] == 2
    assert results["clip_score"] == pytest.approx(expected, rel=1e-5)
    assert results["clip_score"] < 99.0  # the duplicate (score 100) did not count
    empty = SwapScores(embedder)
    with pytest.warns(UserWarning):  # torchmetrics: compute before update
        results = empty.compute()
    assert results["num_pairs"] == 0 and math.isnan(results["clip_score"]) and math.isnan(results["fid_clip"])


# ---------------------------------------------------------------- InstanceSwap


def test_swap_run_writes_clip_metrics_for_both_stages(tmp_path, tiny_sd, tiny_dino, capsys) -> None:
    write_synthetic_masked_pairs(tmp_path / "pairs", num_pairs=2)
    module = InstanceSwap(FusedCorrespondence(tiny_sd, tiny_dino, pca_dims=None), resolution=48, refine=True, refine_steps=4,
                          refine_size=64, metrics=True, clip_model=None, clip_random_init=TINY_CLIP)
    out = tmp_path / "run"
    logger = CSVLogger(save_dir=out, name="csv", version=0)
    trainer = L.Trainer(accelerator="cpu", logger=logger, enable_progress_bar=False, default_root_dir=out,
                        callbacks=[PictureWriter(subdir="swap")])
    outputs = [r for batch in trainer.predict(module, datamodule=MaskedPairsDataModule(str(tmp_path / "pairs")))
               for r in batch]
    results = json.loads((out / "csv" / "version_0" / "swap_metrics.json").read_text())  # the trainer's log_dir
    logged = (out / "csv" / "version_0" / "metrics.csv").read_text().splitlines()
    header, row = logged[0].split(","), logged[1].split(",")
    assert float(row[header.index("swap/refined/clip_score")]) == pytest.approx(results["refined"]["clip_score"])
    assert "swap/preliminary/fid_clip" in header
    assert set(results) >= {"preliminary", "refined"} and results["clip_model"] == "random_init"
    assert results["preliminary"] == module.predict_results.summary["preliminary"]
    for stage in ("preliminary", "refined"):
        values = results[stage]
        assert values["num_pairs"] == 2
        assert math.isfinite(values["clip_score"]) and 0.0 <= values["clip_score"] <= 100.0
        assert math.isfinite(values["fid_clip"])
    # recomputed independently: the preliminary edited region scored against the source box
    embedder = CLIPImageEmbedder(model_id=None, random_init=TINY_CLIP)
    dataset = MaskedPairsDataset(tmp_path / "pairs")
    scores = []
    for output in outputs:
        sample = dataset[dataset.pair_ids.index(output["pair_id"])]
        size = tuple(output["preliminary"].shape[-2:])
        edited = region_crop(output["preliminary"], _resize_nearest(sample["trg_mask"], size))
        source_size = _working_size(sample["src_image"], 48)
        source = _lanczos(sample["src_image"], source_size)
        reference = region_crop(source, _resize_nearest(sample["src_mask"], source_size))
        scores.append(float(clip_image_score(embedder([edited]), embedder([reference]))[0]))
    assert results["preliminary"]["clip_score"] == pytest.approx(sum(scores) / len(scores), rel=1e-4)
    assert "CLIP score" in capsys.readouterr().out


def _resize_nearest(mask: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    from lightning_modules.components.dense import resize_nearest

    return resize_nearest(mask.to(torch.uint8), size).bool()


def _working_size(image: torch.Tensor, resolution: int) -> tuple[int, int]:
    height, width = image.shape[-2:]
    scale = resolution / max(height, width)
    return max(1, round(height * scale)), max(1, round(width * scale))


def _lanczos(image: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    from PIL import Image

    picture = Image.fromarray(image.permute(1, 2, 0).numpy()).resize((size[1], size[0]), Image.Resampling.LANCZOS)
    return torch.from_numpy(np.array(picture)).permute(2, 0, 1)


def test_swap_metrics_are_off_by_default_and_need_a_clip(tiny_dino, tmp_path) -> None:
    module = InstanceSwap(FusedCorrespondence(None, tiny_dino, alpha=0.0, pca_dims=None), refine=False)
    assert module.swap_metrics is None
    with pytest.raises(ValueError, match="model_id"):
        InstanceSwap(FusedCorrespondence(None, tiny_dino, alpha=0.0, pca_dims=None), refine=False, metrics=True,
                     clip_model=None)
