"""The ablation LightningModule: every row of a table in ONE ``trainer.test`` run.

Thin: the rows are evaluated by :class:`~lightning_modules.components.ablation.AblationCorrespondence`
(one extraction per image and featurizer variant), each row is scored by its own PCK metric with the
datamodule's protocol, and the table (rows x alphas, the protocol's headline average) goes to
``results.json``, ``ablation.md`` and ``ablation.csv`` through the ``CorrespondenceWriter``.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Mapping, Sequence
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_warn

from .components.ablation import AblationCorrespondence, AblationRow
from .components.analysis import relative_distance, summarize_fusion_analysis
from .components.dino_featurizer import DinoFeaturizer
from .components.keypoints import AnnotationSize
from .components.pck import keypoint_correct
from .components.pipeline import FusedCorrespondence, benchmark_pose_alignment
from .components.sd_featurizer import SDFeaturizer
from .distributed import gather_from_ranks
from .metrics import PCK
from .results import RunResults
from .zero_shot import (
    keypoint_record,
    place_feature_caches,
    restore_keypoint_metric,
    summed_over_ranks,
)

__all__ = ["AblationResults", "ZeroShotAblation"]


#: The pipeline's name of an option -> its old name on this module, where they differ.
_OLD_NAMES = {"annotation_size": "eval_size"}


def _ablation_pipeline(pipeline: FusedCorrespondence | None, renamed: Mapping[str, Any]) -> FusedCorrespondence:
    """The run's pipeline: as given, or built from the options that moved into it (with a one-line notice).

    Raises:
        ValueError: Both given; or a pipeline with a projection head or pose alignment (the rows decide how
            each prediction is made).
    """
    if renamed:
        old = ", ".join(f"model.{_OLD_NAMES.get(name, name)}" for name in renamed)
        new = ", ".join(f"model.pipeline.{name}" for name in renamed)
        if pipeline is not None:
            raise ValueError(f"{old}: give these as {new} only (they moved into the pipeline)")
        rank_zero_warn(f"{old} of ZeroShotAblation moved into its pipeline: write {new} "
                       "(configs/ablations/*.yaml do); the old names work for a while")
        sd, dino = renamed.get("sd"), renamed.get("dino")
        alpha = 1.0 if dino is None else 0.0 if sd is None else 0.5  # the pipeline's own alpha is not used
        settings = {k: v for k, v in renamed.items() if k not in ("sd", "dino")}
        pipeline = FusedCorrespondence(sd=sd, dino=dino, alpha=alpha, pca_dims=None, **settings)
    if pipeline is None:
        raise ValueError("ZeroShotAblation needs model.pipeline (its sd and dino featurizers)")
    if len(pipeline.extra_featurizers):
        raise ValueError("an ablation compares SD and DINO variants: model.pipeline.featurizers are not used there")
    if pipeline.head is not None or pipeline.align_poses:
        raise ValueError("an ablation's rows decide how each prediction is made: model.pipeline.projection_ckpt and "
                         "model.pipeline.pose_alignment are not used there (a row takes pose_alignment: true)")
    return pipeline


class ZeroShotAblation(L.LightningModule):
    """Zero-shot correspondence for many settings at once (the supplementary's tables).

    The run is made of the ``pipeline``'s parts (:class:`~.components.pipeline.FusedCorrespondence`, the
    ``pipeline:`` node of every config, so ``configs/overlays/tiny.yaml`` serves the ablations too): its SD and
    DINO featurizers (every variant shares their weights), its feature cache, its keypoint square
    (``annotation_size``), its matcher and its flip table. How each prediction is made is the rows' (alpha, fusion,
    layers, co-PCA, refinements, pose alignment): the pipeline's own ``alpha``, ``pca_dims``, ``fusion`` and
    refinements are not used, and a projection head or pose alignment there is refused.

    Args:
        rows: The table's rows (name, SD variant, DINO on/off, alpha, fusion, SD layers, co-PCA dims).
        pipeline: The run's featurizers, cache, ``annotation_size`` (default: each row's DINO input size, else its
            SD's), matcher and ``flip_pairs`` (None: the benchmark protocol's table).
        sd_variants: Variant name -> extraction overrides (``timestep``, ``prompt``, ``image_size``, ...) of the
            pipeline's SD featurizer, or of one of ``sd_models`` named by ``of:`` (sharing its weights).
        dino_variants: Variant name -> DINO extraction overrides (``layer``, ``image_size``, ``facet``, ...);
            ``of:`` works the same way.
        title: Table title (printed and written).
        analysis: Run the supplementary's A.10 analysis over three rows, named by role:
            ``{"sd": <SD-only row>, "dino": <DINO-only row>, "fused": <fused row>}``.
        analysis_alpha: PCK alpha that decides "correct" in the analysis (0.10 in the paper).
        sd_models: Further SD featurizers (their own weights: SD 1-3, 2-1-base, ...) rows can name.
        dino_models: Further DINO featurizers (DINOv1, iBOT, DINOv2-S, ...) rows can name.
        sd: Renamed ``pipeline.sd`` (kept for a while, with a notice).
        dino: Renamed ``pipeline.dino``.
        eval_size: Renamed ``pipeline.annotation_size``.
        feature_cache_gb: Renamed ``pipeline.feature_cache_gb``.
        feature_cache_dir: Renamed ``pipeline.feature_cache_dir``.
        flip_pairs: Renamed ``pipeline.flip_pairs``.
    """

    def __init__(
        self,
        rows: list[AblationRow],
        pipeline: FusedCorrespondence | None = None,
        sd_variants: dict[str, dict[str, Any]] | None = None,
        dino_variants: dict[str, dict[str, Any]] | None = None,
        title: str = "",
        analysis: dict[str, str] | None = None,
        analysis_alpha: float = 0.1,
        sd_models: dict[str, SDFeaturizer] | None = None,
        dino_models: dict[str, DinoFeaturizer] | None = None,
        sd: SDFeaturizer | None = None,
        dino: DinoFeaturizer | None = None,
        eval_size: AnnotationSize | None = None,
        feature_cache_gb: float | None = None,
        feature_cache_dir: str | None = None,
        flip_pairs: dict[str, list[list[int]]] | str | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["pipeline", "sd", "dino", "sd_models", "dino_models"])
        renamed = {"sd": sd, "dino": dino, "annotation_size": eval_size, "feature_cache_gb": feature_cache_gb,
                   "feature_cache_dir": feature_cache_dir, "flip_pairs": flip_pairs}
        pipeline = _ablation_pipeline(pipeline, {k: v for k, v in renamed.items() if v is not None})
        self.ablation = AblationCorrespondence(
            rows, sd=pipeline.configured[0], dino=pipeline.configured[1], sd_variants=sd_variants,
            dino_variants=dino_variants, annotation_size=pipeline.annotation_size_setting, sd_models=sd_models,
            dino_models=dino_models, matcher=pipeline.matcher, cache=pipeline.cache,
        )  # the flip table of pose-aligned rows is set in setup(), once the benchmark is known
        self.flip_pairs = pipeline.flip_pairs
        self.title = title
        names = {row.name for row in rows}
        if analysis is not None and (set(analysis) != {"sd", "dino", "fused"} or not set(analysis.values()) <= names):
            raise ValueError(f"analysis must map sd, dino and fused to rows of this table {sorted(names)}, got {analysis}")
        self.analysis = analysis
        self.analysis_alpha = float(analysis_alpha)
        self._analysis_records: dict[str, dict[str, torch.Tensor]] = {}
        self.metrics = torch.nn.ModuleList()
        self.protocol: Any = None
        self.test_results: AblationResults | None = None

    def setup(self, stage: str) -> None:
        """Place the disk cache (:func:`.zero_shot.place_feature_caches`); one PCK metric per row, from the
        datamodule's protocol and categories."""
        place_feature_caches(self)
        datamodule = getattr(self.trainer, "datamodule", None)
        self.protocol = getattr(datamodule, "protocol", None)
        if self.protocol is None or self.protocol.metric != "keypoint_pck":
            raise ValueError("ablations run on keypoint benchmarks: the datamodule needs a sparse `protocol`")
        if any(row.pose_alignment for row in self.ablation.rows):
            self.ablation.pose_aligner = benchmark_pose_alignment(self.flip_pairs, self.protocol)
        categories = list(datamodule.categories)
        self.metrics = torch.nn.ModuleList(self.protocol.make_metric(categories) for _ in self.ablation.rows)

    def test_step(self, batch: list[dict[str, Any]], batch_idx: int) -> list[dict[str, Any]]:
        """Score every row on a batch; one prediction record per pair and row."""
        detail = (self.analysis["sd"], self.analysis["dino"]) if self.analysis else ()
        outputs = self.ablation.predict_pairs(batch, detail_rows=detail)
        if self.analysis:
            self._collect_analysis(batch, outputs)
        gts = [s["trg_kps"].to(self.device).float() for s in batch]
        valids = [s["kps_valid"].to(self.device) for s in batch]
        thresholds = torch.tensor([float(s["threshold"]) for s in batch], device=self.device)
        groups = {g: [s.get("variations", {}).get(g, -1) for s in batch] for g in self.protocol.groups}
        records = []
        for row, metric in zip(self.ablation.rows, self.metrics):
            preds = [o["pred_kps"] for o in outputs[row.name]]
            metric.update(
                preds=preds, gts=gts, thresholds=thresholds, categories=[s["category"] for s in batch],
                pair_ids=[s["pair_id"] for s in batch], valids=valids, groups=groups,
            )
            records += [
                {"row": row.name, **keypoint_record(s, o["pred_kps"], v, o)}
                for s, o, v in zip(batch, outputs[row.name], valids)
            ]
        return records

    def restore_predictions(self, records: Sequence[dict[str, Any]]) -> None:
        """Put the pairs of an interrupted run (its ``predictions.jsonl`` lines, every row) back into the
        row metrics.

        Raises:
            ValueError: With the A.10 analysis configured: its per-keypoint feature distances are not in
                the prediction lines, so those pairs cannot be restored.
        """
        if not records:
            return
        if self.analysis:
            raise ValueError("resume is not supported with `analysis` (A.10): run the analysis table from the start")
        for row, metric in zip(self.ablation.rows, self.metrics):
            mine = [r for r in records if r["row"] == row.name]
            restore_keypoint_metric(metric, mine, self.protocol.groups, self.device)

    def _collect_analysis(self, batch: list[dict[str, Any]], outputs: Mapping[str, list[dict[str, Any]]]) -> None:
        """Per keypoint: SD / DINO / fused correctness and the SD and DINO relative distances."""
        assert self.analysis is not None
        for i, s in enumerate(batch):
            valid = s["kps_valid"].to(self.device)
            gt = s["trg_kps"].to(self.device).float()
            ok = {
                role: keypoint_correct(outputs[row][i]["pred_kps"], gt, float(s["threshold"]), [self.analysis_alpha],
                                       valid, self.protocol.inclusive)[0][valid]
                for role, row in self.analysis.items()
            }
            sd, dino = outputs[self.analysis["sd"]][i], outputs[self.analysis["dino"]][i]
            sd_match, dino_match = sd["cell_distances"].argmin(1), dino["cell_distances"].argmin(1)
            self._analysis_records[s["pair_id"]] = {
                "sd_ok": ok["sd"].cpu(), "dino_ok": ok["dino"].cpu(), "fused_ok": ok["fused"].cpu(),
                "sd_rel_correct": relative_distance(sd["cell_distances"], sd["gt_cells"])[valid].cpu(),
                "dino_rel_correct": relative_distance(dino["cell_distances"], dino["gt_cells"])[valid].cpu(),
                "sd_rel_at_dino_match": relative_distance(sd["cell_distances"], dino_match)[valid].cpu(),
                "dino_rel_at_sd_match": relative_distance(dino["cell_distances"], sd_match)[valid].cpu(),
            }

    def _analysis_summary(self) -> dict[str, Any]:
        # duplicates collapse by pair id
        records = {k: v for part in gather_from_ranks(self._analysis_records) for k, v in part.items()}
        records = dict(sorted(records.items()))  # sums independent of how pairs were split over processes
        keys = ("sd_ok", "dino_ok", "fused_ok", "sd_rel_correct", "dino_rel_correct",
                "sd_rel_at_dino_match", "dino_rel_at_sd_match")
        columns = {k: torch.cat([r[k] for r in records.values()]) if records else torch.zeros(0) for k in keys}
        summary = summarize_fusion_analysis(**columns)
        return {"rows": dict(self.analysis or {}), "alpha": self.analysis_alpha, **summary}

    def on_test_epoch_end(self) -> None:
        """Per-row summaries, the table in the paper's shape, and the extraction pass counts."""
        rows = {row.name: metric.compute() for row, metric in zip(self.ablation.rows, self.metrics)}
        average = self.protocol.averages[0]
        summary = {
            "title": self.title,
            "average": average,
            "table": {name: {a: r["pck"][a][average] for a in r["pck"]} for name, r in rows.items()},
            "rows": rows,
            "protocol": self.protocol.as_record(),
            "extraction_passes": summed_over_ranks(self, self.ablation.extraction_passes),
        }
        if self.analysis:
            summary["analysis"] = self._analysis_summary()
            self._analysis_records = {}
        self.test_results = AblationResults(summary)
        for metric in self.metrics:
            metric.reset()


class AblationResults(RunResults):
    """An ablation's summary: every row's PCK (``rows``), the table in the paper's shape (``table``) and, with
    the A.10 analysis, ``analysis``; written with ``ablation.md``, ``ablation.csv`` (and ``analysis.md``)."""

    def per_row(self) -> dict[str | None, dict[str, Any]]:
        return dict(self.summary["rows"])

    def files(self) -> dict[str, str]:
        markdown, csv_text = ablation_table(self.summary)
        files = {"ablation.md": markdown, "ablation.csv": csv_text}
        if "analysis" in self.summary:
            files["analysis.md"] = analysis_markdown(self.summary["analysis"])
        return files

    def table(self) -> str:
        files = self.files()
        return files["ablation.md"] + ("\n" + files["analysis.md"] if "analysis.md" in files else "")


def ablation_table(results: Mapping[str, Any]) -> tuple[str, str]:
    """The table of an ablation run as (markdown, csv): rows x alphas of the protocol's headline average."""
    table: Mapping[str, Mapping[str, float]] = results["table"]
    alphas: Sequence[str] = list(next(iter(table.values())))
    head = ["setting", *(f"PCK@{a}" for a in alphas)]
    lines = [f"**{results.get('title') or 'Ablation'}** ({results['average']}, percent)", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(head)
    for name, values in table.items():
        cells = [f"{values[a]:.2f}" for a in alphas]
        lines.append("| " + " | ".join([name.replace("|", "\\|"), *cells]) + " |")
        writer.writerow([name, *cells])
    passes = ", ".join(f"{k}: {v}" for k, v in results.get("extraction_passes", {}).items())
    lines += ["", f"extraction passes: {passes}"]
    return "\n".join(lines) + "\n", buffer.getvalue()


def analysis_markdown(analysis: Mapping[str, Any]) -> str:
    """The A.10 analysis as markdown: outcome distribution, conditional probabilities, relative distances."""
    fmt = lambda v, unit="": "-" if v is None else f"{v:.2f}{unit}" if unit else f"{v:.3f}"  # noqa: E731
    lines = [f"**A.10 analysis** (PCK@{analysis['alpha']}, {analysis['num_keypoints']} keypoints; rows: "
             + ", ".join(f"{k} = {v}" for k, v in analysis["rows"].items()) + ")", "",
             "| SD | DINO | Fused | share |", "|---|---|---|---|"]
    mark = {"0": "x", "1": "v"}
    for code, share in analysis["outcomes"].items():
        lines.append(f"| {mark[code[0]]} | {mark[code[1]]} | {mark[code[2]]} | {fmt(share, '%')} |")
    lines += ["", "| group | P(fused correct) |", "|---|---|"]
    lines += [f"| {group} | {fmt(p, '%')} |" for group, p in analysis["conditional"].items()]
    lines += ["", "| scenario | SD correct match | SD false match | DINO correct match | DINO false match |",
              "|---|---|---|---|---|"]
    for scenario, d in analysis["relative_distance"].items():
        cells = [fmt(d[k]) for k in ("sd_correct", "sd_false", "dino_correct", "dino_false")]
        lines.append(f"| {scenario} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
