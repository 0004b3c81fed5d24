"""Carry points from source to target images: the method on your own pictures (``configs/match.yaml``).

Thin by design: the ``pipeline`` it is given (:class:`.components.pipeline.FusedCorrespondence`, with any
backbone, refinement or trained head of the zero-shot run) predicts; this module turns each pair's prediction
into its output line and picture. The inputs come from :class:`datamodules.ImagePairsDataModule` (a pairs file,
or one source against a folder); the lines go to ``matches.jsonl`` (:class:`callbacks.MatchWriter`), the
pictures to ``pictures/`` (:class:`callbacks.PictureWriter`), the page to ``viewer.html``
(:class:`callbacks.ViewerWriter`).
"""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from jsonargparse.typing import PositiveInt

from .components.image_prep import load_scale
from .components.matchers import point_extras
from .components.pipeline import FusedCorrespondence
from .components.visualize import draw_matches, inside_image
from .zero_shot import place_feature_caches

__all__ = ["PointTransfer", "match_line"]


def _rounded(points: torch.Tensor) -> list[list[float]]:
    """``[N, 2]`` points as lists, to a thousandth of a pixel (float32 noise such as 26.666666030 dropped)."""
    return [[round(float(v), 3) for v in point] for point in points.cpu().tolist()]


def _file_frame(sample: dict[str, Any], side: str) -> tuple[tuple[int, int], torch.Tensor]:
    """The ``(width, height)`` of a pair image's file and the image's pixels per file pixel ``(sx, sy)`` (ones
    where it was read whole, or where the sample does not say)."""
    image = sample[f"{side}_image"]
    size = sample.get(f"{side}_file_size") or (int(image.shape[-1]), int(image.shape[-2]))
    return (int(size[0]), int(size[1])), load_scale(image, size)


def match_line(sample: dict[str, Any], output: dict[str, Any]) -> dict[str, Any]:
    """The ``matches.jsonl`` line of a pair: its files, the source points and their matches, the feature
    distance, the confidence and the mutual-nearest-neighbour flag of each point, and ``inside``: whether each
    match lies on the target (:func:`.components.visualize.inside_image`; a match in the padding keeps its
    coordinates, flagged false, and the picture and the viewer draw it as a square on the border).

    Sizes and points are in the files' own pixels (upright) even where the images were read downscaled
    (``src_file_size``, ``trg_file_size`` and ``src_file_kps`` of the sample, :class:`datamodules.ImagePairsDataset`).
    """
    src_size, _ = _file_frame(sample, "src")
    trg_size, trg_scale = _file_frame(sample, "trg")
    src_kps = sample.get("src_file_kps", sample["src_kps"])
    pred = output["pred_kps"].detach().cpu().double()
    if not torch.equal(trg_scale, torch.ones(2, dtype=torch.float64)):
        pred = pred / trg_scale  # back to the target file's pixels
    line = {
        "pair_id": sample["pair_id"],
        "category": str(sample["category"]),
        "source": sample.get("src_file", sample["src_image_path"]),
        "target": sample.get("trg_file", sample["trg_image_path"]),
        "source_size": list(src_size),
        "target_size": list(trg_size),
        "src_kps": _rounded(src_kps),
        "pred_kps": _rounded(pred),
    }
    for key in ("distance", *point_extras(output)):  # the matcher's extras, as they come
        line[key] = output[key].cpu().tolist()
    line["inside"] = inside_image(line["pred_kps"], line["target_size"]).tolist()
    if "flipped" in output:
        line["flipped"] = bool(output["flipped"])
    return line


class PointTransfer(L.LightningModule):
    """Where do these points of the source image go in the target image? ``trainer.predict`` on own images.

    Args:
        pipeline: The method (:class:`~.components.pipeline.FusedCorrespondence`); its knobs are
            ``--model.pipeline.<name>``. It must check mutual nearest neighbours (``mutual_check: true``, as
            ``configs/match.yaml`` sets): every output line holds a confidence and a mutual flag per point.
        picture_height: Height of each pair's picture in pixels.
    """

    def __init__(self, pipeline: FusedCorrespondence, picture_height: PositiveInt = 256) -> None:
        super().__init__()
        if pipeline.refinement is None or not pipeline.refinement.mutual_check:
            raise ValueError("PointTransfer writes a mutual flag and a confidence per point: set "
                             "model.pipeline.mutual_check true (configs/match.yaml does)")
        self.save_hyperparameters(ignore=["pipeline"])
        self.pipeline = pipeline
        self.picture_height = int(picture_height)

    def setup(self, stage: str) -> None:
        """Place the disk cache (:func:`.zero_shot.place_feature_caches`) before the first pair is matched."""
        place_feature_caches(self)

    @torch.no_grad()
    def predict_step(self, batch: list[dict[str, Any]], batch_idx: int, dataloader_idx: int = 0) -> list[dict[str, Any]]:
        """Per pair: ``pair_id``, ``line`` (the :func:`match_line`) and ``picture`` (:func:`draw_matches`)."""
        records = []
        for sample, output in zip(batch, self.pipeline.predict_pairs(batch)):
            line = match_line(sample, output)
            picture = draw_matches(sample["src_image"], sample["trg_image"], line["src_kps"], line["pred_kps"],
                                   line["mutual"], height=self.picture_height,
                                   src_size=line["source_size"], trg_size=line["target_size"])
            mutual = sum(line["mutual"])
            records.append({"pair_id": sample["pair_id"], "line": line, "picture": picture,
                            "caption": f"{sample['pair_id']}: {mutual}/{len(line['mutual'])} mutual matches"})
        return records
