"""Dense correspondence as predict-time pictures and test-time label propagation (supplementary B.1).

Thin by design: features, co-PCA and fusion come from :class:`.components.pipeline.FusedCorrespondence` (the
zero-shot module's pipeline, its feature cache and ``projection_ckpt`` included), the per-pixel matching,
colour maps and label transfer from :mod:`.components.dense`, the DAVIS scores from
:mod:`.segmentation_metrics`.

* ``predict``: for every pair, a picture [source | source colour map | target | the colour map carried to the
  target through the correspondence] (``callbacks.PictureWriter`` saves it and logs it to W&B).
* ``test`` on a DAVIS datamodule: the first frame's annotation is propagated to every later frame of its
  sequence; J (region IoU) and F (boundary F-measure) per object, averaged per sequence and overall.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict
from typing import Any

import torch

from .components.dense import (
    PixelCorrespondence,
    dense_picture,
    pixel_correspondence,
    propagate_labels,
    resize_nearest,
)
from .components.dino_featurizer import DinoFeaturizer
from .components.pipeline import EvalSize, ImageFeatures, annotation_geometry
from .components.sd_featurizer import SDFeaturizer
from .segmentation_metrics import JAndF
from .zero_shot import ZeroShotCorrespondence, summed_over_ranks

__all__ = ["DenseCorrespondence"]


class DenseCorrespondence(ZeroShotCorrespondence):
    """Per-pixel correspondence from the fused descriptors: colour-map pictures and label propagation.

    Args:
        sd: SD featurizer (None for DINO alone).
        dino: DINO featurizer (None for SD alone).
        alpha: Weight of the SD block (0.5 in the paper).
        pca_dims: Co-PCA dimension per SD layer.
        eval_size: Side of the padded square the descriptors are mapped in (default: the DINO input size).
        fusion: How SD and DINO blocks are combined (``concat_l2`` is the paper's).
        feature_cache_gb: Memory of the per-image feature cache (DAVIS frames share their sequence's first
            frame, which is then extracted once).
        feature_cache_dir: Folder of an on-disk feature cache.
        projection_ckpt: A trained projection head used instead of co-PCA and the fixed fusion.
        resolution: Working resolution of the per-pixel matching (long side in pixels); None matches at the
            original image size. Descriptors are sampled bilinearly at every working pixel.
        chunk: Target pixels matched at a time (bounds the memory to ``chunk x source pixels``).
        use_masks: Restrict matching to the samples' ``src_mask`` / ``trg_mask`` when they have them.
    """

    def __init__(
        self,
        sd: SDFeaturizer | None = None,
        dino: DinoFeaturizer | None = None,
        alpha: float = 0.5,
        pca_dims: Sequence[int] | None = (256, 256, 256),
        eval_size: EvalSize | None = None,
        fusion: str = "concat_l2",
        feature_cache_gb: float = 4.0,
        feature_cache_dir: str | None = None,
        projection_ckpt: str | None = None,
        resolution: int | None = 256,
        chunk: int = 4096,
        use_masks: bool = False,
    ) -> None:
        super().__init__(
            sd=sd, dino=dino, alpha=alpha, pca_dims=pca_dims, eval_size=eval_size, fusion=fusion,
            feature_cache_gb=feature_cache_gb, feature_cache_dir=feature_cache_dir, projection_ckpt=projection_ckpt,
        )
        if resolution is not None and int(resolution) <= 0:
            raise ValueError(f"resolution must be a positive number of pixels or null, got {resolution}")
        if int(chunk) <= 0:
            raise ValueError(f"chunk must be positive, got {chunk}")
        self.resolution = None if resolution is None else int(resolution)
        self.chunk = int(chunk)
        self.use_masks = bool(use_masks)

    def correspondence(
        self, sample: dict[str, Any], source: ImageFeatures, target: ImageFeatures
    ) -> PixelCorrespondence:
        """The per-pixel correspondence of one pair (every target pixel to its nearest source pixel)."""
        descriptors = self.pipeline.describe_pair(source, target)
        masks = {}
        if self.use_masks:
            masks = {"source_mask": sample.get("src_mask"), "target_mask": sample.get("trg_mask")}
        return pixel_correspondence(
            descriptors[0], descriptors[1],
            annotation_geometry(source, self.pipeline.eval_size), annotation_geometry(target, self.pipeline.eval_size),
            resolution=self.resolution, chunk=self.chunk, **{k: v for k, v in masks.items() if v is not None},
        )

    def _correspondences(self, batch: Sequence[dict[str, Any]]) -> list[PixelCorrespondence]:
        features = self.pipeline.features_by_path(batch)
        return [self.correspondence(s, features[s["src_image_path"]], features[s["trg_image_path"]]) for s in batch]

    # --- predict: pictures --------------------------------------------------------------------------------

    @torch.no_grad()
    def predict_step(self, batch: list[dict[str, Any]], batch_idx: int, dataloader_idx: int = 0) -> list[dict[str, Any]]:
        """One record per pair: ``pair_id``, ``category`` and ``picture`` (the colour-map panel)."""
        outputs = []
        for sample, match in zip(batch, self._correspondences(batch)):
            picture = dense_picture(sample["src_image"], sample["trg_image"], match)
            share = float(match.valid.float().mean())
            outputs.append({"pair_id": sample["pair_id"], "category": sample["category"], "picture": picture,
                            "caption": f"{sample['pair_id']}: {100 * share:.0f}% of target pixels matched"})
        return outputs

    # --- test: label propagation --------------------------------------------------------------------------

    def setup(self, stage: str) -> None:
        """Test on a label-propagation datamodule (DAVIS): the J&F metric; predict needs no metric."""
        if stage == "test":
            datamodule = getattr(self.trainer, "datamodule", None)
            self.protocol = getattr(datamodule, "protocol", None)
            if getattr(datamodule, "protocol_name", None) != "davis":
                raise ValueError(
                    f"DenseCorrespondence tests label propagation: it needs a DAVIS datamodule (protocol 'davis'), "
                    f"got {type(datamodule).__name__}; for pictures of other pairs use `predict`"
                )
            self.metric = JAndF(sequences=list(datamodule.categories))

    @torch.no_grad()
    def test_step(self, batch: list[dict[str, Any]], batch_idx: int) -> list[dict[str, Any]]:
        """Propagate each pair's source labels to its target frame and score them."""
        if not batch:
            return []
        predictions = []
        for sample, match in zip(batch, self._correspondences(batch)):
            labels = propagate_labels(sample["src_labels"].to(self.device), match)
            height, width = sample["trg_labels"].shape[-2:]
            predictions.append(resize_nearest(labels, (height, width)).cpu())
        truths = [s["trg_labels"] for s in batch]
        self.metric.update(predictions, truths, [s["category"] for s in batch], [s["pair_id"] for s in batch],
                           [int(s["num_objects"]) for s in batch])
        return [self._record(s, p) for s, p in zip(batch, predictions)]

    @staticmethod
    def _record(sample: dict[str, Any], predicted: torch.Tensor) -> dict[str, Any]:
        """The ``predictions.jsonl`` line of a frame: its pixels per object id, predicted and true."""
        truth = sample["trg_labels"]
        ids = range(1, int(sample["num_objects"]) + 1)
        return {
            "pair_id": sample["pair_id"],
            "category": sample["category"],
            "num_objects": int(sample["num_objects"]),
            "predicted_pixels": {str(i): int((predicted == i).sum()) for i in ids},
            "true_pixels": {str(i): int((truth == i).sum()) for i in ids},
        }

    def restore_predictions(self, records: Sequence[dict[str, Any]]) -> None:
        """Label propagation is not resumable: its lines hold pixel counts, not the per-object J and F."""
        if records:
            raise ValueError("a label-propagation run cannot be resumed (--resume); run it again from the start")

    def on_test_epoch_end(self) -> None:
        """Compute J&F (synchronised across processes) and log the means."""
        results = self.metric.compute()
        results["num_pairs"] = int(results["num_frames"])
        if self.protocol is not None:
            results["protocol"] = asdict(self.protocol)
        results["extraction_passes"] = summed_over_ranks(self, self.pipeline.extraction_passes)
        self.test_results = results
        for key in ("J_mean", "F_mean", "JF_mean"):
            self.log(key, float(results[key]), rank_zero_only=True)
        self.metric.reset()
