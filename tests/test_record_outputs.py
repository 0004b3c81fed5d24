"""scripts/record_outputs.py: the before/after check of a restructuring records runs and finds differences."""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import torch

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "record_outputs.py"


def test_record_and_compare(tmp_path: Path) -> None:
    spec = importlib.util.spec_from_file_location("record_outputs", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    cwd, threads = os.getcwd(), torch.get_num_threads()
    try:
        for name in ("before", "after"):
            assert module.record(tmp_path / name, only=["spair"]) == {"spair": "ok"}
    finally:
        os.chdir(cwd)
    assert torch.get_num_threads() == threads  # its one thread is not left to the rest of the session
    record = json.loads((tmp_path / "before" / "records" / "spair.json").read_text())
    assert record["status"] == "ok" and "run" not in record["results"] and len(record["predictions"]) == 6
    assert module.compare(tmp_path / "before", tmp_path / "after") == []
    record["predictions"][0]["pred_kps"][0][0] += 1.0
    (tmp_path / "after" / "records" / "spair.json").write_text(json.dumps(record))
    assert module.compare(tmp_path / "before", tmp_path / "after") == ["spair: differs in ['predictions']"]
