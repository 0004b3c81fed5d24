"""What a command prints for bad input: the project's own message (file, entry, field), before any model loads.

``cli.run_script`` prints one paragraph per error. The project wraps a library's error in its own (``... is not
a readable image (cannot identify image file ...)``); the message printed is that one, not the library's bare
one underneath it (which names no entry and, for a truncated JPEG, came only after the models had loaded).
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import pytest
from PIL import Image

import evaluate
from cli import run_script
from datamodules.own_images import write_example_photos
from lightning_modules.components import SDFeaturizer

from conftest import TINY_OVERLAY, CONFIGS


@pytest.fixture
def photos(tmp_path: Path) -> Path:
    return write_example_photos(tmp_path / "photos")


def _error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture, *args: str,
           command: tuple[str, str] = ("predict", "match.yaml")) -> str:
    """Run ``evaluate.py predict`` (configs/match.yaml, tiny models; or another ``command``: subcommand and
    config) as the script does; its exit status must be 1, no SD model may have been built, and the printed
    error is returned."""
    built = []
    original = SDFeaturizer.__init__

    @functools.wraps(original)  # the CLI reads the signature
    def spy(self, *args, **kwargs):  # noqa: ANN001, ANN202
        built.append(1)
        original(self, *args, **kwargs)

    monkeypatch.setattr(SDFeaturizer, "__init__", spy)
    monkeypatch.delenv("SD_DINO_DEBUG", raising=False)
    argv = [command[0], "--config", str(CONFIGS / command[1]), "--config", TINY_OVERLAY, "--trainer.accelerator",
            "cpu", "--trainer.default_root_dir", str(tmp_path / "run"), *args]
    with pytest.raises(SystemExit) as stop:
        run_script(lambda: evaluate.main(argv), ["evaluate.py", *argv])
    assert stop.value.code == 1 and built == []
    return capsys.readouterr().err


def _pairs(photos: Path, **changes: object) -> str:
    entries = json.loads(photos.read_text())
    entries[1].update(changes)
    photos.write_text(json.dumps(entries))
    return str(photos)


def test_a_file_that_is_not_an_image_is_named_with_its_entry(photos, tmp_path, monkeypatch, capsys) -> None:
    (photos.parent / "notes.jpg").write_text("not a picture")
    err = _error(tmp_path, monkeypatch, capsys, "--data.pairs", _pairs(photos, target="notes.jpg"))
    assert "pairs.json entry 1" in err and "notes.jpg is not a readable image" in err
    assert err.startswith("error: ") and "(ValueError;" in err


def test_a_truncated_jpeg_is_found_before_the_models_load(photos, tmp_path, monkeypatch, capsys) -> None:
    whole = photos.parent / "whole.jpg"
    Image.open(photos.parent / "source.png").convert("RGB").save(whole, quality=90)
    cut = photos.parent / "cut.jpg"
    cut.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    with Image.open(cut) as header_only:  # the header alone looks fine: only decoding finds the cut
        assert header_only.size == (160, 120)
    err = _error(tmp_path, monkeypatch, capsys, "--data.pairs", _pairs(photos, target="cut.jpg"))
    assert "pairs.json entry 1" in err and "cut.jpg is not a readable image" in err and "truncated" in err


def test_a_string_for_a_coordinate_names_the_entry_and_the_field(photos, tmp_path, monkeypatch, capsys) -> None:
    err = _error(tmp_path, monkeypatch, capsys, "--data.pairs", _pairs(photos, source_keypoints=[["ten", 5]]))
    assert "pairs.json entry 1" in err and "source_keypoints" in err and "expected [[x, y], ...] numbers" in err
    assert "could not convert string to float" not in err.splitlines()[0][:40]  # not the bare numpy message


def test_a_file_over_the_own_images_pixel_limit_is_named(photos, tmp_path, monkeypatch, capsys) -> None:
    from lightning_modules.components import image_prep

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 4000)  # PIL's guard does not apply to own images (issue 26)
    monkeypatch.setattr(image_prep, "USER_IMAGE_MAX_PIXELS", 4000)  # the photos have 19,200 pixels
    err = _error(tmp_path, monkeypatch, capsys, "--data.pairs", str(photos))
    assert "pairs.json entry 0" in err and "160x120 = 0.0 megapixels, above the limit of 0 megapixels" in err
    assert "downscale it" in err


def test_a_pairs_file_that_is_not_json_is_named(photos, tmp_path, monkeypatch, capsys) -> None:
    photos.write_text('[{"source": "source.png", "target": "targets/target_0.png"},]')  # a trailing comma
    err = _error(tmp_path, monkeypatch, capsys, "--data.pairs", str(photos))
    assert f"{photos}: not valid JSON" in err and "line 1" in err


@pytest.mark.parametrize("config, name", [("spair.yaml", "SPair-71k"), ("pfpascal.yaml", "PF-PASCAL"),
                                          ("pfwillow.yaml", "PF-WILLOW"), ("cub.yaml", "CUB-200-2011"),
                                          ("tss.yaml", "TSS"), ("davis.yaml", "DAVIS")])
def test_a_benchmark_root_that_is_not_there_is_named_before_any_model_loads(config, name, tmp_path, monkeypatch,
                                                                            capsys) -> None:
    """A typo in ``--data.root`` (or none given) stops the run before the models are built: with the paper's
    weights that is a minute sooner (before: the benchmark's reader found it in ``setup``, after the models)."""
    missing = tmp_path / "typo"
    err = _error(tmp_path, monkeypatch, capsys, "--data.root", str(missing), command=("test", config))
    assert err.startswith(f"error: {name} root not found: {missing}; expected")
    err = _error(tmp_path, monkeypatch, capsys, command=("test", config))
    assert err.startswith("error: ") and "needs `root` (--data.root DIR)" in err


@pytest.mark.parametrize("workers", [0, 2])
def test_a_truncated_benchmark_image_is_one_line_also_from_a_dataloader_worker(workers, tmp_path, monkeypatch,
                                                                             capsys) -> None:
    """A benchmark's images are read when their batch loads. Read by a DataLoader worker (the benchmark configs
    use 2), torch re-raises the worker's error as the worker's whole traceback in text: the project's own message
    (the file and the reason) is what is printed, in one paragraph."""
    from datamodules import write_synthetic_spair

    root = write_synthetic_spair(tmp_path / "spair", categories=("cat",), images_per_category=3,
                                 pairs_per_category=2)
    image = sorted((root / "JPEGImages" / "cat").glob("*.jpg"))[0]
    image.write_bytes(image.read_bytes()[:400])
    monkeypatch.delenv("SD_DINO_DEBUG", raising=False)
    argv = ["test", "--config", str(CONFIGS / "spair.yaml"), "--config", TINY_OVERLAY, "--trainer.accelerator",
            "cpu", "--trainer.default_root_dir", str(tmp_path / "run"), "--data.root", str(root),
            "--data.num_workers", str(workers)]
    with pytest.raises(SystemExit) as stop:
        run_script(lambda: evaluate.main(argv), ["evaluate.py", *argv])
    err = capsys.readouterr().err
    assert stop.value.code == 1 and f"\nerror: Could not read image {image}: " in f"\n{err}", err
    paragraph = err[err.index("error: "):]
    assert "Traceback" not in err and "DataLoader worker" not in err and len(paragraph.strip().splitlines()) == 2
