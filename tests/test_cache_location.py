"""Where the on-disk feature cache goes: under the run's folder when ``feature_cache_dir`` is relative, where
it says when absolute, nowhere with ``null``; a run writes nothing into the working directory it starts in."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from datamodules import write_synthetic_spair

from conftest import CONFIGS, REPO, SPAIR_CONFIG as SPAIR, TINY_OVERLAY as TINY

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
PRESET = str(CONFIGS / "projection" / "sd_dinov2_b.yaml")


@pytest.fixture(scope="module")
def spair_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("spair")
    for split, pairs in (("trn", 4), ("val", 2), ("test", 2)):
        write_synthetic_spair(root, categories=("cat", "dog"), images_per_category=3, pairs_per_category=pairs,
                              split=split, image_size=(96, 72))
    return root


def _files(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def _run(script: str, args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / script), *args], env=ENV, cwd=cwd, capture_output=True,
                          text=True, timeout=600)


@pytest.mark.parametrize("preset", sorted(p.name for p in (REPO / "configs" / "projection").glob("*.yaml")))
def test_fit_with_a_preset_writes_nothing_outside_its_run_folder(preset: str, spair_root: Path,
                                                                 tmp_path: Path) -> None:
    """The issue's command: ``train.py fit --config configs/projection/<preset>.yaml --trainer.default_root_dir
    OUT`` wrote its feature cache to ``./outputs/feature_cache`` of the working directory (every preset)."""
    cwd, out = tmp_path / "cwd", tmp_path / "out"
    cwd.mkdir()
    done = _run("train.py", [
        "fit", "--config", str(REPO / "configs" / "projection" / preset), "--config", TINY, "--data.root", str(spair_root), "--data.init_args.num_workers", "0",
        "--data.init_args.val_pairs_per_category", "null", "--trainer.accelerator", "cpu", "--trainer.max_epochs", "1",
        "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
        "--model.init_args.out_dim", "8", "--model.init_args.hidden_dim", "8", "--trainer.default_root_dir", str(out),
    ], cwd)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert _files(cwd) == []
    cache = out / "feature_cache"  # the preset's relative feature_cache_dir, under the run's folder
    assert list(cache.rglob("*.safetensors")) and (out / "checkpoints" / "last.ckpt").is_file()
    assert f"feature cache on disk: {cache} (model.pipeline.feature_cache_dir feature_cache is relative" in done.stderr


def test_evaluate_puts_a_relative_cache_under_its_run_folder_and_keeps_an_absolute_one(spair_root: Path,
                                                                                      tmp_path: Path) -> None:
    cwd, out, shared = tmp_path / "cwd", tmp_path / "out", tmp_path / "shared_cache"
    cwd.mkdir()
    common = ["test", "--config", SPAIR, "--config", TINY, "--data.root", str(spair_root), "--data.num_workers", "0",
              "--trainer.accelerator", "cpu", "--trainer.enable_progress_bar", "false"]
    done = _run("evaluate.py", [*common, "--model.pipeline.feature_cache_dir", "features/spair",
                                "--trainer.default_root_dir", str(out)], cwd)
    assert done.returncode == 0, done.stderr[-3000:]
    assert _files(cwd) == []
    assert list((out / "features" / "spair").rglob("*.safetensors"))
    again = _run("evaluate.py", [*common, "--model.pipeline.feature_cache_dir", str(shared),
                                 "--trainer.default_root_dir", str(tmp_path / "out2")], cwd)
    assert again.returncode == 0, again.stderr[-3000:]
    assert _files(cwd) == [] and list(shared.rglob("*.safetensors"))
    assert not (tmp_path / "out2" / str(shared).lstrip("/")).exists()
    assert f"feature cache on disk: {shared}\n" in again.stderr


@pytest.mark.parametrize("config", [PRESET, SPAIR])
def test_null_means_no_disk_cache(config: str, spair_root: Path, tmp_path: Path, monkeypatch) -> None:
    """``--model.pipeline.feature_cache_dir null`` reached the pipeline as the text ``None`` (jsonargparse, a
    value two class levels down) and made a cache folder named ``None``."""
    from cli import build_cli

    monkeypatch.chdir(tmp_path)
    cli = build_cli(["--config", config, "--config", TINY, "--data.root", str(spair_root),
                     "--model.pipeline.feature_cache_dir", "null"], run=False,
                    defaults_of="fit" if config == PRESET else "test")
    cache = cli.model.pipeline.cache
    assert cache is not None and cache.memory_bytes > 0 and cache.directory is None


def test_reproduce_passes_one_absolute_cache_to_every_run(tmp_path: Path, monkeypatch) -> None:
    """A relative ``--out`` (or ``--feature-cache``) still gives every row the one shared cache."""
    monkeypatch.syspath_prepend(str(REPO / "scripts"))
    import reproduce
    from reproduction.runs import plan_runs

    monkeypatch.chdir(tmp_path)
    args = reproduce.parse_args(["--data-dir", "data", "--out", "runs"])
    assert args.out == tmp_path / "runs" and args.data_dir == tmp_path / "data"
    for given, expected in (("default", tmp_path / "runs" / "feature_cache"), (Path("elsewhere"), tmp_path / "elsewhere")):
        runs = plan_runs(["spair", "pfpascal"], ["fused"], {"spair": tmp_path, "pfpascal": tmp_path}, Path("runs"), 1,
                         feature_cache=given)
        caches = {r.args[r.args.index("--model.pipeline.feature_cache_dir") + 1] for r in runs}
        assert caches == {str(expected)}
