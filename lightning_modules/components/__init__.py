"""Plain-torch core (never imports lightning): featurizers, co-PCA and fusion, matching."""

from .captioner import ImplicitCaptioner
from .clip_features import CLIPImageEmbedder
from .ddim import DDIMRefiner
from .dense import PixelCorrespondence, dense_picture, pixel_correspondence, propagate_labels
from .dino_featurizer import DinoFeaturizer
from .features import ImageFeatures
from .fusion import co_pca, fuse, l2_normalize, merge_layers
from .image_prep import PadResize, pad_resize_image
from .matchers import KeypointMatcher, NearestNeighbours
from .matching import cells_to_points, nearest_neighbors, points_to_cells, transfer_keypoints
from .pipeline import FusedCorrespondence, PairMatch
from .projection_head import GatedProjectionHead, symmetric_keypoint_loss
from .samples import PairSample
from .sd_featurizer import SDFeaturizer, decoder_layer_source
from .swap import swap_instance
from .visualize import draw_correspondences, keypoints_correct

__all__ = [
    "CLIPImageEmbedder",
    "DDIMRefiner",
    "DinoFeaturizer",
    "FusedCorrespondence",
    "GatedProjectionHead",
    "ImageFeatures",
    "ImplicitCaptioner",
    "KeypointMatcher",
    "NearestNeighbours",
    "PairMatch",
    "PairSample",
    "PadResize",
    "PixelCorrespondence",
    "SDFeaturizer",
    "cells_to_points",
    "co_pca",
    "decoder_layer_source",
    "dense_picture",
    "draw_correspondences",
    "fuse",
    "keypoints_correct",
    "l2_normalize",
    "merge_layers",
    "nearest_neighbors",
    "pad_resize_image",
    "pixel_correspondence",
    "points_to_cells",
    "propagate_labels",
    "swap_instance",
    "symmetric_keypoint_loss",
    "transfer_keypoints",
]
