"""The ablation LightningModule: every row of a table in ONE ``trainer.test`` run.

Thin: the rows are evaluated by :class:`~lightning_modules.components.ablation.AblationCorrespondence`
(one extraction per image and featurizer variant), each row is scored by its own PCK metric with the
datamodule's protocol, and the table (rows x alphas, the protocol's headline average) goes to
``results.json``, ``ablation.md`` and ``ablation.csv`` through the ``CorrespondenceWriter``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict
from typing import Any

import lightning as L
import torch

from .components.ablation import AblationCorrespondence, AblationRow
from .components.dino_featurizer import DinoFeaturizer
from .components.sd_featurizer import SDFeaturizer
from .metrics import PCK

__all__ = ["ZeroShotAblation"]


class ZeroShotAblation(L.LightningModule):
    """Zero-shot correspondence for many settings at once (the supplementary's tables).

    Args:
        rows: The table's rows (name, SD variant, DINO on/off, alpha, fusion, SD layers, co-PCA dim).
        sd: The SD featurizer whose weights every SD variant shares.
        dino: The DINO featurizer.
        sd_variants: Variant name -> extraction overrides (``timestep``, ``prompt``, ``image_size``, ...).
        dino_variants: Variant name -> DINO extraction overrides (``layer``, ``image_size``).
        title: Table title (printed and written).
        eval_size: Keypoint-to-cell square (default: the DINO input size, else SD's).
    """

    def __init__(
        self,
        rows: list[AblationRow],
        sd: SDFeaturizer | None = None,
        dino: DinoFeaturizer | None = None,
        sd_variants: dict[str, dict[str, Any]] | None = None,
        dino_variants: dict[str, dict[str, Any]] | None = None,
        title: str = "",
        eval_size: int | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["sd", "dino"])
        self.ablation = AblationCorrespondence(
            rows, sd=sd, dino=dino, sd_variants=sd_variants, dino_variants=dino_variants, eval_size=eval_size
        )
        self.title = title
        self.metrics = torch.nn.ModuleList()
        self.protocol: Any = None
        self.test_results: dict[str, Any] | None = None

    def setup(self, stage: str) -> None:
        """One PCK metric per row, from the datamodule's protocol and categories."""
        datamodule = getattr(self.trainer, "datamodule", None)
        self.protocol = getattr(datamodule, "protocol", None)
        if self.protocol is None or self.protocol.dense:
            raise ValueError("ablations run on keypoint benchmarks: the datamodule needs a sparse `protocol`")
        categories = list(datamodule.categories)
        self.metrics = torch.nn.ModuleList(
            PCK(self.protocol.alphas, categories, groups=self.protocol.groups, inclusive=self.protocol.inclusive)
            for _ in self.ablation.rows
        )

    def test_step(self, batch: list[dict[str, Any]], batch_idx: int) -> list[dict[str, Any]]:
        """Score every row on a batch; one prediction record per pair and row."""
        outputs = self.ablation.predict_pairs(batch)
        gts = [s["trg_kps"].to(self.device).float() for s in batch]
        valids = [s["kps_valid"].to(self.device) for s in batch]
        thresholds = torch.tensor([float(s["threshold"]) for s in batch], device=self.device)
        groups = {g: [s.get("variations", {}).get(g, -1) for s in batch] for g in self.protocol.groups}
        records = []
        for row, metric in zip(self.ablation.rows, self.metrics):
            preds = [o["pred_kps"] for o in outputs[row.name]]
            metric.update(preds, gts, thresholds, [s["category"] for s in batch], [s["pair_id"] for s in batch],
                          valids, groups)
            for s, pred, valid in zip(batch, preds, valids):
                keep = valid.cpu()
                records.append(
                    {"row": row.name, "pair_id": s["pair_id"], "category": s["category"],
                     "src_kps": s["src_kps"][keep].tolist(), "trg_kps": s["trg_kps"][keep].tolist(),
                     "pred_kps": pred.cpu()[keep].tolist(), "threshold": float(s["threshold"])}
                )
        return records

    def on_test_epoch_end(self) -> None:
        """Per-row summaries, the table in the paper's shape, and the extraction pass counts."""
        rows = {row.name: metric.compute() for row, metric in zip(self.ablation.rows, self.metrics)}
        average = self.protocol.averages[0]
        self.test_results = {
            "title": self.title,
            "average": average,
            "table": {name: {a: r["pck"][a][average] for a in r["pck"]} for name, r in rows.items()},
            "rows": rows,
            "protocol": asdict(self.protocol),
            "extraction_passes": dict(self.ablation.extraction_passes),
        }
        for metric in self.metrics:
            metric.reset()


def ablation_table(results: Mapping[str, Any]) -> tuple[str, str]:
    """The table of an ablation run as (markdown, csv): rows x alphas of the protocol's headline average."""
    table: Mapping[str, Mapping[str, float]] = results["table"]
    alphas: Sequence[str] = list(next(iter(table.values())))
    head = ["setting", *(f"PCK@{a}" for a in alphas)]
    lines = [f"**{results.get('title') or 'Ablation'}** ({results['average']}, percent)", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    csv_lines = [",".join(head)]
    for name, values in table.items():
        cells = [f"{values[a]:.2f}" for a in alphas]
        lines.append("| " + " | ".join([name.replace("|", "\\|"), *cells]) + " |")
        csv_lines.append(",".join([f'"{name}"', *cells]))
    passes = ", ".join(f"{k}: {v}" for k, v in results.get("extraction_passes", {}).items())
    lines += ["", f"extraction passes: {passes}"]
    return "\n".join(lines) + "\n", "\n".join(csv_lines) + "\n"
