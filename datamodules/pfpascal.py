"""PF-PASCAL reader (plain torch Dataset).

On-disk layout (the ``PF-dataset-PASCAL`` folder of the Proposal Flow release, as used by sd-dino,
HPF, NCNet, weakalign...)::

    <parent>/PF-dataset-PASCAL/                      <- ``root``
        test_pairs_pf_pascal.csv                     (also val_pairs_pf_pascal.csv, trn_pairs_pf_pascal.csv)
        JPEGImages/<name>.jpg
        Annotations/<category>/<name>.mat            (optional: ``kps`` [K, 2] with NaN rows, ``bbox`` [x1, y1, x2, y2])

The test/val csv has a header row ``source_image,target_image,class,XA,YA,XB,YB``: ``class`` is 1..20
indexing :data:`PF_PASCAL_CATEGORIES`, ``XA``/``YA`` the source x/y and ``XB``/``YB`` the target x/y as
``';'``-separated lists. Image paths (``PF-dataset-PASCAL/JPEGImages/2009_002508.jpg``) are relative to
the folder ABOVE ``root`` (if that file does not exist, the first path component is dropped and the
rest resolved under ``root``, so a renamed root folder still works). The training csv
(``source_image,target_image,class,flip``) carries no keypoints: they are read from the two images'
``Annotations`` .mat files, keeping the keypoints visible (not NaN) in both images (as HPF does;
sd-dino's ``load_pascal_data`` reads the .mat for its train split too); its ``flip`` augmentation
column is ignored (as in sd-dino).

PCK threshold (``threshold=``):

* ``"image"`` (default, the reference/paper protocol): ``max(W, H)`` of the TARGET IMAGE. sd-dino's
  ``load_pascal_data`` returns ``thresholds=None`` and its evaluation then uses ``alpha * image size``;
  HPF's ``--thres img`` and the PF-PASCAL numbers of the paper (73.0/86.1/91.1) use the same rule.
* ``"bbox"``: ``max(x2 - x1, y2 - y1)`` of the target object box from its .mat (a missing .mat is then
  an error naming the file).

Keypoints stay in ORIGINAL image pixels ``(x, y)``. :class:`PFPascalDataset` uses plain torch/PIL/scipy
only; the thin LightningDataModule is :class:`PFPascalDataModule` (below).
"""

from __future__ import annotations

import csv
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
import torch
from jsonargparse.typing import NonNegativeInt, PositiveInt
from PIL import Image, UnidentifiedImageError

from .base import PairDataModule, require_root_folder
from .protocols import Protocol
from .records import PairRecordsDataset, category_filter, points_outside, read_pairs_table, warn_points_outside

__all__ = [
    "LAYOUT_HINT",
    "PFPascalDataModule",
    "PFPascalDataset",
    "PFPascalRecord",
    "PF_PASCAL_CATEGORIES",
    "PF_PASCAL_SPLITS",
    "SYNTHETIC_PASCAL_IMAGES",
    "SYNTHETIC_PASCAL_PAIRS",
    "check_pairs_file",
    "read_image_size",
    "resolve_pair_path",
    "write_synthetic_pfpascal",
]

#: The 20 PASCAL VOC classes; the csv ``class`` column is 1-based into this list.
PF_PASCAL_CATEGORIES: tuple[str, ...] = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train",
    "tvmonitor",
)  # fmt: skip

#: Accepted split names and the csv file each reads.
PF_PASCAL_SPLITS: dict[str, str] = {
    "test": "test_pairs_pf_pascal.csv",
    "val": "val_pairs_pf_pascal.csv",
    "trn": "trn_pairs_pf_pascal.csv",
    "train": "trn_pairs_pf_pascal.csv",
}

#: The benchmark's name in messages ("PF-PASCAL root not found: ...").
ROOT_NAME = "PF-PASCAL"
LAYOUT_HINT = (
    "expected the PF-PASCAL layout: '<root>/{test,val,trn}_pairs_pf_pascal.csv', "
    "'<root>/JPEGImages/*.jpg' and optionally '<root>/Annotations/<category>/*.mat', where <root> is the "
    "'PF-dataset-PASCAL' folder (csv image paths are relative to the folder above it)"
)

_KEYPOINT_HEADER = ("source_image", "target_image", "class", "XA", "YA", "XB", "YB")
_MAT_HEADER = ("source_image", "target_image", "class", "flip")
_THRESHOLDS = ("image", "bbox")


def read_image_size(path: Path, cache: dict[Path, tuple[int, int]] | None = None, context: str = "") -> tuple[int, int]:
    """``(W, H)`` of an image from its header (the pixels are not decoded), cached per path.

    Args:
        path: Image file.
        cache: Optional ``{path: (W, H)}`` cache, filled in place.
        context: Where the path came from (e.g. ``"<csv>, line 3"``), appended to error messages.

    Raises:
        FileNotFoundError: If the file does not exist.
        ValueError: If the file is not a readable image.
    """
    if cache is not None and path in cache:
        return cache[path]
    where = f" ({context})" if context else ""
    if not path.is_file():
        raise FileNotFoundError(f"Image file not found: {path}{where}")
    try:
        with Image.open(path) as img:
            size = (int(img.size[0]), int(img.size[1]))
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise ValueError(f"Could not read image {path}{where}: {err}") from err
    if size[0] <= 0 or size[1] <= 0:
        raise ValueError(f"Image {path}{where} has an empty size {size}")
    if cache is not None:
        cache[path] = size
    return size


def resolve_pair_path(root: Path, relative: str) -> tuple[Path, list[Path]]:
    """Resolve a csv image path: relative to the folder above ``root``, else (first component dropped) to ``root``.

    Returns:
        The resolved path (the first candidate that exists, else the first candidate) and the candidates tried.
    """
    parts = PurePosixPath(relative.replace("\\", "/")).parts
    candidates = [root.parent.joinpath(*parts)]
    if len(parts) > 1 and root.joinpath(*parts[1:]) != candidates[0]:
        candidates.append(root.joinpath(*parts[1:]))
    for candidate in candidates:
        if candidate.is_file():
            return candidate, candidates
    return candidates[0], candidates


@dataclass(frozen=True)
class PFPascalRecord:
    """One parsed PF-PASCAL pair (no pixels).

    Attributes:
        pair_id: ``f"{row_index:04d}-{src_stem}-{trg_stem}:{category}"``.
        row_index: 0-based data row of the csv (header excluded).
        category: PASCAL VOC class name.
        src_image_path: Source image path.
        trg_image_path: Target image path.
        src_kps: Source keypoints ``[N, 2]`` float32, ``(x, y)`` original pixels.
        trg_kps: Target keypoints ``[N, 2]`` float32, ``(x, y)`` original pixels.
        src_size: Source image ``(W, H)``.
        trg_size: Target image ``(W, H)``.
        threshold: PCK threshold in pixels (see the module docstring).
        src_bbox: Source object box ``[x1, y1, x2, y2]`` float32 from its .mat, or None.
        trg_bbox: Target object box ``[x1, y1, x2, y2]`` float32 from its .mat, or None.
    """

    pair_id: str
    row_index: int
    category: str
    src_image_path: Path
    trg_image_path: Path
    src_kps: torch.Tensor
    trg_kps: torch.Tensor
    src_size: tuple[int, int]
    trg_size: tuple[int, int]
    threshold: float
    src_bbox: torch.Tensor | None = None
    trg_bbox: torch.Tensor | None = None


@dataclass(frozen=True)
class _MatAnnotation:
    kps: np.ndarray  # [K, 2] float64, NaN rows = not visible
    bbox: torch.Tensor  # [4] float32


def parse_float_list(text: str, where: str, column: str) -> list[float]:
    """Parse a ``';'``-separated list of finite floats (a trailing ``';'`` is tolerated).

    Raises:
        ValueError: Naming ``where`` and ``column`` if the list is empty or holds a non-number.
    """
    stripped = text.strip()
    if stripped.endswith(";"):
        stripped = stripped[:-1]
    if not stripped:
        raise ValueError(f"{where}: column '{column}' is empty (no keypoints)")
    values = []
    for token in stripped.split(";"):
        try:
            value = float(token)
        except ValueError:
            raise ValueError(f"{where}: column '{column}' holds {token.strip()!r}, not a number") from None
        if not math.isfinite(value):
            raise ValueError(f"{where}: column '{column}' holds a non-finite value {token.strip()!r}")
        values.append(value)
    return values


def read_pairs_csv(path: Path) -> tuple[list[str], bool, list[tuple[int, list[str], str]]]:
    """Read a PF-PASCAL pairs csv as text (:func:`~datamodules.records.read_pairs_table`): its header, whether the
    keypoints come from the .mat annotations (a training csv without keypoint columns), and its rows.

    Raises:
        ValueError: An empty file, a header of neither 7 nor 3-4 columns, a row of another count than its header,
            no row, text that is not UTF-8 or not csv.
    """
    def header_problem(header: list[str]) -> str | None:
        if len(header) in (len(_KEYPOINT_HEADER), 3, 4):
            return None
        return (f"expected {len(_KEYPOINT_HEADER)} columns ({','.join(_KEYPOINT_HEADER)}) or 4 ({','.join(_MAT_HEADER)}, "
                f"keypoints from Annotations/*.mat), got {len(header)}: {header}")

    header, rows = read_pairs_table(path, "PF-PASCAL", f"a header row {','.join(_KEYPOINT_HEADER)}", header_problem)
    return header, len(header) != len(_KEYPOINT_HEADER), rows  # a training csv: keypoints from the .mat files


def parse_pair_columns(row: list[str], header: list[str], where: str) -> tuple[str, str, str]:
    """The source and target image paths (as written) and the category of a csv row.

    Raises:
        ValueError: An empty image path, or a ``class`` that is not an integer in 1..20 (naming ``where``).
    """
    src_rel, trg_rel, class_text = row[0].strip(), row[1].strip(), row[2].strip()
    for column, value in ((header[0], src_rel), (header[1], trg_rel)):
        if not value:
            raise ValueError(f"Malformed {where}: column '{column}' (image path) is empty")
    try:
        class_id = int(float(class_text))
        if float(class_text) != class_id:
            raise ValueError
    except (ValueError, OverflowError):
        raise ValueError(f"Malformed {where}: column '{header[2]}' holds {class_text!r}, not an integer") from None
    if not 1 <= class_id <= len(PF_PASCAL_CATEGORIES):
        raise ValueError(f"Malformed {where}: class {class_id} is out of range 1..{len(PF_PASCAL_CATEGORIES)}")
    return src_rel, trg_rel, PF_PASCAL_CATEGORIES[class_id - 1]


def parse_keypoint_columns(
    row: list[str], header: list[str], where: str
) -> tuple[list[float], list[float], list[float], list[float]]:
    """The ``XA``, ``YA``, ``XB``, ``YB`` lists of a csv row with keypoint columns.

    Raises:
        ValueError: A list that is empty or holds a non-number, or lists of unequal lengths (naming ``where``).
    """
    xa, ya, xb, yb = (parse_float_list(row[i], where, header[i]) for i in range(3, 7))
    if len(xa) != len(ya):
        raise ValueError(f"Malformed {where}: '{header[3]}' has {len(xa)} values but '{header[4]}' has {len(ya)}")
    if len(xb) != len(yb):
        raise ValueError(f"Malformed {where}: '{header[5]}' has {len(xb)} values but '{header[6]}' has {len(yb)}")
    if len(xa) != len(xb):
        raise ValueError(f"Malformed {where}: the source has {len(xa)} keypoints but the target has {len(xb)}")
    return xa, ya, xb, yb


def check_pairs_file(path: str | Path) -> int:
    """Check a PF-PASCAL pairs csv as :class:`PFPascalDataset` parses it, without its images: the header, every
    row's column count, class and keypoint lists (``scripts/reproduce.py`` checks a downloaded csv so before it
    installs it).

    Returns:
        The number of pairs.

    Raises:
        ValueError: The reader's message for the first problem (an HTML page, a file cut short and a csv of
            another format all fail here).
    """
    header, from_mat, rows = read_pairs_csv(Path(path))
    for _, row, where in rows:
        parse_pair_columns(row, header, where)
        if not from_mat:
            parse_keypoint_columns(row, header, where)
    return len(rows)


def _read_mat(path: Path, where: str) -> _MatAnnotation:
    """Read a PF-PASCAL annotation .mat (``kps`` [K, 2], ``bbox`` [x1, y1, x2, y2])."""
    from scipy.io import loadmat  # scipy is a dependency; imported lazily to keep `import datamodules` light

    try:
        contents = loadmat(str(path))
    except Exception as err:  # scipy raises ValueError/MatReadError/OSError/... on corrupt files
        raise ValueError(f"Could not read PF-PASCAL annotation {path} ({where}): {err}") from err
    for key in ("kps", "bbox"):
        if key not in contents:
            raise ValueError(f"Malformed PF-PASCAL annotation {path} ({where}): missing variable '{key}'")
    try:
        kps = np.asarray(contents["kps"], dtype=np.float64)
        bbox = np.asarray(contents["bbox"], dtype=np.float64).reshape(-1)
    except (TypeError, ValueError) as err:
        raise ValueError(f"Malformed PF-PASCAL annotation {path} ({where}): non-numeric 'kps'/'bbox' ({err})") from err
    if kps.size == 0:
        kps = kps.reshape(0, 2)
    if kps.ndim != 2 or kps.shape[1] != 2:
        raise ValueError(
            f"Malformed PF-PASCAL annotation {path} ({where}): 'kps' must be [K, 2], got {tuple(kps.shape)}"
        )
    if bbox.shape != (4,) or not np.isfinite(bbox).all():
        raise ValueError(
            f"Malformed PF-PASCAL annotation {path} ({where}): 'bbox' must be 4 finite numbers "
            f"[x1, y1, x2, y2], got {bbox.tolist()}"
        )
    return _MatAnnotation(kps=kps, bbox=torch.tensor(bbox, dtype=torch.float32))


class PFPascalDataset(PairRecordsDataset):
    """PF-PASCAL image pairs with keypoints in original pixels.

    The csv (and, when present, the .mat annotations) are parsed eagerly and every image header is read
    at construction (so missing/corrupt files fail early and the image-size threshold is known); image
    pixels are decoded lazily in :meth:`__getitem__`.

    Args:
        root: The ``PF-dataset-PASCAL`` folder holding the ``*_pairs_pf_pascal.csv`` files.
        split: ``"test"``, ``"val"`` or ``"trn"`` (alias ``"train"``).
        categories: PASCAL class names to keep; ``None`` keeps all classes present in the split.
        threshold: ``"image"`` (max side of the target image: the reference protocol) or ``"bbox"``
            (max side of the target object box from its .mat).

    Attributes:
        root: Dataset root.
        split: Canonical split name.
        csv_path: The pairs file read.
        threshold_mode: ``"image"`` or ``"bbox"``.
        categories: Sorted class names present after filtering.
        records: Parsed pairs, in csv order.

    Raises:
        FileNotFoundError: If the root, the csv, an image or (``threshold="bbox"`` or a csv without
            keypoints) an annotation .mat is missing.
        ValueError: If an argument is invalid or a file is malformed (the message names the file and,
            for the csv, the row).
    """

    def __init__(
        self,
        root: str | Path,
        split: str = "test",
        categories: Sequence[str] | None = None,
        threshold: str = "image",
    ) -> None:
        super().__init__()
        self.root = Path(root).expanduser()
        if split not in PF_PASCAL_SPLITS:
            raise ValueError(f"Unknown PF-PASCAL split {split!r}; expected one of {sorted(PF_PASCAL_SPLITS)}")
        self.split = "trn" if split == "train" else split
        if threshold not in _THRESHOLDS:
            raise ValueError(f"Unknown PF-PASCAL threshold {threshold!r}; expected one of {list(_THRESHOLDS)}")
        self.threshold_mode = threshold
        categories = category_filter(categories)
        if categories is not None:
            unknown = sorted({c for c in categories if c not in PF_PASCAL_CATEGORIES})
            if unknown:
                raise ValueError(f"Unknown PF-PASCAL categories {unknown}; known: {list(PF_PASCAL_CATEGORIES)}")

        require_root_folder(self.root, ROOT_NAME, LAYOUT_HINT)
        self.csv_path = self.root / PF_PASCAL_SPLITS[self.split]
        if not self.csv_path.is_file():
            present = sorted(p.name for p in self.root.glob("*_pairs_pf_pascal.csv"))
            raise FileNotFoundError(
                f"PF-PASCAL pairs file not found: {self.csv_path}; expected one of "
                f"{sorted(set(PF_PASCAL_SPLITS.values()))} in {self.root} (found: {present or 'none'}); {LAYOUT_HINT}"
            )

        self._sizes: dict[Path, tuple[int, int]] = {}
        self._mats: dict[Path, _MatAnnotation | None] = {}
        records = self._parse_csv()
        available = sorted({r.category for r in records})
        if categories is not None:
            missing = sorted({c for c in categories if c not in available})
            if missing:
                raise ValueError(
                    f"PF-PASCAL categories {missing} have no pairs in {self.csv_path.name}; available: {available}"
                )
            records = [r for r in records if r.category in set(categories)]
        self.records: list[PFPascalRecord] = records
        self.categories: list[str] = sorted({r.category for r in records})
        warn_points_outside("PF-PASCAL", [
            (r.pair_id, points_outside(r.src_kps, r.src_size) + points_outside(r.trg_kps, r.trg_size)) for r in records
        ])  # fmt: skip

    # ------------------------------------------------------------------------------------ parsing

    def _parse_csv(self) -> list[PFPascalRecord]:
        header, from_mat, rows = read_pairs_csv(self.csv_path)
        return [self._parse_row(row_index, row, header, where, from_mat) for row_index, row, where in rows]

    def _parse_row(
        self, row_index: int, row: list[str], header: list[str], where: str, from_mat: bool
    ) -> PFPascalRecord:
        src_rel, trg_rel, category = parse_pair_columns(row, header, where)

        src_path, src_tried = resolve_pair_path(self.root, src_rel)
        trg_path, trg_tried = resolve_pair_path(self.root, trg_rel)
        context = where.removeprefix("PF-PASCAL pairs file ")
        for image_path, tried in ((src_path, src_tried), (trg_path, trg_tried)):
            if not image_path.is_file():
                raise FileNotFoundError(
                    f"PF-PASCAL image file not found: {image_path} ({context}; tried {[str(t) for t in tried]})"
                )
        src_size = read_image_size(src_path, self._sizes, context)
        trg_size = read_image_size(trg_path, self._sizes, context)

        src_mat = self._annotation(category, src_path, from_mat, context)
        trg_mat = self._annotation(category, trg_path, from_mat or self.threshold_mode == "bbox", context)

        if from_mat:
            assert src_mat is not None and trg_mat is not None
            if src_mat.kps.shape[0] != trg_mat.kps.shape[0]:
                raise ValueError(
                    f"Malformed {where}: annotation {self._mat_path(category, src_path)} has "
                    f"{src_mat.kps.shape[0]} keypoints but {self._mat_path(category, trg_path)} has "
                    f"{trg_mat.kps.shape[0]}"
                )
            both = np.isfinite(src_mat.kps).all(1) & np.isfinite(trg_mat.kps).all(1)
            src_kps = torch.tensor(src_mat.kps[both], dtype=torch.float32).reshape(-1, 2)
            trg_kps = torch.tensor(trg_mat.kps[both], dtype=torch.float32).reshape(-1, 2)
        else:
            xa, ya, xb, yb = parse_keypoint_columns(row, header, where)
            src_kps = torch.tensor(list(zip(xa, ya)), dtype=torch.float32).reshape(-1, 2)
            trg_kps = torch.tensor(list(zip(xb, yb)), dtype=torch.float32).reshape(-1, 2)

        if self.threshold_mode == "image":
            threshold = float(max(trg_size))
        else:
            assert trg_mat is not None
            x1, y1, x2, y2 = trg_mat.bbox.tolist()
            threshold = float(max(x2 - x1, y2 - y1))
            if not threshold > 0:
                raise ValueError(
                    f"Malformed PF-PASCAL annotation {self._mat_path(category, trg_path)} ({context}): "
                    f"'bbox' {trg_mat.bbox.tolist()} is empty (the PCK threshold must be positive)"
                )

        return PFPascalRecord(
            pair_id=f"{row_index:04d}-{src_path.stem}-{trg_path.stem}:{category}",
            row_index=row_index,
            category=category,
            src_image_path=src_path,
            trg_image_path=trg_path,
            src_kps=src_kps,
            trg_kps=trg_kps,
            src_size=src_size,
            trg_size=trg_size,
            threshold=threshold,
            src_bbox=None if src_mat is None else src_mat.bbox,
            trg_bbox=None if trg_mat is None else trg_mat.bbox,
        )

    def _mat_path(self, category: str, image_path: Path) -> Path:
        return self.root / "Annotations" / category / f"{image_path.stem}.mat"

    def _annotation(self, category: str, image_path: Path, required: bool, context: str) -> _MatAnnotation | None:
        path = self._mat_path(category, image_path)
        if path not in self._mats:
            if path.is_file():
                self._mats[path] = _read_mat(path, context)
            else:
                self._mats[path] = None
        mat = self._mats[path]
        if mat is None and required:
            reason = (
                "threshold='bbox' reads the target box from it"
                if self.threshold_mode == "bbox"
                else f"{self.csv_path.name} has no keypoint columns, so keypoints come from the .mat files"
            )
            raise FileNotFoundError(f"PF-PASCAL annotation file not found: {path} ({context}; {reason})")
        return mat

    # ------------------------------------------------------------------------------------ access

    def __getitem__(self, index: int) -> dict[str, Any]:
        """Load one pair.

        Returns:
            A dict with ``pair_id``, ``category``, ``src_image`` / ``trg_image`` (uint8 ``[3, H, W]``
            RGB), ``src_image_path`` / ``trg_image_path`` (str), ``src_kps`` / ``trg_kps`` (float32
            ``[N, 2]`` original pixels ``(x, y)``), ``kps_valid`` (bool ``[N]``), ``threshold`` (float,
            pixels) and, when the .mat annotations exist, ``src_instance_box`` / ``trg_instance_box`` (the object's box,
            float32 ``[4]``).

        Raises:
            FileNotFoundError: If an image file is missing.
            ValueError: If an image file cannot be decoded.
        """
        record = self.records[index]
        sample: dict[str, Any] = self.load_pair(record)
        if record.src_bbox is not None:
            sample["src_instance_box"] = record.src_bbox.clone()
        if record.trg_bbox is not None:
            sample["trg_instance_box"] = record.trg_bbox.clone()
        return sample

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(root={str(self.root)!r}, split={self.split!r}, threshold={self.threshold_mode!r}, "
            f"pairs={len(self)}, categories={len(self.categories)})"
        )


#: How this benchmark is scored (its DataModule's ``protocol``; :func:`datamodules.protocols.get_protocol`).
PROTOCOL = Protocol(
    # sd-dino load_pascal_data: thresholds None -> alpha * image size; `err < threshold` (strict).
    name="PF-Pascal",
    key="pfpascal",
    alphas=(0.05, 0.1, 0.15),
    threshold="max(w, h) of the target image",
    averages=("weighted", "category_mean", "per_point", "per_image"),
)


class PFPascalDataModule(PairDataModule):
    """PF-PASCAL (``datamodules.pfpascal.PFPascalDataset``), scored with the ``pfpascal`` protocol.

    Args:
        root: The ``PF-dataset-PASCAL`` folder (``*_pairs_pf_pascal.csv``, ``JPEGImages/``, ``Annotations/``).
        test_split: Split evaluated (``test``, ``val`` or ``trn``).
        categories: PASCAL classes to keep (``None``: all).
        threshold: ``"image"`` (max side of the target image: the reference protocol) or ``"bbox"``
            (max side of the target object box from ``Annotations/<cat>/<name>.mat``).
        batch_size: Pairs per batch.
        num_workers: DataLoader workers.
    """

    protocol = PROTOCOL
    layout_hint = LAYOUT_HINT
    root_name = ROOT_NAME

    def __init__(
        self,
        root: str | None = None,
        test_split: str = "test",
        categories: list[str] | None = None,
        threshold: str = "image",
        batch_size: PositiveInt = 1,
        num_workers: NonNegativeInt = 0,
    ) -> None:
        super().__init__(root=root, batch_size=batch_size, num_workers=num_workers)
        self.test_split = test_split
        self.category_filter = list(categories) if categories is not None else None
        self.threshold = threshold

    def build_dataset(self, root: str) -> PFPascalDataset:
        """The PF-PASCAL split with the configured filter and threshold rule."""
        return PFPascalDataset(root, split=self.test_split, categories=self.category_filter, threshold=self.threshold)


# ------------------------------------------------------------------------------------- a generated root

#: The images of :func:`write_synthetic_pfpascal`: name -> (category, (W, H)); images of one class share its
#: ``Annotations`` folder.
SYNTHETIC_PASCAL_IMAGES: dict[str, tuple[str, tuple[int, int]]] = {
    "2008_000101": ("cat", (160, 120)),
    "2008_000202": ("cat", (112, 150)),
    "2009_000303": ("dog", (140, 100)),
    "2009_000404": ("dog", (128, 176)),
    "2010_000505": ("aeroplane", (180, 96)),
    "2010_000606": ("aeroplane", (100, 132)),
}
#: The pairs of :func:`write_synthetic_pfpascal`: (source, target, number of keypoints).
SYNTHETIC_PASCAL_PAIRS: list[tuple[str, str, int]] = [
    ("2008_000101", "2008_000202", 4),
    ("2008_000202", "2008_000101", 3),
    ("2009_000303", "2009_000404", 5),
    ("2009_000404", "2009_000303", 4),
    ("2010_000505", "2010_000606", 3),
]


def write_noise_image(path: Path, size: tuple[int, int], seed: int) -> None:
    """Write an image of uniform random pixels (the format follows the suffix: JPEG, PNG).

    Args:
        path: The file (its folder is created).
        size: ``(W, H)``.
        seed: Seed of the pixels.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)


def quarter_pixels(rng: np.random.Generator, low: float, high: float, n: int) -> list[float]:
    """``n`` random multiples of 0.25 (exact in float32) in ``[low, high]``.

    Args:
        rng: The random generator (advanced by one draw of ``n`` integers).
        low: Smallest value.
        high: Largest value.
        n: How many.

    Returns:
        The values, as Python floats.
    """
    return [float(v) / 4 for v in rng.integers(int(low * 4), int(high * 4) + 1, n)]


def write_csv_rows(path: Path, rows: list[list[str]]) -> None:
    """Write ``rows`` as a csv file (its folder is created), as the PF pair lists are written."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as fh:
        csv.writer(fh).writerows(rows)


def write_synthetic_pfpascal(base: Path, with_mat: bool = True, seed: int = 0) -> tuple[Path, dict]:
    """Write a small PF-PASCAL root in the real on-disk layout, read by :class:`PFPascalDataset`.

    The images are :data:`SYNTHETIC_PASCAL_IMAGES` (random pixels, JPEG), the test csv lists
    :data:`SYNTHETIC_PASCAL_PAIRS` with random keypoints on a quarter-pixel grid, and each image gets an
    ``Annotations/<category>/<name>.mat`` (``kps`` with one NaN row, ``bbox``, ``class``).

    Args:
        base: The folder above the root (created).
        with_mat: Write the ``Annotations`` .mat files.
        seed: Seed of the pixels, keypoints and boxes.

    Returns:
        The root (``base/PF-dataset-PASCAL``) and what was written: ``{"mat": {name: (kps, bbox)}, "rows":
        [{"src", "trg", "category", "xa", "ya", "xb", "yb"}]}``.
    """
    from scipy.io import savemat  # scipy is a dependency; imported lazily as the reader does

    rng = np.random.default_rng(seed)
    root = base / "PF-dataset-PASCAL"
    info: dict = {"mat": {}, "rows": []}
    for i, (name, (category, size)) in enumerate(SYNTHETIC_PASCAL_IMAGES.items()):
        write_noise_image(root / "JPEGImages" / f"{name}.jpg", size, seed + i)
        if with_mat:
            w, h = size
            kps = np.array([quarter_pixels(rng, 0, w - 1, 6), quarter_pixels(rng, 0, h - 1, 6)]).T
            kps[4] = np.nan  # a keypoint invisible in this image
            corners = [rng.integers(0, 10), rng.integers(0, 10), w - rng.integers(1, 20), h - rng.integers(1, 20)]
            bbox = np.array([corners], dtype=np.float64)
            path = root / "Annotations" / category / f"{name}.mat"
            path.parent.mkdir(parents=True, exist_ok=True)
            savemat(str(path), {"kps": kps, "bbox": bbox, "class": category})
            info["mat"][name] = (kps, bbox[0])
    rows = [list(_KEYPOINT_HEADER)]
    for src, trg, n in SYNTHETIC_PASCAL_PAIRS:
        category = SYNTHETIC_PASCAL_IMAGES[src][0]
        (sw, sh), (tw, th) = SYNTHETIC_PASCAL_IMAGES[src][1], SYNTHETIC_PASCAL_IMAGES[trg][1]
        xa, ya = quarter_pixels(rng, 0, sw - 1, n), quarter_pixels(rng, 0, sh - 1, n)
        xb, yb = quarter_pixels(rng, 0, tw - 1, n), quarter_pixels(rng, 0, th - 1, n)
        row = [f"PF-dataset-PASCAL/JPEGImages/{src}.jpg", f"PF-dataset-PASCAL/JPEGImages/{trg}.jpg",
               str(PF_PASCAL_CATEGORIES.index(category) + 1), *(";".join(map(repr, v)) for v in (xa, ya, xb, yb))]
        rows.append(row)
        info["rows"].append({"src": src, "trg": trg, "category": category, "xa": xa, "ya": ya, "xb": xb, "yb": yb})
    write_csv_rows(root / PF_PASCAL_SPLITS["test"], rows)
    return root, info
