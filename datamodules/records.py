"""Shared by the keypoint readers: the category filter, points outside their image, a pairs csv read as text, and a
base over ``records``.

Images load with :func:`lightning_modules.components.image_prep.load_rgb_image` (the core's, so that the
pipeline reads a user's files the way the readers read a benchmark's)."""

from __future__ import annotations

import csv
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from lightning_modules.components.image_prep import load_rgb_image

__all__ = ["PairRecordsDataset", "category_filter", "points_outside", "read_pairs_table", "warn_points_outside"]

log = logging.getLogger(__name__)


def category_filter(categories: str | Sequence[str] | None) -> list[str] | None:
    """A reader's category filter: None keeps everything, a single name becomes a list, [] is an error."""
    if categories is None:
        return None
    names = [categories] if isinstance(categories, str) else list(categories)
    if not names:
        raise ValueError("categories is an empty list; pass None to keep all categories")
    return names


def read_pairs_table(
    path: Path, benchmark: str, expected: str, header_problem: Callable[[list[str]], str | None]
) -> tuple[list[str], list[tuple[int, list[str], str]]]:
    """Read a benchmark's pairs csv as text: its header and rows, every row with the header's column count.

    Args:
        path: The csv file.
        benchmark: Its benchmark's name in messages (``"PF-PASCAL"``).
        expected: What an empty file should have held, for its message (``"a header row and 42 columns"``).
        header_problem: What is wrong with a header (its cells stripped), None when it is right.

    Returns:
        The header (stripped) and per non-blank row ``(row_index, cells, where)``, ``where`` naming the file, row
        and line for messages.

    Raises:
        ValueError: An empty file, a wrong header, a row of another column count, no row, text that is not UTF-8 or
            not csv (naming the file and, for a row, its index and line).
    """
    try:
        with open(path, newline="", encoding="utf-8-sig") as fh:
            reader = csv.reader(fh)
            header = next(reader, None)
            if header is None:
                raise ValueError(f"{benchmark} pairs file {path} is empty (expected {expected})")
            header = [h.strip() for h in header]
            problem = header_problem(header)
            if problem:
                raise ValueError(f"Malformed {benchmark} pairs file {path}, header (line 1): {problem}")
            rows = []
            for row_index, row in enumerate(reader):
                if not row or all(not cell.strip() for cell in row):
                    continue  # blank line
                where = f"{benchmark} pairs file {path}, row {row_index} (line {reader.line_num})"
                if len(row) != len(header):
                    raise ValueError(f"Malformed {where}: expected {len(header)} columns, got {len(row)}")
                rows.append((row_index, row, where))
    except UnicodeDecodeError as err:
        raise ValueError(f"Malformed {benchmark} pairs file {path}: not UTF-8 text ({err})") from err
    except csv.Error as err:
        raise ValueError(f"Malformed {benchmark} pairs file {path}: {err}") from err
    if not rows:
        raise ValueError(f"{benchmark} pairs file {path} has no pairs")
    return header, rows


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
