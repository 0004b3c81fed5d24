"""Result objects: a module's summary writes and prints itself; the writers need not know its kind."""

from __future__ import annotations

import json
import math

from callbacks import CorrespondenceWriter
from lightning_modules.ablation import AblationResults
from lightning_modules.results import PCKResults, RunResults, ScoreResults
from lightning_modules.swap import SwapResults

PCK_SUMMARY = {
    "pck": {"0.1": {"per_point": 50.0, "category_mean": 40.0, "per_category": {"cat": 40.0}}},
    "num_pairs": 2, "num_points": 4, "protocol": {"name": "Toy", "averages": ["category_mean", "per_point"]},
}


class CountsOnly(RunResults):
    """A user's own result kind: its own file, its own table."""

    filename = "counts.json"

    def table(self) -> str:
        return f"{self.summary['num_pairs']} pairs counted"


def test_each_kind_writes_its_files_and_prints_its_table(tmp_path) -> None:
    text = PCKResults(PCK_SUMMARY).write(tmp_path, run={"complete": True})
    written = json.loads((tmp_path / "results.json").read_text())
    assert written["run"] == {"complete": True} and written["pck"] == PCK_SUMMARY["pck"]
    assert text.splitlines()[0].startswith("Toy") and "40.00" in text.splitlines()[2]
    scores = ScoreResults({"J_mean": 0.5, "protocol": {"name": "J", "averages": ["J_mean"]}, "num_frames": 3})
    assert "50.00" in scores.table()
    rows = {"A": {**PCK_SUMMARY}, "B": {**PCK_SUMMARY}}
    ablation = AblationResults({"title": "T", "average": "category_mean", "table": {"A": {"0.1": 40.0}, "B": {"0.1": 41.0}},
                                "rows": rows})
    assert set(ablation.per_row()) == {"A", "B"} and set(ablation.files()) == {"ablation.md", "ablation.csv"}
    ablation.write(tmp_path)
    assert (tmp_path / "ablation.csv").read_text().splitlines()[1:] == ["A,40.00", "B,41.00"]
    swap = SwapResults({"refined": {"clip_score": 80.0, "fid_clip": math.nan, "num_pairs": 1}, "clip_model": "c"})
    swap.write(tmp_path)
    assert json.loads((tmp_path / "swap_metrics.json").read_text())["refined"]["fid_clip"] is None  # strict JSON
    assert "80.00" in swap.table()


def test_the_writer_writes_a_result_kind_it_does_not_know(tmp_path, capsys) -> None:
    writer = CorrespondenceWriter(output_dir=str(tmp_path))
    writer._write(tmp_path, [{"pair_id": "p"}], CountsOnly({"num_pairs": 1}), None)
    assert json.loads((tmp_path / "counts.json").read_text())["run"]["complete"] is True
    assert (tmp_path / "predictions.jsonl").read_text() == '{"pair_id": "p"}\n'
    assert "1 pairs counted\nwritten to" in capsys.readouterr().out
