"""The zero-shot LightningModule: ``trainer.test`` over pair datamodules, scored with their protocol.

Thin by design: the method lives in :class:`~lightning_modules.components.pipeline.FusedCorrespondence`,
the metrics in :mod:`lightning_modules.metrics`, and each benchmark's protocol (alphas, comparison,
averages, sparse keypoints or dense flow) comes from the datamodule's ``protocol``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from .components.feature_cache import FeatureCache
from .components.matchers import point_extras
from .components.pipeline import FusedCorrespondence
from .metrics import PCK, DenseFlowPCK, dense_flow_counts, format_alpha, stable_pair_key
from .results import PCKResults

__all__ = [
    "ZeroShotCorrespondence", "chance_predictions", "keypoint_record", "place_feature_caches", "restore_keypoint_metric",
    "summed_over_ranks",
]


#: Per-pair extras of pose alignment: whether the mirrored source won, and both orientations' instance distances.
PAIR_EXTRAS = ("flipped", "pose_distances")


def keypoint_record(
    sample: dict[str, Any], pred: torch.Tensor, valid: torch.Tensor, output: dict[str, Any] | None = None
) -> dict[str, Any]:
    """The ``predictions.jsonl`` line of a keypoint pair (valid keypoints only, original pixels).

    It holds everything the metric needs, so a resumed run rebuilds its state from these lines
    (:func:`restore_keypoint_metric`) and ends with the numbers of an uninterrupted run; and the per-keypoint
    per-point extras of ``output`` (the pipeline's prediction of the pair: its matcher's, such as ``confidence``
    and ``mutual``, every one that :attr:`~.components.matchers.PairPrediction.point_extras` names, as they come)
    and the :data:`PAIR_EXTRAS` of pose alignment.
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
    for key in () if output is None else point_extras(output):
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
        preds=points("pred_kps"),
        gts=points("trg_kps"),
        thresholds=torch.tensor([float(r["threshold"]) for r in records], device=device),
        categories=[r["category"] for r in records],
        pair_ids=[r["pair_id"] for r in records],
        valids=None,
        groups={g: [r.get("variations", {}).get(g, -1) for r in records] for g in groups},
    )


def chance_predictions(sample: dict[str, Any]) -> torch.Tensor:
    """The chance baseline's predictions for a pair: one uniformly random point ``[N, 2]`` in the target image
    per source keypoint, drawn from a generator seeded by the pair id (the same on every run and process)."""
    generator = torch.Generator().manual_seed(stable_pair_key(str(sample["pair_id"])) % (1 << 63))
    height, width = sample["trg_image"].shape[-2:]
    points = torch.rand(int(sample["src_kps"].shape[0]), 2, generator=generator)
    return points * torch.tensor([float(width), float(height)])


def summed_over_ranks(module: L.LightningModule, counts: dict[str, int]) -> dict[str, int]:
    """Counts (extraction passes) summed over all processes: under DDP each rank extracts its own share."""
    if module.trainer.world_size <= 1 or not counts:
        return dict(counts)
    local = torch.tensor(list(counts.values()), dtype=torch.long, device=module.device)
    total = module.trainer.strategy.reduce(local, reduce_op="sum")
    return {name: int(value) for name, value in zip(counts, total.tolist())}


def place_feature_caches(module: L.LightningModule) -> list[Path]:
    """Put every on-disk feature cache of ``module`` in its place before the run writes to it, and log where.

    A relative ``feature_cache_dir`` is taken under the run's folder (``trainer.default_root_dir``), never the
    working directory; an absolute one (or ``~/...``) is kept. Called first in each module's ``setup`` (the
    pipeline is built before the trainer, so its folder is only known now); the cache creates its folder when
    it first writes. Returns the folders.
    """
    trainer = getattr(module, "_trainer", None)
    if trainer is None:
        return []
    caches = {id(c): c for m in module.modules() if isinstance(c := getattr(m, "cache", None), FeatureCache)}
    placed = []
    for cache in caches.values():
        given = cache.directory
        folder = cache.resolve_under(trainer.default_root_dir)
        if given is None or folder is None:
            continue
        placed.append(folder)
        relative = not given.expanduser().is_absolute()
        where = f" ({cache.flag.lstrip('-')} {given} is relative: under the run's folder)" if relative else ""
        rank_zero_info(f"feature cache on disk: {folder}{where}")
    return placed


def chosen_pck_alphas(pck_alphas: Sequence[float] | None, alphas: Sequence[float] | None) -> list[float] | None:
    """A module's PCK levels from ``pck_alphas`` or its old name ``alphas`` (with a one-line notice)."""
    if alphas is not None:
        if pck_alphas is not None:
            raise ValueError("model.alphas is the old name of model.pck_alphas: give model.pck_alphas only")
        rank_zero_warn("model.alphas is now model.pck_alphas (the fusion weight is model.pipeline.alpha); "
                       "model.alphas works for a while")
        pck_alphas = alphas
    return None if pck_alphas is None else [float(a) for a in pck_alphas]


class ZeroShotCorrespondence(L.LightningModule):
    """Zero-shot semantic correspondence with fused SD + DINO features, scored with the benchmark's protocol.

    Args:
        pipeline: The method (:class:`~.components.pipeline.FusedCorrespondence`: featurizers, co-PCA, fusion,
            matching, refinements, feature cache); its knobs are ``--model.pipeline.<name>``.
        pck_alphas: The PCK@alpha levels (fractions of each pair's threshold) overriding the datamodule
            protocol's (None: the protocol's). Not the fusion weight ``pipeline.alpha``.
        chance_baseline: Also score uniformly random predictions in each target image (seeded by the pair id)
            with the same protocol, and print and write them beside the results (``results.json["chance"]``):
            what the numbers mean against chance. Keypoint benchmarks; such a run cannot be resumed.
        alphas: Renamed ``pck_alphas`` (works for a while, with a one-line notice).
    """

    def __init__(
        self,
        pipeline: FusedCorrespondence,
        pck_alphas: Sequence[float] | None = None,
        chance_baseline: bool = False,
        alphas: Sequence[float] | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["pipeline"])
        self.pipeline = pipeline
        self.pck_alphas = chosen_pck_alphas(pck_alphas, alphas)
        self.chance_baseline = bool(chance_baseline)
        self.chance: PCK | None = None
        self.metric: PCK | None = None
        self.protocol: Any = None
        self.test_results: PCKResults | None = None

    def setup(self, stage: str) -> None:
        """Place the disk cache (:func:`place_feature_caches`); create the metric from the datamodule's protocol
        and categories."""
        place_feature_caches(self)
        datamodule = getattr(self.trainer, "datamodule", None)
        self.protocol = getattr(datamodule, "protocol", None)
        if self.protocol is None:
            raise ValueError("the datamodule must define `protocol` (see datamodules.protocols)")
        alphas = self.pck_alphas or list(self.protocol.alphas)
        categories = list(getattr(datamodule, "categories", None) or [])
        if not categories:
            raise ValueError("the datamodule must expose its category names as `categories` after setup()")
        self.pipeline.use_protocol(self.protocol)
        if self.chance_baseline and self.protocol.metric != "keypoint_pck":
            raise ValueError(
                f"chance_baseline scores keypoints; {self.protocol.name} is scored with {self.protocol.metric}"
            )
        if self.protocol.metric not in ("flow_pck", "keypoint_pck"):
            raise ValueError(
                f"{type(self).__name__} scores keypoint or flow PCK; {self.protocol.name} is scored with "
                f"{self.protocol.metric} (lightning_modules.DenseCorrespondence tests label propagation)"
            )
        self.metric = self.protocol.make_metric(categories, alphas)
        if self.chance_baseline:
            self.chance = self.protocol.make_metric(categories, alphas)

    def test_step(self, batch: list[dict[str, Any]], batch_idx: int) -> list[dict[str, Any]]:
        """Score a batch of pairs and return one prediction record per pair (original pixels)."""
        return self._dense_step(batch) if self.protocol.metric == "flow_pck" else self._sparse_step(batch)

    def _sparse_step(self, batch: list[dict[str, Any]]) -> list[dict[str, Any]]:
        assert self.metric is not None
        outputs = self.pipeline.predict_pairs(batch)
        valids = [s["kps_valid"].to(self.device) for s in batch]
        preds = [o["pred_kps"] for o in outputs]
        gts = [s["trg_kps"].to(self.device).float() for s in batch]
        groups = {g: [s.get("variations", {}).get(g, -1) for s in batch] for g in self.protocol.groups}
        scored = {
            "gts": gts,
            "thresholds": torch.tensor([float(s["threshold"]) for s in batch], device=self.device),
            "categories": [s["category"] for s in batch],
            "pair_ids": [s["pair_id"] for s in batch],
            "valids": valids,
            "groups": groups,
        }
        self.metric.update(preds=preds, **scored)
        if self.chance is not None:
            self.chance.update(preds=[chance_predictions(s).to(self.device) for s in batch], **scored)
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
        self.metric.update_counts(
            counts=counts, datasets=[s["dataset"] for s in batch], pair_ids=[s["pair_id"] for s in batch],
        )
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
            self.metric.update_counts(
                counts=counts, datasets=[r["dataset"] for r in records], pair_ids=[r["pair_id"] for r in records],
            )
        elif self.chance is not None:
            raise ValueError("a run with chance_baseline cannot be resumed (its random predictions are not kept): "
                             "run it again from the start")
        else:
            restore_keypoint_metric(self.metric, records, self.protocol.groups, self.device)

    def on_test_epoch_end(self) -> None:
        """Compute the summary (synchronised across processes) and log the protocol's averages."""
        assert self.metric is not None
        results = self.metric.compute()
        results["protocol"] = self.protocol.as_record()
        results["extraction_passes"] = summed_over_ranks(self, self.pipeline.extraction_passes)
        if self.chance is not None:
            results["chance"] = self.chance.compute()["pck"]
            self.chance.reset()
        self.test_results = PCKResults(results)
        for alpha, values in results["pck"].items():
            for average in self.protocol.averages:
                self.log(f"pck@{alpha}/{average}", float(values[average]), rank_zero_only=True)
        self.metric.reset()
