"""scripts/reproduce.py --tables: the supplementary's tables run by their configs on generated roots with the tiny
models, every cell beside the paper's number; rows that need files the hub does not have are skipped with why."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import yaml

from conftest import REPO

sys.path.insert(0, str(REPO / "scripts"))

import reproduce  # noqa: E402
from reproduction import compare as comparison  # noqa: E402
from reproduction import tables as supplementary  # noqa: E402
from reproduction.runs import run_all  # noqa: E402

TABLES = supplementary.load_supplementary()


def _in_process(args) -> int:  # noqa: ANN001
    import evaluate

    evaluate.main(list(args))
    return 0


def _reproduce(tmp_path: Path, monkeypatch, tables: str, *more: str,  # noqa: ANN001
               runner=_in_process) -> tuple[int, dict, str]:  # noqa: ANN001
    monkeypatch.setattr(reproduce, "run_all", lambda runs: run_all(runs, runner=runner))
    code = reproduce.main(["--data-dir", str(tmp_path), "--synthetic", "--tables", tables, *more])
    out = tmp_path / "runs"
    return code, json.loads((out / "reproduction.json").read_text()), (out / "reproduction.md").read_text()


def _ours_from_results(out: Path, table: supplementary.SupplementaryTable, cell: supplementary.Cell) -> float | None:
    """Our number of a cell read independently of tables.py's reader, from the run folder the plan names."""
    if cell.benchmark in ("spair", "spair_subset20"):
        results = json.loads((out / "tables" / Path(table.config).stem / cell.benchmark / "results.json").read_text())
        if cell.analysis_key:
            node = results["analysis"]
            for key in cell.analysis_key.split("/"):
                node = node[key]
            return node
        return results["rows"][cell.row]["pck"][cell.alpha][cell.average]
    row = supplementary.TABLE10_RUN_ROWS.get(cell.row, cell.row)
    results = json.loads((out / cell.benchmark / row / "results.json").read_text())["pck"][cell.alpha]
    if cell.average.startswith("per_dataset/"):
        return results["per_dataset"][cell.average.split("/", 1)[1]]
    return results[cell.average]


def test_tables_run_and_every_cell_stands_beside_the_papers(tmp_path: Path, monkeypatch, capsys) -> None:
    """Every table: among them 3 (a skipped row), 10 (the whole SPair-71k set, and PF-Pascal / TSS through
    benchmark runs with Table 10's DINO variants), 11 and 12 (the A.10 analysis, one run; cells the paper leaves
    empty), 13 (CUB); the tiny models stand in for the implicit captioner, iBOT and SD-XL."""
    code, written, markdown = _reproduce(tmp_path, monkeypatch, "all")
    printed = capsys.readouterr().out
    assert code == 0 and "failed" not in str(written["context"]["runs"])
    out = tmp_path / "runs"
    cells = written["supplementary"]["cells"]
    states = {c["state"] for c in cells}
    assert {"compared", "skipped", "row unknown", "paper empty"} <= states and "no run" not in states
    for number in supplementary.TABLE_NUMBERS:
        table = TABLES[number]
        mine = [c for c in cells if c["table"] == number]
        assert len(mine) == len(table.cells), number
        for cell, got in zip(table.cells, mine):
            assert (got["paper_row"], got["paper_column"], got["paper"]) == (cell.paper_row, cell.paper_column,
                                                                            cell.value)
            if got["state"] == "compared":
                assert got["ours"] == pytest.approx(_ours_from_results(out, table, cell))
                assert got["difference"] == pytest.approx(got["ours"] - cell.value)
                assert got["within"] == (abs(got["difference"]) <= table.tolerance)
            else:
                assert got["difference"] is None and got["within"] is None
        summary = next(line for line in markdown.splitlines() if line.startswith(f"Table {number} ("))
        compared = sum(c["state"] == "compared" for c in mine)
        within = sum(bool(c["within"]) for c in mine)
        assert f": {within} of {compared} compared cells within +-{table.tolerance:g}" in summary
        assert f"### Supplementary Table {number}: {table.title}" in printed
    # Table 3's ODISE projection layer: no file given, so its rows are skipped, saying what they need and how
    skipped = [c for c in cells if c["state"] == "skipped"]
    assert {c["row"] for c in skipped} == {"SD projection layer", "Fuse projection layer"} and len(skipped) == 6
    assert all("--odise-projection" in c["note"] and "ODISE's projection layer" in c["note"] for c in skipped)
    assert "6 skipped" in next(line for line in markdown.splitlines() if line.startswith("Table 3 ("))
    # Table 1's rows whose layers the text lost stay uncompared, with the note that says why
    unknown = [c for c in cells if c["state"] == "row unknown"]
    assert len(unknown) == 30 and {c["table"] for c in unknown} == {1} and all(c["ours"] is None for c in unknown)
    assert all("layers lost" in c["note"] for c in unknown)
    # our rows that no paper cell is tied to are printed with their numbers: Table 1's five untied layer sets,
    # Table 3's "no reduction" row
    extra = written["supplementary"]["rows_without_a_cell"]
    untied = ("2", "8", "2+5", "2+8", "5+8")
    assert set(extra["1"]) == {f"{kind} {layers}" for kind in ("SD", "Fuse") for layers in untied}
    assert set(extra["3"]) == {"SD no reduction"}
    results = json.loads((out / "tables" / "table3_reduction" / "spair_subset20" / "results.json").read_text())
    assert extra["3"]["SD no reduction"]["0.1"] == results["rows"]["SD no reduction"]["pck"]["0.1"]["category_mean"]
    assert "| SD no reduction | " in markdown
    # the cells the paper leaves empty stay empty (Table 12's four "_")
    empty = [c for c in cells if c["paper"] is None]
    assert len(empty) == 4 and {c["table"] for c in empty} == {12} and all(c["state"] == "paper empty" for c in empty)
    # Table 10 on PF-Pascal and TSS: benchmark runs, the filter and ensemble rows with the Table 10 variants
    for benchmark in ("pfpascal", "tss"):
        for row in ("dino", "dino_filter", "dino_ensemble", "fused"):
            assert (out / benchmark / row / "results.json").is_file(), (benchmark, row)
    command = json.loads((out / "pfpascal" / "dino_filter" / "reproduce_command.json").read_text())
    assert "--model.pipeline.dino.init_args.bilateral_window" in command
    assert "--model.pipeline.dino.init_args.ensemble_layers" in json.loads(
        (out / "tss" / "dino_ensemble" / "reproduce_command.json").read_text())
    # one feature cache: rows whose featurizer settings agree extract each image once across tables (Table 1
    # runs first; Tables 3 and 4 take SD and DINO from it, Table 2 only its other feature locations)
    def passes(config: str, benchmark: str = "spair_subset20") -> dict[str, int]:
        return json.loads((out / "tables" / config / benchmark / "results.json").read_text())["extraction_passes"]

    assert min(passes("table1_layers").values()) > 0
    assert set(passes("table3_reduction").values()) == set(passes("table4_fusion").values()) == {0}
    assert passes("table2_location")["sd:default"] == 0 and passes("table2_location")["sd:conv"] > 0
    # Tables 11 and 12 share one run of the A.10 analysis, on the whole test set
    assert sorted(p.name for p in (out / "tables" / "a10_analysis").iterdir() if p.is_dir()) == ["spair"]
    assert written["context"]["runs"]["table11/spair"] == "ran" and "table12/spair" not in written["context"]["runs"]
    # a rerun runs nothing and writes the same cells
    ran: list = []
    code, again, _ = _reproduce(tmp_path, monkeypatch, "all", runner=lambda a: ran.append(a) or 0)
    assert code == 0 and ran == [] and again["supplementary"]["cells"] == cells
    assert set(again["context"]["runs"].values()) == {"skipped"}


def _derived(number: int, synthetic: bool = False, **given) -> tuple[dict, dict[str, str]]:  # noqa: ANN003
    return supplementary.derive_config(TABLES[number], given, synthetic)


def test_a_row_that_needs_a_missing_file_is_left_out_with_what_only_it_uses(monkeypatch) -> None:
    monkeypatch.setattr(supplementary, "_gpu_memory_gib", lambda: 0.0)
    config, skipped = _derived(7)  # iBOT: its rows and its model leave the run; the others stay
    init = config["model"]["init_args"]
    why = supplementary.REQUIREMENTS["ibot_checkpoint"].reason
    assert skipped == {"iBOT-vitb16": why, "Fuse-iBOT-vitb16": why} and "--ibot-checkpoint" in why
    assert "ibot" not in init["dino_models"] and {"dinov1", "dinov2_s"} <= set(init["dino_models"])
    assert len(init["rows"]) == 7 and all("iBOT" not in row["name"] for row in init["rows"])
    config, skipped = _derived(5)  # the implicit captioner: its rows, variants and the captioned SD leave
    init = config["model"]["init_args"]
    assert set(skipped) == {row for row in (c.row for c in TABLES[5].cells) if "implicit" in row}
    assert all("implicit" not in name for name in init["sd_variants"]) and len(init["sd_variants"]) == 5
    assert init["pipeline"]["sd"].endswith("configs/featurizers/sd15.yaml")
    config, skipped = _derived(6)  # SD-XL without a 24 GiB GPU
    why = supplementary.REQUIREMENTS["sdxl"].reason
    assert skipped == {"SD-XL": why, "Fuse-vitb-XL": why} and "sdxl" not in config["model"]["init_args"]["sd_models"]
    assert _derived(6, sdxl=True)[1] == {} and _derived(7, synthetic=True)[1] == {}  # given, or a tiny stand-in
    monkeypatch.setattr(supplementary, "_gpu_memory_gib", lambda: 80.0)
    assert _derived(6)[1] == {}


def test_offline_a_missing_extra_hub_model_skips_only_its_rows(tmp_path: Path, monkeypatch) -> None:
    """Table 6's BK-SDM-tiny absent offline: its two rows are skipped, naming the model and how to get it; the
    others run. The check reads the Hugging Face cache only (an empty one here) and takes a local folder."""
    models = supplementary.table_hub_models(TABLES, [6, 7])
    assert ("sd", "nota-ai/bk-sdm-tiny") in models and ("dino", "facebook/dinov2-small") in models
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty_cache"))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "empty_cache"))
    folder = tmp_path / "bk-sdm-small"
    folder.mkdir()
    missing = supplementary.missing_hub_models([*models, ("sd", str(folder))])
    assert {model for _, model in models} == missing and str(folder) not in missing
    config, skipped = _derived(6, missing_models={"nota-ai/bk-sdm-tiny"}, sdxl=True)
    assert set(skipped) == {"SD-tiny", "Fuse-vitb-tiny"}
    assert "hub model nota-ai/bk-sdm-tiny" in skipped["SD-tiny"] and "`hf download nota-ai/bk-sdm-tiny --include" in skipped["SD-tiny"]
    init = config["model"]["init_args"]
    assert "sd_tiny" not in init["sd_models"] and "sd_small" in init["sd_models"] and len(init["rows"]) == 11
    assert _derived(6, True, missing_models={"nota-ai/bk-sdm-tiny"})[1] == {}  # --synthetic: tiny stand-ins


def test_a_given_file_makes_its_rows_and_reaches_the_run(tmp_path: Path) -> None:
    maps = tmp_path / "odise_projection.pt"
    maps.write_bytes(b"")
    config, skipped = _derived(3, odise_projection=str(maps))
    rows = {row["name"]: row for row in config["model"]["init_args"]["rows"]}
    assert skipped == {}
    assert rows["SD projection layer"] == {"name": "SD projection layer", "pca_dims": None,
                                           "layer_projection": str(maps), "dino": None}
    fused = rows["Fuse projection layer"]
    assert fused["layer_projection"] == str(maps) and "dino" not in fused
    checkpoint = tmp_path / "ibot.pth"
    checkpoint.write_bytes(b"")
    runs = supplementary.plan_table_runs(TABLES, [7], {"spair": tmp_path}, tmp_path / "out", 1, [], None,
                                         {"ibot_checkpoint": str(checkpoint)}, False)
    args = list(runs[0].run.args)
    assert args[args.index("--model.init_args.dino_models.ibot.init_args.checkpoint") + 1] == str(checkpoint)
    derived = yaml.safe_load(Path(args[args.index("--config") + 1]).read_text())
    assert any(row["name"] == "iBOT-vitb16" for row in derived["model"]["init_args"]["rows"])
    # references to other configs are made absolute, so the derived config reads them from anywhere
    assert Path(derived["data"]).is_absolute() and Path(derived["data"]).is_file()


def test_bad_table_options_are_one_line_before_anything_runs(tmp_path: Path, capsys) -> None:
    with pytest.raises(SystemExit, match=r"--tables '9': choose 'all' or from 1,2,3,4,5,6,7,8,10,11,12,13"):
        reproduce.parse_args(["--data-dir", str(tmp_path), "--tables", "9"])
    with pytest.raises(SystemExit, match=r"--ibot-checkpoint .*nope.pth: no such file \(iBOT's release checkpoint"):
        reproduce.parse_args(["--data-dir", str(tmp_path), "--tables", "7", "--ibot-checkpoint",
                              str(tmp_path / "nope.pth")])
    args = reproduce.parse_args(["--data-dir", str(tmp_path), "--tables", "all"])
    assert args.tables == list(supplementary.TABLE_NUMBERS) and args.benchmarks == [] and args.rows == []
    args = reproduce.parse_args(["--data-dir", str(tmp_path), "--tables", "13", "--benchmarks", "cub"])
    assert args.benchmarks == ["cub"] and args.tables == [13]


def test_the_main_numbers_file_agrees_with_the_supplementarys() -> None:
    """paper_numbers.yaml cites Tables 10 and 13 for TSS and CUB: the same numbers as the transcription."""
    runs_row = {"Fuse-ViT-B/14": "fused", "DINOv2-ViT-B/14": "dino"}
    cells = {}
    for number in (10, 13):
        for cell in TABLES[number].cells:
            row = runs_row.get(cell.row, cell.row) if number == 10 else cell.row
            cells[(cell.benchmark, row, cell.alpha, cell.average)] = cell.value
    cited = [n for n in comparison.load_paper_numbers() if "supplementary" in n.table and n.value is not None]
    assert len(cited) >= 20
    for number in cited:
        assert cells[(number.benchmark, number.row, number.alpha, number.average)] == number.value, number


def test_the_projected_time_is_written_beside_the_command() -> None:
    minutes = supplementary.projected_gpu_minutes(TABLES, list(supplementary.TABLE_NUMBERS))
    readme = (REPO / "README.md").read_text()
    assert f"about {minutes / 60:.0f} hours" in readme and "projected" in readme


@pytest.mark.parametrize("number", [5, 6, 7])
def test_a_derived_config_parses_and_the_model_options_reach_it(tmp_path: Path, number: int, monkeypatch,
                                                                capsys) -> None:
    """Without the files (and without a GPU for SD-XL) the derived config, as the real run reads it, has the other
    rows, the pipeline's weights given on the command line, and no trace of what was left out."""
    import evaluate

    monkeypatch.setattr(supplementary, "_gpu_memory_gib", lambda: 0.0)
    (planned,) = supplementary.plan_table_runs(TABLES, [number], {"spair": tmp_path}, tmp_path / "out", 1, [], None,
                                               {}, False, {"sd": "/models/sd15", "dino": "org/dino"})
    with pytest.raises(SystemExit):
        evaluate.main([*planned.run.args, "--print_config"])
    init = yaml.safe_load(capsys.readouterr().out)["model"]["init_args"]
    rows = [row["name"] for row in init["rows"]]
    assert planned.skipped and not set(planned.skipped) & set(rows)
    assert len(rows) + len(planned.skipped) == len(yaml.safe_load((REPO / TABLES[number].config).read_text())
                                                   ["model"]["init_args"]["rows"])
    pipeline = init["pipeline"]["init_args"]
    assert pipeline["sd"]["init_args"]["model_id"] == "/models/sd15"
    assert pipeline["dino"]["init_args"]["model_id"] == "org/dino"
    if number == 5:  # the explicit prompt, no captioner left to load
        assert pipeline["sd"]["init_args"].get("captioner") is None


def test_the_reproductions_files_are_written_whole_or_not_at_all(tmp_path: Path, monkeypatch) -> None:
    """A full disk while reproduction.json / .md are rewritten leaves the previous files whole and no temporary
    file (they go through the project's write_atomically)."""
    import errno
    import os

    out = tmp_path / "runs"
    comparison.write_comparison([], out, {"synthetic": True}, ("## first\n", {"cells": [1]}))
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def full(*_args, **_kwargs) -> None:  # noqa: ANN002, ANN003
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "replace", full)
    with pytest.raises(OSError, match=r"could not write .*reproduction\.md: No space left on device"):
        comparison.write_comparison([], out, {"synthetic": True}, ("## second\n", {"cells": [2]}))
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
