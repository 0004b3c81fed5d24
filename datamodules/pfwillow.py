"""PF-WILLOW reader (plain torch Dataset).

On-disk layouts (both accepted)::

    Proposal Flow release                      HPF / CATs / DenseMatching release
    <parent>/PF-dataset/          <- root      <parent>/PF-WILLOW/          <- root
        test_pairs_pf.csv                          test_pairs.csv
        car(G)/Cars_006a.png                       car(G)/Cars_006a.png
        ...                                        ...

The pairs file is the first of ``test_pairs_pf_willow.csv``, ``test_pairs_pf.csv``, ``test_pairs.csv``
found in ``root``. It has a header row and 42 columns: source path, target path, 10 source x, 10
source y, 10 target x, 10 target y (``imageA,imageB,XA1..XA10,YA1..YA10,XB1..XB10,YB1..YB10``). Image
paths such as ``PF-dataset/car(G)/Cars_006a.png`` are resolved relative to the folder ABOVE ``root``;
if that file does not exist, the first path component is dropped and the rest resolved under ``root``
(the HPF layout, whose csv still says ``PF-dataset/...``).

The category is the part of the subclass folder before ``"("``, lower-case (``car``, ``duck``,
``motorbike``, ``winebottle``); the subclass (``car(G)``, ``winebottle(woC)``, ...) is kept in the sample
as ``subclass``.

PCK threshold: ``max(x_max - x_min, y_max - y_min)`` of the tight box around the 10 TARGET keypoints,
without a ``+1``: HPF ``data/pfwillow.py`` ``get_pckthres`` (``thres == 'bbox'``:
``max(trg_kps.max(1)[0] - trg_kps.min(1)[0])``), the weakalign/NCNet convention. Peers differ (some
scale with the source keypoints or the image size); this reader follows HPF. A point is correct when
``error <= alpha * threshold`` (HPF ``torch.le``), see ``datamodules.protocols``.

Keypoints stay in ORIGINAL image pixels ``(x, y)``. The thin LightningDataModule is
:class:`PFWillowDataModule` (below).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
import torch
from jsonargparse.typing import NonNegativeInt, PositiveInt

from lightning_modules.components.samples import PairSample

from .base import PairDataModule, require_root_folder
from .pfpascal import quarter_pixels, read_image_size, resolve_pair_path, write_csv_rows, write_noise_image
from .protocols import Protocol
from .records import PairRecordsDataset, category_filter, points_outside, read_pairs_table, warn_points_outside

__all__ = [
    "LAYOUT_HINT",
    "NUM_KEYPOINTS",
    "PFWillowDataModule",
    "PFWillowDataset",
    "PFWillowRecord",
    "PF_WILLOW_CSV_NAMES",
    "SYNTHETIC_WILLOW_IMAGES",
    "SYNTHETIC_WILLOW_PAIRS",
    "WILLOW_HEADER",
    "check_pairs_file",
    "write_synthetic_pfwillow",
]

#: Pairs file names looked for in ``root``, in order.
PF_WILLOW_CSV_NAMES: tuple[str, ...] = ("test_pairs_pf_willow.csv", "test_pairs_pf.csv", "test_pairs.csv")

#: Keypoints per PF-WILLOW image.
NUM_KEYPOINTS = 10
_NUM_COLUMNS = 2 + 4 * NUM_KEYPOINTS

#: The benchmark's name in messages ("PF-WILLOW root not found: ...").
ROOT_NAME = "PF-WILLOW"
LAYOUT_HINT = (
    "expected the PF-WILLOW layout: '<root>/test_pairs_pf_willow.csv' (or 'test_pairs_pf.csv' / "
    "'test_pairs.csv') and '<root>/<subclass>/*.png' (e.g. 'car(G)/Cars_006a.png'), where <root> is the "
    "'PF-dataset' (or HPF's 'PF-WILLOW') folder"
)


@dataclass(frozen=True)
class PFWillowRecord:
    """One parsed PF-WILLOW pair (no pixels).

    Attributes:
        pair_id: ``f"{row_index:04d}-{src_stem}-{trg_stem}:{subclass}"``.
        row_index: 0-based data row of the csv (header excluded).
        category: Object category (``car``, ``duck``, ``motorbike``, ``winebottle``).
        subclass: Image folder (``car(G)``, ``winebottle(woC)``, ...).
        src_image_path: Source image path.
        trg_image_path: Target image path.
        src_kps: Source keypoints ``[10, 2]`` float32, ``(x, y)`` original pixels.
        trg_kps: Target keypoints ``[10, 2]`` float32, ``(x, y)`` original pixels.
        threshold: ``max(w, h)`` of the box around the target keypoints.
    """

    pair_id: str
    row_index: int
    category: str
    subclass: str
    src_image_path: Path
    trg_image_path: Path
    src_kps: torch.Tensor
    trg_kps: torch.Tensor
    threshold: float


def category_of_subclass(subclass: str) -> str:
    """``"winebottle(M)"`` -> ``"winebottle"``: the part before ``"("``, stripped and lower-case."""
    return subclass.split("(", 1)[0].strip().lower()


def read_pairs_csv(path: Path) -> tuple[list[str], list[tuple[int, list[str], str]]]:
    """Read a PF-WILLOW pairs csv as text (:func:`~datamodules.records.read_pairs_table`): its header and rows.

    Raises:
        ValueError: An empty file, a header or row of another column count than 42, no row, text that is not UTF-8
            or not csv.
    """
    def header_problem(header: list[str]) -> str | None:
        if len(header) == _NUM_COLUMNS:
            return None
        return (f"expected {_NUM_COLUMNS} columns (source, target, 10 source x, 10 source y, 10 target x, 10 target y), "
                f"got {len(header)}")

    return read_pairs_table(path, "PF-WILLOW", f"a header row and {_NUM_COLUMNS} columns", header_problem)


def parse_keypoint_columns(row: list[str], header: list[str], where: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The source and target keypoints (float32 ``[10, 2]``, ``(x, y)``) of a csv row.

    Raises:
        ValueError: A cell that is not a finite number (naming ``where`` and the column).
    """
    values: list[float] = []
    for column in range(2, _NUM_COLUMNS):
        text = row[column].strip()
        try:
            value = float(text)
        except ValueError:
            raise ValueError(
                f"Malformed {where}: column {column} ('{header[column]}') holds {text!r}, not a number"
            ) from None
        if not math.isfinite(value):
            raise ValueError(
                f"Malformed {where}: column {column} ('{header[column]}') holds a non-finite value {text!r}"
            )
        values.append(value)
    k = NUM_KEYPOINTS
    src_kps = torch.tensor([values[0:k], values[k : 2 * k]], dtype=torch.float32).t().contiguous()
    trg_kps = torch.tensor([values[2 * k : 3 * k], values[3 * k : 4 * k]], dtype=torch.float32).t().contiguous()
    return src_kps, trg_kps


def image_column(row: list[str], header: list[str], where: str, column: int) -> tuple[str, tuple[str, ...]]:
    """An image path of a csv row (column 0: source, 1: target) as written, and its parts.

    Raises:
        ValueError: A path without a subclass folder (naming ``where`` and the column).
    """
    relative = row[column].strip()
    parts = PurePosixPath(relative.replace("\\", "/")).parts
    if len(parts) < 2:
        raise ValueError(
            f"Malformed {where}: column {column} ('{header[column]}') holds {relative!r}; expected "
            "'<folder>/<subclass>/<name>.png' (the subclass folder names the category)"
        )
    return relative, parts


def check_pairs_file(path: str | Path) -> int:
    """:func:`datamodules.pfpascal.check_pairs_file` for PF-WILLOW: the csv parsed as :class:`PFWillowDataset`
    parses it (header, columns, keypoints, image paths), without its images; returns the number of pairs."""
    header, rows = read_pairs_csv(Path(path))
    for _, row, where in rows:
        parse_keypoint_columns(row, header, where)
        for column in (0, 1):
            image_column(row, header, where, column)
    return len(rows)


class PFWillowSample(PairSample, total=False):
    """A PF-Willow pair: :class:`~lightning_modules.components.samples.PairSample` (keypoints) and its folder.

    Attributes:
        subclass: PF-Willow's image folder (``car(G)``, ...).
    """

    subclass: str


class PFWillowDataset(PairRecordsDataset):
    """PF-WILLOW image pairs (the 900 test pairs) with keypoints in original pixels.

    The csv is parsed eagerly and every image header is read at construction (missing/corrupt files fail
    early); image pixels are decoded lazily in :meth:`__getitem__`.

    Args:
        root: The ``PF-dataset`` (or HPF's ``PF-WILLOW``) folder holding the pairs csv.
        categories: Categories (``car``...) or subclasses (``car(G)``...) to keep; ``None`` keeps all.

    Attributes:
        root: Dataset root.
        csv_path: The pairs file read.
        categories: Sorted categories present after filtering.
        subclasses: Sorted subclasses present after filtering.
        records: Parsed pairs, in csv order.

    Raises:
        FileNotFoundError: If the root, the csv or an image is missing.
        ValueError: If a category is unknown or the csv is malformed (the message names the file and row).
    """

    #: The keys its samples hold (the contract ``tests/test_sample_contract.py`` checks).
    sample_type = PFWillowSample

    def __init__(self, root: str | Path, categories: Sequence[str] | None = None) -> None:
        super().__init__()
        self.root = Path(root).expanduser()
        categories = category_filter(categories)
        require_root_folder(self.root, ROOT_NAME, LAYOUT_HINT)
        csv_path = next((self.root / n for n in PF_WILLOW_CSV_NAMES if (self.root / n).is_file()), None)
        if csv_path is None:
            raise FileNotFoundError(
                f"PF-WILLOW pairs file not found in {self.root}: looked for {list(PF_WILLOW_CSV_NAMES)}; {LAYOUT_HINT}"
            )
        self.csv_path: Path = csv_path
        self._sizes: dict[Path, tuple[int, int]] = {}
        records = self._parse_csv()
        if categories is not None:
            names = {r.category for r in records} | {r.subclass for r in records}
            unknown = sorted({c for c in categories if c not in names})
            if unknown:
                raise ValueError(
                    f"Unknown PF-WILLOW categories {unknown} in {self.csv_path.name}; available: "
                    f"{sorted({r.category for r in records})} or subclasses {sorted({r.subclass for r in records})}"
                )
            wanted = set(categories)
            records = [r for r in records if r.category in wanted or r.subclass in wanted]
        self.records: list[PFWillowRecord] = records
        self.categories: list[str] = sorted({r.category for r in records})
        warn_points_outside("PF-WILLOW", [
            (r.pair_id, points_outside(r.src_kps, self._sizes[r.src_image_path])
             + points_outside(r.trg_kps, self._sizes[r.trg_image_path])) for r in records
        ])  # fmt: skip
        self.subclasses: list[str] = sorted({r.subclass for r in records})

    def _parse_csv(self) -> list[PFWillowRecord]:
        header, rows = read_pairs_csv(self.csv_path)
        return [self._parse_row(row_index, row, header, where) for row_index, row, where in rows]

    def _parse_row(self, row_index: int, row: list[str], header: list[str], where: str) -> PFWillowRecord:
        src_kps, trg_kps = parse_keypoint_columns(row, header, where)
        context = where.removeprefix("PF-WILLOW pairs file ")
        paths = []
        for column in (0, 1):
            relative, parts = image_column(row, header, where, column)
            image_path, tried = resolve_pair_path(self.root, relative)
            if not image_path.is_file():
                raise FileNotFoundError(
                    f"PF-WILLOW image file not found: {relative} ({context}; tried {[str(t) for t in tried]})"
                )
            read_image_size(image_path, self._sizes, context)
            paths.append((image_path, parts[-2]))
        (src_path, subclass), (trg_path, _) = paths
        category = category_of_subclass(subclass)
        if not category:
            raise ValueError(f"Malformed {where}: cannot read a category from the folder {subclass!r}")

        x_min, y_min = trg_kps.min(0).values.tolist()
        x_max, y_max = trg_kps.max(0).values.tolist()
        threshold = float(max(x_max - x_min, y_max - y_min))
        if not threshold > 0:
            raise ValueError(
                f"Malformed {where}: the target keypoints all coincide (the PCK threshold must be positive)"
            )

        return PFWillowRecord(
            pair_id=f"{row_index:04d}-{src_path.stem}-{trg_path.stem}:{subclass}",
            row_index=row_index,
            category=category,
            subclass=subclass,
            src_image_path=src_path,
            trg_image_path=trg_path,
            src_kps=src_kps,
            trg_kps=trg_kps,
            threshold=threshold,
        )

    def __getitem__(self, index: int) -> dict[str, Any]:
        """Load one pair.

        Returns:
            A dict with ``pair_id``, ``category``, ``subclass``, ``src_image`` / ``trg_image`` (uint8
            ``[3, H, W]`` RGB), ``src_image_path`` / ``trg_image_path`` (str), ``src_kps`` / ``trg_kps``
            (float32 ``[10, 2]`` original pixels ``(x, y)``), ``kps_valid`` (bool ``[10]``) and
            ``threshold`` (float, pixels).

        Raises:
            FileNotFoundError: If an image file is missing.
            ValueError: If an image file cannot be decoded.
        """
        record = self.records[index]
        return {
            **self.load_pair(record),
            "subclass": record.subclass,
        }

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(root={str(self.root)!r}, csv={self.csv_path.name!r}, pairs={len(self)}, "
            f"categories={len(self.categories)})"
        )


#: How this benchmark is scored (its DataModule's ``protocol``; :func:`datamodules.protocols.get_protocol`).
PROTOCOL = Protocol(
    # HPF (data/pfwillow.py, thres='bbox'): max side of the box around the TARGET keypoints, and
    # `torch.le` (inclusive) in its correct_kps, as weakalign and DenseMatching (`epe.le`); HPF
    # reports the mean over pairs (per_image).
    name="PF-Willow",
    key="pfwillow",
    alphas=(0.05, 0.1, 0.15),
    threshold="max(w, h) of the box around the target keypoints",
    averages=("per_image", "per_point", "category_mean"),
    inclusive=True,
)


class PFWillowDataModule(PairDataModule):
    """PF-WILLOW (``datamodules.pfwillow.PFWillowDataset``), scored with the ``pfwillow`` protocol.

    Args:
        root: The ``PF-dataset`` (or HPF's ``PF-WILLOW``) folder holding the test pairs csv.
        categories: Categories (``car``, ``duck``, ``motorbike``, ``winebottle``) or subclasses
            (``car(G)``...) to keep (``None``: all).
        batch_size: Pairs per batch.
        num_workers: DataLoader workers.
    """

    protocol = PROTOCOL
    layout_hint = LAYOUT_HINT
    root_name = ROOT_NAME

    def __init__(
        self,
        root: str | None = None,
        categories: list[str] | None = None,
        batch_size: PositiveInt = 1,
        num_workers: NonNegativeInt = 0,
    ) -> None:
        super().__init__(root=root, batch_size=batch_size, num_workers=num_workers)
        self.category_filter = list(categories) if categories is not None else None

    def build_dataset(self, root: str) -> PFWillowDataset:
        """The PF-WILLOW test pairs with the configured filter."""
        return PFWillowDataset(root, categories=self.category_filter)


# ------------------------------------------------------------------------------------- a generated root

#: The images of :func:`write_synthetic_pfwillow`: (subclass, name) -> (W, H).
SYNTHETIC_WILLOW_IMAGES: dict[tuple[str, str], tuple[int, int]] = {
    ("car(G)", "Cars_001a"): (200, 150),
    ("car(G)", "Cars_002a"): (180, 160),
    ("winebottle(M)", "Bottle_M_001a"): (120, 190),
    ("winebottle(M)", "Bottle_M_002a"): (130, 170),
    ("duck(S)", "Duck_001a"): (170, 150),
    ("duck(S)", "Duck_002a"): (160, 124),
}
#: The pairs of :func:`write_synthetic_pfwillow`: (subclass, source, target).
SYNTHETIC_WILLOW_PAIRS: list[tuple[str, str, str]] = [
    ("car(G)", "Cars_001a", "Cars_002a"),
    ("car(G)", "Cars_002a", "Cars_001a"),
    ("winebottle(M)", "Bottle_M_001a", "Bottle_M_002a"),
    ("duck(S)", "Duck_001a", "Duck_002a"),
    ("duck(S)", "Duck_002a", "Duck_001a"),
]
#: The header row of the PF-WILLOW pairs file (source, target, then 10 each of XA, YA, XB, YB).
WILLOW_HEADER: list[str] = ["imageA", "imageB", *[f"{c}{i}" for c in ("XA", "YA", "XB", "YB") for i in range(1, 11)]]


def write_synthetic_pfwillow(
    base: Path, layout: str = "pf", csv_name: str = "test_pairs_pf.csv", seed: int = 0
) -> tuple[Path, list[dict]]:
    """Write a small PF-WILLOW root in the real on-disk layout, read by :class:`PFWillowDataset`.

    The images are :data:`SYNTHETIC_WILLOW_IMAGES` (random pixels, PNG), the csv lists
    :data:`SYNTHETIC_WILLOW_PAIRS` with 10 random keypoints per image on a quarter-pixel grid. Both layouts
    name images ``PF-dataset/<subclass>/<name>.png`` in the csv, as the real files do. The first two target
    keypoints sit near opposite image corners, so the target keypoint box is known in advance.

    Args:
        base: The folder above the root (created).
        layout: ``"pf"`` (root ``base/PF-dataset``) or ``"hpf"`` (root ``base/PF-WILLOW``).
        csv_name: The pairs file's name in the root.
        seed: Seed of the pixels and keypoints.

    Returns:
        The root and, per pair, ``{"subclass", "src", "trg", "xa", "ya", "xb", "yb"}``.
    """
    rng = np.random.default_rng(seed)
    root = base / ("PF-dataset" if layout == "pf" else "PF-WILLOW")
    for i, ((subclass, name), size) in enumerate(SYNTHETIC_WILLOW_IMAGES.items()):
        write_noise_image(root / subclass / f"{name}.png", size, seed + 10 + i)
    rows, info = [WILLOW_HEADER], []
    for subclass, src, trg in SYNTHETIC_WILLOW_PAIRS:
        (sw, sh), (tw, th) = SYNTHETIC_WILLOW_IMAGES[(subclass, src)], SYNTHETIC_WILLOW_IMAGES[(subclass, trg)]
        xa, ya = quarter_pixels(rng, 0, sw - 1, 10), quarter_pixels(rng, 0, sh - 1, 10)
        xb = [10.0, tw - 10.0, *quarter_pixels(rng, 15, tw - 15, 8)]
        yb = [10.0, th - 10.0, *quarter_pixels(rng, 15, th - 15, 8)]
        rows.append([f"PF-dataset/{subclass}/{src}.png", f"PF-dataset/{subclass}/{trg}.png",
                     *map(repr, xa), *map(repr, ya), *map(repr, xb), *map(repr, yb)])
        info.append({"subclass": subclass, "src": src, "trg": trg, "xa": xa, "ya": ya, "xb": xb, "yb": yb})
    write_csv_rows(root / csv_name, rows)
    return root, info
