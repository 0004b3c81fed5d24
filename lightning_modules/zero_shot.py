"""The zero-shot LightningModule: ``trainer.test`` over pair datamodules, scored with PCK.

Thin by design: the method lives in :class:`~lightning_modules.components.pipeline.FusedCorrespondence`
and the metric in :class:`~lightning_modules.metrics.PCK`; this class wires them to Lightning's test loop.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import lightning as L
import torch

from .components.dino_featurizer import DinoFeaturizer
from .components.pipeline import FusedCorrespondence
from .components.sd_featurizer import SDFeaturizer
from .metrics import PCK

__all__ = ["ZeroShotCorrespondence"]


class ZeroShotCorrespondence(L.LightningModule):
    """Zero-shot semantic correspondence with fused SD + DINO features.

    Args:
        sd: SD featurizer (None for DINO alone).
        dino: DINO featurizer (None for SD alone).
        alpha: Weight of the SD block (0.5 in the paper; 1 = SD only, 0 = DINO only).
        pca_dims: Co-PCA dimension per SD layer; None keeps raw channels.
        eval_size: Keypoint-to-cell mapping resolution (default: the DINO input size).
        alphas: PCK thresholds; None takes the datamodule's protocol (``datamodule.alphas``).
    """

    def __init__(
        self,
        sd: SDFeaturizer | None = None,
        dino: DinoFeaturizer | None = None,
        alpha: float = 0.5,
        pca_dims: Sequence[int] | None = (256, 256, 256),
        eval_size: int | None = None,
        alphas: Sequence[float] | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["sd", "dino"])
        self.pipeline = FusedCorrespondence(sd, dino, alpha=alpha, pca_dims=pca_dims, eval_size=eval_size)
        self.alphas = None if alphas is None else [float(a) for a in alphas]
        self.pck: PCK | None = None
        self.test_results: dict[str, Any] | None = None

    def setup(self, stage: str) -> None:
        """Create the metric from the datamodule's categories and protocol alphas."""
        datamodule = getattr(self.trainer, "datamodule", None)
        alphas = self.alphas or list(getattr(datamodule, "alphas", None) or [])
        if not alphas:
            raise ValueError("no PCK alphas: set model.alphas or use a datamodule that defines `alphas`")
        categories = list(getattr(datamodule, "categories", None) or [])
        if not categories:
            raise ValueError("the datamodule must expose its category names as `categories` after setup()")
        self.pck = PCK(alphas=alphas, categories=categories)

    def test_step(self, batch: list[dict[str, Any]], batch_idx: int) -> list[dict[str, Any]]:
        """Predict a batch of pairs, update PCK and return one record per pair (original pixels)."""
        assert self.pck is not None
        outputs = self.pipeline.predict_pairs(batch)
        valids = [s["kps_valid"].to(self.device) for s in batch]
        preds = [o["pred_kps"] for o in outputs]
        gts = [s["trg_kps"].to(self.device).float() for s in batch]
        self.pck.update(
            preds,
            gts,
            torch.tensor([float(s["threshold"]) for s in batch], device=self.device),
            [s["category"] for s in batch],
            [s["pair_id"] for s in batch],
            valids,
        )
        records = []
        for s, pred, valid in zip(batch, preds, valids):
            keep = valid.cpu()
            records.append(
                {
                    "pair_id": s["pair_id"],
                    "category": s["category"],
                    "src_kps": s["src_kps"][keep].tolist(),
                    "trg_kps": s["trg_kps"][keep].tolist(),
                    "pred_kps": pred.cpu()[keep].tolist(),
                    "threshold": float(s["threshold"]),
                }
            )
        return records

    def on_test_epoch_end(self) -> None:
        """Compute the PCK summary (synchronised across processes) and log its headline numbers."""
        assert self.pck is not None
        self.test_results = self.pck.compute()
        for alpha, values in self.test_results["pck"].items():
            for average in ("per_point", "per_image", "category_mean"):
                value = values[average]
                self.log(f"pck@{alpha}/{average}", float(value), rank_zero_only=True, sync_dist=False)
        self.pck.reset()
