"""Writes a test run's ``predictions.jsonl`` and ``results.json`` and prints the PCK table."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import lightning as L
import torch.distributed as dist

from lightning_modules.ablation import ablation_table, analysis_markdown

__all__ = ["CorrespondenceWriter", "format_pck_table"]


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
        lines.append(f"{average:<22}" + "".join(f"{results['pck'][a][average]:>10.2f}" for a in alphas))
    if "aepe" in results:  # dense benchmarks: average end-point error in pixels, per image
        lines.append(f"{'aepe (px)':<22}" + f"{results['aepe']['per_image']:>10.2f}")
    groups = sorted({g for a in alphas for g in results["pck"][a].get(group_label, {})})
    if per_group and groups:
        lines.append("-" * len(head))
        for group in groups:
            values = [results["pck"][a][group_label].get(group, float("nan")) for a in alphas]
            lines.append(f"{group:<22}" + "".join(f"{v:>10.2f}" for v in values))
    counts = "  ".join(f"{k}: {v}" for k, v in results.items() if k.startswith("num_"))
    lines.append(counts)
    return "\n".join(lines)


class CorrespondenceWriter(L.Callback):
    """Collects the per-pair records returned by ``test_step`` and writes the run's output files.

    Files, in ``output_dir`` (default: the trainer's log dir):
    ``predictions.jsonl`` (one line per pair, original pixels) and ``results.json`` (the PCK summary
    that the LightningModule computed in ``on_test_epoch_end``).

    Args:
        output_dir: Where to write; None uses ``trainer.log_dir``.
        print_table: Print the PCK table at the end of the run.
    """

    def __init__(self, output_dir: str | None = None, print_table: bool = True) -> None:
        self.output_dir = output_dir
        self.print_table = print_table
        self._records: list[dict[str, Any]] = []

    def resolve_dir(self, trainer: L.Trainer) -> Path:
        """The directory this run writes to."""
        return Path(self.output_dir or trainer.log_dir or trainer.default_root_dir)

    def on_test_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._records = []

    def on_test_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if outputs:
            self._records.extend(outputs)

    def _gathered_records(self) -> list[dict[str, Any]]:
        records = self._records
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            parts: list[list[dict[str, Any]]] = [[] for _ in range(dist.get_world_size())]
            dist.all_gather_object(parts, records)
            records = [r for part in parts for r in part]
        unique: dict[tuple[str, str | None], dict[str, Any]] = {}
        for record in records:  # a padded sampler repeats pairs: keep each pair (of each ablation row) once
            unique.setdefault((record["pair_id"], record.get("row")), record)
        return list(unique.values())

    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        records = self._gathered_records()
        if not trainer.is_global_zero:
            return
        out = self.resolve_dir(trainer)
        out.mkdir(parents=True, exist_ok=True)
        with open(out / "predictions.jsonl", "w") as handle:
            for record in records:
                handle.write(json.dumps(record) + "\n")
        results = getattr(pl_module, "test_results", None)
        if results is not None and "table" in results:  # an ablation: one row per setting
            markdown, csv = ablation_table(results)
            (out / "results.json").write_text(json.dumps(results, indent=2))
            (out / "ablation.md").write_text(markdown)
            (out / "ablation.csv").write_text(csv)
            if "analysis" in results:
                analysis = analysis_markdown(results["analysis"])
                (out / "analysis.md").write_text(analysis)
                markdown += "\n" + analysis
            if self.print_table:
                print("\n" + markdown + f"written to {out}", flush=True)
        elif results is not None:
            (out / "results.json").write_text(json.dumps(results, indent=2))
            if self.print_table:
                print("\n" + format_pck_table(results) + f"\nwritten to {out}", flush=True)
