"""The typed pair sample every reader returns and the pipeline takes (a ``TypedDict``: plain dicts at run time).

Every sample holds the :data:`COMMON_KEYS`; then the keys of its kind (:data:`KIND_KEYS`): keypoints (SPair-71k,
PF-Pascal, PF-Willow, CUB-200), dense flow (TSS), propagated labels (DAVIS) or instance masks (instance
swapping). Coordinates are ``(x, y)`` in the pixels of the sample's own images. ``tests/test_sample_contract.py``
checks every reader against this declaration. Plain torch.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import Any, TypedDict

import numpy as np
import torch

__all__ = ["COMMON_KEYS", "KIND_KEYS", "PairSample", "sample_digest", "sample_kind"]


class RequiredPairKeys(TypedDict):
    """The keys every sample holds (:data:`COMMON_KEYS`; see :class:`PairSample`)."""

    pair_id: str
    category: str
    src_image: torch.Tensor
    trg_image: torch.Tensor
    src_image_path: str
    trg_image_path: str


class PairSample(RequiredPairKeys, total=False):
    """One pair of images and what a benchmark knows about it: the required base every reader returns, and the
    keys of each kind. A benchmark's own fields (CUB-200's crops, DAVIS's annotation files, PF-Willow's folder,
    the own-images files' frame) are declared by the benchmark, in a ``TypedDict`` that extends this one beside
    its reader (``datamodules/cub.py``'s ``CUBSample``, ...: the reader's ``sample_type``).

    Every sample:
        pair_id: Stable id of the pair (the prediction line's key; repeats of a draw get ``#2``, ...).
        category: What the images show (the SD prompt's ``{category}``, the metric's group).
        src_image: Source image, uint8 ``[3, H, W]``.
        trg_image: Target image, uint8 ``[3, H', W']``.
        src_image_path: Identity of the source image (the file, or the file plus a suffix for a derived image,
            e.g. CUB's crop): images with one path share their features within a batch.
        trg_image_path: Identity of the target image.

    Keypoint benchmarks:
        src_kps: Source keypoints ``[N, 2]`` float32.
        trg_kps: Target keypoints ``[N, 2]`` float32.
        kps_valid: Which keypoints are scored ``[N]`` bool.
        threshold: The PCK normaliser of the pair in pixels (the protocol's rule).
        kps_ids: Semantic id of each keypoint (SPair-71k, CUB-200: what pose alignment swaps left and right by).
        src_instance_box: The source object's box ``[4]`` ``(x0, y0, x1, y1)`` float32, in the sample image's
            pixels (pose alignment compares the instances' features inside them; none: the whole image).
        trg_instance_box: The target object's box.
        variations: Per-pair attributes the protocol's ``groups`` break PCK down by (SPair-71k's difficulty
            levels, ``viewpoint_variation``, ...; -1 = not annotated).
        src_file: The source image's file where ``src_image_path`` is not just that (CUB-200: the sample image is
            its crop; own images: a file matched under several categories).
        trg_file: The target image's file, likewise.

    Dense flow (TSS):
        dataset: Sub-dataset (``FG3DCar``, ``JODS``, ``PASCAL``; DAVIS: ``davis``).
        flow: Ground-truth flow ``[2, H, W]`` float32 (target pixel -> source pixel).
        mask: Valid pixels of the flow ``[H, W]`` bool.
        src_size: Source size ``(width, height)`` before padding to a common size.
        trg_size: Target size ``(width, height)`` before padding.

    Label propagation (DAVIS):
        src_labels: Object ids of the source frame ``[H, W]`` (0 = background).
        trg_labels: Object ids of the target frame ``[H, W]``.
        num_objects: Objects annotated in the sequence.

    Points to carry (own images, ``datamodules.own_images``): ``src_kps`` alone, no ground truth.

    Instance masks (instance swapping):
        src_mask: The source instance ``[H, W]`` bool.
        trg_mask: The target instance ``[H', W']`` bool.
    """

    src_kps: torch.Tensor
    trg_kps: torch.Tensor
    kps_valid: torch.Tensor
    threshold: float
    kps_ids: list[int]
    src_instance_box: torch.Tensor
    trg_instance_box: torch.Tensor
    variations: dict[str, int]
    src_file: str
    trg_file: str
    dataset: str
    flow: torch.Tensor
    mask: torch.Tensor
    src_size: tuple[int, int]
    trg_size: tuple[int, int]
    src_labels: torch.Tensor
    trg_labels: torch.Tensor
    num_objects: int
    src_mask: torch.Tensor
    trg_mask: torch.Tensor


#: The keys every sample holds.
COMMON_KEYS = ("pair_id", "category", "src_image", "trg_image", "src_image_path", "trg_image_path")
#: The keys a sample of each kind holds besides :data:`COMMON_KEYS` (others of :class:`PairSample` are optional).
KIND_KEYS: dict[str, tuple[str, ...]] = {
    "keypoints": ("src_kps", "trg_kps", "kps_valid", "threshold"),
    "flow": ("dataset", "flow", "mask", "threshold", "src_size", "trg_size"),
    "labels": ("dataset", "src_labels", "trg_labels", "num_objects"),
    "masks": ("src_mask", "trg_mask"),
    "points": ("src_kps",),  # own images: points to carry, no ground truth (checked last: keypoints hold it too)
}


def sample_kind(sample: Mapping[str, Any]) -> str:
    """The kind of a sample (a key of :data:`KIND_KEYS`), by the keys it holds.

    Raises:
        ValueError: It holds the keys of no kind, or lacks one of :data:`COMMON_KEYS`.
    """
    missing = [key for key in COMMON_KEYS if key not in sample]
    if missing:
        raise ValueError(f"sample {sample.get('pair_id')!r} lacks {missing}")
    for kind, keys in KIND_KEYS.items():
        if all(key in sample for key in keys):
            return kind
    raise ValueError(f"sample {sample.get('pair_id')!r} holds the keys of no kind {list(KIND_KEYS)}: {sorted(sample)}")


def sample_digest(sample: Mapping[str, Any]) -> str:
    """A digest of everything a reader returned for a pair: every key, with each tensor's shape, dtype and bytes
    (the images' pixels included) and every other value's ``repr``. An edited annotation, a replaced image or a
    changed protocol setting (a threshold) changes it; a resumed run compares it with the digest its flushed
    predictions were made from."""
    digest = hashlib.blake2b(digest_size=16)
    for key in sorted(sample):
        value = sample[key]
        digest.update(f"{key}=".encode())
        if isinstance(value, np.ndarray):
            value = torch.from_numpy(np.ascontiguousarray(value))
        if isinstance(value, torch.Tensor):
            flat = value.detach().to("cpu").contiguous().reshape(-1)
            digest.update(f"{tuple(value.shape)}:{value.dtype}:".encode())
            digest.update(flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b"")
        else:
            digest.update(repr(value).encode())
        digest.update(b"|")
    return digest.hexdigest()
