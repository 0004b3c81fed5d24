"""scripts/reproduction/supplementary_numbers.yaml against the supplementary's own text.

The data file transcribes the supplementary's Tables 1-8 and 10-13 cell by cell. These tests parse the text
extraction of the supplementary (``shared/spec/tale-of-two-features-supplementary.txt``) independently and check
every cell: the value is the token printed at its column on its text line, the line is a data row of that
table whose label is the cell's ``paper_row``, the column (``paper_column``) sits at that position among the
line's value cells, the threshold / benchmark / average fit the column, and every value cell of a table's text
is transcribed exactly once. Rows tied to ours must exist in the configs (or, for CUB, in runs.py).

How the text's tables are read (the extraction's quirks, each justified by the text itself):
- a table is the run of tab-separated lines next to its caption ``Table N:`` (after it, or before it when
  the caption sits under the table, as for Tables 3, 6, 8 and 12); its first ``header_lines`` lines are the
  header, the last of which labels each value column;
- a data line's value cells are its last fields (as many as the header has value columns; Table 5 prints two
  numbers, implicit then explicit, per field); markup (<b>, <u>, ``*``) is stripped, ``_`` / ``-`` is empty;
- a blank leading label continues the label of the line above (merged cells: Tables 8 and 13); a
  ``\\frac{A}{B}`` label (Table 3's "PCA (dim= 256)" over "PCA (dim = 128)") is A for its line and B for the
  next line, whose label is blank;
- Table 1's labels all read "2 5 8" (the underline that said which layers was lost): the label check holds
  for every line there, so a Table 1 row is tied to ours only through ``evidence``, a line of another table
  with the same six numbers (checked here, both ways).
"""

from __future__ import annotations

import ast
import copy
import re
import sys
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
DATA_FILE = REPO / "scripts" / "reproduction" / "supplementary_numbers.yaml"
RUNS_FILE = REPO / "scripts" / "reproduction" / "runs.py"
sys.path[:0] = [str(REPO / "scripts")]
from reproduction.tables import REQUIREMENTS  # noqa: E402
TEXT_NAME = "tale-of-two-features-supplementary.txt"
TEXT_CANDIDATES = (Path(__file__).resolve().parents[2] / "shared" / "spec" / TEXT_NAME,
                   Path("/work/shared/spec") / TEXT_NAME)
TEXT_FILE = next((p for p in TEXT_CANDIDATES if p.is_file()), None)
needs_text = pytest.mark.skipif(
    TEXT_FILE is None, reason=f"the supplementary's text ({TEXT_NAME}) is not in shared/spec: nothing to check against")

BENCHMARKS = {"spair_subset20", "spair", "pfpascal", "tss", "cub"}
QUANTITIES = {"pck", "outcome_percent", "relative_distance"}
#: Benchmark -> the averages of our results that can hold the paper's PCK.
AVERAGES = {"spair_subset20": {"category_mean"}, "spair": {"category_mean"}, "cub": {"category_mean"},
            "pfpascal": {"weighted"},
            "tss": {"dataset_mean", "per_dataset/FG3DCar", "per_dataset/JODS", "per_dataset/PASCAL"}}


# ---------------------------------------------------------------------------------------------- column specs
@dataclass(frozen=True)
class Column:
    """A value column as the paper prints it: its name, the header text over it, and what a cell under it
    must say (``expect``: field -> allowed value or set of values; ``prefix``: our row name's start)."""

    name: str
    header: str
    expect: dict = field(default_factory=dict)
    prefix: str | None = None


def _sd_fuse() -> list[Column]:
    return [Column(f"{group} PCK@{a}", a, {"alpha": str(float(a))}, prefix)
            for group, prefix in (("Stable Diffusion", "SD "), ("Fuse-ViT-B/14", "Fuse "))
            for a in ("0.01", "0.05", "0.10")]


def _pck(alphas: tuple[str, ...], header: str = "{a}") -> list[Column]:
    return [Column(f"PCK@{a}", header.format(a=a), {"alpha": str(float(a))}) for a in alphas]


_SPAIR = {"spair", "spair_subset20"}
SPECS: dict[int, dict] = {
    1: {"header_lines": 2, "columns": _sd_fuse()},
    2: {"header_lines": 2, "columns": _sd_fuse()},
    3: {"header_lines": 2, "columns": _sd_fuse()},
    4: {"header_lines": 1, "columns": _pck(("0.01", "0.05", "0.10"))},
    5: {"header_lines": 1, "per_field": 2,
        "columns": [Column(f"{t} ({cap})", str(t), {"alpha": "0.1", "captioner": cap.lower(), "timestep": t})
                    for t in (0, 50, 100, 150, 200) for cap in ("Implicit", "Explicit")]},
    6: {"header_lines": 1, "columns": _pck(("0.10", "0.05", "0.01"), "PCK@{a}")},
    7: {"header_lines": 1, "columns": _pck(("0.10", "0.05", "0.01"), "PCK@{a}")},
    8: {"header_lines": 1, "columns": _pck(("0.10", "0.05", "0.01"))},
    10: {"header_lines": 2, "columns": [
        *(Column(f"SPair-71k PCK@{a}", a, {"alpha": str(float(a)), "benchmark": _SPAIR, "average": "category_mean"})
          for a in ("0.01", "0.05", "0.10")),
        *(Column(f"PF-Pascal PCK@{a}", a, {"alpha": str(float(a)), "benchmark": "pfpascal", "average": "weighted"})
          for a in ("0.05", "0.10", "0.15")),
        *(Column(f"TSS, PCK@0.05 {name}", name, {"alpha": "0.05", "benchmark": "tss", "average": average})
          for name, average in (("FG3DCar", "per_dataset/FG3DCar"), ("JODS", "per_dataset/JODS"),
                                ("Pascal", "per_dataset/PASCAL"), ("Avg.", "dataset_mean")))]},
    11: {"header_lines": 1, "columns": [Column("share (unlabelled)", "", {"alpha": None})]},
    12: {"header_lines": 2, "columns": [
        Column(f"{group} Features {match.title()} Match", f"{match.title()} Match",
               {"alpha": None, "feature": feature, "match": match})
        for group, feature in (("SD", "sd"), ("DINO", "dino")) for match in ("correct", "false")]},
    13: {"header_lines": 1, "columns": _pck(("0.1", "0.05", "0.01"), "PCK@{a}")},
}


# --------------------------------------------------------------------------------------------- text parsing
MARKUP = re.compile(r"</?(?:b|u|i|em|strong|sup|sub)>|\*")
EMPTY = {"_", "-", "\u2014", "\u2013"}
NUMBER = re.compile(r"\d+(?:\.\d+)?%?")
FRACTION = re.compile(r"\\frac\{\\text\{([^}]*)\}\}\{\\text\{([^}]*)\}\}")


def normalize(label: str) -> str:
    """A label without markup, LaTeX wrappers, norm bars, whitespace or case (the text's "$\\mathcal{F}_{\\text
    {SD}}  _2$" and the data file's "||F_SD||_2" both read "f_sd_2")."""
    s = MARKUP.sub("", label).replace("\\alpha", "\u03b1")
    s = re.sub(r"\\(?:mathcal|mathrm|mathbf|text)\b", "", s)
    s = re.sub(r"(?<=\{)\s*ext(?=\{)", "", s)  # the extraction ate the "\t" of "\text" on Table 4's line 81
    return re.sub(r"[\s${}|\\]", "", s).lower()


def token_value(token: str | None) -> float | None:
    return None if token is None else float(token.rstrip("%"))


@dataclass
class TextRow:
    line: int  # 1-based
    labels: list[str]
    tokens: list[str | None]  # printed value tokens, left to right; None: an empty cell


@dataclass
class TextTable:
    number: int
    caption: int  # 1-based line of "Table N:"
    first: int
    last: int  # 1-based block bounds, inclusive
    header: list[str]  # the last header line's fields over the value columns
    rows: dict[int, TextRow]
    problems: list[str]

    def row_with_label(self, label: str) -> TextRow | None:
        hits = [r for r in self.rows.values() if normalize(label) in (normalize(x) for x in r.labels)]
        return hits[0] if len(hits) == 1 else None


@lru_cache(maxsize=1)
def text_lines() -> tuple[str, ...]:
    return tuple(TEXT_FILE.read_text(encoding="utf-8").splitlines())


def _block(lines: tuple[str, ...], caption: int) -> tuple[int, int] | None:
    """0-based bounds of the tab-separated lines next to the caption: after it, else before it."""
    def run(start: int, step: int) -> tuple[int, int] | None:
        i = start
        while 0 <= i < len(lines) and not lines[i].strip():
            i += step
        if not 0 <= i < len(lines) or "\t" not in lines[i]:
            return None
        j = i
        while 0 <= j + step < len(lines) and "\t" in lines[j + step]:
            j += step
        return min(i, j), max(i, j)
    return run(caption + 1, 1) or run(caption - 1, -1)


@lru_cache(maxsize=None)
def parse_table(number: int) -> TextTable:
    """Table ``number`` as the text prints it (see the module docstring for the rules)."""
    lines, spec = text_lines(), SPECS[number]
    captions = [i for i, text in enumerate(lines) if re.match(rf"Table {number}:", text)]
    assert len(captions) == 1, f"Table {number}: {len(captions)} caption lines 'Table {number}:' in the text"
    bounds = _block(lines, captions[0])
    assert bounds, f"Table {number}: no tab-separated block next to its caption (line {captions[0] + 1})"
    first, last = bounds
    n_fields = len(spec["columns"]) // spec.get("per_field", 1)
    head = lines[first + spec["header_lines"] - 1].split("\t")
    problems, rows, previous, pending = [], {}, [], None
    for i in range(first + spec["header_lines"], last + 1):
        raw = lines[i].split("\t")
        if len(raw) != len(head):
            problems.append(f"line {i + 1}: {len(raw)} fields, the header has {len(head)}")
        fields = list(raw)
        while fields and not fields[-1].strip():
            fields.pop()
        labels, values = [f.strip() for f in fields[:-n_fields]], fields[-n_fields:]
        header = [h.strip() for h in head[len(fields) - n_fields:len(fields)]]
        if pending is not None and not any(labels):
            labels, pending = [pending], None
        else:
            labels = [lab or (previous[k] if k < len(previous) else "") for k, lab in enumerate(labels)]
        for k, lab in enumerate(labels):
            stacked = FRACTION.search(lab)
            if stacked:
                labels[k], pending = stacked.group(1), stacked.group(2)
        previous = labels
        tokens: list[str | None] = []
        for value in values:
            parts = MARKUP.sub("", value).split()
            if len(parts) != spec.get("per_field", 1) or not all(p in EMPTY or NUMBER.fullmatch(p) for p in parts):
                problems.append(f"line {i + 1}: value field {value!r} is not {spec.get('per_field', 1)} number(s)")
            tokens += [None if p in EMPTY else p for p in parts]
        rows[i + 1] = TextRow(i + 1, labels, tokens)
    expected = [c.header for c in spec["columns"]][::spec.get("per_field", 1)]
    if [normalize(h) for h in header] != [normalize(h) for h in expected]:
        problems.append(f"header over the value columns reads {header}, expected {expected}")
    return TextTable(number, captions[0] + 1, first + 1, last + 1, header, rows, problems)


# ------------------------------------------------------------------------------------------------ the checker
def _effective(table: dict, cell: dict, key: str):
    return cell[key] if key in cell else table.get(key)


def _allowed(value, allowed) -> bool:
    return value in allowed if isinstance(allowed, set) else value == allowed


def _row_rule(number: int, cell: dict, column: Column) -> str | None:
    """What our row name must be, given the paper's row and column (None: fine)."""
    row, paper_row = cell["row"], cell["paper_row"]
    if column.prefix and not row.startswith(column.prefix):
        return f"row {row!r} under column {column.name!r} should start with {column.prefix!r}"
    if number == 2 and row.removesuffix(" (default)").lower() != f"{column.prefix}{paper_row}".lower():
        return f"row {row!r} is not {column.prefix}{paper_row!r}"
    if number == 3 and paper_row == "Projection layer [12]":
        if row != f"{column.prefix}projection layer" or cell.get("requires") != "odise_projection":
            return f"row {row!r} is not the {column.prefix}projection layer that --odise-projection adds"
    elif number == 3 and not re.search(rf"PCA {re.escape(paper_row.split('=')[-1].strip(' )'))}\b", row):
        return f"row {row!r} is not the PCA dimension of {paper_row!r}"
    if number == 4 and normalize(paper_row) != "f_fuse=" + normalize(row.removesuffix(" (default)")):
        return f"row {row!r} is not the fusion {paper_row!r}"
    if number == 8:
        resolution, annotation = paper_row.split(" / ")
        if not (row.startswith(resolution.split()[0] + " ") and f"/ annotations {annotation}" in row):
            return f"row {row!r} is not input {resolution!r} with annotations {annotation!r}"
    if number == 5 and row != f"{paper_row} {column.expect['captioner']} t={column.expect['timestep']}":
        return f"row {row!r} is not {paper_row} {column.expect['captioner']} t={column.expect['timestep']}"
    if number in (6, 7, 10) and row != paper_row:
        return f"row {row!r} is not the paper's row {paper_row!r}"
    if number == 12 and row != {"sd": "SD", "dino": "DINO"}[column.expect["feature"]]:
        return f"row {row!r} does not hold feature {column.expect['feature']}"
    if number == 13:
        want = ("dino" if "dinov2" in normalize(paper_row) else "sd" if "stablediffusion" in normalize(paper_row)
                else "fused" if "\u03b1=0.5" in normalize(paper_row) else "fused_alpha0.8"
                if "\u03b1=0.8" in normalize(paper_row) else None)
        if row != want:
            return f"row {row!r} is not runs.py's {want!r} for {paper_row!r}"
    return None


#: Where a cell may leave ``row`` null: Table 1 wherever no other table ties the line (checked both ways by
#: test_table1_rows_are_tied_exactly_where_another_table_agrees), Table 11 (each outcome is the three rows
#: together); nowhere else (Table 3's ODISE projection layer names the rows that --odise-projection adds).
NULL_ROWS = {n: (lambda cell: False) for n in SPECS}
NULL_ROWS.update({1: lambda cell: "evidence" not in cell,
                  11: lambda cell: True})


def check_table(table: dict) -> list[str]:
    """Every disagreement between one table of the data file and the supplementary's text."""
    number = table["table"]
    spec, text = SPECS[number], parse_table(number)
    errors = [f"Table {number}, text: {p}" for p in text.problems]
    columns = {c.name: k for k, c in enumerate(spec["columns"])}
    skipped = set()
    for label in table.get("skipped_rows", []):
        hit = text.row_with_label(label)
        if hit is None:
            errors.append(f"Table {number}: skipped row {label!r} is not one data line of the text")
        else:
            skipped.add(hit.line)
    if table.get("benchmark") not in BENCHMARKS:
        errors.append(f"Table {number}: benchmark {table.get('benchmark')!r} not in {sorted(BENCHMARKS)}")
    if table.get("quantity") not in QUANTITIES:
        errors.append(f"Table {number}: quantity {table.get('quantity')!r} not in {sorted(QUANTITIES)}")
    seen: dict[tuple[int, int], int] = {}
    row_lines: dict[str, set[int]] = {}
    for n, cell in enumerate(table["cells"]):
        where = (f"Table {number}, cell {n} ({cell.get('paper_row')!r} / {cell.get('paper_column')!r}, "
                 f"line {cell.get('line')})")
        if cell.get("paper_column") not in columns:
            errors.append(f"{where}: unknown paper_column, expected one of {list(columns)}")
            continue
        k, column = columns[cell["paper_column"]], spec["columns"][columns[cell["paper_column"]]]
        row = text.rows.get(cell.get("line"))
        if row is None:
            errors.append(f"{where}: line {cell.get('line')} is not a data line of Table {number} "
                          f"(lines {min(text.rows)}-{max(text.rows)})")
            continue
        if row.line in skipped:
            errors.append(f"{where}: line {row.line} is one of the skipped rows")
        seen[(row.line, k)] = seen.get((row.line, k), 0) + 1
        printed = row.tokens[k] if k < len(row.tokens) else None
        value = cell.get("value")
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
            errors.append(f"{where}: value {value!r} is not a number")
        elif (value is None) != (printed is None) or (value is not None and abs(value - token_value(printed)) > 1e-9):
            errors.append(f"{where}: value {value!r}, the text prints {printed!r} there "
                          f"(its value cells: {row.tokens})")
        labels = {normalize(x) for x in row.labels}
        for part in str(cell.get("paper_row")).split(" / "):
            if normalize(part) not in labels:
                errors.append(f"{where}: paper_row part {part!r} is not a label of line {row.line} {row.labels}")
        if table.get("quantity") == "pck":
            benchmark, average = _effective(table, cell, "benchmark"), _effective(table, cell, "average")
            if benchmark not in BENCHMARKS or average not in AVERAGES.get(benchmark, set()):
                errors.append(f"{where}: average {average!r} does not hold a PCK of benchmark {benchmark!r}")
        for key, allowed in column.expect.items():
            if key in ("alpha", "feature", "match", "benchmark", "average") and not _allowed(
                    _effective(table, cell, key), allowed):
                errors.append(f"{where}: {key} {_effective(table, cell, key)!r}, "
                              f"column {column.name!r} says {allowed!r}")
        if number == 11:
            if cell.get("outcome") != row.labels[3] or cell.get("analysis_key") != f"outcomes/{row.labels[3]}":
                errors.append(f"{where}: outcome / analysis_key {cell.get('outcome')!r} / {cell.get('analysis_key')!r},"
                              f" the line's notation is {row.labels[3]!r}")
        if number == 12:
            scenario = row.labels[0].lower()
            key = f"relative_distance/{scenario}/{column.expect['feature']}_{column.expect['match']}"
            if cell.get("scenario") != scenario or cell.get("analysis_key") != key:
                errors.append(f"{where}: scenario / analysis_key {cell.get('scenario')!r} / "
                              f"{cell.get('analysis_key')!r}, expected {scenario!r} / {key!r}")
        if cell.get("row") is None:
            if not cell.get("row_note"):
                errors.append(f"{where}: row null without a row_note")
            if not NULL_ROWS[number](cell):
                errors.append(f"{where}: row null where the paper's row is one of ours")
        elif number == 11:
            errors.append(f"{where}: an outcome of rows SD, DINO and Fused together is no one row")
        else:
            problem = _row_rule(number, cell, column)
            if problem:
                errors.append(f"{where}: {problem}")
            row_lines.setdefault(cell["row"], set()).add(row.line)
        if "evidence" in cell:
            other = parse_table(cell["evidence"]["table"])
            ev = other.rows.get(cell["evidence"]["line"])
            if ev is None or ev.tokens != row.tokens:
                errors.append(f"{where}: evidence {cell['evidence']} does not print the same numbers "
                              f"({row.tokens} vs {None if ev is None else ev.tokens})")
        elif number == 1 and cell.get("row") is not None:
            errors.append(f"{where}: a Table 1 row is tied only with evidence from another table")
    for name, found in row_lines.items():
        if len(found) > 1 and number != 12:  # Table 12's rows are its feature columns, one per scenario line
            errors.append(f"Table {number}: row {name!r} is given cells on several text lines {sorted(found)}")
    expected = {(line, k) for line, r in text.rows.items() if line not in skipped for k in range(len(r.tokens))}
    missing, extra = sorted(expected - set(seen)), sorted(set(seen) - expected)
    twice = sorted(key for key, count in seen.items() if count > 1)
    if len(table["cells"]) != len(expected) or missing or extra or twice:
        errors.append(f"Table {number}: {len(table['cells'])} cells, the text has {len(expected)} value cells "
                      f"(lines {text.first}-{text.last}); missing (line, column): {missing}, not in the text: "
                      f"{extra}, given twice: {twice}")
    return errors


# ------------------------------------------------------------------------------------------------------ tests
@lru_cache(maxsize=1)
def data() -> dict:
    return yaml.safe_load(DATA_FILE.read_text(encoding="utf-8"))


def tables() -> dict[int, dict]:
    return {t["table"]: t for t in data()["tables"]}


TABLES = (1, 2, 3, 4, 5, 6, 7, 8, 10, 11, 12, 13)


def test_the_data_file_has_the_tables() -> None:
    assert sorted(tables()) == list(TABLES)
    for number, table in tables().items():
        assert table.get("title") and table.get("cells"), f"Table {number}: title and cells"
        assert (REPO / table["config"]).is_file(), f"Table {number}: config {table['config']} is missing"


@needs_text
@pytest.mark.parametrize("number", TABLES)
def test_every_cell_is_the_texts(number: int) -> None:
    errors = check_table(tables()[number])
    assert not errors, "\n".join(errors)


def _config_rows(config: str) -> set[str]:
    path = REPO / config
    if path.parent.name == "ablations":
        return {r["name"] for r in yaml.safe_load(path.read_text())["model"]["init_args"]["rows"]}
    tree = ast.parse(RUNS_FILE.read_text())  # the benchmark configs: runs.py's rows, read without importing it
    for node in tree.body:
        targets = [node.target] if isinstance(node, ast.AnnAssign) else getattr(node, "targets", [])
        if any(isinstance(t, ast.Name) and t.id == "ROWS" for t in targets):
            return {key.value for key in node.value.keys}
    raise AssertionError("runs.py defines no ROWS")


@pytest.mark.parametrize("number", TABLES)
def test_rows_exist_in_the_config(number: int) -> None:
    table = tables()[number]
    names = _config_rows(table["config"])
    # a row that only a given file makes (Table 3's ODISE projection layer) names what it requires instead
    added = {c["row"] for c in table["cells"] if c.get("requires")}
    assert all(c["requires"] in REQUIREMENTS for c in table["cells"] if c.get("requires")), f"Table {number}"
    unknown = sorted({c["row"] for c in table["cells"] if c.get("row") is not None} - names - added)
    assert not unknown, f"Table {number}: rows {unknown} are not in {table['config']}'s rows {sorted(names)}"


def test_values_keep_the_printed_precision() -> None:
    """The data file's text writes each value as printed ("55.90", not "55.9")."""
    raw = [line for line in DATA_FILE.read_text(encoding="utf-8").splitlines()
           if re.match(r"\s*- \{paper_row:", line)]
    cells = [(t["table"], c) for t in data()["tables"] for c in t["cells"]]
    assert len(raw) == len(cells), "one flow-style line per cell"
    if TEXT_FILE is None:
        pytest.skip(f"{TEXT_NAME} is not in shared/spec")
    for text, (number, cell) in zip(raw, cells):
        written = re.search(r"\bvalue: ([^,}]+)", text).group(1).strip()
        column = [c.name for c in SPECS[number]["columns"]].index(cell["paper_column"])
        printed = parse_table(number).rows[cell["line"]].tokens[column]
        assert written == ("null" if printed is None else printed.rstrip("%")), f"Table {number}: {text.strip()}"


@needs_text
def test_table1_rows_are_tied_exactly_where_another_table_agrees() -> None:
    """Table 1's recovery rule both ways: a line is tied to our rows iff another table prints its six numbers."""
    others = {(n, line): r.tokens for n in TABLES if n != 1 for line, r in parse_table(n).rows.items()}
    cells = tables()[1]["cells"]
    for line, row in parse_table(1).rows.items():
        matches = [key for key, tokens in others.items() if tokens == row.tokens]
        tied = {c["row"] is not None for c in cells if c["line"] == line}
        assert tied == {bool(matches)}, \
            f"Table 1 line {line} {row.tokens}: equal lines elsewhere {matches}, rows tied: {tied}"


def _by_row_alpha(number: int) -> dict[tuple[str, str], float]:
    return {(c["row"], c["alpha"]): c["value"] for c in tables()[number]["cells"] if c.get("row")}


def test_the_defaults_agree_across_tables() -> None:
    """Tables 1, 3 and 4 share the default setting (2+5+8, PCA 256, concatenated L2-normalised features);
    this is also what puts Table 3's stacked "PCA (dim= 256)" on the first of its two lines."""
    t1, t3, t4 = _by_row_alpha(1), _by_row_alpha(3), _by_row_alpha(4)
    for alpha in ("0.01", "0.05", "0.1"):
        assert t1[("Fuse 2+5+8 (default)", alpha)] == t3[("Fuse PCA 256 (default)", alpha)] \
            == t4[("(||F_SD||_2, ||F_DINO||_2) (default)", alpha)]
        assert t1[("SD 2+5+8", alpha)] == t3[("SD PCA 256 (default)", alpha)]


@needs_text
def test_table10_spair_benchmark_follows_the_numbers() -> None:
    """Table 10's SPair-71k columns count as the 20-pair subset only if they round Table 7's subset numbers."""
    t7, t10 = parse_table(7), parse_table(10)
    alphas7 = [c.expect["alpha"] for c in SPECS[7]["columns"]]
    alphas10 = [c.expect["alpha"] for c in SPECS[10]["columns"][:3]]
    agree = True
    for label7, label10 in (("DINOv2-vitb14", "DINOv2-ViT-B/14"), ("Fuse-DINOv2-vitb14", "Fuse-ViT-B/14")):
        v7 = dict(zip(alphas7, map(token_value, t7.row_with_label(label7).tokens)))
        v10 = dict(zip(alphas10, map(token_value, t10.row_with_label(label10).tokens[:3])))
        agree &= all(abs(v7[a] - v10[a]) <= 0.05 + 1e-9 for a in alphas10)
    want = "spair_subset20" if agree else "spair"
    spair = [c for c in tables()[10]["cells"] if c["paper_column"].startswith("SPair-71k")]
    assert len(spair) == 12 and {c["benchmark"] for c in spair} == {want}


def test_analysis_keys_are_the_analysis_outputs() -> None:
    """Tables 11 and 12's analysis_key paths exist in summarize_fusion_analysis's output, and Table 12's rows
    are the ones a10_analysis.yaml hands the analysis as its SD and DINO features."""
    import torch

    from lightning_modules.components.analysis import OUTCOMES, summarize_fusion_analysis

    code = torch.arange(len(OUTCOMES))
    flags = {"sd_ok": code // 4 % 2 == 1, "dino_ok": code // 2 % 2 == 1, "fused_ok": code % 2 == 1}
    dist = {k: torch.linspace(0, 1, len(OUTCOMES)) for k in
            ("sd_rel_correct", "dino_rel_correct", "sd_rel_at_dino_match", "dino_rel_at_sd_match")}
    summary = summarize_fusion_analysis(**flags, **dist)
    for number in (11, 12):
        for cell in tables()[number]["cells"]:
            node = summary
            for part in cell["analysis_key"].split("/"):
                assert isinstance(node, dict) and part in node, \
                    f"Table {number}: {cell['analysis_key']} is not in the analysis output"
                node = node[part]
            if number == 12:
                assert (node is None) == (cell["value"] is None), f"{cell['analysis_key']}: empty cells agree"
    config = yaml.safe_load((REPO / tables()[12]["config"]).read_text())["model"]["init_args"]["analysis"]
    for cell in tables()[12]["cells"]:
        assert cell["row"] == config[cell["feature"]]


@needs_text
def test_the_checker_catches_slips() -> None:
    """Each kind of transcription slip, made on a copy, fails the check."""
    good = tables()[6]
    assert not check_table(good)

    def slipped(change) -> list[str]:
        table = copy.deepcopy(good)
        change(table["cells"])
        return check_table(table)

    def wrong_value(cells):
        cells[4]["value"] = 38.34

    def swapped_columns(cells):  # 41.07 and 28.67 under each other's column
        cells[0]["paper_column"], cells[1]["paper_column"] = cells[1]["paper_column"], cells[0]["paper_column"]
        cells[0]["alpha"], cells[1]["alpha"] = cells[1]["alpha"], cells[0]["alpha"]

    def wrong_row(cells):  # SD-small's PCK@0.10 placed on SD-1-3's line
        cells[3].update(line=109)

    def missing(cells):
        del cells[-1]

    def wrong_alpha(cells):
        cells[2]["alpha"] = "0.05"

    for change in (wrong_value, swapped_columns, wrong_row, missing, wrong_alpha):
        assert slipped(change), f"{change.__name__} went unnoticed"
    assert any("missing" in e and "(119, 2)" in e for e in slipped(missing))
    table13 = copy.deepcopy(tables()[13])
    table13["cells"][0]["row"] = "sd"
    assert check_table(table13), "a CUB row tied to the wrong runs.py row went unnoticed"
