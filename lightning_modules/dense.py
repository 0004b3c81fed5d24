"""Dense correspondence as predict-time pictures and test-time label propagation (supplementary B.1).

Thin by design: features, co-PCA, fusion and the per-pixel matching come from the ``pipeline`` it is given
(:class:`.components.pipeline.FusedCorrespondence`, as in the zero-shot run, its feature cache and
``projection_ckpt`` included), the pixel matching,
colour maps and label transfer from :mod:`.components.dense`, the DAVIS scores from
:mod:`.segmentation_metrics`.

* ``predict``: for every pair, a picture [source | source colour map | target | the colour map carried to the
  target through the correspondence] (``callbacks.PictureWriter`` saves it and logs it to W&B).
* ``test`` on a DAVIS datamodule: the first frame's annotation is propagated to every later frame of its
  sequence; J (region IoU) and F (boundary F-measure) per object, averaged per sequence and overall.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

import lightning as L
from jsonargparse.typing import PositiveInt

from .components.dense import PixelCorrespondence, dense_picture, propagate_labels, resize_nearest
from .components.pipeline import FusedCorrespondence
from .results import ScoreResults
from .segmentation_metrics import JAndF
from .zero_shot import place_feature_caches, summed_over_ranks

__all__ = ["DenseCorrespondence", "check_resolution"]


def check_resolution(resolution: int | None) -> int | None:
    """A working resolution: a positive number of pixels, or None (the original size)."""
    if resolution is not None and int(resolution) <= 0:
        raise ValueError(f"resolution must be a positive number of pixels or null, got {resolution}")
    return None if resolution is None else int(resolution)


class DenseCorrespondence(L.LightningModule):
    """Per-pixel correspondence from the fused descriptors: colour-map pictures and label propagation.

    Args:
        pipeline: The method (:class:`~.components.pipeline.FusedCorrespondence`), as in the zero-shot run
            (its feature cache makes DAVIS frames extract their sequence's first frame once).
        resolution: Working resolution of the per-pixel matching (long side in pixels); None matches at the
            original image size. Descriptors are sampled bilinearly at every working pixel.
        chunk: Target pixels matched at a time (bounds the memory to ``chunk x source pixels``).
        use_masks: Restrict matching to the samples' ``src_mask`` / ``trg_mask`` when they have them.
    """

    def __init__(
        self,
        pipeline: FusedCorrespondence,
        resolution: PositiveInt | None = 256,
        chunk: PositiveInt = 4096,
        use_masks: bool = False,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["pipeline"])
        self.pipeline = pipeline
        self.resolution = check_resolution(resolution)
        if int(chunk) <= 0:
            raise ValueError(f"chunk must be positive, got {chunk}")
        self.chunk = int(chunk)
        self.use_masks = bool(use_masks)
        self.metric: JAndF | None = None
        self.protocol: Any = None
        self.test_results: ScoreResults | None = None

    def _correspondences(self, batch: Sequence[dict[str, Any]]) -> list[PixelCorrespondence]:
        return self.pipeline.predict_pixels(batch, self.resolution, self.chunk, self.use_masks)

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
        """Place the disk cache (:func:`.zero_shot.place_feature_caches`); test on a label-propagation datamodule
        (DAVIS): the J&F metric; predict needs no metric."""
        place_feature_caches(self)
        if stage == "test":
            datamodule = getattr(self.trainer, "datamodule", None)
            self.protocol = getattr(datamodule, "protocol", None)
            if self.protocol is None or self.protocol.metric != "label_jf":
                raise ValueError(
                    f"DenseCorrespondence tests label propagation: it needs a DAVIS datamodule (metric 'label_jf'), "
                    f"got {type(datamodule).__name__}; for pictures of other pairs use `predict`"
                )
            self.metric = self.protocol.make_metric(list(datamodule.categories))

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
        self.metric.update(
            pred_labels=predictions, gt_labels=truths, sequences=[s["category"] for s in batch],
            pair_ids=[s["pair_id"] for s in batch], num_objects=[int(s["num_objects"]) for s in batch],
        )
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
            results["protocol"] = self.protocol.as_record()
        results["extraction_passes"] = summed_over_ranks(self, self.pipeline.extraction_passes)
        self.test_results = ScoreResults(results)
        for key in ("J_mean", "F_mean", "JF_mean"):
            self.log(key, float(results[key]), rank_zero_only=True)
        self.metric.reset()
