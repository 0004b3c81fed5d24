"""One image file under two categories (a VOC photo in PF-Pascal holds a dining table and a motorbike).

The identity of an image for extraction and the cache is (file, prompt): the file's SD features come once per
prompt and each pair gets its own category's; its prompt-free (DINO) features come once. Predictions of a batch
holding both equal those of one pair at a time, with and without the feature cache, in the zero-shot pipeline,
the ablation module and a whole ``evaluate.py`` run (the DDP run is in ``test_distributed.py``).
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch

import evaluate
from datamodules import PFPascalDataset
from datamodules.pfpascal import PF_PASCAL_CATEGORIES, write_synthetic_pfpascal
from lightning_modules.components import DinoFeaturizer, FusedCorrespondence, SDFeaturizer
from lightning_modules.components.ablation import AblationCorrespondence, AblationRow
from lightning_modules.components.features import sample_image_key, unique_images

from conftest import CONFIGS, CPU_ARGS, TINY_OVERLAY

#: Rows added to the fixture's csv: (source, target, class): 2008_000101 (a "cat" image) also serves "dog",
#: 2009_000303 (a "dog" image) and 2010_000505 (an "aeroplane" image) also serve "cat".
SHARED_ROWS = [("2008_000101", "2009_000303", "dog"), ("2009_000303", "2008_000101", "cat"),
               ("2008_000202", "2010_000505", "cat")]


def write_shared_image_pfpascal(base: Path) -> Path:
    """The PF-Pascal fixture plus :data:`SHARED_ROWS`: three JPEGs each named under two classes."""
    root, _ = write_synthetic_pfpascal(base, with_mat=False)
    csv_path = root / "test_pairs_pf_pascal.csv"
    with open(csv_path, newline="") as fh:
        rows = list(csv.reader(fh))
    rng = np.random.default_rng(7)
    for src, trg, category in SHARED_ROWS:
        points = [[float(v) for v in rng.integers(4, 90, 3)] for _ in range(4)]  # inside every fixture image
        rows.append([f"PF-dataset-PASCAL/JPEGImages/{src}.jpg", f"PF-dataset-PASCAL/JPEGImages/{trg}.jpg",
                     str(PF_PASCAL_CATEGORIES.index(category) + 1), *(";".join(map(repr, p)) for p in points)])
    with open(csv_path, "w", newline="") as fh:
        csv.writer(fh).writerows(rows)
    return root


@pytest.fixture(scope="module")
def shared_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_shared_image_pfpascal(tmp_path_factory.mktemp("pfpascal_shared"))


@pytest.fixture(scope="module")
def samples(shared_root: Path) -> list[dict]:
    dataset = PFPascalDataset(shared_root)
    return [dataset[i] for i in range(len(dataset))]


def _inputs(samples: list[dict]) -> tuple[set, set]:
    """The distinct (file, category) and the distinct files of a batch."""
    pairs = {(s[f"{side}_image_path"], s["category"]) for s in samples for side in ("src", "trg")}
    return pairs, {path for path, _ in pairs}


def test_the_fixture_names_one_file_under_two_categories(samples) -> None:
    by_file: dict[str, set] = {}
    for s in samples:
        for side in ("src", "trg"):
            by_file.setdefault(Path(s[f"{side}_image_path"]).stem, set()).add(s["category"])
    assert by_file["2008_000101"] == {"cat", "dog"} and by_file["2009_000303"] == {"cat", "dog"}
    assert by_file["2010_000505"] == {"aeroplane", "cat"}
    pairs, files = _inputs(samples)
    assert len(pairs) == len(files) + 3
    assert len(unique_images(samples)) == len(pairs)  # one image per (file, prompt)


@pytest.mark.parametrize("cache_gb", [0.0, 4.0], ids=["no_cache", "memory_cache"])
def test_a_batch_with_a_shared_file_predicts_as_one_pair_at_a_time(
    tiny_sd: SDFeaturizer, tiny_dino: DinoFeaturizer, samples: list[dict], cache_gb: float
) -> None:
    together = FusedCorrespondence(tiny_sd, tiny_dino, pca_dims=(16, 16, 8), feature_cache_gb=cache_gb)
    batched = together.predict_pairs(samples)
    pairs, files = _inputs(samples)
    # SD once per (file, prompt), DINO once per file: the shared JPEGs are run twice by SD, once by DINO
    assert together.extraction_passes == {"sd": len(pairs), "dino": len(files)}
    for sample, got in zip(samples, batched):
        alone = FusedCorrespondence(tiny_sd, tiny_dino, pca_dims=(16, 16, 8), feature_cache_gb=0)
        expected = alone.predict_pairs([sample])[0]
        assert got.keys() == expected.keys()
        assert torch.equal(got["pred_kps"], expected["pred_kps"]), sample["pair_id"]
        # the extraction batch differs (11 images vs 2): on one thread its last bits may (as for any batch)
        torch.testing.assert_close(got["distance"], expected["distance"], rtol=0, atol=1e-5)


def test_the_shared_file_gets_each_prompts_sd_features_and_one_dino_map(
    tiny_sd: SDFeaturizer, tiny_dino: DinoFeaturizer, samples: list[dict]
) -> None:
    pipeline = FusedCorrespondence(tiny_sd, tiny_dino, pca_dims=(16, 16, 8), feature_cache_gb=0)
    features = pipeline.batch_features(samples)
    cat = next(s for s in samples if s["category"] == "cat" and s["src_image_path"].endswith("2008_000101.jpg"))
    dog = next(s for s in samples if s["category"] == "dog" and s["src_image_path"].endswith("2008_000101.jpg"))
    as_cat, as_dog = features[sample_image_key(cat, "src")], features[sample_image_key(dog, "src")]
    assert not torch.equal(as_cat.sd[0], as_dog.sd[0])  # "a photo of a cat" vs "a photo of a dog"
    assert as_cat.dino is as_dog.dino  # one DINO pass serves both
    alone = pipeline.batch_features([dog])[sample_image_key(dog, "src")]
    for a, b in zip(as_dog.sd, alone.sd):  # the dog's features, up to the batch's last bits
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


def test_the_disk_cache_keeps_one_entry_per_prompt(
    tiny_sd: SDFeaturizer, tiny_dino: DinoFeaturizer, samples: list[dict], tmp_path: Path
) -> None:
    first = FusedCorrespondence(tiny_sd, tiny_dino, pca_dims=(16, 16, 8), feature_cache_gb=0,
                                feature_cache_dir=str(tmp_path))
    batched = first.predict_pairs(samples)
    pairs, files = _inputs(samples)
    assert len(list(tmp_path.rglob("*.safetensors"))) == len(pairs) + len(files)
    again = FusedCorrespondence(tiny_sd, tiny_dino, pca_dims=(16, 16, 8), feature_cache_gb=0,
                                feature_cache_dir=str(tmp_path))
    for sample, expected in zip(samples, batched):  # one pair at a time, every entry from disk
        assert torch.equal(again.predict_pairs([sample])[0]["pred_kps"], expected["pred_kps"])
    assert again.extraction_passes == {"sd": 0, "dino": 0}


def test_the_ablation_module_predicts_a_shared_file_as_one_pair_at_a_time(
    tiny_sd: SDFeaturizer, tiny_dino: DinoFeaturizer, samples: list[dict]
) -> None:
    rows = [AblationRow("fused", pca_dims=8), AblationRow("sd", dino=None, pca_dims=8),
            AblationRow("fused t0", sd="t0", pca_dims=8, pose_alignment=False)]

    def ablation() -> AblationCorrespondence:
        return AblationCorrespondence(rows, sd=tiny_sd, dino=tiny_dino, sd_variants={"t0": {"timestep": 0}},
                                      flip_pairs={"*": []})

    module = ablation()
    batched = module.predict_pairs(samples)
    pairs, files = _inputs(samples)
    assert module.extraction_passes == {"sd:default": len(pairs), "sd:t0": len(pairs), "dino:default": len(files)}
    for index, sample in enumerate(samples):
        alone = ablation().predict_pairs([sample])
        for row in alone:
            assert torch.equal(batched[row][index]["pred_kps"], alone[row][0]["pred_kps"]), (row, sample["pair_id"])


def _run(root: Path, out: Path, batch_size: int) -> tuple[list[str], dict]:
    evaluate.main(["test", "--config", str(CONFIGS / "pfpascal.yaml"), "--config", TINY_OVERLAY,
                   "--data.root", str(root), *CPU_ARGS, "--data.init_args.batch_size", str(batch_size),
                   "--trainer.default_root_dir", str(out), "--trainer.enable_progress_bar", "false"])
    results = json.loads((out / "results.json").read_text())
    return (out / "predictions.jsonl").read_text().splitlines(), results


def test_a_pfpascal_run_with_a_shared_file_in_one_batch_equals_batch_size_one(
    shared_root: Path, samples: list[dict], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    whole, whole_results = _run(shared_root, tmp_path / "whole", batch_size=len(samples))  # one batch
    single, single_results = _run(shared_root, tmp_path / "single", batch_size=1)
    assert len(whole) == len(samples) == 8
    assert whole == single
    pairs, files = _inputs(samples)
    assert whole_results["extraction_passes"] == {"sd": len(pairs), "dino": len(files)}
    for key in ("pck", "num_pairs", "num_points"):
        assert whole_results[key] == single_results[key]
