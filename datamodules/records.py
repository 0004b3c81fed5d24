"""A base for readers that parse every pair annotation up front into ``records``."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from torch.utils.data import Dataset

__all__ = ["PairRecordsDataset", "category_filter"]


def category_filter(categories: str | Sequence[str] | None) -> list[str] | None:
    """A reader's category filter: None keeps everything, a single name becomes a list, [] is an error."""
    if categories is None:
        return None
    names = [categories] if isinstance(categories, str) else list(categories)
    if not names:
        raise ValueError("categories is an empty list; pass None to keep all categories")
    return names


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

    def __len__(self) -> int:
        """Number of pairs."""
        return len(self.records)
