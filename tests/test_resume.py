"""Nothing lost: predictions are flushed per batch, and ``--resume true`` finishes an interrupted run with the
files an uninterrupted run writes."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest

import evaluate
from callbacks.prediction_writer import PARTIAL_GLOB, read_partial_records
from callbacks.run_folder import LOCK_FILE, RunFolderError
from datamodules import write_synthetic_spair
from cli import build_cli

from conftest import CONFIGS, SPAIR_CONFIG as SPAIR, TINY_OVERLAY as TINY
TABLE4 = str(CONFIGS / "ablations" / "table4_fusion.yaml")
TINY_ABLATION = str(CONFIGS / "ablations" / "tiny.yaml")


class Crash(L.Callback):
    """Simulates a run dying after ``after`` batches (the writer, earlier in the list, has flushed them)."""

    def __init__(self, after: int) -> None:
        self.after = after

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if batch_idx + 1 == self.after:
            raise RuntimeError("simulated crash")


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return write_synthetic_spair(tmp_path_factory.mktemp("resume") / "spair", categories=("cat", "dog", "bus"),
                                 pairs_per_category=3)


def _args(configs: list[str], root: Path, out: Path) -> list[str]:
    """``configs``: config files, then (from the first ``--`` option on) extra command-line arguments."""
    first_option = next((i for i, c in enumerate(configs) if c.startswith("--")), len(configs))
    files, extra = configs[:first_option], configs[first_option:]
    # one pair per batch (the benchmark configs take 4): the interruptions and counts below go batch by batch
    return ["test", *[a for c in files for a in ("--config", c)], "--data.root", str(root), "--data.batch_size", "1",
            *extra,
            "--data.num_workers", "0", "--trainer.accelerator", "cpu", "--trainer.default_root_dir", str(out)]


def _crash_after(configs: list[str], root: Path, out: Path, batches: int) -> None:
    cli = build_cli(_args(configs, root, out)[1:], run=False)
    cli.trainer.callbacks.append(Crash(batches))
    with pytest.raises(RuntimeError, match="simulated crash"):
        cli.trainer.test(cli.model, datamodule=cli.datamodule)


def _outputs(out: Path) -> tuple[dict, str]:
    results = json.loads((out / "results.json").read_text())
    passes = results.pop("extraction_passes")
    return results | {"_passes": passes}, (out / "predictions.jsonl").read_text()


# the ablation's reference subset draw, 3 per category: 9 draws of which 3 repeat a pair ('#2' ids)
@pytest.mark.parametrize("configs", [[SPAIR, TINY], [TABLE4, TINY_ABLATION, "--data.pairs_per_category", "3"]],
                         ids=["spair", "ablation"])
def test_resumed_run_ends_with_the_uninterrupted_files(configs, root, tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    evaluate.main(_args(configs, root, tmp_path / "whole"))
    whole, whole_predictions = _outputs(tmp_path / "whole")

    out = tmp_path / "interrupted"
    _crash_after(configs, root, out, batches=4)
    assert not (out / "predictions.jsonl").exists()
    flushed = read_partial_records(out)
    rows = max(1, len(whole.get("table", {})))
    assert len(flushed) == 4 * rows  # 4 pairs x every row, durably on disk
    with open(next(out.glob(PARTIAL_GLOB)), "a") as handle:
        handle.write('{"pair_id": "torn')  # the process died in the middle of a line

    cli = evaluate.main([*_args(configs, root, out), "--resume", "true"])
    resumed, resumed_predictions = _outputs(out)
    assert resumed_predictions == whole_predictions
    passes, whole_passes = resumed.pop("_passes"), whole.pop("_passes")
    assert resumed == whole
    assert not list(out.glob(PARTIAL_GLOB))  # complete: the flushed batches are folded in
    # only the unfinished pairs were evaluated: fewer images than the whole run extracted
    assert all(passes[k] < whole_passes[k] for k in whole_passes)
    assert len(cli.datamodule.finished_pair_ids) == 4


def test_a_fresh_run_discards_an_interrupted_runs_flushed_batches(root, tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "run"
    _crash_after([SPAIR, TINY], root, out, batches=2)
    assert read_partial_records(out)
    evaluate.main(_args([SPAIR, TINY], root, out))  # no --resume: start over
    results = json.loads((out / "results.json").read_text())
    assert results["num_pairs"] == 9 and not list(out.glob(PARTIAL_GLOB))
    assert results["extraction_passes"]["sd"] == results["extraction_passes"]["dino"] > 0


def test_resume_refuses_the_a10_analysis(root, tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    configs = [str(CONFIGS / "ablations" / "a10_analysis.yaml"), TINY_ABLATION]
    out = tmp_path / "run"
    _crash_after(configs, root, out, batches=1)
    with pytest.raises(ValueError, match="resume is not supported with `analysis`"):
        evaluate.main([*_args(configs, root, out), "--resume", "true"])


def test_read_partial_records_keeps_only_pairs_with_every_row(tmp_path) -> None:
    lines = [{"pair_id": "a", "row": "x"}, {"pair_id": "a", "row": "y"}, {"pair_id": "b", "row": "x"},
             {"pair_id": "a", "row": "x"}]  # "b" lost its second row in a crash; "a"/"x" repeated
    (tmp_path / "predictions.partial.rank0.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines[:3]))
    (tmp_path / "predictions.partial.rank1.jsonl").write_text(json.dumps(lines[3]) + "\n{bad")
    records = read_partial_records(tmp_path)
    assert sorted((r["pair_id"], r["row"]) for r in records) == [("a", "x"), ("a", "y")]


# ------------------------------------------------------------------------------- one run per folder


def test_resume_refuses_other_prediction_settings_and_names_them(root, tmp_path, monkeypatch) -> None:
    """An interrupted alpha-0.5 run resumed with alpha 0.0 would mix two settings in one PCK."""
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "run"
    _crash_after([SPAIR, TINY], root, out, batches=3)
    config_before = (out / "config.yaml").read_text()
    with pytest.raises(RunFolderError, match=r"other settings[\s\S]*model\.pipeline\.alpha: 0\.5 -> 0\.0") as info:
        evaluate.main([*_args([SPAIR, TINY], root, out), "--resume", "true", "--model.pipeline.alpha", "0.0"])
    assert "data." not in str(info.value)  # only what differs is named
    assert (out / "config.yaml").read_text() == config_before  # the refused run wrote nothing
    assert len(read_partial_records(out)) == 3
    # what cannot change predictions may differ: workers, batch size, the feature cache, the progress bar
    evaluate.main([*_args([SPAIR, TINY], root, out), "--resume", "true", "--data.batch_size", "2",
                   "--model.pipeline.feature_cache_gb", "0"])
    results = json.loads((out / "results.json").read_text())
    assert results["num_pairs"] == 9 and results["run"]["complete"] is True
    assert results["run"]["settings"]["model.pipeline.alpha"] == 0.5


def test_a_folder_in_use_is_refused_and_left_alone(root, tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "run"
    _crash_after([SPAIR, TINY], root, out, batches=2)  # the other run's flushed batches and config
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (out / LOCK_FILE).write_text(json.dumps({"pid": other.pid, "host": socket.gethostname(), "started": "now"}))
        before = {p.name: p.read_bytes() for p in out.iterdir()}
        for extra in ([], ["--resume", "true"]):
            with pytest.raises(RunFolderError, match=rf"is in use: another run \(process {other.pid}"):
                evaluate.main([*_args([SPAIR, TINY], root, out), *extra])
        assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # nothing deleted or overwritten
    finally:
        other.kill()
        other.wait()
    # its process gone, the lock is stale: taken over, and the run resumes
    evaluate.main([*_args([SPAIR, TINY], root, out), "--resume", "true"])
    assert json.loads((out / "results.json").read_text())["num_pairs"] == 9
    assert not (out / LOCK_FILE).exists()  # given back at the end


def test_a_finished_run_is_never_silently_overwritten(root, tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "run"
    evaluate.main(_args([SPAIR, TINY], root, out))
    finished = {name: (out / name).read_bytes() for name in ("results.json", "predictions.jsonl", "config.yaml")}
    for extra in ([], ["--resume", "true"]):
        with pytest.raises(RunFolderError, match="holds a finished run|nothing to resume"):
            evaluate.main([*_args([SPAIR, TINY], root, out), "--model.pipeline.alpha", "0.0", *extra])
        assert {name: (out / name).read_bytes() for name in finished} == finished  # config.yaml still matches
    evaluate.main([*_args([SPAIR, TINY], root, out), "--model.pipeline.alpha", "0.0", "--overwrite", "true"])
    results = json.loads((out / "results.json").read_text())
    assert results["run"]["settings"]["model.pipeline.alpha"] == 0.0
    assert "alpha: 0.0" in (out / "config.yaml").read_text()


def test_a_limited_run_is_marked_partial(root, tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "run"
    evaluate.main([*_args([SPAIR, TINY], root, out), "--trainer.limit_test_batches", "3"])
    results = json.loads((out / "results.json").read_text())
    assert results["num_pairs"] == 3
    assert results["run"]["complete"] is False and results["run"]["partial_reason"] == "limit_test_batches=3"
    assert "PARTIAL RUN (limit_test_batches=3)" in capsys.readouterr().out
