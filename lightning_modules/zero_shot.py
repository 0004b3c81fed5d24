"""The zero-shot LightningModule: ``trainer.test`` over pair datamodules, scored with their protocol.

Thin by design: the method lives in :class:`~lightning_modules.components.pipeline.FusedCorrespondence`,
the metrics in :mod:`lightning_modules.metrics`, and each benchmark's protocol (alphas, comparison,
averages, sparse keypoints or dense flow) comes from the datamodule's ``protocol``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict
from typing import Any

import lightning as L
import torch
from jsonargparse.typing import ClosedUnitInterval, NonNegativeFloat, PositiveInt

from .components.dino_featurizer import DinoFeaturizer
from .components.feature_cache import FeatureCache
from .components.pipeline import EvalSize, FusedCorrespondence
from .components.pose_alignment import PoseAlignment
from .components.projection_head import GatedProjectionHead
from .components.refinements import MatchRefinement
from .components.sd_featurizer import SDFeaturizer
from .metrics import PCK, DenseFlowPCK, dense_flow_counts, format_alpha

__all__ = ["ZeroShotCorrespondence", "benchmark_pose_alignment", "feature_cache", "keypoint_record", "restore_keypoint_metric", "summed_over_ranks"]


#: Per-keypoint extras of the test-time refinements that ``predictions.jsonl`` keeps when they are computed.
KEYPOINT_EXTRAS = ("confidence", "mutual")
#: Per-pair extras of pose alignment: whether the mirrored source won, and both orientations' instance distances.
PAIR_EXTRAS = ("flipped", "pose_distances")


def keypoint_record(
    sample: dict[str, Any], pred: torch.Tensor, valid: torch.Tensor, output: dict[str, Any] | None = None
) -> dict[str, Any]:
    """The ``predictions.jsonl`` line of a keypoint pair (valid keypoints only, original pixels).

    It holds everything the metric needs, so a resumed run rebuilds its state from these lines
    (:func:`restore_keypoint_metric`) and ends with the numbers of an uninterrupted run; and the per-keypoint
    :data:`KEYPOINT_EXTRAS` of ``output`` (the pipeline's prediction of the pair) when it has them.
    """
    keep = valid.cpu()
    record = {
        "pair_id": sample["pair_id"],
        "category": sample["category"],
        "src_kps": sample["src_kps"][keep].tolist(),
        "trg_kps": sample["trg_kps"][keep].tolist(),
        "pred_kps": pred.cpu()[keep].tolist(),
        "threshold": float(sample["threshold"]),
    }
    if "variations" in sample:
        record["variations"] = {k: int(v) for k, v in sample["variations"].items()}
    for key in KEYPOINT_EXTRAS:
        if output is not None and key in output:
            record[key] = output[key].cpu()[keep].tolist()
    for key in PAIR_EXTRAS:
        if output is not None and key in output:
            record[key] = output[key].cpu().tolist()
    return record


def restore_keypoint_metric(
    metric: PCK, records: Sequence[dict[str, Any]], groups: Sequence[str], device: torch.device
) -> None:
    """Feed saved :func:`keypoint_record` lines back into ``metric`` (exactly the state they came from:
    JSON floats round-trip the float32 coordinates and the thresholds bit for bit)."""
    if not records:
        return

    def points(key: str) -> list[torch.Tensor]:
        return [torch.tensor(r[key], dtype=torch.float32, device=device).reshape(-1, 2) for r in records]

    metric.update(
        points("pred_kps"),
        points("trg_kps"),
        torch.tensor([float(r["threshold"]) for r in records], device=device),
        [r["category"] for r in records],
        [r["pair_id"] for r in records],
        None,
        {g: [r.get("variations", {}).get(g, -1) for r in records] for g in groups},
    )


def benchmark_pose_alignment(flip_pairs: Any, protocol: Any) -> PoseAlignment:
    """The pose alignment of a run: ``flip_pairs`` when given, else the benchmark protocol's table.

    Raises:
        ValueError: A dense benchmark, or one without a left/right keypoint table and no ``flip_pairs``.
    """
    if protocol.dense:
        raise ValueError(f"pose_alignment applies to keypoint benchmarks; {protocol.name} is scored on dense flow")
    table = flip_pairs if flip_pairs is not None else protocol.flip_pairs
    if table is None:
        raise ValueError(
            f"pose_alignment needs left/right keypoint pairs, and {protocol.name} has no semantic keypoint ids; "
            "a dataset whose samples carry keypoint ids ('kps_ids') can give flip_pairs (category -> [[left id, "
            "right id], ...])"
        )
    return PoseAlignment(table)


def feature_cache(memory_gb: float, directory: str | None) -> FeatureCache | None:
    """The per-image feature cache of a run: ``memory_gb`` in memory (0 = none), ``directory`` on disk."""
    if memory_gb < 0:
        raise ValueError(f"feature_cache_gb must be >= 0, got {memory_gb}")
    if memory_gb == 0 and directory is None:
        return None
    return FeatureCache(memory_bytes=int(memory_gb * (1 << 30)), directory=directory)


def summed_over_ranks(module: L.LightningModule, counts: dict[str, int]) -> dict[str, int]:
    """Counts (extraction passes) summed over all processes: under DDP each rank extracts its own share."""
    if module.trainer.world_size <= 1 or not counts:
        return dict(counts)
    local = torch.tensor(list(counts.values()), dtype=torch.long, device=module.device)
    total = module.trainer.strategy.reduce(local, reduce_op="sum")
    return {name: int(value) for name, value in zip(counts, total.tolist())}


class ZeroShotCorrespondence(L.LightningModule):
    """Zero-shot semantic correspondence with fused SD + DINO features.

    Args:
        sd: SD featurizer (None for DINO alone).
        dino: DINO featurizer (None for SD alone).
        alpha: Weight of the SD block (0.5 in the paper; 1 = SD only, 0 = DINO only).
        pca_dims: Co-PCA dimension per SD layer; None keeps raw channels.
        eval_size: Keypoint-to-cell mapping resolution (default: the DINO input size).
        alphas: PCK thresholds overriding the datamodule protocol's (None: the protocol's).
        fusion: How SD and DINO blocks are combined: ``concat_l2`` (the paper's), ``concat``, ``sum_l2``
            or ``sum`` (supplementary Table 4).
        feature_cache_gb: Memory for raw per-image features shared by all pairs of the run (on the
            featurizers' device); each image is then extracted once. 0 disables the in-memory cache.
        feature_cache_dir: Folder of an on-disk feature cache (safetensors, keyed by image content and
            feature config) that later runs reuse; None disables it.
        projection_ckpt: A trained projection head (``train.py``'s ``.ckpt`` or a
            :meth:`GatedProjectionHead.save_checkpoint` file) used instead of co-PCA and the fixed fusion; its
            sources decide which featurizers run, and ``alpha``, ``pca_dims`` and ``fusion`` are then unused.
        soft_argmax_window: Beyond the paper (GeoAware-SC): predict the softmax-weighted mean cell of a
            ``(2w+1)^2`` window around the best match (sub-cell predictions); None (default) keeps the cell
            centre of the nearest neighbour, as the paper does.
        soft_argmax_temperature: Softmax temperature over cosine similarities (window and confidence).
        mutual_check: Beyond the paper: record per keypoint whether its match is a mutual nearest neighbour.
            With either knob on, ``predictions.jsonl`` also holds a ``confidence`` per keypoint.
        pose_alignment: Beyond the paper (GeoAware-SC): also match from each source image's horizontal mirror
            (one more extraction per source image), with left/right keypoint ids swapped, and keep the
            orientation whose instance (bounding box) features agree better; ``predictions.jsonl`` then holds
            ``flipped`` and ``pose_distances`` per pair. Keypoint benchmarks with semantic keypoint ids
            (SPair-71k, CUB-200).
        flip_pairs: Category -> left/right keypoint id pairs for pose alignment (``"*"``: any other category),
            or a table name (``"spair"``, ``"cub"``); None takes the benchmark protocol's table.
    """

    def __init__(
        self,
        sd: SDFeaturizer | None = None,
        dino: DinoFeaturizer | None = None,
        alpha: ClosedUnitInterval = 0.5,
        pca_dims: Sequence[PositiveInt] | None = (256, 256, 256),
        eval_size: EvalSize | None = None,
        alphas: Sequence[float] | None = None,
        fusion: str = "concat_l2",
        feature_cache_gb: NonNegativeFloat = 4.0,
        feature_cache_dir: str | None = None,
        projection_ckpt: str | None = None,
        soft_argmax_window: int | None = None,
        soft_argmax_temperature: float = 0.04,
        mutual_check: bool = False,
        pose_alignment: bool = False,
        flip_pairs: dict[str, list[list[int]]] | str | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["sd", "dino"])
        head = None if projection_ckpt is None else GatedProjectionHead.from_checkpoint(projection_ckpt)
        refinement = MatchRefinement(soft_argmax_window, float(soft_argmax_temperature), bool(mutual_check))
        self.pipeline = FusedCorrespondence(
            sd, dino, alpha=alpha, pca_dims=pca_dims, eval_size=eval_size, fusion=fusion,
            cache=feature_cache(feature_cache_gb, feature_cache_dir), head=head, refinement=refinement,
        )  # pose alignment is set in setup(), once the benchmark (and so its default flip table) is known
        self.pose_alignment, self.flip_pairs = bool(pose_alignment), flip_pairs
        self.alphas = None if alphas is None else [float(a) for a in alphas]
        self.metric: PCK | None = None
        self.protocol: Any = None
        self.test_results: dict[str, Any] | None = None

    def setup(self, stage: str) -> None:
        """Create the metric from the datamodule's protocol and categories."""
        datamodule = getattr(self.trainer, "datamodule", None)
        self.protocol = getattr(datamodule, "protocol", None)
        if self.protocol is None:
            raise ValueError("the datamodule must define `protocol` (see datamodules.protocols)")
        alphas = self.alphas or list(self.protocol.alphas)
        categories = list(getattr(datamodule, "categories", None) or [])
        if not categories:
            raise ValueError("the datamodule must expose its category names as `categories` after setup()")
        if self.pose_alignment:
            self.pipeline.pose_alignment = benchmark_pose_alignment(self.flip_pairs, self.protocol)
        if self.protocol.dense:
            self.metric = DenseFlowPCK(alphas, categories, inclusive=self.protocol.inclusive)
        else:
            self.metric = PCK(alphas, categories, groups=self.protocol.groups, inclusive=self.protocol.inclusive)

    def test_step(self, batch: list[dict[str, Any]], batch_idx: int) -> list[dict[str, Any]]:
        """Score a batch of pairs and return one prediction record per pair (original pixels)."""
        return self._dense_step(batch) if self.protocol.dense else self._sparse_step(batch)

    def _sparse_step(self, batch: list[dict[str, Any]]) -> list[dict[str, Any]]:
        assert self.metric is not None
        outputs = self.pipeline.predict_pairs(batch)
        valids = [s["kps_valid"].to(self.device) for s in batch]
        preds = [o["pred_kps"] for o in outputs]
        gts = [s["trg_kps"].to(self.device).float() for s in batch]
        groups = {g: [s.get("variations", {}).get(g, -1) for s in batch] for g in self.protocol.groups}
        self.metric.update(
            preds,
            gts,
            torch.tensor([float(s["threshold"]) for s in batch], device=self.device),
            [s["category"] for s in batch],
            [s["pair_id"] for s in batch],
            valids,
            groups,
        )
        return [keypoint_record(s, o["pred_kps"], v, o) for s, o, v in zip(batch, outputs, valids)]

    def _dense_step(self, batch: list[dict[str, Any]]) -> list[dict[str, Any]]:
        assert isinstance(self.metric, DenseFlowPCK)
        flows = self.pipeline.predict_flows(batch)
        counts = [
            dense_flow_counts(
                flow, s["flow"].to(self.device), s["mask"].to(self.device), float(s["threshold"]),
                self.metric.alphas, self.metric.inclusive,
            )
            for s, flow in zip(batch, flows)
        ]
        self.metric.update_counts(counts, [s["dataset"] for s in batch], [s["pair_id"] for s in batch])
        records = []
        for s, (correct, valid, epe_sum) in zip(batch, counts):
            records.append(
                {
                    "pair_id": s["pair_id"],
                    "category": s["category"],
                    "dataset": s["dataset"],
                    "threshold": float(s["threshold"]),
                    "num_valid": valid,
                    "pck": {format_alpha(a): 100.0 * int(c) / max(valid, 1) for a, c in zip(self.metric.alphas, correct)},
                    "epe": epe_sum / max(valid, 1),
                    # the raw counts, from which a resumed run restores the metric exactly
                    "correct": [int(c) for c in correct],
                    "epe_sum": float(epe_sum),
                }
            )
        return records

    def restore_predictions(self, records: Sequence[dict[str, Any]]) -> None:
        """Put the pairs of an interrupted run (its ``predictions.jsonl`` lines) back into the metric."""
        assert self.metric is not None, "call after setup()"
        if not records:
            return
        if isinstance(self.metric, DenseFlowPCK):
            counts = [(torch.tensor(r["correct"]), int(r["num_valid"]), float(r["epe_sum"])) for r in records]
            self.metric.update_counts(counts, [r["dataset"] for r in records], [r["pair_id"] for r in records])
        else:
            restore_keypoint_metric(self.metric, records, self.protocol.groups, self.device)

    def on_test_epoch_end(self) -> None:
        """Compute the summary (synchronised across processes) and log the protocol's averages."""
        assert self.metric is not None
        results = self.metric.compute()
        results["protocol"] = asdict(self.protocol)
        results["extraction_passes"] = summed_over_ranks(self, self.pipeline.extraction_passes)
        self.test_results = results
        for alpha, values in results["pck"].items():
            for average in self.protocol.averages:
                self.log(f"pck@{alpha}/{average}", float(values[average]), rank_zero_only=True)
        self.metric.reset()
