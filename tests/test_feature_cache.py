"""The per-image feature cache: memory bound, disk entries, keys, and one extraction per image per run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from datamodules import SPairDataset, write_synthetic_spair
from lightning_modules.components import FusedCorrespondence
from lightning_modules.components.feature_cache import FORMAT_VERSION, FeatureCache, image_digest

from conftest import REPO, SPAIR_CONFIG as SPAIR, TINY_OVERLAY as TINY


def _counting(values: dict[str, torch.Tensor], keys: list[str], calls: list[list[int]]):
    def compute(indices: list[int]) -> list[tuple[torch.Tensor, ...]]:
        calls.append(list(indices))
        return [(values[keys[i]].clone(),) for i in indices]

    return compute


# ------------------------------------------------------------------------------------------------ memory


def test_memory_cache_computes_only_misses_once_each() -> None:
    cache = FeatureCache(memory_bytes=1 << 20)
    values = {k: torch.full((4,), float(i)) for i, k in enumerate("abc")}
    calls: list[list[int]] = []
    keys = ["a", "b", "a", "c"]
    out, computed = cache.fetch(keys, _counting(values, keys, calls), torch.device("cpu"))
    assert calls == [[0, 1, 3]] and computed == 3  # "a" asked twice, run once
    assert [t[0][0].item() for t in out] == [0.0, 1.0, 0.0, 2.0]
    keys2 = ["c", "a"]
    out, computed = cache.fetch(keys2, _counting(values, keys2, calls), torch.device("cpu"))
    assert computed == 0 and len(calls) == 1 and cache.hits == 2
    assert [t[0][0].item() for t in out] == [2.0, 0.0]


def test_memory_cache_is_bounded_in_bytes_and_evicts_least_recently_used() -> None:
    cache = FeatureCache(memory_bytes=2 * 16)  # two 4-float tensors
    values = {k: torch.zeros(4) for k in "abc"}
    calls: list[list[int]] = []
    for keys in (["a"], ["b"], ["a"], ["c"]):  # "a" used again, so "b" is the least recently used
        cache.fetch(keys, _counting(values, keys, calls), torch.device("cpu"))
    assert cache.used_bytes == 32 and len(cache) == 2
    keys = ["a", "b"]
    _, computed = cache.fetch(keys, _counting(values, keys, calls), torch.device("cpu"))
    assert computed == 1 and calls[-1] == [1]  # "b" was evicted, "a" kept
    zero = FeatureCache(memory_bytes=0)
    zero.fetch(["a"], _counting(values, ["a"], calls), torch.device("cpu"))
    assert len(zero) == 0
    with pytest.raises(ValueError, match="memory_bytes must be >= 0"):
        FeatureCache(memory_bytes=-1)


# -------------------------------------------------------------------------------------------------- disk


def _disk_round(directory: Path, keys: list[str], values: dict[str, torch.Tensor]) -> tuple[FeatureCache, int]:
    cache = FeatureCache(memory_bytes=0, directory=directory)
    calls: list[list[int]] = []
    out, computed = cache.fetch(keys, _counting(values, keys, calls), torch.device("cpu"))
    for key, features in zip(keys, out):
        assert torch.equal(features[0], values[key])
    return cache, computed


def test_disk_cache_serves_a_later_run(tmp_path: Path) -> None:
    values = {"a": torch.randn(3, 5), "b": torch.randn(2)}
    _, first = _disk_round(tmp_path, ["a", "b"], values)
    cache, second = _disk_round(tmp_path, ["b", "a"], values)
    assert (first, second) == (2, 0) and cache.disk_hits == 2
    assert len(list(tmp_path.rglob("*.safetensors"))) == 2 and not list(tmp_path.rglob("*.partial"))


def test_corrupt_disk_entry_is_recomputed_and_replaced(tmp_path: Path) -> None:
    values = {"a": torch.randn(64)}
    cache, _ = _disk_round(tmp_path, ["a"], values)
    path = cache.path_for("a")
    path.write_bytes(path.read_bytes()[:40])  # truncated, as after a crash of another writer
    cache, computed = _disk_round(tmp_path, ["a"], values)
    assert computed == 1 and cache.rejected == 1
    cache, computed = _disk_round(tmp_path, ["a"], values)  # replaced by a good entry
    assert computed == 0 and cache.rejected == 0


def test_damaged_tensor_bytes_are_detected_recomputed_and_logged(tmp_path: Path, caplog) -> None:
    """The header (key, format) intact, a byte of the tensor data flipped: the checksum catches it."""
    values = {"a": torch.randn(64)}
    cache, _ = _disk_round(tmp_path, ["a"], values)
    path = cache.path_for("a")
    data = bytearray(path.read_bytes())
    data[-3] ^= 0xFF  # inside the last float's bytes
    path.write_bytes(bytes(data))
    with caplog.at_level("WARNING"):
        cache, computed = _disk_round(tmp_path, ["a"], values)  # asserts the values are the computed ones
    assert computed == 1 and cache.rejected == 1 and cache.disk_hits == 0
    assert "checksum mismatch" in caplog.text and str(path) in caplog.text
    cache, computed = _disk_round(tmp_path, ["a"], values)  # replaced by a good entry
    assert computed == 0 and cache.disk_hits == 1


@pytest.mark.parametrize("metadata", [{"key": "another", "format": FORMAT_VERSION, "count": "1"},
                                      {"key": "a", "format": "0", "count": "1"},
                                      {"key": "a", "format": FORMAT_VERSION, "count": "1"}],
                         ids=["key", "format", "no-checksum"])
def test_stale_disk_entry_is_recomputed_never_used(tmp_path: Path, metadata: dict) -> None:
    from safetensors.torch import save_file

    values = {"a": torch.randn(8)}
    cache = FeatureCache(memory_bytes=0, directory=tmp_path)
    path = cache.path_for("a")
    path.parent.mkdir(parents=True)
    save_file({"0": torch.zeros(8)}, str(path), metadata=metadata)  # wrong content under the right name
    cache, computed = _disk_round(tmp_path, ["a"], values)  # asserts the values are the computed ones
    assert computed == 1 and cache.rejected == 1


# -------------------------------------------------------------------------------------------------- keys


def test_image_digest_depends_on_content_and_shape() -> None:
    image = torch.randint(0, 255, (3, 8, 6), dtype=torch.uint8)
    assert image_digest(image) == image_digest(image.clone())
    changed = image.clone()
    changed[0, 0, 0] ^= 1
    assert image_digest(changed) != image_digest(image)
    assert image_digest(image.reshape(3, 6, 8)) != image_digest(image)


def test_cache_keys_follow_what_the_features_depend_on(tiny_sd, tiny_dino) -> None:
    from lightning_modules.components import DinoFeaturizer, SDFeaturizer

    assert tiny_sd.cache_key("cat") == tiny_sd.variant().cache_key("cat")
    assert tiny_sd.cache_key("cat") != tiny_sd.cache_key("dog")  # the prompt names the category
    assert tiny_sd.cache_key("cat") != tiny_sd.variant(timestep=50).cache_key("cat")
    assert tiny_sd.cache_key("cat") != tiny_sd.variant(prompt="").cache_key("cat")
    other_weights = SDFeaturizer(model_id=None, random_init={"seed": 1}, image_size=192, crop_size=128)
    assert other_weights.cache_key("cat") != tiny_sd.cache_key("cat")
    assert tiny_dino.cache_key("cat") == tiny_dino.cache_key("dog")  # DINO features ignore the category
    assert tiny_dino.cache_key() != tiny_dino.variant(layer=2).cache_key()
    same = DinoFeaturizer(model_id=None, random_init={"seed": 0, "num_hidden_layers": 4}, layer=3, image_size=224)
    assert same.cache_key() == tiny_dino.cache_key()  # same config and weights, another instance


# ------------------------------------------------------------------------------------------------ pipeline


def _samples(n_images: int = 3) -> list[dict]:
    gen = torch.Generator().manual_seed(0)
    images = [torch.randint(0, 255, (3, 60 + 10 * i, 80), generator=gen, dtype=torch.uint8) for i in range(n_images)]
    kps = torch.tensor([[5.0, 6.0], [30.0, 20.0], [70.0, 50.0]])
    return [
        {"src_image": images[a], "trg_image": images[b], "src_image_path": f"{a}.jpg", "trg_image_path": f"{b}.jpg",
         "category": "cat", "src_kps": kps}
        for a, b in ((0, 1), (1, 2), (2, 0), (0, 2))
    ]


def test_cached_pipeline_extracts_each_image_once_and_predicts_the_same(tiny_sd, tiny_dino, tmp_path) -> None:
    samples = _samples()
    plain = FusedCorrespondence(tiny_sd, tiny_dino, feature_cache_gb=0)
    expected = [o["pred_kps"] for s in samples for o in plain.predict_pairs([s])]  # one pair per batch
    assert plain.extraction_passes == {"sd": 8, "dino": 8}
    cached = FusedCorrespondence(tiny_sd, tiny_dino, feature_cache_dir=str(tmp_path))
    got = [o["pred_kps"] for s in samples for o in cached.predict_pairs([s])]
    assert cached.extraction_passes == {"sd": 3, "dino": 3}  # 3 distinct images
    again = FusedCorrespondence(tiny_sd, tiny_dino, feature_cache_gb=0, feature_cache_dir=str(tmp_path))
    from_disk = [o["pred_kps"] for o in again.predict_pairs(samples)]
    assert again.extraction_passes == {"sd": 0, "dino": 0}
    for a, b, c in zip(expected, got, from_disk):
        assert torch.equal(a, b) and torch.equal(a, c)


def test_a_second_run_with_the_disk_cache_does_no_extraction(tmp_path, monkeypatch) -> None:
    """Two runs in two fresh processes with different hash seeds: the keys must not depend on the process."""
    monkeypatch.chdir(tmp_path)
    root = write_synthetic_spair(tmp_path / "spair", categories=("cat", "dog"), pairs_per_category=4)
    dataset = SPairDataset(root)
    runs = []
    for name, hash_seed in (("first", "1"), ("second", "2")):
        args = ["test", "--config", SPAIR, "--config", TINY, "--data.root", str(root),
                "--data.num_workers", "0", "--trainer.accelerator", "cpu",
                "--model.pipeline.feature_cache_dir", str(tmp_path / "features"),
                "--trainer.default_root_dir", str(tmp_path / name)]
        env = {**os.environ, "PYTHONHASHSEED": hash_seed, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
        done = subprocess.run([sys.executable, str(REPO / "evaluate.py"), *args], env=env, cwd=tmp_path,
                              capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-4000:]
        runs.append(json.loads((tmp_path / name / "results.json").read_text()))
    unique = len(dataset.image_paths)
    assert unique < 2 * len(dataset)  # pairs share images
    assert runs[0]["extraction_passes"] == {"sd": unique, "dino": unique}
    assert runs[1]["extraction_passes"] == {"sd": 0, "dino": 0}
    assert runs[0]["pck"] == runs[1]["pck"]
    predictions = [(tmp_path / name / "predictions.jsonl").read_text() for name in ("first", "second")]
    assert predictions[0] == predictions[1]
