"""The supplementary's tables, cell by cell: which runs make each table, which rows need more than hub weights,
and the comparison of every cell with the paper's (``supplementary_numbers.yaml``).

A table is run by its config (``configs/ablations/*.yaml``: every row on one shared extraction), on the data its
cells name: the 20-pairs-per-category SPair-71k subset (the config's own data), the whole SPair-71k test set,
or, for Table 10's PF-Pascal and TSS columns and Table 13 (CUB), the benchmark runs of :mod:`.runs` (their
``dino`` / ``fused`` rows, and the DINO variants of Table 10 as rows of their own). Every run shares the one
on-disk feature cache, so rows whose featurizer settings agree extract each image once across all tables.

Rows that need more than hub weights (ODISE's implicit captioner and projection layer, iBOT's release
checkpoint, SD-XL's memory) are run when it is given and otherwise left out of the run and reported as skipped
with what they need (:data:`REQUIREMENTS`), never silently.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from . import write_output
from .runs import CONFIGS, REPO, Run

__all__ = [
    "REQUIREMENTS", "SUPPLEMENTARY_FILE", "TABLE_NUMBERS", "Cell", "Requirement", "SupplementaryTable",
    "compare_tables", "load_supplementary", "missing_hub_models", "parse_tables", "plan_table_runs",
    "projected_gpu_minutes", "table_hub_models",
    "render_tables", "rows_without_a_cell", "table_benchmarks",
]

SUPPLEMENTARY_FILE = Path(__file__).with_name("supplementary_numbers.yaml")
#: The tables ``--tables`` takes (Table 9, instance swapping, is scored by other metrics and left out).
TABLE_NUMBERS = (1, 2, 3, 4, 5, 6, 7, 8, 10, 11, 12, 13)
#: Tiny random stand-ins of a table's extra models for ``--synthetic`` (after ``configs/overlays/tiny.yaml``).
TINY_TABLE_CONFIGS = {n: CONFIGS / "ablations" / f"tiny_table{n}.yaml" for n in (5, 6, 7)}
#: Table 10's rows on PF-Pascal and TSS: the benchmark runs' rows (scripts/reproduction/runs.py) that make them.
TABLE10_RUN_ROWS = {"DINOv2-ViT-B/14": "dino", "Filter-ViT-B/14": "dino_filter",
                    "Ensemble-ViT-B/14": "dino_ensemble", "Fuse-ViT-B/14": "fused"}
#: The DINO variant of the Table 10 config that each of those run rows takes (None: the configured DINO).
TABLE10_VARIANTS = {"dino_filter": "filter", "dino_ensemble": "ensemble"}


@dataclass(frozen=True)
class Requirement:
    """Something a row needs beyond hub weights.

    Attributes:
        key: Its name in the numbers file (``requires:``) and the attribute of reproduce.py's arguments.
        flag: reproduce.py's option that gives it.
        need: What it is and where it comes from (said beside every skipped cell).
        tables: The tables whose rows may need it.
        needs_it: Whether a row (by name) needs it.
        stand_in: Whether ``--synthetic``'s tiny models stand in for it (the row then runs).
        args: The run arguments that pass it on, given its value.
        on_machine: Whether this machine meets it without its being given (SD-XL: a large enough GPU).
        makes_rows: For a file that makes rows of its own (they exist only when it is given): the row of a given
            name (from the numbers file's ``requires:`` cells) and the file's path.
        without: What the run changes in the table's ``init_args`` when it is missing (beyond leaving its rows
            out).
    """

    key: str
    flag: str
    need: str
    tables: tuple[int, ...]
    needs_it: Callable[[str], bool]
    stand_in: bool
    args: Callable[[str], list[str]] = lambda value: []
    on_machine: Callable[[], bool] = lambda: False
    makes_rows: Callable[[str, str], dict[str, Any]] | None = None
    without: Callable[[dict[str, Any]], None] | None = None

    @property
    def reason(self) -> str:
        """What a skipped row says."""
        return f"needs {self.need} ({self.flag})"


def _explicit_sd(init: dict[str, Any]) -> None:
    """Without ODISE's captioner the run's SD is the explicit one (the prompt): the other rows use only that."""
    init["pipeline"] = {**init["pipeline"], "sd": str(CONFIGS / "featurizers" / "sd15.yaml")}


def _projection_row(name: str, path: str) -> dict[str, Any]:
    """A row of Table 3's projection layer: the given per-layer map instead of co-PCA, SD alone or fused."""
    alone = {"dino": None} if name.startswith("SD ") else {}
    return {"name": name, "pca_dims": None, "layer_projection": path, **alone}


REQUIREMENTS: dict[str, Requirement] = {r.key: r for r in (
    Requirement("odise_captioner", "--odise-captioner",
                "ODISE's implicit captioner weights (odise_label_coco_50e-b67d2efc.pth from the ODISE release; not on "
                "the model hub)", (5,), lambda row: "implicit" in row, True,
                lambda value: ["--model.pipeline.sd.captioner.weights", value], without=_explicit_sd),
    Requirement("odise_projection", "--odise-projection",
                "ODISE's projection layer as a per-layer map file (torch.save({'<layer>.weight': [d, C], "
                "'<layer>.bias': [d]}), from ODISE's checkpoint; not published on its own)", (3,),
                lambda row: row.endswith("projection layer"), False, makes_rows=_projection_row),
    Requirement("ibot_checkpoint", "--ibot-checkpoint",
                "iBOT's release checkpoint (ViT-B/16 checkpoint_teacher.pth; not on the model hub)", (7,),
                lambda row: "iBOT" in row, True,
                lambda value: ["--model.init_args.dino_models.ibot.init_args.checkpoint", value]),
    Requirement("sdxl", "--sdxl",
                "SD-XL's memory: a GPU with at least 24 GiB (its UNet is 3x SD 1.5's, run at 1024 px); --sdxl runs "
                "it anyway", (6,), lambda row: row in ("SD-XL", "Fuse-vitb-XL"), True,
                on_machine=lambda: _gpu_memory_gib() >= 24),
)}


@dataclass(frozen=True)
class Cell:
    """One number of the supplementary (see the header of ``supplementary_numbers.yaml``)."""

    paper_row: str
    paper_column: str
    row: str | None
    value: float | None
    line: int
    benchmark: str
    average: str | None = None
    alpha: str | None = None
    analysis_key: str | None = None
    requires: str | None = None
    row_note: str | None = None


@dataclass(frozen=True)
class SupplementaryTable:
    """One table: its cells, the config that runs it, its quantity and its tolerance."""

    number: int
    title: str
    config: str
    quantity: str
    tolerance: float
    cells: tuple[Cell, ...]
    note: str | None = None
    other_rows: tuple[str, ...] = ()

    @property
    def benchmarks(self) -> list[str]:
        """The data its cells are measured on, in order of appearance."""
        return list(dict.fromkeys(cell.benchmark for cell in self.cells))


def load_supplementary(path: str | Path = SUPPLEMENTARY_FILE) -> dict[int, SupplementaryTable]:
    """Read the supplementary's numbers (table number -> table).

    Raises:
        ValueError: A missing field or an unknown requirement, named with the file, the table and the cell.
    """
    path = Path(path)
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    tables = {}
    for entry in data.get("tables") or []:
        fields = ("table", "title", "config", "benchmark", "quantity", "tolerance", "cells")
        missing = [k for k in fields if k not in entry]
        if missing:
            raise ValueError(f"{path}: table {entry.get('table', '?')} lacks {missing}")
        cells = []
        for i, raw in enumerate(entry["cells"]):
            where = f"{path}: table {entry['table']}, cell {i} (line {raw.get('line')})"
            lacking = [k for k in ("paper_row", "paper_column", "row", "value", "line") if k not in raw]
            if lacking:
                raise ValueError(f"{where} lacks {lacking}")
            if raw.get("requires") is not None and raw["requires"] not in REQUIREMENTS:
                raise ValueError(f"{where}: requires {raw['requires']!r}, known: {sorted(REQUIREMENTS)}")
            cells.append(Cell(
                paper_row=str(raw["paper_row"]), paper_column=str(raw["paper_column"]),
                row=None if raw["row"] is None else str(raw["row"]),
                value=None if raw["value"] is None else float(raw["value"]), line=int(raw["line"]),
                benchmark=str(raw.get("benchmark", entry["benchmark"])),
                average=raw.get("average", entry.get("average")),
                alpha=None if raw.get("alpha") is None else str(raw["alpha"]),
                analysis_key=raw.get("analysis_key"), requires=raw.get("requires"), row_note=raw.get("row_note"),
            ))
        number = int(entry["table"])
        tables[number] = SupplementaryTable(number, str(entry["title"]), str(entry["config"]), str(entry["quantity"]),
                                            float(entry["tolerance"]), tuple(cells), entry.get("note"),
                                            tuple(entry.get("skipped_rows") or ()))
    if not tables:
        raise ValueError(f"{path}: no tables")
    return tables


def parse_tables(text: str) -> list[int]:
    """``--tables``: ``all`` or comma-separated numbers out of :data:`TABLE_NUMBERS` (Tables 11 and 12 come from
    one run, the A.10 analysis).

    Raises:
        ValueError: An unknown table, named with the ones there are.
    """
    if text.strip() == "all":
        return list(TABLE_NUMBERS)
    try:
        numbers = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        numbers = [-1]
    unknown = [n for n in numbers if n not in TABLE_NUMBERS]
    if unknown or not numbers:
        raise ValueError(f"--tables {text!r}: choose 'all' or from {','.join(map(str, TABLE_NUMBERS))} (Table 9, "
                         "instance swapping, is scored by FID / CLIP and not reproduced here)")
    return sorted(set(numbers))


def table_benchmarks(tables: Mapping[int, SupplementaryTable], numbers: Sequence[int]) -> list[str]:
    """The benchmark roots the chosen tables need (``spair_subset20`` reads the SPair-71k root)."""
    needed = {"spair" if b == "spair_subset20" else b for n in numbers for b in tables[n].benchmarks}
    return [b for b in ("spair", "pfpascal", "pfwillow", "tss", "cub") if b in needed]


# ---------------------------------------------------------------------------------------------- the runs
def _absolute_refs(node: Any, folder: Path) -> Any:
    """A config node with its relative references to other config files made absolute (the derived config is
    written elsewhere)."""
    if isinstance(node, dict):
        return {key: _absolute_refs(value, folder) for key, value in node.items()}
    if isinstance(node, list):
        return [_absolute_refs(value, folder) for value in node]
    if isinstance(node, str) and node.endswith((".yaml", ".yml")) and (folder / node).is_file():
        return str((folder / node).resolve())
    return node


def _used_names(rows: Sequence[Mapping[str, Any]], variants: Mapping[str, Any], kind: str) -> set[str]:
    """The variants and extra models of ``kind`` (sd / dino) that the rows still use (a variant may vary an extra
    model, ``of: <name>``)."""
    used = {row.get(kind, "default") for row in rows} - {None, "default"}
    return used | {str(v["of"]) for name, v in variants.items() if name in used and isinstance(v, dict) and "of" in v}


def available(requirement: Requirement, given: Mapping[str, Any], synthetic: bool) -> bool:
    """Whether a requirement is met: given on the command line, stood in for by ``--synthetic``'s tiny models, or
    met by this machine (:attr:`Requirement.on_machine`)."""
    if given.get(requirement.key):
        return True
    return requirement.stand_in if synthetic else requirement.on_machine()


def _gpu_memory_gib() -> float:
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a dependency of the project
        return 0.0
    if not torch.cuda.is_available():
        return 0.0
    return torch.cuda.get_device_properties(0).total_memory / 2**30


@dataclass(frozen=True)
class TableRun:
    """The run of one table's config on one benchmark: the run itself and the rows it leaves out (row -> what it
    needs)."""

    table: int
    benchmark: str
    run: Run
    skipped: dict[str, str] = field(default_factory=dict)


def derive_config(table: SupplementaryTable, given: Mapping[str, Any], synthetic: bool) -> tuple[dict, dict[str, str]]:
    """The table's config as this reproduction runs it: rows whose requirement is missing left out (with the
    variants and models only they use), rows that a given file makes added (Table 3's projection layer).

    Returns:
        The config (references made absolute) and the skipped rows (row name -> what it needs, a sentence).
        ``given["missing_models"]``: hub model ids that are not there (offline, :func:`missing_hub_models`); the
        rows of the table's extra models among them are skipped too.
    """
    path = REPO / table.config
    config = _absolute_refs(yaml.safe_load(path.read_text(encoding="utf-8")), path.parent)
    init = config["model"]["init_args"]
    rows, skipped = list(init["rows"]), {}
    for requirement in REQUIREMENTS.values():
        if table.number not in requirement.tables:
            continue
        if requirement.makes_rows is not None:  # rows that only a given file makes
            made = sorted({c.row for c in table.cells if c.requires == requirement.key and c.row})
            if given.get(requirement.key):
                rows += [requirement.makes_rows(name, str(given[requirement.key])) for name in made]
            else:
                skipped.update({name: requirement.reason for name in made})
            continue
        if available(requirement, given, synthetic):
            continue
        skipped.update({row["name"]: requirement.reason for row in rows if requirement.needs_it(row["name"])})
        rows = [row for row in rows if not requirement.needs_it(row["name"])]
        if requirement.without is not None:
            requirement.without(init)
    from lightning_modules.components.hub import download_command  # the core, on first use

    for kind in ("sd", "dino"):  # extra hub models that are not there (offline): the rows that use them
        variants = init.get(f"{kind}_variants") or {}
        for name, node in (init.get(f"{kind}_models") or {}).items():
            model_id = ((node or {}).get("init_args") or {}).get("model_id")
            if synthetic or model_id is None or model_id not in given.get("missing_models", ()):
                continue
            users = {name} | {v for v, o in variants.items() if isinstance(o, dict) and o.get("of") == name}
            reason = (f"needs the hub model {model_id} ({kind}_models.{name}), not in the Hugging Face cache and "
                      f"offline: `{download_command(model_id)}` where the hub is reachable, or run online")
            skipped.update({row["name"]: reason for row in rows if row.get(kind, "default") in users})
            rows = [row for row in rows if row.get(kind, "default") not in users]
    init["rows"] = rows
    for kind in ("sd", "dino"):
        variants = init.get(f"{kind}_variants") or {}
        used = _used_names(rows, variants, kind)
        for key in (f"{kind}_variants", f"{kind}_models"):
            if init.get(key):
                init[key] = {name: value for name, value in init[key].items() if name in used}
    return config, skipped


def table_hub_models(tables: Mapping[int, SupplementaryTable], numbers: Sequence[int]) -> set[tuple[str, str]]:
    """The extra models the chosen tables' configs load, as ``(kind, hub id or folder)`` (Tables 6 and 7)."""
    found = set()
    for number in numbers:
        table = tables[number]
        if not table.config.startswith("configs/ablations/"):
            continue
        init = yaml.safe_load((REPO / table.config).read_text(encoding="utf-8"))["model"]["init_args"]
        for kind in ("sd", "dino"):
            for node in (init.get(f"{kind}_models") or {}).values():
                model_id = ((node or {}).get("init_args") or {}).get("model_id")
                if model_id:
                    found.add((kind, str(model_id)))
    return found


def missing_hub_models(models: Iterable[tuple[str, str]]) -> set[str]:
    """The models that neither a local folder nor the Hugging Face cache holds (checked without the network, by
    the file that loading reads first: diffusers' ``model_index.json``, transformers' ``config.json``)."""
    from huggingface_hub import try_to_load_from_cache

    missing = set()
    for kind, model_id in models:
        if Path(model_id).expanduser().is_dir():
            continue
        first = "model_index.json" if kind == "sd" else "config.json"
        if not isinstance(try_to_load_from_cache(model_id, first), str):
            missing.add(model_id)
    return missing


def _data_args(benchmark: str, synthetic: bool) -> list[str]:
    """How a table config's data (the subset) becomes the benchmark its cells name."""
    if benchmark == "spair":  # the whole test set
        return ["--data.init_args.pairs_per_category", "null"]
    return ["--data.init_args.pairs_per_category", "3"] if synthetic else []  # a smoke run: 3 draws a category


def plan_table_runs(
    tables: Mapping[int, SupplementaryTable], numbers: Sequence[int], roots: Mapping[str, Path], out: Path,
    devices: int, extra_configs: Sequence[str], cache: Path | None, given: Mapping[str, Any], synthetic: bool,
    models: Mapping[str, str] | None = None,
) -> list[TableRun]:
    """The runs of the chosen tables' configs (one per table and SPair-71k benchmark), into
    ``out/tables/<config>/<benchmark>``; Table 10's PF-Pascal / TSS columns and Table 13 are benchmark runs
    (:func:`benchmark_runs_needed`). Tables 11 and 12 share one run (the A.10 analysis). ``models``: the pipeline's
    SD / DINO weights given on the command line (hub id or local folder; the tables' other models keep theirs)."""
    planned: list[TableRun] = []
    runs: dict[Path, Run] = {}  # by folder: Tables 11 and 12 share one run
    for number in numbers:
        table = tables[number]
        if not table.config.startswith("configs/ablations/"):
            continue  # Table 13: benchmark runs
        for benchmark in table.benchmarks:
            if benchmark not in ("spair", "spair_subset20"):
                continue  # Table 10's PF-Pascal / TSS columns: benchmark runs
            config, skipped = derive_config(table, given, synthetic)
            folder = out / "tables" / Path(table.config).stem / benchmark
            if folder not in runs:
                args = _table_run_args(number, benchmark, config, folder, roots["spair"], devices, extra_configs,
                                       cache, given, synthetic, models)
                runs[folder] = Run(f"table{number}", benchmark, folder, tuple(args),
                                   resumable="analysis" not in config["model"]["init_args"])
            planned.append(TableRun(number, benchmark, runs[folder], skipped))
    return planned


def _table_run_args(
    number: int, benchmark: str, config: dict, folder: Path, root: Path, devices: int, extra_configs: Sequence[str],
    cache: Path | None, given: Mapping[str, Any], synthetic: bool, models: Mapping[str, str] | None,
) -> list[str]:
    """``evaluate.py`` arguments of a table run: its derived config (written beside the run folder, named by its
    content so that a changed config is a changed command), the overlays, data, devices, cache and given files."""
    text = yaml.safe_dump(config, sort_keys=False)
    derived = folder.parent / f"config-{benchmark}-{hashlib.sha256(text.encode()).hexdigest()[:12]}.yaml"
    derived.parent.mkdir(parents=True, exist_ok=True)
    write_output(derived, text)
    tiny = [TINY_TABLE_CONFIGS[number]] if synthetic and number in TINY_TABLE_CONFIGS else []
    args = ["test", "--config", str(derived)]
    for extra in [*extra_configs, *tiny]:
        args += ["--config", str(extra)]
    args += ["--data.root", str(root), *_data_args(benchmark, synthetic), "--trainer.devices", str(devices),
             "--trainer.default_root_dir", str(folder),
             "--model.init_args.pipeline.init_args.feature_cache_dir", "null" if cache is None else str(cache)]
    for kind, model_id in (models or {}).items():
        args += [f"--model.pipeline.{kind}.model_id", str(model_id)]
    for requirement in REQUIREMENTS.values():
        if number in requirement.tables and given.get(requirement.key):
            args += requirement.args(str(given[requirement.key]))
    return args


def benchmark_runs_needed(tables: Mapping[int, SupplementaryTable], numbers: Sequence[int]) -> dict[str, list[str]]:
    """Benchmark -> the rows of :mod:`.runs` that the chosen tables read (Table 10 on PF-Pascal / TSS, Table 13)."""
    needed: dict[str, list[str]] = {}
    for number in numbers:
        for cell in tables[number].cells:
            if cell.benchmark in ("spair", "spair_subset20") or cell.row is None:
                continue
            row = TABLE10_RUN_ROWS.get(cell.row, cell.row) if number == 10 else cell.row
            needed.setdefault(cell.benchmark, [])
            if row not in needed[cell.benchmark]:
                needed[cell.benchmark].append(row)
    return needed


def table10_row_args() -> dict[str, list[str]]:
    """The benchmark-run rows of Table 10's DINO variants: DINO alone with the variant's settings (read from the
    Table 10 config, so the two never disagree)."""
    config = yaml.safe_load((CONFIGS / "ablations" / "table10_dino_variants.yaml").read_text(encoding="utf-8"))
    variants = config["model"]["init_args"]["dino_variants"]
    rows = {}
    for row, variant in TABLE10_VARIANTS.items():
        args = ["--config", str(CONFIGS / "overlays" / "dino_only.yaml")]
        for key, value in variants[variant].items():
            args += [f"--model.pipeline.dino.init_args.{key}", json.dumps(value)]
        rows[row] = args
    return rows


# ------------------------------------------------------------------------------------------ the comparison
@dataclass(frozen=True)
class CellComparison:
    """A cell of the paper beside ours: ``state`` is ``compared``, ``paper empty`` (the paper prints no number),
    ``row unknown`` (the text lost which of our rows it is), ``skipped`` (the row's requirement is missing),
    ``no run`` (no finished run holds it) or ``ours empty`` (the run has no such number)."""

    table: int
    paper_row: str
    paper_column: str
    row: str | None
    benchmark: str
    paper: float | None
    ours: float | None
    difference: float | None
    tolerance: float
    within: bool | None
    state: str
    note: str | None


def _dig(node: Any, path: Sequence[str]) -> float | None:
    for key in path:
        if not isinstance(node, dict) or key not in node:
            return None
        node = node[key]
    return float(node) if isinstance(node, (int, float)) and math.isfinite(float(node)) else None


def _read(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None
    except (json.JSONDecodeError, OSError):
        return None


def _results(table: SupplementaryTable, cell: Cell, out: Path) -> dict | None:
    """The ``results.json`` of the run that holds a cell (None: no finished run)."""
    if cell.benchmark in ("spair", "spair_subset20"):
        return _read(out / "tables" / Path(table.config).stem / cell.benchmark / "results.json")
    row = TABLE10_RUN_ROWS.get(str(cell.row), cell.row) if table.number == 10 else cell.row
    return _read(out / cell.benchmark / str(row) / "results.json")


def _ours(table: SupplementaryTable, cell: Cell, results: Mapping[str, Any]) -> float | None:
    """Our value of a cell from its run's results (None: the run has no such number, e.g. no keypoint fell in
    an outcome)."""
    if cell.analysis_key:
        return _dig(results.get("analysis"), cell.analysis_key.split("/"))
    if cell.benchmark in ("spair", "spair_subset20"):
        return _dig(results.get("rows"), [str(cell.row), "pck", str(cell.alpha), str(cell.average)])
    average = str(cell.average)
    path = ["per_dataset", average.split("/", 1)[1]] if average.startswith("per_dataset/") else [average]
    return _dig(results.get("pck"), [str(cell.alpha), *path])


def compare_tables(
    tables: Mapping[int, SupplementaryTable], numbers: Sequence[int], out: Path,
    skipped: Mapping[int, Mapping[str, str]],
) -> list[CellComparison]:
    """Every cell of the chosen tables beside ours (``skipped``: table -> row -> what it needs, as planned)."""
    compared = []
    for number in numbers:
        table = tables[number]
        for cell in table.cells:
            reason = skipped.get(number, {}).get(str(cell.row))
            unknown = cell.row is None and not cell.analysis_key
            results = None if unknown or reason else _results(table, cell, out)
            ours = None if results is None else _ours(table, cell, results)
            if reason:
                state, note = "skipped", reason
            elif unknown:
                state, note = "row unknown", cell.row_note
            elif cell.value is None:
                state, note = "paper empty", None
            elif results is None:
                state, note = "no run", None
            elif ours is None:
                state, note = "ours empty", "the run has no such number (e.g. no keypoint had this outcome)"
            else:
                state, note = "compared", cell.row_note
            difference = ours - cell.value if state == "compared" else None
            within = None if difference is None else abs(difference) <= table.tolerance + 1e-9
            compared.append(CellComparison(number, cell.paper_row, cell.paper_column, cell.row, cell.benchmark,
                                           cell.value, ours, difference, table.tolerance, within, state, note))
    return compared


def _number(value: float | None, quantity: str) -> str:
    if value is None:
        return "—"
    return f"{value:.3f}" if quantity == "relative_distance" else f"{value:.2f}"


def _signed(value: float, quantity: str) -> str:
    return f"{value:+.3f}" if quantity == "relative_distance" else f"{value:+.2f}"


def table_summary(table: SupplementaryTable, cells: Sequence[CellComparison]) -> str:
    """One line: cells within tolerance of those compared, and why the others were not."""
    compared = [c for c in cells if c.state == "compared"]
    within = sum(bool(c.within) for c in compared)
    others = {}
    for c in cells:
        if c.state != "compared":
            others[c.state] = others.get(c.state, 0) + 1
    rest = "; ".join(f"{n} {state}" for state, n in others.items())
    return (f"Table {table.number} ({table.title}): {within} of {len(compared)} compared cells within "
            f"+-{table.tolerance:g}" + (f"; {rest}" if rest else "") + f" ({len(cells)} cells)")


def rows_without_a_cell(
    tables: Mapping[int, SupplementaryTable], numbers: Sequence[int], out: Path
) -> dict[int, dict[str, dict[str, float]]]:
    """Our rows of each table's run that no paper cell is tied to (e.g. Table 1's rows whose paper row the text
    lost, Table 3's "no reduction"): table -> row -> PCK alpha -> ours, at the table's average."""
    found: dict[int, dict[str, dict[str, float]]] = {}
    for number in numbers:
        table = tables[number]
        if table.quantity != "pck" or not table.config.startswith("configs/ablations/"):
            continue
        tied = {c.row for c in table.cells}
        average = next(c.average for c in table.cells if c.average)
        for benchmark in table.benchmarks:
            if benchmark not in ("spair", "spair_subset20"):
                continue
            results = _read(out / "tables" / Path(table.config).stem / benchmark / "results.json") or {}
            for row, values in (results.get("rows") or {}).items():
                if row not in tied:
                    found.setdefault(number, {})[row] = {
                        alpha: value for alpha in values.get("pck", {})
                        if (value := _dig(values["pck"], [alpha, str(average)])) is not None}
    return found


def _cell_text(c: CellComparison, quantity: str, mark: str) -> str:
    """A cell as printed: ``paper / ours (difference)``, or why there is no comparison."""
    if c.state == "compared":
        verdict = "" if c.within else " **x**"
        difference = _signed(c.difference, quantity)
        return f"{_number(c.paper, quantity)} / {_number(c.ours, quantity)} ({difference}){verdict}{mark}"
    if c.state == "paper empty":
        return f"— / {_number(c.ours, quantity)}"
    return f"{_number(c.paper, quantity)} / {c.state}{mark}"


def _grid(table: SupplementaryTable, cells: Sequence[CellComparison]) -> tuple[list[str], dict[str, int]]:
    """The table's lines as the paper prints them (one per text line, with our rows that fill it), and the
    footnotes they mark (note -> number)."""
    by_place = {(s.line, c.paper_column): c for s, c in zip(table.cells, cells)}
    columns = list(dict.fromkeys(c.paper_column for c in cells))
    lines: dict[int, tuple[str, list[str]]] = {}
    for s, c in zip(table.cells, cells):
        ours = lines.setdefault(s.line, (s.paper_row, []))[1]
        if c.row is not None and c.row not in ours:
            ours.append(c.row)
    notes: dict[str, int] = {}
    head = ["paper row", "our rows", *columns, "tolerance"]
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for line, (paper_row, ours) in lines.items():
        values = []
        for column in columns:
            c = by_place.get((line, column))
            mark = f" [{notes.setdefault(c.note, len(notes) + 1)}]" if c is not None and c.note else ""
            values.append("" if c is None else _cell_text(c, table.quantity, mark))
        rows.append(f"| {paper_row} | {' / '.join(ours) or '—'} | " + " | ".join(values)
                    + f" | +-{table.tolerance:g} |")
    return rows, notes


def render_tables(
    tables: Mapping[int, SupplementaryTable], compared: Sequence[CellComparison],
    extra_rows: Mapping[int, Mapping[str, Mapping[str, float]]] | None = None,
) -> str:
    """Each table as the paper prints it (its rows and columns), every cell ``paper / ours (difference)``, a
    tolerance column, footnotes for the cells not compared, our rows that no paper cell is tied to
    (``extra_rows``, :func:`rows_without_a_cell`), and the summary line."""
    parts = []
    for number in dict.fromkeys(c.table for c in compared):
        table, cells = tables[number], [c for c in compared if c.table == number]
        said = [f"> {table.note}"] if table.note else []
        if table.other_rows:
            said.append(f"> Other methods' rows, not ours, not reproduced: {', '.join(table.other_rows)}.")
        rows, notes = _grid(table, cells)
        parts.append(f"### Supplementary Table {number}: {table.title}\n\n" + "".join(line + "\n\n" for line in said)
                     + "\n".join(rows) + "\n")
        if notes:
            parts.append("\n".join(f"[{i}] {note}" for note, i in notes.items()) + "\n")
        mine = (extra_rows or {}).get(number)
        if mine:
            alphas = list(dict.fromkeys(a for values in mine.values() for a in values))
            extra = [f"Our rows that no paper cell is tied to ({table.cells[0].average}):", "",
                     "| our row | " + " | ".join(f"PCK@{a}" for a in alphas) + " |", "|---|" + "---|" * len(alphas)]
            extra += [f"| {row} | " + " | ".join(_number(values.get(a), table.quantity) for a in alphas) + " |"
                      for row, values in mine.items()]
            parts.append("\n".join(extra) + "\n")
        parts.append(table_summary(table, cells) + "\n")
    legend = ("Each cell: the paper's number / ours (ours - paper); **x** marks a cell outside the table's "
              "tolerance (its reasoning: the header of scripts/reproduction/supplementary_numbers.yaml).")
    return "## Supplementary tables\n\n" + legend + "\n\n" + "\n".join(parts)


def comparison_records(compared: Sequence[CellComparison]) -> list[dict[str, Any]]:
    """The cells for ``reproduction.json``."""
    return [asdict(c) for c in compared]


# --------------------------------------------------------------------------------------------- the time
#: Measured on one H200 (benchmarks/README.md, 2026-11-26, fp32): one image through SD + DINOv2 at the paper's
#: resolution, and matching + co-PCA of one pair (three SD layers).
IMAGE_SECONDS, PAIR_SECONDS = 1.07, 0.036
#: Images and pairs of each benchmark the tables read, approximate where marked: SPair-71k test 12,234 pairs of
#: about 1,800 images; the subset 18 x 20 pairs (at most 720 images); PF-Pascal test 299 pairs (at most 598
#: images); TSS 400 pairs (800 images); CUB as configs/cub.yaml draws it, 3 classes of about 30 test images, all
#: ordered pairs (approximate).
SIZES = {"spair_subset20": (720, 360), "spair": (1_800, 12_234), "pfpascal": (598, 299), "tss": (800, 400),
         "cub": (90, 2_610)}


def projected_gpu_minutes(tables: Mapping[int, SupplementaryTable], numbers: Sequence[int]) -> float:
    """A projection, not a measurement: per table and benchmark, :data:`IMAGE_SECONDS` per image for each distinct
    SD variant its rows use (SD is most of an image's extraction), a tenth of that for each further DINO variant
    (an assumption: DINO's share was not measured apart), and :data:`PAIR_SECONDS` per row and pair; the feature
    cache that tables share is not counted (it only lowers the time)."""
    seconds, seen = 0.0, set()
    for number in numbers:
        table = tables[number]
        config = yaml.safe_load((REPO / table.config).read_text(encoding="utf-8"))
        rows = config["model"]["init_args"]["rows"] if table.config.startswith("configs/ablations/") else []
        sd = len({r.get("sd", "default") for r in rows} - {None})
        dino = len({r.get("dino", "default") for r in rows} - {None})
        for benchmark in table.benchmarks:
            images, pairs = SIZES[benchmark]
            if benchmark in ("spair", "spair_subset20") and (table.config, benchmark) not in seen:
                seen.add((table.config, benchmark))  # one run of the table's config: its rows share extraction
                passes = max(sd, 1) + 0.1 * max(dino - 1, 0)
                seconds += passes * images * IMAGE_SECONDS + len(rows) * pairs * PAIR_SECONDS
            elif benchmark not in ("spair", "spair_subset20"):  # benchmark runs, one per row
                for row in {c.row for c in table.cells if c.benchmark == benchmark and c.row}:
                    if (benchmark, row) in seen:
                        continue
                    seen.add((benchmark, row))
                    passes = 0.1 if TABLE10_RUN_ROWS.get(row, row).startswith("dino") else 1.0
                    seconds += passes * images * IMAGE_SECONDS + pairs * PAIR_SECONDS
    return seconds / 60.0
