"""Smoke test of benchmarks/throughput.py with tiny random models (a few seconds on a 2-core CPU)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "throughput.py"


@pytest.fixture(scope="module")
def throughput():
    spec = importlib.util.spec_from_file_location("benchmark_throughput", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_tiny_run_counts_passes_and_matches_the_baseline(throughput, tmp_path: Path, capsys) -> None:
    out = tmp_path / "throughput.json"
    # One thread: on a shared 2-core machine two OpenMP threads make tiny ops many times slower.
    argv = ["--tiny", "--quiet", "--device", "cpu", "--threads", "1", "--categories", "2", "--images", "3",
            "--pairs-per-image", "3", "--image-size", "160", "120", "--spair-test-images", "100", "--out", str(out)]
    threads = torch.get_num_threads()
    try:
        returned = throughput.main(argv)
    finally:
        torch.set_num_threads(threads)  # process-wide: leave the rest of the session as it was
    report = json.loads(out.read_text())
    assert report["setup"]["pairs"] == returned["setup"]["pairs"]
    printed = capsys.readouterr().out
    assert "speed-up / pass ratio" in printed and "projection" in printed

    (result,) = report["results"]
    pairs, unique = result["pairs"], result["unique_images"]
    assert pairs == report["setup"]["pairs"] > unique > 0
    assert result["precision"] == "fp32"
    assert result["baseline"]["passes"] == {"sd": 2 * pairs, "dino": 2 * pairs}
    assert result["ours"]["passes"] == {"sd": unique, "dino": unique}
    assert result["pass_ratio"] == pytest.approx(2 * pairs / unique)
    assert result["cache"]["entries"] == 2 * unique
    assert result["predictions_match"]["equal_pairs"] == pairs
    assert result["distances_match"]["equal_pairs"] == pairs
    for name in ("baseline", "ours"):
        run = result[name]
        assert run["wall_s"] > 0 and run["pairs_per_s"] > 0
        assert run["extract_s"] > 0 and run["match_s"] > 0
        assert run["extract_s"] + run["match_s"] <= run["wall_s"] * 1.001
    for key in ("speedup", "speedup_over_pass_ratio", "images_per_s", "match_s_per_pair", "targets", "feature_shapes"):
        assert key in result
    projection = result["projection"]
    assert projection["spair_test_pairs"] == 12234 and projection["spair_test_images"] == 100
    assert projection["ours_s"] > 0 and projection["baseline_s"] > 0
    assert "not measured" in projection["spair_test_images_source"]
    assert report["process_peak_rss_mib"] > 0


def test_reduced_precision_is_cuda_only(throughput) -> None:
    with pytest.raises(SystemExit, match="cuda only"):
        throughput.main(["--tiny", "--device", "cpu", "--precision", "fp16"])


def test_batched_pairs_predict_what_one_pair_per_call_does(throughput, tmp_path: Path) -> None:
    out = tmp_path / "batched.json"
    threads = torch.get_num_threads()
    try:
        throughput.main(["--tiny", "--quiet", "--device", "cpu", "--threads", "1", "--categories", "2", "--images",
                         "3", "--pairs-per-image", "3", "--image-size", "160", "120", "--pair-batch", "4",
                         "--out", str(out)])
    finally:
        torch.set_num_threads(threads)
    (result,) = json.loads(out.read_text())["results"]
    assert result["pair_batch"] == 4
    # ours (4 pairs per call, batched co-PCA) against the baseline (one pair per call): the same predictions
    assert result["predictions_match"]["equal_pairs"] == result["pairs"]
    assert result["distances_match"]["max_abs_diff"] == 0.0
    for name in ("baseline", "ours"):
        assert 0 < result[name]["co_pca_s"] <= result[name]["match_s"]
