"""The zero-shot method end to end, in plain torch: extract, co-PCA, fuse, match, map back.

Usable without Lightning::

    pipeline = FusedCorrespondence(SDFeaturizer(), DinoFeaturizer())
    predictions = pipeline.predict_pairs(samples)  # samples as returned by datamodules.SPairDataset
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .dino_featurizer import DinoFeaturizer
from .fusion import co_pca, fuse, merge_layers
from .image_prep import PadResize, pad_resize_image
from .matching import dense_flow, transfer_keypoints
from .sd_featurizer import SDFeaturizer

__all__ = ["ImageFeatures", "FusedCorrespondence"]


@dataclass
class ImageFeatures:
    """Raw (pre-PCA) features of one image.

    Attributes:
        sd: One ``[C_i, h_i, w_i]`` map per SD layer, or None when SD is not used.
        dino: ``[C, G, G]`` DINO map, or None when DINO is not used.
        width: Original image width.
        height: Original image height.
    """

    sd: list[torch.Tensor] | None
    dino: torch.Tensor | None
    width: int
    height: int


class FusedCorrespondence(nn.Module):
    """SD + DINO fused features and nearest-neighbour keypoint transfer ("A Tale of Two Features").

    Args:
        sd: SD featurizer, or None for DINO alone.
        dino: DINO featurizer, or None for SD alone.
        alpha: Weight of the SD block in the fusion (0.5 in the paper). With 1 the DINO featurizer is not
            run, with 0 the SD featurizer is not run.
        pca_dims: Co-PCA dimension per SD layer (256 each in the paper); None keeps the raw channels.
        eval_size: Side of the padded square in which keypoints are mapped to feature cells; defaults to
            the DINO input size when DINO is used (840 in the reference), else the SD input size.
    """

    def __init__(
        self,
        sd: SDFeaturizer | None = None,
        dino: DinoFeaturizer | None = None,
        alpha: float = 0.5,
        pca_dims: Sequence[int] | None = (256, 256, 256),
        eval_size: int | None = None,
    ) -> None:
        super().__init__()
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {alpha}")
        self.alpha = float(alpha)
        self.sd = sd if alpha > 0 else None
        self.dino = dino if alpha < 1 else None
        if self.sd is None and alpha > 0:
            raise ValueError(f"alpha={alpha} gives SD features a weight, but no sd featurizer is configured")
        if self.dino is None and alpha < 1:
            raise ValueError(f"alpha={alpha} gives DINO features a weight, but no dino featurizer is configured")
        if pca_dims is not None and self.sd is not None and len(pca_dims) != len(self.sd.layers):
            raise ValueError(f"pca_dims {list(pca_dims)} must have one entry per SD layer {self.sd.layers}")
        self.pca_dims = None if pca_dims is None else [int(d) for d in pca_dims]
        default_size = self.dino.image_size if self.dino is not None else self.sd.image_size  # type: ignore[union-attr]
        self.eval_size = int(eval_size or default_size)
        self.register_buffer("_device_marker", torch.empty(0), persistent=False)

    @property
    def device(self) -> torch.device:
        """Device the module lives on (featurizers without weights included)."""
        return self._device_marker.device

    @torch.no_grad()
    def extract(self, images: Sequence[torch.Tensor], categories: Sequence[str]) -> list[ImageFeatures]:
        """Run the featurizers on a batch of images (one pass per image per featurizer).

        Args:
            images: uint8 ``[3, H, W]`` tensors of any sizes.
            categories: Category of each image (for the SD prompt).
        """
        sd_maps: list[list[torch.Tensor]] | None = None
        dino_maps: torch.Tensor | None = None
        if self.sd is not None:
            batch = torch.stack([pad_resize_image(img, self.sd.image_size)[0] for img in images]).to(self.device)
            layers = self.sd(batch, categories)
            sd_maps = [[layer[i] for layer in layers] for i in range(len(images))]
        if self.dino is not None:
            batch = torch.stack([pad_resize_image(img, self.dino.image_size)[0] for img in images]).to(self.device)
            dino_maps = self.dino(batch)
        return [
            ImageFeatures(
                sd=None if sd_maps is None else sd_maps[i],
                dino=None if dino_maps is None else dino_maps[i],
                width=int(img.shape[-1]),
                height=int(img.shape[-2]),
            )
            for i, img in enumerate(images)
        ]

    def describe_pair(self, source: ImageFeatures, target: ImageFeatures) -> torch.Tensor:
        """Fused descriptors of a pair: ``[2, D, G, G]`` (source first)."""
        grid = None
        if self.dino is not None:
            grid = self.dino.grid_size
        sd_block = None
        if self.sd is not None:
            assert source.sd is not None and target.sd is not None
            pairs = [torch.stack([s, t]) for s, t in zip(source.sd, target.sd)]
            if self.pca_dims is not None:
                pairs = [co_pca(pair, dim) for pair, dim in zip(pairs, self.pca_dims)]
            sd_block = merge_layers(pairs, grid)
        dino_block = None
        if self.dino is not None:
            assert source.dino is not None and target.dino is not None
            dino_block = torch.stack([source.dino, target.dino])
        return fuse(sd_block, dino_block, self.alpha)

    def match(
        self, source: ImageFeatures, target: ImageFeatures, src_kps: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Transfer source keypoints (original pixels) to the target image.

        Returns:
            ``(predicted [N, 2] in original target pixels, feature distance of each match [N])``.
        """
        # PCA and nearest neighbours run in fp32 even inside a mixed-precision (autocast) test loop.
        with torch.autocast(device_type=self.device.type, enabled=False):
            descriptors = self.describe_pair(source, target)
        src_geo = PadResize(source.width, source.height, self.eval_size)
        trg_geo = PadResize(target.width, target.height, self.eval_size)
        points = src_geo.forward_points(src_kps.to(descriptors.device).float())
        with torch.autocast(device_type=self.device.type, enabled=False):
            predicted, distance = transfer_keypoints(descriptors[0], descriptors[1], points, self.eval_size)
        return trg_geo.inverse_points(predicted), distance

    def flow(self, source: ImageFeatures, target: ImageFeatures) -> torch.Tensor:
        """Dense flow ``[2, H, W]`` from every target pixel to the source (both images share ``H x W``)."""
        if (source.width, source.height) != (target.width, target.height):
            raise ValueError(
                f"dense flow needs images of one size (pad them first): source {source.width}x{source.height}, "
                f"target {target.width}x{target.height}"
            )
        with torch.autocast(device_type=self.device.type, enabled=False):
            descriptors = self.describe_pair(source, target)
            return dense_flow(descriptors[0], descriptors[1], target.height, target.width)

    def _features_by_path(self, samples: Sequence[Mapping[str, Any]]) -> dict[str, ImageFeatures]:
        """Extract every distinct image of a batch once."""
        unique: dict[str, tuple[torch.Tensor, str]] = {}
        for s in samples:
            unique.setdefault(s["src_image_path"], (s["src_image"], s["category"]))
            unique.setdefault(s["trg_image_path"], (s["trg_image"], s["category"]))
        keys = list(unique)
        return dict(zip(keys, self.extract([unique[k][0] for k in keys], [unique[k][1] for k in keys])))

    @torch.no_grad()
    def predict_flows(self, samples: Sequence[Mapping[str, Any]]) -> list[torch.Tensor]:
        """Dense flows ``[2, H, W]`` (target pixel -> source pixel) for a batch of same-size image pairs."""
        features = self._features_by_path(samples)
        return [self.flow(features[s["src_image_path"]], features[s["trg_image_path"]]) for s in samples]

    @torch.no_grad()
    def predict_pairs(self, samples: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
        """Predict target keypoints for a batch of pair samples.

        Each image is extracted once per batch even when several pairs share it.

        Args:
            samples: Pair dicts with ``src_image``, ``trg_image`` (uint8 ``[3, H, W]``),
                ``src_image_path``, ``trg_image_path``, ``category`` and ``src_kps`` (``[N, 2]``).

        Returns:
            Per pair: ``pred_kps`` ``[N, 2]`` (original target pixels) and ``distance`` ``[N]``.
        """
        features = self._features_by_path(samples)
        outputs = []
        for s in samples:
            pred, distance = self.match(features[s["src_image_path"]], features[s["trg_image_path"]], s["src_kps"])
            outputs.append({"pred_kps": pred, "distance": distance})
        return outputs
