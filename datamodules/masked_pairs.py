"""Image pairs with instance masks, listed in a JSON file: the inputs of instance swapping.

    [
      {"source": "a.jpg", "source_mask": "a.png", "target": "b.jpg", "target_mask": "b.png", "category": "dog"},
      ...
    ]

Paths are relative to the JSON file's folder (or absolute); a mask is any image whose nonzero pixels mark the
instance, at its image's size. ``pair_id`` is optional (default: ``<source stem>-<target stem>:<category>``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from jsonargparse.typing import NonNegativeInt, PositiveInt
from PIL import Image
from torch.utils.data import Dataset

from lightning_modules.components.image_prep import load_rgb_image

from .base import PairDataModule

__all__ = [
    "MASKED_PAIRS_HINT",
    "MaskedPairsDataModule",
    "MaskedPairsDataset",
    "write_synthetic_masked_pairs",
]

MASKED_PAIRS_HINT = (
    "expected a JSON list of {source, source_mask, target, target_mask, category} (paths relative to the file), "
    "or a folder holding it as pairs.json"
)
_KEYS = ("source", "source_mask", "target", "target_mask")


def _pairs_file(path: str | Path) -> Path:
    path = Path(path)
    if path.is_dir():
        path = path / "pairs.json"
    if not path.is_file():
        raise FileNotFoundError(f"masked pairs file not found: {path}; {MASKED_PAIRS_HINT}")
    return path


def _read_entries(path: Path) -> list[dict[str, Any]]:
    try:
        entries = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err}); {MASKED_PAIRS_HINT}") from err
    if not isinstance(entries, list) or not entries:
        raise ValueError(f"{path}: expected a non-empty JSON list; {MASKED_PAIRS_HINT}")
    checked = []
    for index, entry in enumerate(entries):
        missing = [k for k in (*_KEYS, "category") if not isinstance(entry, dict) or k not in entry]
        if missing:
            raise ValueError(f"{path}: entry {index} lacks {missing}; {MASKED_PAIRS_HINT}")
        resolved = {k: (path.parent / entry[k]).resolve() for k in _KEYS}
        for key, file in resolved.items():
            if not file.is_file():
                raise FileNotFoundError(f"{path}: entry {index} {key!r}: no such file {file}")
        pair_id = entry.get("pair_id") or f"{resolved['source'].stem}-{resolved['target'].stem}:{entry['category']}"
        checked.append({**{k: str(v) for k, v in resolved.items()}, "category": str(entry["category"]),
                        "pair_id": str(pair_id)})
    return checked


def _image(path: str) -> torch.Tensor:
    return load_rgb_image(path)


def _mask(path: str, size: tuple[int, int], image_path: str) -> torch.Tensor:
    with Image.open(path) as image:
        mask = np.asarray(image.convert("L")) > 0
    if mask.shape != size:
        raise ValueError(f"mask {path} is {mask.shape[1]}x{mask.shape[0]}, its image {image_path} is "
                         f"{size[1]}x{size[0]}")
    return torch.from_numpy(mask)


class MaskedPairsDataset(Dataset):
    """Pairs of images with instance masks (see the module docstring for the file format).

    Items: ``pair_id``, ``category``, ``src_image`` / ``trg_image`` (uint8 ``[3, H, W]``), ``src_mask`` /
    ``trg_mask`` (bool ``[H, W]``), ``src_image_path`` / ``trg_image_path``. Entries are checked when the
    dataset is built (a missing key or file is named); images are read lazily.

    Args:
        path: The JSON file, or a folder holding it as ``pairs.json``.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = _pairs_file(path)
        self.entries = _read_entries(self.path)
        ids = [e["pair_id"] for e in self.entries]
        if len(set(ids)) != len(ids):
            raise ValueError(f"{self.path}: pair ids are not unique; give each entry its own 'pair_id'")
        self.categories = sorted({e["category"] for e in self.entries})

    @property
    def pair_ids(self) -> list[str]:
        """The pair ids, in file order."""
        return [e["pair_id"] for e in self.entries]

    def pair_images(self) -> list[tuple[str, str, str]]:
        """``(category, source image, target image)`` of every pair (the evaluation order groups by image)."""
        return [(e["category"], e["source"], e["target"]) for e in self.entries]

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, index: int) -> dict[str, Any]:
        entry = self.entries[index]
        src, trg = _image(entry["source"]), _image(entry["target"])
        return {
            "pair_id": entry["pair_id"],
            "category": entry["category"],
            "src_image": src,
            "trg_image": trg,
            "src_mask": _mask(entry["source_mask"], tuple(src.shape[-2:]), entry["source"]),
            "trg_mask": _mask(entry["target_mask"], tuple(trg.shape[-2:]), entry["target"]),
            "src_image_path": entry["source"],
            "trg_image_path": entry["target"],
        }


def _instance(rng: np.random.Generator, width: int, height: int) -> tuple[np.ndarray, np.ndarray]:
    """A textured ellipse on a noisy background: ``(image [H, W, 3] uint8, mask [H, W] bool)``."""
    yy, xx = np.mgrid[0:height, 0:width]
    cx, cy = rng.uniform(0.35, 0.65) * width, rng.uniform(0.35, 0.65) * height
    rx, ry = rng.uniform(0.18, 0.3) * width, rng.uniform(0.18, 0.3) * height
    mask = ((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2 <= 1
    background = rng.integers(0, 80, (height, width, 3))
    stripes = (np.sin(xx / 3.0 + rng.uniform(0, 6)) > 0)[..., None] * rng.integers(60, 255, 3)
    image = np.where(mask[..., None], stripes + rng.integers(0, 60, 3), background)
    return image.clip(0, 255).astype(np.uint8), mask


def write_synthetic_masked_pairs(root: str | Path, num_pairs: int = 2, size: tuple[int, int] = (96, 72),
                                 category: str = "blob", seed: int = 0) -> Path:
    """Write ``num_pairs`` generated pairs (textured ellipses and their masks) and ``pairs.json`` into ``root``.

    Returns:
        The path of ``pairs.json``.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    entries = []
    for index in range(num_pairs):
        names = {}
        for side in ("source", "target"):
            image, mask = _instance(rng, *size)
            stem = f"{index:03d}_{side}"
            Image.fromarray(image).save(root / f"{stem}.png")
            Image.fromarray((mask * 255).astype(np.uint8)).save(root / f"{stem}_mask.png")
            names[side], names[f"{side}_mask"] = f"{stem}.png", f"{stem}_mask.png"
        entries.append({**names, "category": category, "pair_id": f"pair{index:03d}"})
    path = root / "pairs.json"
    path.write_text(json.dumps(entries, indent=1) + "\n", encoding="utf-8")
    return path


class MaskedPairsDataModule(PairDataModule):
    """Image pairs with instance masks from a JSON list (``datamodules.masked_pairs``): the inputs of instance
    swapping, served to ``trainer.predict``. There is no benchmark protocol.

    Args:
        root: The JSON file, or a folder holding it as ``pairs.json``.
        generate: When ``root`` holds no ``pairs.json``, write ``num_generated`` generated pairs (textured
            ellipses and their masks) into it: a smoke run without data.
        num_generated: Pairs generated.
        batch_size: Pairs per batch.
        num_workers: DataLoader workers.
    """

    layout_hint = MASKED_PAIRS_HINT

    def __init__(self, root: str | None = None, generate: bool = False, num_generated: int = 2,
                 batch_size: PositiveInt = 1, num_workers: NonNegativeInt = 0) -> None:
        super().__init__(root=root, batch_size=batch_size, num_workers=num_workers)
        self.generate, self.num_generated = bool(generate), int(num_generated)


    def build_dataset(self, root: str) -> MaskedPairsDataset:
        """The listed pairs (generated first when ``generate`` is set and none are there)."""
        path = Path(root)
        if self.generate and not (path.is_file() or (path / "pairs.json").is_file()):
            write_synthetic_masked_pairs(path, num_pairs=self.num_generated)
        return MaskedPairsDataset(path)
