"""Compare a reproduction's numbers with the paper's: one table (printed, ``reproduction.md``, ``reproduction.json``)
with, per benchmark and row, the paper's number, ours, the difference and whether it is within tolerance."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import yaml

from . import write_output

__all__ = ["PaperNumber", "Comparison", "compare", "load_paper_numbers", "render_markdown"]

PAPER_FILE = Path(__file__).with_name("paper_numbers.yaml")


@dataclass(frozen=True)
class PaperNumber:
    """One number of the paper: benchmark, row, the metric (``pck@<alpha>`` and the average, or a TSS sub-dataset),
    its value, where it is printed, and the tolerance within which ours counts as reproduced (PCK points)."""

    benchmark: str
    row: str
    alpha: str
    average: str
    value: float | None
    table: str
    tolerance: float


@dataclass(frozen=True)
class Comparison:
    """A table line: the paper's number (None: not reported), ours (None: no finished run), the difference and
    the verdict (None when either is missing)."""

    benchmark: str
    row: str
    metric: str
    paper: float | None
    ours: float | None
    difference: float | None
    tolerance: float
    within: bool | None
    table: str


def load_paper_numbers(path: str | Path = PAPER_FILE) -> list[PaperNumber]:
    """Read and check the paper's numbers.

    Raises:
        ValueError: A missing or malformed field, named with the file and the entry.
    """
    path = Path(path)
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    default = float(data.get("tolerance", 1.0))
    numbers = []
    for i, entry in enumerate(data.get("numbers") or []):
        missing = [k for k in ("benchmark", "row", "alpha", "average", "value", "table") if k not in entry]
        if missing:
            raise ValueError(f"{path}: number {i} lacks {missing}")
        numbers.append(PaperNumber(str(entry["benchmark"]), str(entry["row"]), str(entry["alpha"]),
                                   str(entry["average"]), None if entry["value"] is None else float(entry["value"]),
                                   str(entry["table"]),
                                   float(entry.get("tolerance", default))))
    if not numbers:
        raise ValueError(f"{path}: no numbers")
    return numbers


def _ours(results: dict[str, Any], number: PaperNumber) -> float | None:
    """Our value of ``number``'s metric from a ``results.json`` (``per_dataset/<name>`` reaches into TSS's table)."""
    values = results.get("pck", {}).get(number.alpha)
    if values is None:
        return None
    if number.average.startswith("per_dataset/"):
        value = values.get("per_dataset", {}).get(number.average.split("/", 1)[1])
    else:
        value = values.get(number.average)
    return None if value is None or not math.isfinite(float(value)) else float(value)


def compare(numbers: Sequence[PaperNumber], out: Path, benchmarks: Sequence[str], rows: Sequence[str]) -> list[Comparison]:
    """The table of the requested benchmarks and rows, ours read from ``out/<benchmark>/<row>/results.json``."""
    table = []
    for number in numbers:
        if number.benchmark not in benchmarks or number.row not in rows:
            continue
        path = out / number.benchmark / number.row / "results.json"
        ours = _ours(json.loads(path.read_text()), number) if path.is_file() else None
        difference = None if ours is None or number.value is None else ours - number.value
        within = None if difference is None else abs(difference) <= number.tolerance
        table.append(Comparison(number.benchmark, number.row, f"PCK@{number.alpha} {number.average}", number.value,
                                ours, difference, number.tolerance, within, number.table))
    return table


def _cell(value: float | None, signed: bool = False) -> str:
    if value is None:
        return "-"
    return f"{value:+.1f}" if signed else f"{value:.1f}"


#: The mark of a paper cell without a number, and its footnote.
NO_NUMBER = "— [a]"
NO_NUMBER_NOTE = ("[a] No number of the paper to compare with: the last column says where it would be printed and "
                  "why there is none here (not evaluated by the paper, or in a part of it whose text was not "
                  "available here).")
#: The note at the top of a ``--synthetic`` run's table.
SYNTHETIC_NOTE = ("> **Generated data and tiny random models** (`--synthetic`): benchmarks generated in the real "
                  "on-disk formats, run with tiny random SD and DINOv2 models. These numbers only show that every "
                  "step runs; they say nothing about the paper's.")


def render_markdown(table: Sequence[Comparison]) -> str:
    """The comparison as a Markdown table (a footnote under it where a paper cell has no number)."""
    lines = ["| benchmark | row | metric | paper | ours | difference | within tolerance | source of the paper's number |",
             "|---|---|---|---|---|---|---|---|"]
    for c in table:
        if c.within is not None:
            verdict = f"{'yes' if c.within else 'NO'} (+-{c.tolerance:g})"
        else:
            verdict = "no run" if c.ours is None else "—"
        paper = NO_NUMBER if c.paper is None else _cell(c.paper)
        lines.append(f"| {c.benchmark} | {c.row} | {c.metric} | {paper} | {_cell(c.ours)} | "
                     f"{_cell(c.difference, True)} | {verdict} | {c.table} |")
    if any(c.paper is None for c in table):
        lines += ["", NO_NUMBER_NOTE]
    return "\n".join(lines) + "\n"


def write_comparison(
    table: Sequence[Comparison], out: Path, context: dict[str, Any], supplementary: tuple[str, list] | None = None,
) -> str:
    """Write ``reproduction.md`` and ``reproduction.json`` into ``out``; returns the Markdown text (under its
    title): the table (when it has lines), preceded by :data:`SYNTHETIC_NOTE` when ``context["synthetic"]``, and
    the supplementary's tables (``supplementary``: their Markdown and their cells, :mod:`.tables`)."""
    text = (SYNTHETIC_NOTE + "\n\n" if context.get("synthetic") else "") + (render_markdown(table) if table else "")
    if supplementary is not None:
        text += ("\n" if table else "") + supplementary[0]
    out.mkdir(parents=True, exist_ok=True)
    write_output(out / "reproduction.md", "# Reproduction of the paper's numbers\n\n" + text)
    payload = {"context": context, "table": [asdict(c) for c in table]}
    if supplementary is not None:
        payload["supplementary"] = supplementary[1]
    write_output(out / "reproduction.json", json.dumps(payload, indent=1, allow_nan=False) + "\n")
    return text
