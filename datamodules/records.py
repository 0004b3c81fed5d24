"""Shared by the keypoint readers: image loading, the category filter, and a base over ``records``."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

__all__ = ["PairRecordsDataset", "category_filter", "load_rgb_image", "points_outside", "warn_points_outside"]

log = logging.getLogger(__name__)


def category_filter(categories: str | Sequence[str] | None) -> list[str] | None:
    """A reader's category filter: None keeps everything, a single name becomes a list, [] is an error."""
    if categories is None:
        return None
    names = [categories] if isinstance(categories, str) else list(categories)
    if not names:
        raise ValueError("categories is an empty list; pass None to keep all categories")
    return names


def points_outside(points: torch.Tensor, size: Sequence[float]) -> int:
    """How many ``(x, y)`` points lie outside ``[0, W] x [0, H]`` of an image of ``size = (W, H)``."""
    width, height = float(size[0]), float(size[1])
    x, y = points[:, 0], points[:, 1]
    return int(((x < 0) | (y < 0) | (x > width) | (y > height)).sum())


def warn_points_outside(benchmark: str, counts: Sequence[tuple[str, int]]) -> None:
    """Every reader's rule for keypoints outside their image: they are scored as annotated (as the benchmarks'
    own code and the reference do), and the reader warns once with the count.

    Args:
        benchmark: The benchmark's name, for the message.
        counts: ``(pair or file, points outside)`` per pair.
    """
    outside = [(name, n) for name, n in counts if n]
    if outside:
        log.warning(
            "%s: %d keypoints of %d pairs lie outside their image (e.g. %s); they are scored as annotated, as "
            "the benchmark's own code does", benchmark, sum(n for _, n in outside), len(outside), outside[0][0],
        )


#: 16-bit (and 32-bit integer) grey modes: scaled to 8 bits as an image viewer shows them.
_WIDE_GREY_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")


def load_rgb_image(path: str | Path) -> torch.Tensor:
    """Load an image file as the RGB ``uint8`` pixels a viewer shows.

    - 8-bit grey, bilevel, palette, CMYK and YCbCr images convert to RGB;
    - 16-bit grey (PNG, TIFF) is scaled to 8 bits, ``round(v * 255 / 65535)`` (a plain conversion would
      clip every value above 255 to white);
    - transparency (RGBA, grey + alpha, a palette or colour key with a transparent entry) is composited over
      white, as on a page.

    Args:
        path: Image file path.

    Returns:
        A ``torch.uint8`` tensor of shape ``[3, H, W]``.

    Raises:
        FileNotFoundError: If the file does not exist.
        ValueError: If the file cannot be decoded as an image (corrupt, truncated, not an image), or holds
            pixels with no 8-bit RGB meaning (32-bit float, integers outside 0..65535, unsupported modes).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Image file not found: {path}")
    try:
        with Image.open(path) as img:
            img.load()
            array = _rgb_pixels(img, path)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise ValueError(f"Could not read image {path}: {err}") from err
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


def _rgb_pixels(img: Image.Image, path: Path) -> np.ndarray:
    """``[H, W, 3]`` uint8 RGB of a loaded PIL image (see :func:`load_rgb_image`)."""
    if img.mode in _WIDE_GREY_MODES:
        grey = np.asarray(img).astype(np.int64)
        if grey.size and (grey.min() < 0 or grey.max() > 65535):
            raise ValueError(f"{img.mode} pixels outside 0..65535 have no 8-bit meaning")
        scaled = np.floor(grey * 255 / 65535 + 0.5).astype(np.uint8)
        return np.repeat(scaled[..., None], 3, axis=2)
    if img.mode == "F":
        raise ValueError("32-bit float pixels have no fixed 8-bit meaning; save the image with 8 or 16 bits")
    if img.mode in ("RGBA", "LA", "PA", "La", "RGBa") or "transparency" in img.info:
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return np.array(Image.alpha_composite(white, rgba).convert("RGB"), dtype=np.uint8)
    return np.array(img.convert("RGB"), dtype=np.uint8)


class PairRecordsDataset(Dataset):
    """A Dataset over ``self.records``, each with ``pair_id``, ``src_image_path`` and ``trg_image_path``.

    Subclasses fill ``records`` (and ``categories``) in ``__init__`` and implement ``__getitem__``.
    """

    records: list[Any]

    @property
    def pair_ids(self) -> list[str]:
        """Pair ids in dataset order."""
        return [r.pair_id for r in self.records]

    @property
    def image_paths(self) -> list[Path]:
        """Sorted unique image paths used by the selected pairs (one feature pass each)."""
        return sorted({p for r in self.records for p in (r.src_image_path, r.trg_image_path)})

    def pair_images(self) -> list[tuple[str, str, str]]:
        """``(category, source image path, target image path)`` per pair, in dataset order (no decoding).

        Used to order the evaluation so that pairs sharing an image run together
        (``datamodules.samplers.image_grouped_order``).
        """
        return [(r.category, str(r.src_image_path), str(r.trg_image_path)) for r in self.records]

    def __len__(self) -> int:
        """Number of pairs."""
        return len(self.records)

    def load_pair(self, record: Any) -> dict[str, Any]:
        """The sample keys every keypoint reader shares, images decoded: ``pair_id``, ``category``,
        ``src_image`` / ``trg_image``, their paths, ``src_kps`` / ``trg_kps`` (all valid) and ``threshold``."""
        return {
            "pair_id": record.pair_id,
            "category": record.category,
            "src_image": load_rgb_image(record.src_image_path),
            "trg_image": load_rgb_image(record.trg_image_path),
            "src_image_path": str(record.src_image_path),
            "trg_image_path": str(record.trg_image_path),
            "src_kps": record.src_kps.clone(),
            "trg_kps": record.trg_kps.clone(),
            "kps_valid": torch.ones(record.src_kps.shape[0], dtype=torch.bool),
            "threshold": record.threshold,
        }
