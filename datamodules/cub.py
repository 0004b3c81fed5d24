"""CUB-200-2011 with the ASIC protocol (plain torch Dataset); its DataModule is ``CUBDataModule``.

The protocol is the one of ASIC (Gupta et al. 2023, code: ``kampta/asic``), which "A Tale of Two
Features" follows for its CUB table (supplementary Table 13; fused features: PCK@0.10/0.05/0.01 =
79.2/64.6/14.3):

- Images: ACSM/CMR's cleaned test list ``cachedir/cub/data/test_cub_cleaned.mat`` (from ACSM's
  ``cachedir.tar.gz``), NOT the official ``train_test_split.txt``. Each entry of its ``images`` struct
  array has ``rel_path`` (e.g. ``001.Black_footed_Albatross/Black_Footed_Albatross_0001_796111.jpg``),
  ``bbox`` (a struct with 1-based ``x1, y1, x2, y2``) and ``id`` (the CUB image id, whose 15 rows in
  ``parts/part_locs.txt`` are the keypoints ``x y visible``).
- One class at a time (``int(rel_path.split('.')[0])``); the benchmark uses classes 1, 2 and 3.
- Every image is cropped as ACSM does: bbox minus 1, padded by 5 % of its width/height
  (:func:`perturb_bbox`), made square with Python-2 rounding (:func:`square_bbox`), cropped with edge
  padding where the square leaves the image and resized to 256 x 256 with LANCZOS (:func:`crop_square`);
  keypoints follow: ``kps -= bbox[:2] + 1; kps *= 256 / side`` (:func:`map_keypoints`).
- Pairs: all ordered pairs ``itertools.permutations(range(N), 2)`` of the class's test images.
- Scored points: visible in both images; correct when ``error < alpha * 256`` (strict), per point.

Because ASIC scores on the 256 px crops, a sample's images ARE the crops (uint8 ``[3, 256, 256]``,
produced in :meth:`CUBASICDataset.__getitem__`) and its keypoints are crop pixels: for CUB, the
"original pixels" of the project's contract are the protocol's crop, and the PCK threshold is the crop
side (256). The image paths of a sample carry a ``#asic-crop<size>`` suffix so that feature caches keyed
by path never mix a crop with the full image.

Expected layout (``root`` is the ``CUB_200_2011`` folder)::

    <root>/images/<class folder>/<name>.jpg
    <root>/images.txt                        (optional: checked against the test list when present)
    <root>/parts/part_locs.txt               (<image id> <part id> <x> <y> <visible>, 1-based pixels)
    <root>/cachedir/cub/data/test_cub_cleaned.mat
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from decimal import ROUND_HALF_UP, Decimal
from jsonargparse.typing import NonNegativeInt, PositiveInt
from PIL import Image
from torch.utils.data import Dataset

from lightning_modules.components.image_prep import load_rgb_image
from lightning_modules.components.samples import PairSample

from .base import PairDataModule, require_root_folder
from .protocols import Protocol

__all__ = [
    "ACSM_CACHEDIR_HINT",
    "CUBASICDataset",
    "CUBDataModule",
    "CUBImageRecord",
    "CUB_NUM_PARTS",
    "DEFAULT_TEST_LIST",
    "LAYOUT_HINT",
    "asic_crop_box",
    "crop_square",
    "map_keypoints",
    "perturb_bbox",
    "python2_round",
    "read_image_list",
    "read_part_locs",
    "read_test_list",
    "square_bbox",
    "write_synthetic_cub",
]

#: Keypoints per CUB image.
CUB_NUM_PARTS = 15

#: Location of ACSM's test list relative to the ``CUB_200_2011`` root (where ASIC extracts it).
DEFAULT_TEST_LIST = Path("cachedir") / "cub" / "data" / "test_cub_cleaned.mat"

ACSM_CACHEDIR_HINT = (
    "it comes from ACSM's cachedir.tar.gz (md5 89842f8937a136bfdd7106e80f88d30f; ASIC's "
    "download_cub_metadata in kampta/asic datasets/cub.py fetches it from "
    "https://www.dropbox.com/sh/ea3yprgrcjuzse5/AACgvZyPDkR9nWpPk-LJc9ATa/cachedir.tar.gz?dl=1): "
    "extract it inside the CUB_200_2011 folder, or pass test_list=PATH"
)

#: The benchmark's name in messages ("CUB-200-2011 root not found: ...").
ROOT_NAME = "CUB-200-2011"
LAYOUT_HINT = (
    "expected the CUB_200_2011 folder: '<root>/images/<class>/*.jpg', '<root>/parts/part_locs.txt' and "
    f"ACSM's test list '<root>/{DEFAULT_TEST_LIST.as_posix()}'"
)

#: Suffix added to image paths in samples: the sample's pixels are the protocol's crop, not the file.
CROP_SUFFIX = "#asic-crop"


# ------------------------------------------------------------------------------------ crop arithmetic


def python2_round(value: float) -> int:
    """Round half away from zero, as Python 2's ``round`` (ACSM/ASIC's ``python2_round``).

    ``Decimal(value)`` is the exact binary value, so only exact ties round away from zero.
    """
    return int(Decimal(float(value)).to_integral_value(rounding=ROUND_HALF_UP))


def perturb_bbox(bbox: Sequence[float], pad_frac: float = 0.05) -> list[float]:
    """Pad a zero-based tight bbox ``[x1, y1, x2, y2]`` (inclusive corners) by ``pad_frac`` of its size.

    ASIC's ``perturb_bbox(bbox, 0.05, 0)``: the side is ``x2 - x1 + 1`` and each corner moves out by
    ``pad_frac * side`` (the jitter term is zero at test time). The result may leave the image.
    """
    x1, y1, x2, y2 = (float(c) for c in bbox)
    width = x2 - x1 + 1
    height = y2 - y1 + 1
    return [x1 - pad_frac * width, y1 - pad_frac * height, x2 + pad_frac * width, y2 + pad_frac * height]


def square_bbox(bbox: Sequence[float]) -> list[int]:
    """Grow the shorter side of a bbox to make it square (ASIC/ACSM's ``square_bbox``).

    Corners are rounded with :func:`python2_round`; the extra ``max - side`` pixels go half before
    (rounded) and the rest after; the result is ``[x1, y1, x1 + side - 1, y1 + side - 1]``.
    """
    x1, y1, x2, y2 = (python2_round(c) for c in bbox)
    width = x2 - x1 + 1
    height = y2 - y1 + 1
    side = max(width, height)
    x1 -= python2_round((side - width) / 2.0)
    y1 -= python2_round((side - height) / 2.0)
    return [x1, y1, x1 + side - 1, y1 + side - 1]


def asic_crop_box(bbox_one_based: Sequence[float], pad_frac: float = 0.05) -> list[int]:
    """The square crop box of an image from its 1-based test-list bbox: minus 1, padded, squared."""
    zero_based = [float(c) - 1 for c in bbox_one_based]
    return square_bbox(perturb_bbox(zero_based, pad_frac))


def crop_square(image: np.ndarray, box: Sequence[int], size: int) -> np.ndarray:
    """Crop ``box`` (inclusive integer corners) with edge padding outside the image, resize with LANCZOS.

    ASIC's ``cub_crop`` (``acsm_crop`` with ``border=True``, then ``PIL.Image.resize`` LANCZOS).

    Args:
        image: ``[H, W, 3]`` uint8 RGB array.
        box: Square crop box ``[x1, y1, x2, y2]`` from :func:`square_bbox`.
        size: Output side.

    Returns:
        ``[size, size, 3]`` uint8 array.

    Raises:
        ValueError: If the box is not square or does not overlap the image (nothing to pad from).
    """
    x1, y1, x2, y2 = (python2_round(c) for c in box)
    width, height = x2 - x1 + 1, y2 - y1 + 1
    if width != height or width < 1:
        raise ValueError(f"crop box {list(box)} must be a non-empty square")
    im_h, im_w = image.shape[:2]
    x_lo, x_hi = max(0, x1), min(im_w, x2 + 1)
    y_lo, y_hi = max(0, y1), min(im_h, y2 + 1)
    if x_lo >= x_hi or y_lo >= y_hi:
        raise ValueError(f"crop box {list(box)} does not overlap the {im_w}x{im_h} image")
    inner = image[y_lo:y_hi, x_lo:x_hi]
    left, top = x_lo - x1, y_lo - y1
    padded = np.pad(
        inner,
        ((top, height - top - inner.shape[0]), (left, width - left - inner.shape[1]), (0, 0)),
        mode="edge",
    )
    resized = Image.fromarray(padded).resize((size, size), Image.Resampling.LANCZOS)
    return np.asarray(resized, dtype=np.uint8)


def map_keypoints(kps: np.ndarray, box: Sequence[int], size: int) -> np.ndarray:
    """Map 1-based CUB keypoints ``[N, 2]`` (x, y) into the ``size`` px crop of ``box``.

    ASIC's ``preprocess_kps_box_crop`` in float32: ``kps -= box[:2] + 1; kps *= size / (box[2] - box[0] + 1)``
    (the ``+ 1`` turns the 1-based CUB pixel coordinates zero-based).
    """
    out = np.array(kps, dtype=np.float32)[:, :2].copy()
    side = 1 + box[2] - box[0]
    if side != 1 + box[3] - box[1]:
        raise ValueError(f"crop box {list(box)} must be square")
    out[:, 0] -= box[0] + 1
    out[:, 1] -= box[1] + 1
    out *= size / float(side)
    return out


# ------------------------------------------------------------------------------------ annotation files


@dataclass(frozen=True)
class CUBImageRecord:
    """One test image of the benchmark (no pixels).

    Attributes:
        image_id: CUB image id (1-based row block of ``part_locs.txt``).
        rel_path: Path under ``images/``.
        path: Absolute image path.
        class_index: CUB class (1..200) from the ``rel_path`` prefix.
        class_folder: Class folder, e.g. ``"001.Black_footed_Albatross"``.
        category: Readable class name, e.g. ``"Black footed Albatross"`` (also the SD prompt's category).
        bbox: Zero-based tight bbox ``[x1, y1, x2, y2]`` (test list bbox minus 1), original pixels.
        crop_box: Square crop box ``[x1, y1, x2, y2]`` (inclusive) in original pixels.
        kps: ``[15, 2]`` float32 keypoints in crop pixels.
        visible: ``[15]`` bool visibility flags.
    """

    image_id: int
    rel_path: str
    path: Path
    class_index: int
    class_folder: str
    category: str
    bbox: tuple[float, float, float, float]
    crop_box: tuple[int, int, int, int]
    kps: np.ndarray
    visible: np.ndarray


def read_part_locs(path: str | Path) -> dict[int, np.ndarray]:
    """Parse ``parts/part_locs.txt`` (``<image id> <part id> <x> <y> <visible>`` per line).

    Returns:
        ``{image id: [15, 3] float32 array of (x, y, visible)}``, rows in part id order (the same rows
        as ASIC's ``reshape((11788, 15, 5))[id - 1]`` on the real, image-major file).

    Raises:
        FileNotFoundError: If the file is missing.
        ValueError: On a malformed line (named with its number) or an out-of-range part id.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"CUB keypoint file not found: {path}; {LAYOUT_HINT}")
    parts: dict[int, np.ndarray] = {}
    parse = (int, int, float, float, float)
    rows = _table_rows(path, "CUB keypoint file", "<image id> <part id> <x> <y> <visible>", parse)
    for number, (image_id, part_id, x, y, visible) in rows:
        if not 1 <= part_id <= CUB_NUM_PARTS:
            raise ValueError(
                f"Malformed CUB keypoint file {path} line {number}: part id {part_id} is not in 1..{CUB_NUM_PARTS}"
            )
        if not (math.isfinite(x) and math.isfinite(y) and math.isfinite(visible)):
            raise ValueError(f"Malformed CUB keypoint file {path} line {number}: a non-finite number (NaN or infinity)")
        block = parts.get(image_id)
        if block is None:
            block = parts[image_id] = np.full((CUB_NUM_PARTS, 3), np.nan, dtype=np.float32)
        block[part_id - 1] = (x, y, visible)
    return parts


def read_image_list(path: str | Path) -> dict[int, str]:
    """Parse ``images.txt`` (``<image id> <relative path>`` per line) into ``{id: rel_path}``."""
    rows = _table_rows(Path(path), "CUB image list", "<image id> <relative path>", (int, str))
    return {image_id: rel_path for _, (image_id, rel_path) in rows}


def _table_rows(
    path: Path, what: str, layout: str, parse: tuple[Callable[[str], Any], ...]
) -> Iterator[tuple[int, list[Any]]]:
    """``(line number, parsed fields)`` of a whitespace-separated CUB text file, blank lines skipped.

    Raises:
        ValueError: Naming the file, the line and the expected ``layout`` when a line has the wrong number
            of fields or a field does not parse.
    """
    with open(path, encoding="utf-8") as fh:
        for number, line in enumerate(fh, 1):
            fields = line.split()
            if not fields:
                continue
            try:
                if len(fields) != len(parse):
                    raise ValueError(f"expected {len(parse)} fields, got {len(fields)}")
                values = [convert(field) for convert, field in zip(parse, fields)]
            except ValueError as err:
                raise ValueError(
                    f"Malformed {what} {path} line {number}: {line.strip()!r} (expected '{layout}'; {err})"
                ) from None
            yield number, values


def _scalar(path: Path, index: int, field: str, value: Any) -> Any:
    """The single element of a MATLAB scalar read by ``scipy.io.loadmat`` (an array of size 1)."""
    array = np.asarray(value)
    if array.size != 1:
        raise ValueError(
            f"Malformed CUB test list {path}: images({index + 1}).{field} must hold one value, "
            f"got shape {array.shape}"
        )
    return array.reshape(-1)[0]


def read_test_list(path: str | Path) -> list[tuple[int, str, tuple[float, float, float, float]]]:
    """Read ACSM's ``*_cub_cleaned.mat``: the ``images`` struct array, as ASIC reads it.

    ASIC (``load_acsm_data``) uses ``mat['images']['rel_path' | 'id' | 'bbox']`` with ``bbox`` a struct of
    1-based ``x1, y1, x2, y2``; the file has further fields (``mask``, ``parts``, ...) that are not read.

    Returns:
        ``[(image id, rel_path, (x1, y1, x2, y2) 1-based), ...]`` in file order.

    Raises:
        FileNotFoundError: If the file is missing (with the download hint).
        ValueError: If it cannot be read or lacks the fields above.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"CUB ASIC test list not found: {path}; {ACSM_CACHEDIR_HINT}")
    try:
        from scipy.io import loadmat
    except ImportError as err:  # pragma: no cover - scipy is a dependency
        raise ImportError("reading the CUB test list needs scipy (pip install scipy)") from err
    try:
        mat = loadmat(str(path))
    except Exception as err:  # scipy raises ValueError / MatReadError / OSError on bad files
        raise ValueError(f"Could not read the CUB test list {path} as a MATLAB file: {err}") from err
    images = mat.get("images")
    if not isinstance(images, np.ndarray) or images.dtype.names is None:
        raise ValueError(f"Malformed CUB test list {path}: no 'images' struct array")
    missing = [f for f in ("rel_path", "bbox", "id") if f not in images.dtype.names]
    if missing:
        raise ValueError(
            f"Malformed CUB test list {path}: 'images' lacks field(s) {missing}; has {list(images.dtype.names)}"
        )
    entries = []
    for index, record in enumerate(images.reshape(-1)):
        rel_path = str(_scalar(path, index, "rel_path", record["rel_path"]))
        raw_id = _scalar(path, index, "id", record["id"])
        if float(raw_id) != int(raw_id) or int(raw_id) < 1:
            raise ValueError(f"Malformed CUB test list {path}: images({index + 1}).id {raw_id!r} is not a positive int")
        bbox = _scalar(path, index, "bbox", record["bbox"])
        names = getattr(getattr(bbox, "dtype", None), "names", None) or ()
        if not {"x1", "y1", "x2", "y2"} <= set(names):
            raise ValueError(
                f"Malformed CUB test list {path}: images({index + 1}).bbox must be a struct with x1, y1, x2, y2"
            )
        box = tuple(float(_scalar(path, index, f"bbox.{k}", bbox[k])) for k in ("x1", "y1", "x2", "y2"))
        entries.append((int(raw_id), rel_path, box))
    return entries


def _class_of(rel_path: str, where: Path) -> tuple[int, str, str]:
    """``(class index, class folder, readable name)`` of a ``rel_path`` like ``001.Black_footed_Albatross/x.jpg``."""
    folder = rel_path.replace("\\", "/").split("/")[0]
    prefix, _, name = folder.partition(".")
    try:
        index = int(prefix)
    except ValueError:
        raise ValueError(
            f"Malformed CUB test list {where}: rel_path {rel_path!r} does not start with '<class>.<name>/'"
        ) from None
    return index, folder, (name or folder).replace("_", " ")


def _load_rgb_array(path: Path) -> np.ndarray:
    """``[H, W, 3]`` uint8 RGB (:func:`load_rgb_image`; for CUB's RGB JPEGs ASIC's ``convert('RGB')``), with
    errors naming the file."""
    if not path.is_file():
        raise FileNotFoundError(f"CUB image file not found: {path}")
    return load_rgb_image(path).permute(1, 2, 0).numpy()


# ------------------------------------------------------------------------------------ dataset


class CUBSample(PairSample, total=False):
    """A CUB-200 (ASIC) pair: :class:`~lightning_modules.components.samples.PairSample` (keypoints in the
    protocol's square crops) and where the crops come from.

    Attributes:
        class_index: CUB-200's class number.
        class_folder: CUB-200's class folder.
        src_file_bbox: The source object box in the file's pixels.
        trg_file_bbox: The target object box in the file's pixels.
        src_crop_box: The square crop of the source file (inclusive corners).
        trg_crop_box: The square crop of the target file.
    """

    class_index: int
    class_folder: str
    src_file_bbox: torch.Tensor
    trg_file_bbox: torch.Tensor
    src_crop_box: torch.Tensor
    trg_crop_box: torch.Tensor


class CUBASICDataset(Dataset):
    """CUB-200-2011 pairs with the ASIC protocol: all ordered pairs of each class's test images.

    The test list, keypoints and crop boxes are parsed eagerly (missing files and malformed lines fail
    at construction); images are decoded and cropped lazily in :meth:`__getitem__`.

    Args:
        root: The ``CUB_200_2011`` folder (``images/``, ``parts/part_locs.txt``, ...).
        categories: CUB class indices (1..200) to evaluate, each separately (ASIC: 1, 2, 3).
        crop_size: Side of the square crop (ASIC: 256); also the PCK threshold.
        test_list: ACSM's test list; default ``<root>/cachedir/cub/data/test_cub_cleaned.mat``.

    Attributes:
        root: Dataset root.
        test_list: Path of the test list read.
        crop_size: Crop side.
        class_indices: Evaluated classes, ascending.
        categories: Readable class names (sorted), e.g. ``["Black footed Albatross", ...]``.
        images: The selected test images, grouped by class (ascending), in test-list order within a class.
        pairs: ``(source, target)`` indices into ``images``: per class, ``permutations(range(N), 2)``.

    Raises:
        FileNotFoundError: If the root, the test list, ``part_locs.txt`` or an image file is missing.
        ValueError: On a malformed file, an unknown class, a class with fewer than 2 test images, or a
            test-list id without 15 keypoints.
    """

    #: The keys its samples hold (the contract ``tests/test_sample_contract.py`` checks).
    sample_type = CUBSample

    def __init__(
        self,
        root: str | Path,
        categories: Sequence[int] = (1, 2, 3),
        crop_size: int = 256,
        test_list: str | Path | None = None,
    ) -> None:
        super().__init__()
        self.root = Path(root).expanduser()
        if isinstance(categories, (int, str)):
            categories = [categories]
        try:
            wanted = sorted({int(c) for c in categories})
        except (TypeError, ValueError):
            raise ValueError(f"categories must be CUB class indices (ints 1..200), got {categories!r}") from None
        if not wanted:
            raise ValueError("categories is empty; the ASIC protocol uses classes [1, 2, 3]")
        if isinstance(crop_size, bool) or int(crop_size) < 1:
            raise ValueError(f"crop_size must be a positive int, got {crop_size!r}")
        self.crop_size = int(crop_size)
        require_root_folder(self.root, ROOT_NAME, LAYOUT_HINT)
        self.test_list = Path(test_list).expanduser() if test_list is not None else self.root / DEFAULT_TEST_LIST

        entries = read_test_list(self.test_list)
        by_class: dict[int, list[tuple[int, str, tuple[float, float, float, float]]]] = {}
        for entry in entries:
            by_class.setdefault(_class_of(entry[1], self.test_list)[0], []).append(entry)
        unknown = [c for c in wanted if c not in by_class]
        if unknown:
            raise ValueError(
                f"CUB class(es) {unknown} have no image in the test list {self.test_list}; "
                f"available: {sorted(by_class)[:10]}{' ...' if len(by_class) > 10 else ''}"
            )

        part_locs_path = self.root / "parts" / "part_locs.txt"
        part_locs = read_part_locs(part_locs_path)
        images_txt = self.root / "images.txt"
        id_to_path = read_image_list(images_txt) if images_txt.is_file() else None

        self.class_indices: list[int] = wanted
        self.images: list[CUBImageRecord] = []
        self.pairs: list[tuple[int, int]] = []
        for class_index in wanted:
            members = by_class[class_index]
            if len(members) < 2:
                raise ValueError(
                    f"CUB class {class_index} has {len(members)} image(s) in {self.test_list}; pairs need 2"
                )
            start = len(self.images)
            for image_id, rel_path, bbox in members:
                self.images.append(
                    self._record(image_id, rel_path, bbox, part_locs, part_locs_path, id_to_path, images_txt)
                )
            self.pairs.extend((start + i, start + j) for i, j in itertools.permutations(range(len(members)), 2))
        for record in self.images:
            if not record.path.is_file():
                raise FileNotFoundError(f"CUB image file not found: {record.path} (listed in {self.test_list})")
        self.categories: list[str] = sorted({r.category for r in self.images})

    def _record(
        self,
        image_id: int,
        rel_path: str,
        bbox: tuple[float, float, float, float],
        part_locs: dict[int, np.ndarray],
        part_locs_path: Path,
        id_to_path: dict[int, str] | None,
        images_txt: Path,
    ) -> CUBImageRecord:
        if id_to_path is not None and id_to_path.get(image_id) != rel_path:
            raise ValueError(
                f"CUB test list {self.test_list} gives image id {image_id} the path {rel_path!r}, but "
                f"{images_txt} gives {id_to_path.get(image_id)!r}: keypoints would be misaligned"
            )
        parts = part_locs.get(image_id)
        if parts is None or np.isnan(parts).any():
            raise ValueError(
                f"CUB keypoint file {part_locs_path} lacks some of the {CUB_NUM_PARTS} parts of image id "
                f"{image_id} ({rel_path})"
            )
        class_index, folder, name = _class_of(rel_path, self.test_list)
        zero_based = tuple(c - 1 for c in bbox)
        box = asic_crop_box(bbox)
        return CUBImageRecord(
            image_id=image_id,
            rel_path=rel_path,
            path=self.root / "images" / rel_path,
            class_index=class_index,
            class_folder=folder,
            category=name,
            bbox=zero_based,  # type: ignore[arg-type]
            crop_box=tuple(box),  # type: ignore[arg-type]
            kps=map_keypoints(parts[:, :2], box, self.crop_size),
            visible=parts[:, 2] > 0,
        )

    @property
    def image_paths(self) -> list[Path]:
        """Sorted unique image files used by the pairs (one crop, one feature pass each)."""
        return sorted({r.path for r in self.images})

    def pair_id(self, index: int) -> str:
        """``cub<class:03d>-<source stem>-<target stem>``."""
        src, trg = (self.images[i] for i in self.pairs[index])
        return f"cub{src.class_index:03d}-{src.path.stem}-{trg.path.stem}"

    @property
    def pair_ids(self) -> list[str]:
        """Pair ids in dataset order."""
        return [self.pair_id(i) for i in range(len(self))]

    def pair_images(self) -> list[tuple[str, str, str]]:
        """``(category, source image path, target image path)`` per pair, in dataset order (no decoding).

        Every image has a single crop, so its path identifies its features
        (``datamodules.samplers.image_grouped_order`` keeps pairs sharing an image together).
        """
        out = []
        for src_index, trg_index in self.pairs:
            src, trg = self.images[src_index], self.images[trg_index]
            out.append((src.category, str(src.path), str(trg.path)))
        return out

    def crop(self, record: CUBImageRecord) -> torch.Tensor:
        """The protocol's crop of one image: uint8 ``[3, crop_size, crop_size]``."""
        array = _load_rgb_array(record.path)
        try:
            cropped = crop_square(array, record.crop_box, self.crop_size)
        except ValueError as err:
            raise ValueError(f"Cannot crop CUB image {record.path}: {err}") from None
        return torch.from_numpy(cropped.copy()).permute(2, 0, 1).contiguous()

    def __len__(self) -> int:
        """Number of ordered pairs."""
        return len(self.pairs)

    def __getitem__(self, index: int) -> dict[str, Any]:
        """Load one pair.

        Returns:
            A dict with ``pair_id``, ``category`` (readable class name), ``class_index``,
            ``class_folder``, ``src_image`` / ``trg_image`` (the ASIC crops, uint8 ``[3, S, S]``),
            ``src_image_path`` / ``trg_image_path`` (file path + ``"#asic-crop<S>"``, the feature-cache
            key), ``src_file`` / ``trg_file`` (the image files), ``src_kps`` / ``trg_kps`` (float32
            ``[15, 2]`` crop pixels ``(x, y)``, all 15 parts), ``kps_valid`` (bool ``[15]``: visible in
            both), ``kps_ids`` (1..15), ``threshold`` (``S``), ``src_file_bbox`` / ``trg_file_bbox`` (float32
            ``[4]`` zero-based tight bbox, original pixels), ``src_crop_box`` / ``trg_crop_box``
            (float32 ``[4]`` square crop, original pixels, inclusive corners) and ``src_instance_box`` /
            ``trg_instance_box`` (the tight bbox in crop pixels).

        Raises:
            FileNotFoundError: If an image file is missing.
            ValueError: If an image cannot be decoded or cropped.
        """
        src, trg = (self.images[i] for i in self.pairs[index])
        suffix = f"{CROP_SUFFIX}{self.crop_size}"
        return {
            "pair_id": self.pair_id(index),
            "category": src.category,
            "class_index": src.class_index,
            "class_folder": src.class_folder,
            "src_image": self.crop(src),
            "trg_image": self.crop(trg),
            "src_image_path": f"{src.path}{suffix}",
            "trg_image_path": f"{trg.path}{suffix}",
            "src_file": str(src.path),
            "trg_file": str(trg.path),
            "src_kps": torch.from_numpy(src.kps.copy()),
            "trg_kps": torch.from_numpy(trg.kps.copy()),
            "kps_valid": torch.from_numpy(src.visible & trg.visible),
            "kps_ids": list(range(1, CUB_NUM_PARTS + 1)),
            "threshold": float(self.crop_size),
            "src_file_bbox": torch.tensor(src.bbox, dtype=torch.float32),
            "trg_file_bbox": torch.tensor(trg.bbox, dtype=torch.float32),
            "src_crop_box": torch.tensor(src.crop_box, dtype=torch.float32),
            "trg_crop_box": torch.tensor(trg.crop_box, dtype=torch.float32),
            "src_instance_box": self.instance_box(src),
            "trg_instance_box": self.instance_box(trg),
        }

    def instance_box(self, record: CUBImageRecord) -> torch.Tensor:
        """The tight bbox in crop pixels (float32 ``[4]``), mapped like the keypoints (pose alignment's instance)."""
        x0, y0 = record.crop_box[0], record.crop_box[1]
        scale = self.crop_size / float(1 + record.crop_box[2] - record.crop_box[0])
        x1, y1, x2, y2 = record.bbox
        return torch.tensor([(x1 - x0) * scale, (y1 - y0) * scale, (x2 - x0) * scale, (y2 - y0) * scale])

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(root={str(self.root)!r}, classes={self.class_indices}, "
            f"images={len(self.images)}, pairs={len(self)}, crop_size={self.crop_size})"
        )


#: How this benchmark is scored (its DataModule's ``protocol``; :func:`datamodules.protocols.get_protocol`).
PROTOCOL = Protocol(
    name="CUB-200-2011 (ASIC)",
    key="cub",
    alphas=(0.1, 0.05, 0.01),
    # Keypoints live in the protocol's 256 px square crops (datamodules/cub.py), so every pair's
    # threshold is the crop side: PCK@alpha counts error < alpha * 256 (ASIC's compute_pck).
    threshold="alpha * 256 (the side of the ASIC square crop)",
    # ASIC scores one class per run (per-point pooled); the paper's single number over the first three
    # classes is their mean: category_mean is the headline, per_category holds ASIC's per-run numbers.
    averages=("category_mean", "per_point", "per_image"),
    flip_pairs="cub",
)


class CUBDataModule(PairDataModule):
    """CUB-200-2011 with the ASIC protocol (``datamodules.cub.CUBASICDataset``).

    All ordered pairs of each class's test images (ACSM's ``test_cub_cleaned.mat``), on the protocol's
    square crops: samples' images are the ``crop_size`` px crops, keypoints are crop pixels and the PCK
    threshold is ``crop_size``. Results are reported per class (``per_category``) and as their mean.

    Args:
        root: The ``CUB_200_2011`` folder.
        categories: CUB class indices evaluated, each separately (ASIC and the paper: 1, 2, 3).
        crop_size: Side of the square crop (ASIC: 256).
        test_list: ACSM's test list (default ``<root>/cachedir/cub/data/test_cub_cleaned.mat``).
        batch_size: Pairs per batch.
        num_workers: DataLoader workers.
    """

    protocol = PROTOCOL
    layout_hint = LAYOUT_HINT
    root_name = ROOT_NAME

    def __init__(
        self,
        root: str | None = None,
        categories: list[int] | None = None,
        crop_size: int = 256,
        test_list: str | None = None,
        batch_size: PositiveInt = 1,
        num_workers: NonNegativeInt = 0,
    ) -> None:
        super().__init__(root=root, batch_size=batch_size, num_workers=num_workers)
        self.class_indices = [int(c) for c in categories] if categories is not None else [1, 2, 3]
        self.crop_size = crop_size
        self.test_list = test_list

    def build_dataset(self, root: str) -> CUBASICDataset:
        """All ordered test pairs of the selected classes."""
        return CUBASICDataset(root, categories=self.class_indices, crop_size=self.crop_size, test_list=self.test_list)


# ------------------------------------------------------------------------------------ a generated root

#: The classes of :func:`write_synthetic_cub`: index -> folder name (CUB's first three).
SYNTHETIC_CUB_CLASSES: dict[int, str] = {1: "001.Black_footed_Albatross", 2: "002.Laysan_Albatross", 3: "003.Sooty_Albatross"}
#: Per class: (image id, image size W x H, 1-based bbox x1 y1 x2 y2, grayscale?). Images 4 and 8 are not in the
#: test list (training images); boxes touch the image borders so that crops need edge padding.
SYNTHETIC_CUB_IMAGES: dict[int, list[tuple[int, tuple[int, int], tuple[int, int, int, int], bool]]] = {
    1: [(1, (120, 90), (11, 21, 110, 70), False), (2, (80, 140), (1, 1, 30, 90), True),
        (3, (200, 150), (40, 30, 190, 149), False), (4, (64, 64), (5, 5, 60, 60), False)],
    2: [(5, (150, 100), (20, 10, 140, 95), False), (6, (90, 120), (10, 5, 85, 115), False),
        (7, (130, 130), (2, 3, 129, 128), False), (8, (64, 64), (5, 5, 60, 60), False)],
}  # fmt: skip
#: Image ids of :data:`SYNTHETIC_CUB_IMAGES` left out of the test list.
SYNTHETIC_CUB_NOT_IN_TEST: set[int] = {4, 8}
#: Invisible parts per image id (everything else visible).
SYNTHETIC_CUB_INVISIBLE: dict[int, set[int]] = {1: {0, 5}, 2: {5, 14}, 3: set(), 5: {3}, 6: {3, 7}, 7: {0, 1, 2, 3}}


def synthetic_cub_rel_path(class_index: int, image_id: int) -> str:
    """The path under ``images/`` of a generated image, named as CUB names its files."""
    folder = SYNTHETIC_CUB_CLASSES[class_index]
    return f"{folder}/{folder.split('.', 1)[1]}_{image_id:04d}_{100000 + image_id}.jpg"


def synthetic_cub_parts(image_id: int, size: tuple[int, int], bbox: tuple[int, ...]) -> np.ndarray:
    """The generated parts of an image: ``[15, 3]`` (x, y, visible), 1-based pixels inside the bbox.

    Args:
        image_id: The image (seeds the draw; :data:`SYNTHETIC_CUB_INVISIBLE` says which parts are hidden).
        size: ``(W, H)`` (unused: the parts lie inside the bbox).
        bbox: 1-based ``(x1, y1, x2, y2)``.

    Returns:
        The parts; invisible parts are ``0 0 0`` as in CUB.
    """
    rng = np.random.default_rng(image_id)
    x = rng.integers(bbox[0], bbox[2] + 1, CUB_NUM_PARTS).astype(float)
    y = rng.integers(bbox[1], bbox[3] + 1, CUB_NUM_PARTS).astype(float)
    visible = np.ones(CUB_NUM_PARTS)
    for k in SYNTHETIC_CUB_INVISIBLE.get(image_id, ()):
        x[k] = y[k] = visible[k] = 0
    return np.stack([x, y, visible], axis=1)


def write_synthetic_cub(root: Path) -> Path:
    """Write a tiny CUB_200_2011 tree in the real on-disk layout, read by :class:`CUBASICDataset`.

    Classes 1 and 2 with 3 test images each (and one training image each): ``images/<class>/*.jpg`` (random
    pixels, one grayscale), ``images.txt``, ``parts/part_locs.txt`` and ACSM's test list
    (:data:`DEFAULT_TEST_LIST`, see :func:`write_acsm_test_list`).

    Args:
        root: The ``CUB_200_2011`` folder (created).

    Returns:
        ``root``.
    """
    rng = np.random.default_rng(0)
    rows, parts_lines, images_txt = [], [], []
    for class_index, members in SYNTHETIC_CUB_IMAGES.items():
        for image_id, (w, h), bbox, gray in members:
            rel = synthetic_cub_rel_path(class_index, image_id)
            path = root / "images" / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
            (Image.fromarray(pixels[..., 0], "L") if gray else Image.fromarray(pixels)).save(path, quality=95)
            images_txt.append(f"{image_id} {rel}")
            parts = synthetic_cub_parts(image_id, (w, h), bbox)
            parts_lines += [f"{image_id} {k + 1} {x:.1f} {y:.1f} {int(v)}" for k, (x, y, v) in enumerate(parts)]
            if image_id not in SYNTHETIC_CUB_NOT_IN_TEST:
                rows.append((image_id, rel, class_index, (w, h), bbox, parts))
    (root / "images.txt").write_text("\n".join(images_txt) + "\n")
    (root / "parts").mkdir(parents=True, exist_ok=True)
    (root / "parts" / "part_locs.txt").write_text("\n".join(parts_lines) + "\n")
    write_acsm_test_list(root / DEFAULT_TEST_LIST, rows)
    return root


def write_acsm_test_list(path: Path, rows: list) -> None:
    """Write ACSM's ``*_cub_cleaned.mat``: a 1 x N MATLAB struct array ``images`` (as :func:`read_test_list` reads).

    Args:
        path: The .mat file (its folder is created).
        rows: Per image ``(image_id, rel_path, class_index, (W, H), bbox x1 y1 x2 y2, parts [15, 3])``.
    """
    from scipy.io import savemat  # scipy is a dependency; imported lazily as the reader does

    fields = ["id", "rel_path", "train", "test", "class", "bbox", "width", "height", "mask", "parts"]
    images = np.zeros((1, len(rows)), dtype=[(f, object) for f in fields])
    box_dtype = [(k, object) for k in ("x1", "y1", "x2", "y2")]
    for i, (image_id, rel, class_index, (w, h), bbox, parts) in enumerate(rows):
        box = np.zeros((1, 1), dtype=box_dtype)
        for k, v in zip(("x1", "y1", "x2", "y2"), bbox):
            box[0, 0][k] = np.array([[float(v)]])
        images[0, i] = (
            np.array([[image_id]], dtype=np.int32), np.array([rel]), np.array([[0]], dtype=np.uint8),
            np.array([[1]], dtype=np.uint8), np.array([[class_index]], dtype=np.int32), box,
            np.array([[float(w)]]), np.array([[float(h)]]), np.zeros((h, w), dtype=np.uint8),
            parts.T.copy(),
        )  # fmt: skip
    path.parent.mkdir(parents=True, exist_ok=True)
    savemat(str(path), {"images": images})
