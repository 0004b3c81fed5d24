"""`evaluate.py predict --config configs/match.yaml` on own images: the inputs, their errors, the outputs."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import evaluate
from callbacks.visualization import safe_filename
from datamodules.own_images import ImagePairsDataModule, grid_points, read_image_pairs, write_example_photos
from lightning_modules.components import SDFeaturizer
from lightning_modules.components.sd_featurizer import WholePrompt

from conftest import CONFIGS, TINY_OVERLAY, tiny_overlay_args

MATCH_CONFIG = str(CONFIGS / "match.yaml")


@pytest.fixture()
def photos(tmp_path: Path) -> Path:
    return write_example_photos(tmp_path / "photos")


def _write(path: Path, entries: object) -> Path:
    path.write_text(json.dumps(entries), encoding="utf-8")
    return path


# --- inputs --------------------------------------------------------------------------------------------------


def test_pairs_file_gives_keypoints_or_a_lattice_in_the_box_or_mask(photos: Path) -> None:
    pairs = read_image_pairs(pairs=str(photos), grid=4)
    assert [p["pair_id"] for p in pairs] == ["source->target_0", "source->target_1", "masked"]
    assert pairs[0]["points"] == [[48.0, 38.0], [80.0, 60.0], [111.0, 81.0]] and pairs[0]["category"] == "toy"
    box = json.loads(photos.read_text())[1]["source_box"]
    assert len(pairs[1]["points"]) == 16 and pairs[1]["category"] == "object"
    assert all(box[0] <= x < box[2] and box[1] <= y < box[3] for x, y in pairs[1]["points"])
    assert isinstance(pairs[2]["category"], WholePrompt) and pairs[2]["category"] == "a photo of a toy"
    assert Path(pairs[2]["source"]).is_absolute() and Path(pairs[2]["target"]).name == "target_2.png"


def test_grid_points_cover_the_image_box_or_only_the_mask() -> None:
    assert grid_points((100, 50), 2) == [[25.0, 12.5], [75.0, 12.5], [25.0, 37.5], [75.0, 37.5]]
    assert grid_points((100, 50), 1, box=(10, 10, 30, 20)) == [[20.0, 15.0]]
    mask = np.zeros((50, 100), dtype=bool)
    mask[:, :40] = True
    mask[:25, :] = True  # an L: the lattice over its bounding box keeps the points on it
    points = grid_points((100, 50), 2, mask=mask)
    assert points == [[25.0, 12.5], [75.0, 12.5], [25.0, 37.5]]


def test_a_collection_is_the_source_against_every_other_image_of_the_folder(photos: Path) -> None:
    folder = photos.parent / "targets"
    Image.open(photos.parent / "source.png").save(folder / "source_copy.jpg")
    (folder / "notes.txt").write_text("not an image")
    keypoints = _write(photos.parent / "kps.json", [[50, 40], [70, 60]])
    pairs = read_image_pairs(source=str(photos.parent / "source.png"), targets=str(folder),
                             source_keypoints=str(keypoints), category="toy")
    assert [Path(p["target"]).name for p in pairs] == ["source_copy.jpg", "target_0.png", "target_1.png",
                                                        "target_2.png"]
    assert all(p["points"] == [[50.0, 40.0], [70.0, 60.0]] and p["category"] == "toy" for p in pairs)
    inline = read_image_pairs(source=str(photos.parent / "source.png"), targets=str(folder), grid=3)
    assert len(inline[0]["points"]) == 9


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ({"target": "targets/target_0.png"}, r"pairs.json entry 0: missing field 'source'"),
        ({"source": "source.png", "target": "nope.png"}, r"entry 0 'target': no such image file .*nope.png"),
        ({"source": "broken.jpg", "target": "source.png"}, r"entry 0 'source': .*broken.jpg is not a readable image"),
        ({"source": "source.png", "target": "source.png", "source_keypoints": [[10, 10], [160, 5]]},
         r"entry 0 'source_keypoints': point 1 \[160.0, 5.0\] lies outside the 160x120 image"),
        ({"source": "source.png", "target": "source.png", "source_keypoints": [[1, 2, 3]]},
         r"'source_keypoints': expected a non-empty list of \[x, y\] points"),
        ({"source": "source.png", "target": "source.png", "source_box": [50, 50, 40, 60]},
         r"'source_box': box .* is empty or not inside the 160x120 image"),
        ({"source": "source.png", "target": "source.png", "source_mask": "targets/target_0.png", "x": 1},
         r"entry 0: unknown field\(s\) \['x'\]"),
        ({"source": "source.png", "target": "source.png", "source_mask": "small_mask.png"},
         r"'source_mask': mask .*small_mask.png is 10x10, its image is 160x120"),
    ],
)
def test_bad_pairs_are_named_by_file_entry_and_field(photos: Path, entry: dict, message: str) -> None:
    (photos.parent / "broken.jpg").write_text("this is not a JPEG")
    Image.fromarray(np.full((10, 10), 255, dtype=np.uint8)).save(photos.parent / "small_mask.png")
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        read_image_pairs(pairs=str(_write(photos, [entry])))


def test_bad_collections_and_settings_are_named(photos: Path, tmp_path: Path) -> None:
    source = str(photos.parent / "source.png")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("no images here")
    with pytest.raises(ValueError, match=r"data.targets: folder .*empty holds no image"):
        read_image_pairs(source=source, targets=str(tmp_path / "empty"))
    with pytest.raises(FileNotFoundError, match=r"data.targets: no such folder"):
        read_image_pairs(source=source, targets=str(tmp_path / "missing"))
    with pytest.raises(ValueError, match=r"data.source_keypoints: point 0 \[500.0, 1.0\] lies outside"):
        read_image_pairs(source=source, targets=str(photos.parent / "targets"), source_keypoints=[[500, 1]])
    with pytest.raises(ValueError, match="either data.pairs .* or data.source"):
        read_image_pairs()
    with pytest.raises(ValueError, match="data.source needs data.targets"):
        read_image_pairs(source=source)
    with pytest.raises(ValueError, match=r"pairs.json: expected a non-empty JSON list"):
        read_image_pairs(pairs=str(_write(photos, {})))
    with pytest.raises(FileNotFoundError, match="pairs file not found"):
        read_image_pairs(pairs=str(tmp_path / "nothing.json"))


def test_whole_prompt_replaces_the_template_and_its_cache_key(tiny_sd: SDFeaturizer) -> None:
    assert tiny_sd.prompt_for("dog") == "a photo of dog"
    assert tiny_sd.prompt_for(WholePrompt("a dog on a sofa")) == "a dog on a sofa"
    assert tiny_sd.cache_key(WholePrompt("dog")) != tiny_sd.cache_key("dog")


# --- the command ---------------------------------------------------------------------------------------------


def _run(tmp_path: Path, *args: str) -> Path:
    out = tmp_path / "run"
    evaluate.main(["predict", "--config", MATCH_CONFIG, "--config", TINY_OVERLAY, "--trainer.accelerator", "cpu",
                   "--trainer.default_root_dir", str(out), *args])
    return out


def _truth(photos: Path, target: str, points: list[list[float]]) -> np.ndarray:
    matrix = np.asarray(json.loads((photos.parent / "truth.json").read_text())[Path(target).name])
    mapped = np.c_[np.asarray(points), np.ones(len(points))] @ matrix.T
    return mapped[:, :2] / mapped[:, 2:]


def test_match_command_writes_lines_pictures_and_the_viewer(photos: Path, tmp_path: Path) -> None:
    out = _run(tmp_path, "--data.pairs", str(photos))
    lines = [json.loads(line) for line in (out / "matches.jsonl").read_text().splitlines()]
    assert [line["pair_id"] for line in lines] == ["source->target_0", "source->target_1", "masked"]  # input order
    first = lines[0]
    assert first["src_kps"] == [[48.0, 38.0], [80.0, 60.0], [111.0, 81.0]] and first["category"] == "toy"
    assert first["source_size"] == [160, 120] and Path(first["target"]).name == "target_0.png"
    for line in lines:
        n = len(line["src_kps"])
        assert len(line["pred_kps"]) == len(line["confidence"]) == len(line["mutual"]) == len(line["distance"]) == n
        assert all(0.0 <= c <= 1.0 for c in line["confidence"]) and all(isinstance(m, bool) for m in line["mutual"])
        assert all(-40 < x < 200 and -40 < y < 160 for x, y in line["pred_kps"])  # target pixels (or its padding)
        width, height = line["target_size"]  # a match in the padding is kept and flagged (issue 26)
        assert line["inside"] == [-0.5 <= x <= width - 0.5 and -0.5 <= y <= height - 0.5 for x, y in line["pred_kps"]]
    assert len(lines[1]["src_kps"]) == 36 and lines[2]["category"] == "a photo of a toy"
    # the targets are known warps of the source: most of the lattice lands near where the warp sends it
    errors = np.concatenate([np.linalg.norm(np.asarray(line["pred_kps"]) - _truth(photos, line["target"], line["src_kps"]),
                                            axis=1) for line in lines])
    assert np.mean(errors < 16.0) > 0.5, errors  # 0.1 x the long side
    pictures = sorted(p.name for p in (out / "pictures").iterdir())  # one per pair; a safe id is its own name
    assert pictures == sorted(f"{safe_filename(line['pair_id'])}.png" for line in lines)
    assert "masked.png" in pictures and all(re.fullmatch(r"source-_target_[01]-[0-9a-f]{10}\.png", p)
                                            for p in pictures if p != "masked.png")
    with Image.open(out / "pictures" / "masked.png") as picture:
        assert picture.height == 320
    page = (out / "viewer.html").read_text()
    assert page.count('"pair_id":') == 3 and '"pair_id":"masked"' in page and '"total_pairs":3' in page


@pytest.mark.parametrize("fault", ["crash", "full disk"])
def test_a_stopped_match_run_never_leaves_a_torn_matches_file(fault: str, photos: Path, tmp_path: Path,
                                                           monkeypatch) -> None:
    """matches.jsonl is written whole when the run ends; while it runs the lines go to matches.jsonl.partial (a
    stopped run keeps its finished pairs there). A crash, or a disk that fills, in the second batch leaves the
    previous run's matches.jsonl as it was."""
    import errno

    from callbacks.match_writer import MatchWriter
    from lightning_modules.components.files import OutputWriteError

    out = _run(tmp_path, "--data.pairs", str(photos))
    before = (out / "matches.jsonl").read_text()
    original = MatchWriter.on_predict_batch_end

    def stop_in_second_batch(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):  # noqa: ANN001
        if batch_idx == 1 and fault == "crash":
            raise RuntimeError("the process died")
        if batch_idx == 1:
            def full(_data: str) -> int:
                raise OSError(errno.ENOSPC, "No space left on device")
            self._file.write = full
        original(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx)

    monkeypatch.setattr(MatchWriter, "on_predict_batch_end", stop_in_second_batch)
    expected = (RuntimeError, "the process died") if fault == "crash" else (
        OutputWriteError, r"could not write .*matches\.jsonl\.partial: No space left on device \(the pairs matched "
                          r"before are in it; .*matches\.jsonl is written when the run ends\)")
    with pytest.raises(expected[0], match=expected[1]):
        _run(tmp_path, "--data.pairs", str(photos))
    assert (out / "matches.jsonl").read_text() == before  # the previous run's file, whole
    kept = [json.loads(line) for line in (out / "matches.jsonl.partial").read_text().splitlines()]
    finished = {json.loads(line)["pair_id"]: json.loads(line) for line in before.splitlines()}
    assert len(kept) == 2 and all(finished[line["pair_id"]] == line for line in kept)  # the first batch's pairs
    monkeypatch.undo()
    _run(tmp_path, "--data.pairs", str(photos))  # a whole run replaces both
    assert (out / "matches.jsonl").read_text() == before and not (out / "matches.jsonl.partial").exists()


def test_match_command_carries_landmarks_to_a_folder_like_the_python_call(photos: Path, tmp_path: Path) -> None:
    out = _run(tmp_path, "--data.source", str(photos.parent / "source.png"), "--data.targets",
               str(photos.parent / "targets"), "--data.source_keypoints", "[[60, 50], [100, 70]]")
    lines = [json.loads(line) for line in (out / "matches.jsonl").read_text().splitlines()]
    assert [Path(line["target"]).name for line in lines] == ["target_0.png", "target_1.png", "target_2.png"]
    from lightning_modules.components import DinoFeaturizer, FusedCorrespondence

    pipeline = FusedCorrespondence(SDFeaturizer(**tiny_overlay_args("sd")), DinoFeaturizer(**tiny_overlay_args("dino")),
                                   mutual_check=True)  # the overlay's featurizers, built by hand
    expected = pipeline.match(photos.parent / "source.png", lines[1]["target"], [[60, 50], [100, 70]])
    assert lines[1]["pred_kps"] == [[round(v, 3) for v in p] for p in expected.points.tolist()]
    assert lines[1]["mutual"] == expected.mutual.tolist()


def test_bad_input_is_an_error_before_any_model_is_loaded(photos: Path, tmp_path: Path, monkeypatch) -> None:
    loaded = []
    original = SDFeaturizer.__init__
    monkeypatch.setattr(SDFeaturizer, "__init__", lambda self, *a, **k: loaded.append(1) or original(self, *a, **k))
    entries = json.loads(photos.read_text())
    del entries[1]["target"]
    _write(photos, entries)
    with pytest.raises(ValueError, match=r"pairs.json entry 1: missing field 'target'"):
        _run(tmp_path, "--data.pairs", str(photos))
    assert loaded == []


def test_point_transfer_needs_the_mutual_check(tmp_path: Path, photos: Path) -> None:
    with pytest.raises(ValueError, match="set model.pipeline.mutual_check true"):
        _run(tmp_path, "--data.pairs", str(photos), "--model.pipeline.mutual_check", "false")


def test_image_pairs_datamodule_serves_points_without_ground_truth(photos: Path) -> None:
    datamodule = ImagePairsDataModule(pairs=str(photos), batch_size=2)
    datamodule.setup("predict")
    assert datamodule.protocol is None and datamodule.categories == ["a photo of a toy", "object", "toy"]
    batch = next(iter(datamodule.predict_dataloader()))
    assert len(batch) == 2 and batch[0]["src_kps"].dtype == torch.float32 and "trg_kps" not in batch[0]
