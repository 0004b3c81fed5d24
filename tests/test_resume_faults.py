"""A resumed run still ends right when its data changed in between, or when its final files failed to write.

- The flushed predictions of an interrupted run carry a digest of what the reader returned for each pair
  (``input_digest``, partial files only); a resume re-evaluates the pairs whose data changed, and says so.
- A full disk while ``results.json`` is written leaves no torn file and keeps the flushed predictions; the same
  command with ``--resume true`` then writes the files (a write shim fills the disk at ``results.json``).
"""

from __future__ import annotations

import errno
import json
import logging
import shutil
from pathlib import Path

import pytest

import evaluate
import lightning_modules.components.files as files
from callbacks.prediction_writer import INPUT_DIGEST, PARTIAL_GLOB, read_partial_records
from datamodules import write_synthetic_spair
from lightning_modules.components.files import OutputWriteError

from conftest import SPAIR_CONFIG as SPAIR, TINY_OVERLAY as TINY
from test_resume import _args, _crash_after, _outputs


@pytest.fixture
def root(tmp_path: Path) -> Path:
    return write_synthetic_spair(tmp_path / "data" / "spair", categories=("cat", "dog", "bus"), pairs_per_category=3)


def _shift_target_keypoint(root: Path, pair_id: str, dx: float) -> None:
    path = root / "PairAnnotation" / "test" / f"{pair_id}.json"
    annotation = json.loads(path.read_text())
    annotation["trg_kps"][0][0] += dx  # a corrected annotation
    path.write_text(json.dumps(annotation))


def test_a_resume_over_changed_data_evaluates_those_pairs_again(root, tmp_path, monkeypatch, caplog) -> None:
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "interrupted"
    _crash_after([SPAIR, TINY], root, out, batches=4)
    flushed = read_partial_records(out)
    assert len(flushed) == 4 and all(len(r[INPUT_DIGEST]) == 32 for r in flushed)
    edited = str(flushed[1]["pair_id"])
    _shift_target_keypoint(root, edited, 7.0)

    with caplog.at_level(logging.WARNING, logger="callbacks.prediction_writer"):
        cli = evaluate.main([*_args([SPAIR, TINY], root, out), "--resume", "true"])
    assert f"the data of 1 flushed pair(s) changed since they were evaluated ({edited})" in caplog.text
    assert edited not in cli.datamodule.finished_pair_ids and len(cli.datamodule.finished_pair_ids) == 3
    resumed, resumed_predictions = _outputs(out)
    evaluate.main(_args([SPAIR, TINY], root, tmp_path / "whole"))  # the edited data from the start
    whole, whole_predictions = _outputs(tmp_path / "whole")
    assert resumed_predictions == whole_predictions  # the corrected target keypoint, not the flushed one
    resumed.pop("_passes"), whole.pop("_passes")
    assert resumed == whole
    assert INPUT_DIGEST not in resumed_predictions  # the digests stay in the partial files


def test_flushed_pairs_without_a_digest_are_evaluated_again_and_said_so(root, tmp_path, monkeypatch,
                                                                        caplog) -> None:
    """Partial files flushed by an earlier version hold no digest: nothing to compare, so those pairs are
    evaluated again, and the log says why (not that their data changed)."""
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "interrupted"
    _crash_after([SPAIR, TINY], root, out, batches=3)
    (partial,) = out.glob(PARTIAL_GLOB)
    lines = [json.loads(line) for line in partial.read_text().splitlines()]
    old = str(lines[0]["pair_id"])
    lines[0].pop(INPUT_DIGEST)
    partial.write_text("".join(json.dumps(line) + "\n" for line in lines))

    with caplog.at_level(logging.WARNING, logger="callbacks.prediction_writer"):
        cli = evaluate.main([*_args([SPAIR, TINY], root, out), "--resume", "true"])
    assert (f"resume: 1 flushed pair(s) carry no record of their data (flushed by an earlier version), so it "
            f"cannot be compared ({old}): they are evaluated again") in caplog.text
    assert "changed since" not in caplog.text
    assert old not in cli.datamodule.finished_pair_ids and len(cli.datamodule.finished_pair_ids) == 2
    evaluate.main(_args([SPAIR, TINY], root, tmp_path / "whole"))
    assert _outputs(out)[1] == _outputs(tmp_path / "whole")[1]


class _FullDisk:
    """``open`` for :mod:`files` that fills the disk after ``keep`` bytes of a file whose name holds ``name``
    (after ``room_for`` opens that still write whole)."""

    def __init__(self, name: str, room_for: int = 0, keep: int = 4096) -> None:
        self.name, self.hits, self.room_for, self.keep = name, 0, room_for, keep

    def __call__(self, path, mode="r", *args, **kwargs):  # noqa: ANN001, ANN204 - open's signature
        handle = open(path, mode, *args, **kwargs)  # noqa: SIM115 - returned to the caller's with-block
        if self.name not in Path(path).name:
            return handle
        if self.room_for > 0:
            self.room_for -= 1
            return handle
        self.hits += 1
        real_write = handle.write

        def write(data):  # noqa: ANN001, ANN202
            real_write(data[:self.keep])
            raise OSError(errno.ENOSPC, "No space left on device")

        handle.write = write
        return handle


def test_a_full_disk_at_results_json_keeps_the_run_resumable(root, tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    evaluate.main(_args([SPAIR, TINY], root, tmp_path / "whole"))
    whole, whole_predictions = _outputs(tmp_path / "whole")
    out, full = tmp_path / "full", _FullDisk("results.json")
    monkeypatch.setattr(files, "open", full, raising=False)
    with pytest.raises(OutputWriteError, match=r"results\.json: No space left on device; the run's predictions are "
                                               r"kept in .*--resume true") as caught:
        evaluate.main(_args([SPAIR, TINY], root, out))
    assert caught.value.errno == errno.ENOSPC and full.hits == 1
    assert not (out / "results.json").exists()  # never a torn results.json
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]
    assert len(read_partial_records(out)) == 9  # every pair's prediction kept

    monkeypatch.undo()  # room again
    monkeypatch.chdir(tmp_path)
    cli = evaluate.main([*_args([SPAIR, TINY], root, out), "--resume", "true"])
    assert len(cli.datamodule.finished_pair_ids) == 9  # nothing evaluated again: the files are written
    resumed, resumed_predictions = _outputs(out)
    assert resumed_predictions == whole_predictions
    assert resumed.pop("_passes") == {"sd": 0, "dino": 0}
    whole.pop("_passes")
    assert resumed == whole
    assert not list(out.glob(PARTIAL_GLOB))
    shutil.rmtree(out)


def test_a_disk_that_fills_while_predictions_are_flushed_names_the_file_and_the_resume(root, tmp_path,
                                                                                      monkeypatch) -> None:
    """Earlier than results.json: the disk fills at the third batch's flush. The error names the partial file and
    the resume; the batches flushed before are kept (a torn last line is skipped) and the resume ends the run as
    an uninterrupted one."""
    from callbacks import prediction_writer

    monkeypatch.chdir(tmp_path)
    evaluate.main(_args([SPAIR, TINY], root, tmp_path / "whole"))
    whole, whole_predictions = _outputs(tmp_path / "whole")
    out, full = tmp_path / "full", _FullDisk("predictions.partial", room_for=2, keep=100)
    monkeypatch.setattr(prediction_writer, "open", full, raising=False)
    with pytest.raises(OutputWriteError, match=r"could not write .*predictions\.partial\.rank0\.jsonl: No space left "
                                               r"on device; the predictions of the finished batches are kept in "
                                               r".*--resume true") as caught:
        evaluate.main(_args([SPAIR, TINY], root, out))
    assert caught.value.errno == errno.ENOSPC and full.hits == 1
    assert not (out / "results.json").exists()
    assert len((out / "predictions.partial.rank0.jsonl").read_text().splitlines()) == 3  # the third one torn
    assert len(read_partial_records(out)) == 2  # the two batches flushed before (batch size 1)

    monkeypatch.undo()  # room again
    monkeypatch.chdir(tmp_path)
    cli = evaluate.main([*_args([SPAIR, TINY], root, out), "--resume", "true"])
    assert len(cli.datamodule.finished_pair_ids) == 2
    resumed, resumed_predictions = _outputs(out)
    assert resumed_predictions == whole_predictions
    resumed.pop("_passes"), whole.pop("_passes")
    assert resumed == whole
