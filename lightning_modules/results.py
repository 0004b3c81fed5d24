"""What a LightningModule hands the writers at the end of a run: a summary that writes and prints itself.

A module sets ``test_results`` (``on_test_epoch_end``) or ``predict_results`` (``on_predict_epoch_end``) to a
:class:`RunResults`; :class:`callbacks.CorrespondenceWriter` (test) and :class:`callbacks.PictureWriter`
(predict) then check, write and print it without knowing its kind, and :class:`callbacks.WandbResults` logs its
``summary``. Kinds: :class:`PCKResults` (keypoint and dense-flow PCK), :class:`ScoreResults` (DAVIS J&F),
``lightning_modules.ablation.AblationResults`` and ``lightning_modules.swap.SwapResults``. Plain Python.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from .components.files import write_atomically
from .components.strict_json import dumps

__all__ = ["PCKResults", "RunResults", "ScoreResults", "format_pck_table", "format_scores_table"]


@dataclass
class RunResults:
    """A run's summary (the JSON content of :attr:`filename`) and how it is written and printed.

    Attributes:
        summary: The JSON-able summary.
    """

    summary: dict[str, Any]
    #: The file the summary is written to, in the run folder.
    filename: ClassVar[str] = "results.json"

    def per_row(self) -> dict[str | None, dict[str, Any]]:
        """The summaries that count pairs and points: one (key None), or one per ablation row."""
        return {None: self.summary}

    def files(self) -> dict[str, str]:
        """Extra files written next to the summary, by name (tables in other formats)."""
        return {}

    def table(self) -> str:
        """The text printed at the end of the run."""
        raise NotImplementedError

    def write(self, out: Path, run: dict[str, Any] | None = None) -> str:
        """Write the summary (with the ``run`` block, when given) and the extra files to ``out``; return the
        text to print. Each file is written whole or not at all (:func:`.components.files.write_atomically`); the
        summary last, so that its presence says the run's files are all there."""
        payload = self.summary if run is None else {**self.summary, "run": run}
        for name, text in self.files().items():
            write_atomically(out / name, text)
        write_atomically(out / self.filename, dumps(payload, indent=2))
        return self.table()


class PCKResults(RunResults):
    """PCK of a keypoint or dense-flow benchmark (``pck`` per alpha and average; ``aepe`` for dense flow)."""

    def table(self) -> str:
        return format_pck_table(self.summary)


class ScoreResults(RunResults):
    """Scores without PCK (DAVIS J&F, fractions), printed in percent."""

    def table(self) -> str:
        return format_scores_table(self.summary)


def format_pck_table(results: dict[str, Any], per_group: bool = True) -> str:
    """Render ``results.json`` content as a plain-text table (values in percent).

    Rows are the protocol's averages (``results["protocol"]["averages"]``, the paper's headline first),
    then, with ``per_group``, one row per category (or per dataset for dense benchmarks).

    Args:
        results: The summary written to ``results.json``.
        per_group: Also list every category's / dataset's value.
    """
    protocol = results.get("protocol") or {}
    alphas = list(results["pck"])
    first = results["pck"][alphas[0]]
    averages = protocol.get("averages") or [k for k, v in first.items() if not isinstance(v, dict)]
    group_label = protocol.get("group_label", "per_category")
    head = f"{protocol.get('name', 'PCK'):<22}" + "".join(f"{'@' + a:>10}" for a in alphas)
    lines = [head, "-" * len(head)]
    for average in averages:
        lines.append(f"{average:<22}" + "".join(_cell(results["pck"][a][average]) for a in alphas))
    if "chance" in results:  # the same protocol on uniformly random predictions (ZeroShotCorrespondence)
        headline = averages[0]
        lines.append(f"{'chance: ' + headline:<22}" + "".join(_cell(results["chance"][a][headline]) for a in alphas))
    if "aepe" in results:  # dense benchmarks: average end-point error in pixels, per image
        lines.append(f"{'aepe (px)':<22}" + f"{results['aepe']['per_image']:>10.2f}")
    groups = sorted({g for a in alphas for g in results["pck"][a].get(group_label, {})})
    if per_group and groups:
        lines.append("-" * len(head))
        for group in groups:
            values = [results["pck"][a][group_label].get(group) for a in alphas]
            lines.append(f"{group:<22}" + "".join(_cell(v) for v in values))
    counts = "  ".join(f"{k}: {v}" for k, v in results.items() if k.startswith("num_"))
    lines.append(counts)
    return "\n".join(lines)


def _cell(value: float | None) -> str:
    """A table cell: the value in percent, or ``n/a`` where it is undefined (no point to score)."""
    return f"{'n/a':>10}" if value is None or value != value else f"{value:>10.2f}"


def format_scores_table(results: dict[str, Any], per_group: bool = True) -> str:
    """Render a run scored without PCK (DAVIS J&F: fractions in ``results.json``) as a table in percent.

    Rows are the protocol's averages, then, with ``per_group``, one row per group (sequence) with the same
    columns.
    """
    protocol = results.get("protocol") or {}
    averages = list(protocol.get("averages") or [k for k, v in results.items() if k.endswith("_mean")])
    head = f"{protocol.get('name', 'scores'):<30}" + "".join(f"{a:>10}" for a in averages)
    lines = [head, "-" * len(head), f"{'all':<30}" + "".join(f"{100 * results[a]:>10.2f}" for a in averages)]
    groups = results.get(protocol.get("group_label", "per_sequence")) or {}
    if per_group and groups:
        lines.append("-" * len(head))
        for name, values in sorted(groups.items()):
            lines.append(f"{name:<30}" + "".join(f"{100 * values.get(a, float('nan')):>10.2f}" for a in averages))
    lines.append("  ".join(f"{k}: {v}" for k, v in results.items() if k.startswith("num_")))
    return "\n".join(lines)
