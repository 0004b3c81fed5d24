"""Plain-torch core (never imports lightning): featurizers, co-PCA and fusion, matching."""

from .captioner import ImplicitCaptioner
from .dino_featurizer import DinoFeaturizer
from .fusion import co_pca, fuse, l2_normalize, merge_layers
from .image_prep import PadResize, pad_resize_image
from .matching import cells_to_points, nearest_neighbors, points_to_cells, transfer_keypoints
from .pipeline import FusedCorrespondence, ImageFeatures
from .projection_head import GatedProjectionHead, symmetric_keypoint_loss
from .sd_featurizer import SDFeaturizer, decoder_layer_source
from .visualize import draw_correspondences, keypoints_correct

__all__ = [
    "DinoFeaturizer",
    "FusedCorrespondence",
    "GatedProjectionHead",
    "ImageFeatures",
    "ImplicitCaptioner",
    "PadResize",
    "SDFeaturizer",
    "cells_to_points",
    "co_pca",
    "decoder_layer_source",
    "draw_correspondences",
    "fuse",
    "keypoints_correct",
    "l2_normalize",
    "merge_layers",
    "nearest_neighbors",
    "pad_resize_image",
    "points_to_cells",
    "symmetric_keypoint_loss",
    "transfer_keypoints",
]
