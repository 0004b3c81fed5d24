"""TSS (Taniai et al., CVPR 2016) dense semantic flow benchmark reader, and Middlebury ``.flo`` I/O.

Layout of ``TSS_CVPR2016``::

    <root>/{FG3DCar,JODS,PASCAL}/<pair folder>/image1.png, image2.png, flow1.flo, flow2.flo, mask1.png, mask2.png

As in the reference evaluation (sd-dino ``utils/utils_tss.py``, from GLU-Net/DenseMatching), every folder
gives two pairs, one per direction: source ``image1`` -> target ``image2`` scored with ``flow2.flo`` and
``mask2.png`` (both on the target's pixel grid), and ``image2`` -> ``image1`` with ``flow1.flo`` and
``mask1.png``. Ground-truth flow maps a target pixel to its source pixel (``source = target + flow``).
Both images are zero-padded at the right and bottom to a common size, so that one padded square geometry
serves both; the mask is padded with zeros, so padding is never scored. A pixel is valid where its mask
value is 255 (the reference reads ``mask / 255`` as uint8). The PCK threshold is ``max(H, W)`` of the
ORIGINAL source image (the reference's ``L_pck``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from jsonargparse.typing import NonNegativeInt, PositiveInt
from PIL import Image
from torch.utils.data import Dataset

from lightning_modules.components.image_prep import load_rgb_image

from .base import PairDataModule, require_root_folder
from .protocols import Protocol

__all__ = [
    "TSSDataModule",
    "TSSDataset",
    "TSS_DATASETS",
    "TSS_LAYOUT_HINT",
    "read_flo",
    "tss_category",
    "write_flo",
    "write_synthetic_tss",
]

TSS_DATASETS = ("FG3DCar", "JODS", "PASCAL")
#: The benchmark's name in messages ("TSS root not found: ...").
ROOT_NAME = "TSS"
TSS_LAYOUT_HINT = (
    "expected the TSS layout: '<root>/{FG3DCar,JODS,PASCAL}/<pair>/' holding image1.png, image2.png, "
    "flow1.flo, flow2.flo, mask1.png and mask2.png"
)
FLO_MAGIC = 202021.25
_CATEGORY_ALIASES = {"busd": "bus", "bike": "bicycle", "plane": "aeroplane", "suv": "car"}


def read_flo(path: str | Path) -> torch.Tensor:
    """Read a Middlebury ``.flo`` file.

    Args:
        path: File path.

    Returns:
        float32 ``[2, H, W]`` flow (dx, dy).

    Raises:
        FileNotFoundError: If the file does not exist.
        ValueError: On a bad magic number, a non-positive size or a data length that does not match.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Flow file not found: {path}")
    raw = path.read_bytes()
    if len(raw) < 12:
        raise ValueError(f"Invalid .flo file {path}: {len(raw)} bytes, shorter than its 12-byte header")
    magic = np.frombuffer(raw, np.float32, count=1, offset=0)[0]
    if magic != np.float32(FLO_MAGIC):
        raise ValueError(f"Invalid .flo file {path}: magic number {magic} instead of {FLO_MAGIC}")
    width, height = (int(v) for v in np.frombuffer(raw, np.int32, count=2, offset=4))
    expected = 12 + 8 * width * height
    if width <= 0 or height <= 0 or len(raw) != expected:
        raise ValueError(
            f"Invalid .flo file {path}: header says {width}x{height} ({expected} bytes) but the file has {len(raw)}"
        )
    data = np.frombuffer(raw, np.float32, offset=12).reshape(height, width, 2)
    return torch.from_numpy(data.copy()).permute(2, 0, 1)


def write_flo(path: str | Path, flow: torch.Tensor) -> None:
    """Write a float ``[2, H, W]`` flow as a Middlebury ``.flo`` file."""
    if flow.ndim != 3 or flow.shape[0] != 2:
        raise ValueError(f"expected a [2, H, W] flow, got {tuple(flow.shape)}")
    _, height, width = flow.shape
    header = np.array([FLO_MAGIC], np.float32).tobytes() + np.array([width, height], np.int32).tobytes()
    body = flow.permute(1, 2, 0).contiguous().cpu().numpy().astype(np.float32).tobytes()
    Path(path).write_bytes(header + body)


def tss_category(dataset: str, folder: str) -> str:
    """Object category of a TSS pair folder (the reference's rule): FG3DCar is all cars, else the prefix."""
    if dataset == "FG3DCar" or "Car" in folder:
        return "car"
    prefix = folder.split("_")[0].lower()
    return _CATEGORY_ALIASES.get(prefix, prefix)


@dataclass(frozen=True)
class TSSPair:
    """One direction of a TSS folder."""

    pair_id: str
    dataset: str
    category: str
    src_image_path: Path
    trg_image_path: Path
    flow_path: Path
    mask_path: Path


def _pad_to(tensor: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Zero-pad the last two dims at the bottom and right."""
    return F.pad(tensor, (0, width - tensor.shape[-1], 0, height - tensor.shape[-2]))


class TSSDataset(Dataset):
    """TSS image pairs with dense ground-truth flow, both directions of every folder.

    Args:
        root: The ``TSS_CVPR2016`` folder.
        datasets: Sub-datasets to read (default all three).

    Attributes:
        categories: The sub-dataset names present (what results are grouped by).
    """

    def __init__(self, root: str | Path, datasets: Sequence[str] = TSS_DATASETS) -> None:
        self.root = Path(root).expanduser()
        require_root_folder(self.root, ROOT_NAME, TSS_LAYOUT_HINT)
        unknown = sorted(set(datasets) - set(TSS_DATASETS))
        if unknown:
            raise ValueError(f"unknown TSS datasets {unknown}; known: {list(TSS_DATASETS)}")
        self.pairs: list[TSSPair] = []
        for dataset in datasets:
            folder_root = self.root / dataset
            if not folder_root.is_dir():
                raise FileNotFoundError(f"TSS dataset folder not found: {folder_root}; {TSS_LAYOUT_HINT}")
            for folder in sorted(p for p in folder_root.iterdir() if p.is_dir()):
                self.pairs.extend(self._folder_pairs(dataset, folder))
        if not self.pairs:
            raise ValueError(f"no TSS pairs under {self.root}; {TSS_LAYOUT_HINT}")
        self.categories = [d for d in datasets if any(p.dataset == d for p in self.pairs)]

    @staticmethod
    def _folder_pairs(dataset: str, folder: Path) -> list[TSSPair]:
        for name in ("image1.png", "image2.png", "flow1.flo", "flow2.flo", "mask1.png", "mask2.png"):
            if not (folder / name).is_file():
                raise FileNotFoundError(f"TSS pair folder {folder} lacks {name}; {TSS_LAYOUT_HINT}")
        category = tss_category(dataset, folder.name)
        return [
            TSSPair(
                pair_id=f"{dataset}/{folder.name}/image{src}-image{trg}",
                dataset=dataset,
                category=category,
                src_image_path=folder / f"image{src}.png",
                trg_image_path=folder / f"image{trg}.png",
                flow_path=folder / f"flow{trg}.flo",
                mask_path=folder / f"mask{trg}.png",
            )
            for src, trg in ((1, 2), (2, 1))
        ]

    @property
    def pair_ids(self) -> list[str]:
        """Pair ids in dataset order (``<dataset>/<folder>/image<src>-image<trg>``)."""
        return [p.pair_id for p in self.pairs]

    def pair_images(self) -> list[tuple[str, str, str]]:
        """``(sub-dataset, source image path, target image path)`` per pair, in dataset order (no decoding).

        Both directions of a folder share its two images (padded to the same size), so ordering by shared
        images keeps them together (``datamodules.samplers.image_grouped_order``).
        """
        return [(p.dataset, str(p.src_image_path), str(p.trg_image_path)) for p in self.pairs]

    def __len__(self) -> int:
        """Number of directed pairs (twice the number of folders)."""
        return len(self.pairs)

    def __getitem__(self, index: int) -> dict[str, Any]:
        """Load one directed pair, padded to the common size of its two images.

        Returns:
            A dict with ``pair_id``, ``dataset``, ``category`` (object class, for the prompt),
            ``src_image`` / ``trg_image`` (uint8 ``[3, H, W]``, zero-padded to one size),
            ``src_image_path`` / ``trg_image_path`` (keys that name the padded content), ``flow``
            (float32 ``[2, H, W]``), ``mask`` (bool ``[H, W]``), ``threshold`` (max side of the original
            source image) and ``src_size`` / ``trg_size`` (original (W, H)).

        Raises:
            ValueError: If the flow or mask does not have the target image's size, or a file is corrupt.
        """
        pair = self.pairs[index]
        src, trg = load_rgb_image(pair.src_image_path), load_rgb_image(pair.trg_image_path)
        flow = read_flo(pair.flow_path)
        if flow.shape[1:] != trg.shape[1:]:
            raise ValueError(
                f"{pair.flow_path} is {flow.shape[2]}x{flow.shape[1]} but the target image "
                f"{pair.trg_image_path} is {trg.shape[2]}x{trg.shape[1]}"
            )
        mask = self._mask(pair.mask_path, trg.shape[1:])
        height, width = max(src.shape[1], trg.shape[1]), max(src.shape[2], trg.shape[2])
        suffix = f"#pad{width}x{height}"
        return {
            "pair_id": pair.pair_id,
            "dataset": pair.dataset,
            "category": pair.category,
            "src_image": _pad_to(src, height, width),
            "trg_image": _pad_to(trg, height, width),
            "src_image_path": str(pair.src_image_path) + suffix,
            "trg_image_path": str(pair.trg_image_path) + suffix,
            "flow": _pad_to(flow, height, width),
            "mask": _pad_to(mask, height, width),
            "threshold": float(max(src.shape[1], src.shape[2])),
            "src_size": (int(src.shape[2]), int(src.shape[1])),
            "trg_size": (int(trg.shape[2]), int(trg.shape[1])),
        }

    @staticmethod
    def _mask(path: Path, size: torch.Size) -> torch.Tensor:
        if not path.is_file():
            raise FileNotFoundError(f"Mask file not found: {path}")
        try:
            with Image.open(path) as img:
                array = np.array(img.convert("L"))
        except OSError as err:
            raise ValueError(f"Could not read mask {path}: {err}") from err
        if array.shape != tuple(size):
            raise ValueError(
                f"mask {path} is {array.shape[1]}x{array.shape[0]} but its target image is {size[1]}x{size[0]}"
            )
        return torch.from_numpy(array == 255)


#: How this benchmark is scored (its DataModule's ``protocol``; :func:`datamodules.protocols.get_protocol`).
PROTOCOL = Protocol(
    name="TSS",
    key="tss",
    alphas=(0.05,),
    threshold="max(H, W) of the source image",
    averages=("per_image", "per_pixel", "dataset_mean"),
    metric="flow_pck",
    inclusive=True,
    group_label="per_dataset",
)


class TSSDataModule(PairDataModule):
    """TSS dense flow (``datamodules.tss.TSSDataset``): FG3DCar, JODS and PASCAL, both directions.

    Args:
        root: The ``TSS_CVPR2016`` folder.
        datasets: Sub-datasets to evaluate (default all three; results are reported per dataset).
        batch_size: Pairs per batch.
        num_workers: DataLoader workers.
    """

    protocol = PROTOCOL
    layout_hint = TSS_LAYOUT_HINT
    root_name = ROOT_NAME

    def __init__(
        self,
        root: str | None = None,
        datasets: list[str] | None = None,
        batch_size: PositiveInt = 1,
        num_workers: NonNegativeInt = 0,
    ) -> None:
        super().__init__(root=root, batch_size=batch_size, num_workers=num_workers)
        self.datasets = list(datasets) if datasets is not None else list(TSS_DATASETS)

    def build_dataset(self, root: str) -> TSSDataset:
        """All directed pairs of the selected sub-datasets."""
        return TSSDataset(root, self.datasets)


# ------------------------------------------------------------------------------------- a generated root


def write_synthetic_tss(root: Path, sizes: dict[str, list[tuple[str, tuple[int, int], tuple[int, int]]]]) -> Path:
    """Write a TSS_CVPR2016 tree in the real on-disk layout, read by :class:`TSSDataset`.

    Each pair folder holds ``image{1,2}.png`` (random pixels), ``flow{1,2}.flo`` (random flows) and
    ``mask{1,2}.png`` (the centre half 255, one corner pixel 128: not valid, as in the reference, the rest 0).

    Args:
        root: The ``TSS_CVPR2016`` folder (created; the pair folders must not exist yet).
        sizes: ``{dataset: [(folder, (w1, h1), (w2, h2))]}``: the pair folders of each sub-dataset and their
            two images' sizes.

    Returns:
        ``root``.
    """
    rng = np.random.default_rng(0)
    for dataset, folders in sizes.items():
        for name, (w1, h1), (w2, h2) in folders:
            folder = root / dataset / name
            folder.mkdir(parents=True)
            for idx, (w, h) in ((1, (w1, h1)), (2, (w2, h2))):
                Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(folder / f"image{idx}.png")
                write_flo(folder / f"flow{idx}.flo", torch.from_numpy(rng.normal(0, 5, (2, h, w)).astype(np.float32)))
                mask = np.zeros((h, w), np.uint8)
                mask[h // 4 : 3 * h // 4, w // 4 : 3 * w // 4] = 255
                mask[0, 0] = 128  # not 255: not a valid pixel, as in the reference
                Image.fromarray(mask).save(folder / f"mask{idx}.png")
    return root
