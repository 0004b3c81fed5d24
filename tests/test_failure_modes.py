"""Nothing silently wrong: preemption, bad keypoints and images, strict JSON, settings that cannot work.

(Resume, run folders and the feature cache have their own files: test_resume.py, test_feature_cache.py.)
"""

from __future__ import annotations

import functools
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from jsonargparse import ArgumentError
from PIL import Image

import evaluate
from callbacks.prediction_writer import PARTIAL_GLOB, IncompleteEvaluationError
from datamodules import SPairDataset, write_synthetic_spair
from datamodules.cub import read_part_locs
from lightning_modules.components.image_prep import load_rgb_image
from cli import SIGTERM_EXIT, resume_command

from conftest import REPO, SPAIR_CONFIG as SPAIR, TINY_OVERLAY as TINY


def _env() -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def _args(root: Path, out: Path, *extra: str) -> list[str]:
    return ["test", "--config", SPAIR, "--config", TINY, "--data.root", str(root), "--data.num_workers", "0",
            "--trainer.accelerator", "cpu", "--trainer.default_root_dir", str(out), *extra]


def _strict(text: str):
    """``json.loads`` that refuses NaN and Infinity, as strict parsers (browsers, jq) do."""
    def refuse(constant: str):
        raise ValueError(f"non-standard JSON constant {constant}")

    return json.loads(text, parse_constant=refuse)


# ------------------------------------------------------------------------------------------- SIGTERM


def test_sigterm_exits_non_zero_keeps_the_flushed_predictions_and_prints_the_resume_command(tmp_path) -> None:
    root = write_synthetic_spair(tmp_path / "spair", categories=("cat", "dog"), images_per_category=6,
                                 pairs_per_category=30)
    out = tmp_path / "run"
    # a slow featurizer keeps the run going long enough to be stopped in the middle
    slow = ["--model.pipeline.sd.image_size", "512", "--model.pipeline.sd.crop_size", "256"]
    argv = [str(REPO / "evaluate.py"), *_args(root, out, *slow)]
    proc = subprocess.Popen([sys.executable, *argv], env=_env(), cwd=tmp_path, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while not list(out.glob(PARTIAL_GLOB)) and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == SIGTERM_EXIT, stderr[-3000:]
    assert not (out / "results.json").exists()
    flushed = sum(len(p.read_text().splitlines()) for p in out.glob(PARTIAL_GLOB))
    assert 0 < flushed < 60
    command = stderr.split("resume with:\n", 1)[1].strip().splitlines()[0]
    assert command == resume_command(argv)
    resumed = subprocess.run([sys.executable, *shlex.split(command)[1:]], env=_env(), cwd=tmp_path,
                             capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert json.loads((out / "results.json").read_text())["num_pairs"] == 60


def test_resume_command_replaces_an_earlier_resume_flag() -> None:
    assert resume_command(["evaluate.py", "test", "--config", "a b.yaml", "--resume", "false"]) == (
        "python evaluate.py test --config 'a b.yaml' --resume true")
    assert resume_command(["evaluate.py", "test", "--resume=false"]) == "python evaluate.py test --resume true"


# ----------------------------------------------------------------------------- keypoints, strict JSON


def _edit_annotations(root: Path, edit) -> None:
    for path in sorted((root / "PairAnnotation" / "test").glob("*.json")):
        data = json.loads(path.read_text())
        edit(path, data)
        path.write_text(json.dumps(data))


@pytest.mark.parametrize("bad", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_non_finite_spair_keypoints_are_an_error_naming_file_and_key(tmp_path, bad) -> None:
    root = write_synthetic_spair(tmp_path / "spair", categories=("cat",), pairs_per_category=2)
    first = sorted((root / "PairAnnotation" / "test").glob("*.json"))[0]
    data = json.loads(first.read_text())
    data["trg_kps"][0][1] = bad
    first.write_text(json.dumps(data))  # Python writes NaN / Infinity, which json.loads accepts
    with pytest.raises(ValueError, match=rf"{first.name}: key 'trg_kps' holds a non-finite number"):
        SPairDataset(root)


def test_keypoints_outside_the_image_are_scored_and_counted(tmp_path, caplog) -> None:
    root = write_synthetic_spair(tmp_path / "spair", categories=("cat",), pairs_per_category=3)

    def push_out(_path, data):
        data["src_kps"][0] = [data["src_imsize"][0] + 5.0, 1.0]

    _edit_annotations(root, push_out)
    with caplog.at_level("WARNING"):
        dataset = SPairDataset(root)
    assert "3 keypoints of 3 pairs lie outside their image" in caplog.text
    assert all(r.src_kps[0, 0] > 100 for r in dataset.records)  # kept as annotated


def test_a_split_without_a_visible_keypoint_is_an_error_not_a_nan_table(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    root = write_synthetic_spair(tmp_path / "spair", categories=("cat", "dog"), pairs_per_category=2)

    def no_points(_path, data):
        data["src_kps"], data["trg_kps"], data["kps_ids"] = [], [], []

    _edit_annotations(root, no_points)
    with pytest.raises(IncompleteEvaluationError, match="no point was scored"):
        evaluate.main(_args(root, tmp_path / "run"))
    assert not (tmp_path / "run" / "results.json").exists()


def test_output_files_are_strict_json_when_a_category_has_no_point(tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)
    root = write_synthetic_spair(tmp_path / "spair", categories=("cat", "dog"), pairs_per_category=2)

    def dogs_without_points(path, data):
        if path.stem.endswith(":dog"):
            data["src_kps"], data["trg_kps"], data["kps_ids"] = [], [], []

    _edit_annotations(root, dogs_without_points)
    out = tmp_path / "run"
    evaluate.main(_args(root, out))
    results = _strict((out / "results.json").read_text())
    assert results["pck"]["0.1"]["per_category"]["cat"] is not None
    assert results["pck"]["0.1"]["per_category"].get("dog") is None
    for line in (out / "predictions.jsonl").read_text().splitlines():
        _strict(line)
    assert "nan" not in capsys.readouterr().out.lower()


def test_cub_keypoint_files_refuse_non_finite_numbers(tmp_path) -> None:
    path = tmp_path / "part_locs.txt"
    path.write_text("1 1 10.0 20.0 1\n1 2 nan 5.0 1\n")
    with pytest.raises(ValueError, match=r"part_locs.txt line 2: a non-finite number"):
        read_part_locs(path)


# ------------------------------------------------------------------------------------------- images


def _save(path: Path, image: Image.Image, **kwargs) -> Path:
    image.save(path, **kwargs)
    return path


def test_images_of_every_mode_give_the_pixels_a_viewer_shows(tmp_path) -> None:
    grey16 = (np.arange(48 * 64).reshape(48, 64) * 21).astype(np.uint16)  # up to 64491, far above 255
    path = _save(tmp_path / "grey16.png", Image.fromarray(grey16))
    assert Image.open(path).mode.startswith("I")
    expected = np.floor(grey16.astype(np.float64) * 255 / 65535 + 0.5).astype(np.uint8)
    image = load_rgb_image(path)
    assert torch.equal(image, torch.from_numpy(np.repeat(expected[None], 3, axis=0)))
    assert 0 < image.float().mean() < 200  # not the all-white of a clipping conversion

    rgb = (np.random.default_rng(0).random((20, 30, 3)) * 255).astype(np.uint8)
    alpha = np.full((20, 30), 64, np.uint8)
    rgba = _save(tmp_path / "rgba.png", Image.fromarray(np.dstack([rgb, alpha]), "RGBA"))
    over_white = np.floor((rgb.astype(int) * 64 + 255 * (255 - 64)) / 255 + 0.5)  # alpha over a white page
    assert (load_rgb_image(rgba).permute(1, 2, 0).numpy().astype(int) - over_white).__abs__().max() <= 1

    grey = _save(tmp_path / "grey.png", Image.fromarray(rgb[..., 0]))
    assert torch.equal(load_rgb_image(grey), torch.from_numpy(rgb[..., 0]).expand(3, -1, -1))
    palette = _save(tmp_path / "palette.png", Image.fromarray(rgb).quantize(16))
    assert torch.equal(load_rgb_image(palette), torch.from_numpy(np.array(Image.open(palette).convert("RGB"))).permute(2, 0, 1))
    cmyk = _save(tmp_path / "cmyk.tif", Image.fromarray(rgb).convert("CMYK"))
    assert (load_rgb_image(cmyk).permute(1, 2, 0).numpy().astype(int) - rgb).__abs__().max() <= 1


def test_pixels_without_an_8_bit_meaning_are_a_clear_error(tmp_path) -> None:
    path = _save(tmp_path / "float.tif", Image.fromarray(np.ones((4, 4), np.float32)))
    with pytest.raises(ValueError, match=r"float.tif: 32-bit float pixels"):
        load_rgb_image(path)


# -------------------------------------------------------------------------- settings that cannot work


@pytest.fixture
def no_model_may_load(monkeypatch):
    """Any featurizer construction fails the test: the error must come before."""
    from lightning_modules.components import DinoFeaturizer, SDFeaturizer

    for cls in (SDFeaturizer, DinoFeaturizer):
        @functools.wraps(cls.__init__)  # the CLI still reads the constructor's signature
        def refuse(*_args, **_kwargs):
            raise AssertionError("a model was loaded before the setting error was reported")

        monkeypatch.setattr(cls, "__init__", refuse)


@pytest.mark.parametrize("extra, message", [
    (["--model.pipeline.alpha", "2"], r'"alpha":\s+Not of type ClosedUnitInterval'),
    (["--data.init_args.batch_size", "0"], r'"batch_size":\s+Not of type PositiveInt'),
    (["--model.pipeline.pca_dims", "[0, 16, 16]"], r"PositiveInt"),
], ids=["alpha", "batch_size", "pca_dims"])
def test_out_of_range_settings_fail_at_parse_time(tmp_path, monkeypatch, no_model_may_load, extra, message):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ArgumentError, match=message):
        evaluate.main(_args(tmp_path, tmp_path / "run", *extra))


def test_the_script_reports_a_parse_error_in_a_few_lines_naming_the_field(tmp_path) -> None:
    argv = [sys.executable, str(REPO / "evaluate.py"), *_args(tmp_path, tmp_path / "run"), "--model.pipeline.alpha", "2"]
    done = subprocess.run(argv, env=_env(), cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2
    assert 'Parser key "alpha"' in done.stderr and "v>=0 and v<=1" in done.stderr and "usage:" not in done.stderr
    assert len(done.stderr.strip().splitlines()) < 12


def test_paths_that_cannot_work_fail_before_any_model_loads(tmp_path, monkeypatch, no_model_may_load) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "a_file").write_text("")  # a relative feature_cache_dir lies under the run's folder
    with pytest.raises(ValueError) as info:
        evaluate.main(_args(tmp_path, tmp_path / "run", "--model.pipeline.feature_cache_dir", "a_file",
                            "--model.pipeline.dino.model_id", "./no_such_dino",
                            "--model.pipeline.projection_ckpt", "missing.pt"))
    message = str(info.value)
    assert "before loading any model" in message
    assert "model.pipeline.feature_cache_dir: a_file is a file, not a folder" in message
    assert "model.pipeline.dino.model_id: model folder ./no_such_dino not found" in message
    assert "model.pipeline.projection_ckpt: file missing.pt not found" in message
    from cli import path_problems

    (tmp_path / "a_file").write_text("")  # the working directory's a_file is not where the cache would go
    config = {"trainer": {"default_root_dir": str(tmp_path / "elsewhere")},
              "model": {"pipeline": {"feature_cache_dir": "a_file"}}}
    assert path_problems(config) == []


def test_the_script_reports_an_error_in_a_few_lines(tmp_path) -> None:
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "a_file").write_text("")  # a relative feature_cache_dir lies under the run's folder
    argv = [sys.executable, str(REPO / "evaluate.py"), *_args(tmp_path, tmp_path / "run"),
            "--model.pipeline.feature_cache_dir", "a_file"]
    short = subprocess.run(argv, env=_env(), cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert short.returncode == 1
    assert "error: settings that cannot work" in short.stderr and "Traceback" not in short.stderr
    assert len(short.stderr.strip().splitlines()) < 12
    full = subprocess.run(argv, env={**_env(), "SD_DINO_DEBUG": "1"}, cwd=tmp_path, capture_output=True, text=True,
                          timeout=300)
    assert full.returncode == 1 and "Traceback" in full.stderr
