"""SPair-71k reader (plain torch Dataset).

On-disk layout of SPair-71k (only ``PairAnnotation`` and ``JPEGImages`` are read)::

    <root>/PairAnnotation/{trn,val,test}/<id>-<src>-<trg>:<category>.json
    <root>/JPEGImages/<category>/<name>.jpg
    <root>/ImageAnnotation/<category>/<name>.json
    <root>/Layout/large/{trn,val,test}.txt

A sample keeps keypoints in ORIGINAL image pixels ``(x, y)``; resizing to the model resolution is
the model's job. The per-pair PCK threshold is ``max(x2 - x1, y2 - y1)`` of the TARGET bounding box.

:class:`SPairDataset` uses plain torch/PIL only; the thin LightningDataModule
is :class:`SPairDataModule` (below).
"""

from __future__ import annotations

import dataclasses
import json
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from jsonargparse.typing import NonNegativeInt, PositiveInt

from lightning_modules.components.image_prep import load_rgb_image

from .base import PairDataModule, require_root_folder
from .protocols import Protocol, SPAIR_VARIATIONS
from .records import PairRecordsDataset, category_filter, points_outside, warn_points_outside

__all__ = [
    "SPLIT_ALIASES",
    "SUBSET_DRAWS",
    "SPairDataset",
    "SPairRecord",
    "SPairDataModule",
    "load_rgb_image",
    "normalize_split",
]

#: How ``pairs_per_category`` draws a category's subset: ``uniform`` distinct pairs without replacement;
#: ``reference`` the reference's ``--SAMPLE`` draw (see :func:`draw_subset`), with replacement.
SUBSET_DRAWS = ("uniform", "reference")

#: Accepted split names and the folder each maps to.
SPLIT_ALIASES: dict[str, str] = {"trn": "trn", "train": "trn", "val": "val", "test": "test"}

#: The benchmark's name in messages ("SPair-71k root not found: ...").
ROOT_NAME = "SPair-71k"
LAYOUT_HINT = (
    "expected the SPair-71k layout: '<root>/PairAnnotation/<split>/*.json' "
    "(split in trn/val/test) and '<root>/JPEGImages/<category>/*.jpg'"
)

_REQUIRED_KEYS: tuple[str, ...] = (
    "src_imname",
    "trg_imname",
    "category",
    "src_kps",
    "trg_kps",
    "kps_ids",
    "src_bndbox",
    "trg_bndbox",
)


def normalize_split(split: str) -> str:
    """Map a split name to its SPair folder name.

    Args:
        split: One of ``"trn"``, ``"train"`` (alias of ``"trn"``), ``"val"`` or ``"test"``.

    Returns:
        The folder name under ``PairAnnotation`` (``"trn"``, ``"val"`` or ``"test"``).

    Raises:
        ValueError: If the split name is unknown.
    """
    try:
        return SPLIT_ALIASES[split]
    except (KeyError, TypeError):
        raise ValueError(
            f"Unknown SPair-71k split {split!r}; expected one of {sorted(SPLIT_ALIASES)}"
        ) from None


@dataclass(frozen=True)
class SPairRecord:
    """One parsed SPair pair annotation (no pixels).

    Attributes:
        pair_id: Annotation file stem, e.g. ``"000001-2008_001546-2008_004704:aeroplane"``.
        category: Object category.
        annotation_path: Path of the pair json.
        src_image_path: Path of the source image.
        trg_image_path: Path of the target image.
        src_kps: Source keypoints ``[N, 2]`` float32, ``(x, y)`` original pixels.
        trg_kps: Target keypoints ``[N, 2]`` float32, ``(x, y)`` original pixels.
        kps_ids: Keypoint ids (ints), length ``N``.
        src_bbox: Source bbox ``[x1, y1, x2, y2]`` float32.
        trg_bbox: Target bbox ``[x1, y1, x2, y2]`` float32.
        threshold: PCK threshold ``max(x2 - x1, y2 - y1)`` of the target bbox.
        variations: The pair's difficulty levels (``viewpoint_variation``, ``scale_variation``,
            ``truncation``, ``occlusion``); -1 where the file does not say.
        outside: How many of its keypoints lie outside their image (``src_imsize`` / ``trg_imsize``); they are
            scored as annotated, as the reference does (the reader warns with the count).
    """

    pair_id: str
    category: str
    annotation_path: Path
    src_image_path: Path
    trg_image_path: Path
    src_kps: torch.Tensor
    trg_kps: torch.Tensor
    kps_ids: tuple[int, ...]
    src_bbox: torch.Tensor
    trg_bbox: torch.Tensor
    threshold: float
    variations: dict[str, int] = field(default_factory=dict)
    outside: int = 0


def _category_from_stem(stem: str) -> str | None:
    """Return the category encoded after ``':'`` in a pair file stem, if any."""
    if ":" in stem:
        category = stem.rsplit(":", 1)[1]
        return category or None
    return None


def _read_json(path: Path) -> dict[str, Any]:
    """Read a pair annotation json into a dict, raising ``ValueError`` naming the file."""
    try:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
    except json.JSONDecodeError as err:
        raise ValueError(f"Malformed SPair annotation {path}: invalid JSON ({err})") from err
    except UnicodeDecodeError as err:
        raise ValueError(f"Malformed SPair annotation {path}: not UTF-8 text ({err})") from err
    if not isinstance(data, dict):
        raise ValueError(
            f"Malformed SPair annotation {path}: expected a JSON object, got {type(data).__name__}"
        )
    return data


def _points(path: Path, key: str, value: Any) -> torch.Tensor:
    """Convert a list of ``[x, y]`` to a float32 ``[N, 2]`` tensor, validating its shape."""
    if not isinstance(value, list):
        raise ValueError(f"Malformed SPair annotation {path}: key '{key}' must be a list of [x, y]")
    if len(value) == 0:
        return torch.zeros(0, 2, dtype=torch.float32)
    try:
        tensor = torch.tensor(value, dtype=torch.float32)
    except (TypeError, ValueError) as err:
        raise ValueError(
            f"Malformed SPair annotation {path}: key '{key}' must be a list of [x, y] numbers "
            f"({err})"
        ) from err
    if tensor.ndim != 2 or tensor.shape[1] != 2:
        raise ValueError(
            f"Malformed SPair annotation {path}: key '{key}' must be a list of [x, y], "
            f"got shape {tuple(tensor.shape)}"
        )
    _require_finite(path, key, tensor)
    return tensor


def _require_finite(path: Path, key: str, tensor: torch.Tensor) -> None:
    """Every reader's rule: a NaN or infinite coordinate is an error naming the file and key."""
    if not torch.isfinite(tensor).all():
        raise ValueError(f"Malformed SPair annotation {path}: key '{key}' holds a non-finite number (NaN or infinity)")


def _outside(points: torch.Tensor, imsize: Any) -> int:
    """How many points lie outside the image ``imsize`` ([W, H, ...]); 0 when the file does not give it."""
    if not isinstance(imsize, list) or len(imsize) < 2 or not all(isinstance(v, (int, float)) for v in imsize[:2]):
        return 0
    return points_outside(points, imsize[:2])


def _bbox(path: Path, key: str, value: Any) -> torch.Tensor:
    """Convert ``[x1, y1, x2, y2]`` to a float32 ``[4]`` tensor, validating its shape."""
    try:
        tensor = torch.tensor(value, dtype=torch.float32)
    except (TypeError, ValueError) as err:
        raise ValueError(
            f"Malformed SPair annotation {path}: key '{key}' must be [x1, y1, x2, y2] ({err})"
        ) from err
    if tensor.shape != (4,):
        raise ValueError(
            f"Malformed SPair annotation {path}: key '{key}' must be [x1, y1, x2, y2], "
            f"got shape {tuple(tensor.shape)}"
        )
    _require_finite(path, key, tensor)
    return tensor


def _image_path(images_dir: Path, category: str, imname: str) -> Path:
    """Path of an SPair image; ``imname`` normally carries its ``.jpg`` suffix."""
    name = imname if Path(imname).suffix else f"{imname}.jpg"
    return images_dir / category / name


def _parse_pair(path: Path, images_dir: Path, category_hint: str | None) -> SPairRecord:
    """Parse and validate one pair annotation file."""
    data = _read_json(path)
    for key in _REQUIRED_KEYS:
        if key not in data:
            raise ValueError(f"Malformed SPair annotation {path}: missing key '{key}'")
    category = data["category"]
    if not isinstance(category, str) or not category:
        raise ValueError(f"Malformed SPair annotation {path}: key 'category' must be a string")
    if category_hint is not None and category != category_hint:
        raise ValueError(
            f"Malformed SPair annotation {path}: key 'category' is {category!r} but the file name "
            f"says {category_hint!r}"
        )
    for key in ("src_imname", "trg_imname"):
        if not isinstance(data[key], str) or not data[key]:
            raise ValueError(f"Malformed SPair annotation {path}: key '{key}' must be a string")

    src_kps = _points(path, "src_kps", data["src_kps"])
    trg_kps = _points(path, "trg_kps", data["trg_kps"])
    if src_kps.shape[0] != trg_kps.shape[0]:
        raise ValueError(
            f"Malformed SPair annotation {path}: 'src_kps' has {src_kps.shape[0]} points but "
            f"'trg_kps' has {trg_kps.shape[0]}"
        )
    raw_ids = data["kps_ids"]
    if not isinstance(raw_ids, list):
        raise ValueError(f"Malformed SPair annotation {path}: key 'kps_ids' must be a list")
    try:
        kps_ids = tuple(int(k) for k in raw_ids)
    except (TypeError, ValueError) as err:
        raise ValueError(
            f"Malformed SPair annotation {path}: key 'kps_ids' must hold integer strings ({err})"
        ) from err
    if len(kps_ids) != src_kps.shape[0]:
        raise ValueError(
            f"Malformed SPair annotation {path}: 'kps_ids' has {len(kps_ids)} entries but "
            f"'src_kps' has {src_kps.shape[0]} points"
        )

    src_bbox = _bbox(path, "src_bndbox", data["src_bndbox"])
    trg_bbox = _bbox(path, "trg_bndbox", data["trg_bndbox"])
    threshold = float(max(trg_bbox[2] - trg_bbox[0], trg_bbox[3] - trg_bbox[1]))
    if not threshold > 0:
        raise ValueError(
            f"Malformed SPair annotation {path}: key 'trg_bndbox' {trg_bbox.tolist()} is empty "
            "(the PCK threshold must be positive)"
        )

    return SPairRecord(
        pair_id=path.stem,
        category=category,
        annotation_path=path,
        src_image_path=_image_path(images_dir, category, data["src_imname"]),
        trg_image_path=_image_path(images_dir, category, data["trg_imname"]),
        src_kps=src_kps,
        trg_kps=trg_kps,
        kps_ids=kps_ids,
        src_bbox=src_bbox,
        trg_bbox=trg_bbox,
        threshold=threshold,
        variations={key: _level(path, key, data.get(key, -1)) for key in SPAIR_VARIATIONS},
        outside=_outside(src_kps, data.get("src_imsize")) + _outside(trg_kps, data.get("trg_imsize")),
    )


def _records(paths: list[Path], images_dir: Path, hints: dict[Path, str | None]) -> list[SPairRecord]:
    """Parse each file once; a file listed again (a with-replacement draw) gets ``#2``, ``#3``... on its
    ``pair_id``, so pair ids stay unique (predictions, resume and DDP de-duplication key on them)."""
    parsed: dict[Path, SPairRecord] = {}
    seen: dict[Path, int] = {}
    records = []
    for path in paths:
        if path not in parsed:
            parsed[path] = _parse_pair(path, images_dir, hints[path])
        seen[path] = seen.get(path, 0) + 1
        record = parsed[path]
        records.append(record if seen[path] == 1 else dataclasses.replace(record, pair_id=f"{record.pair_id}#{seen[path]}"))
    return records


def _level(path: Path, key: str, value: Any) -> int:
    """An integer difficulty level (SPair stores small non-negative ints)."""
    try:
        return int(value)
    except (TypeError, ValueError):
        raise ValueError(f"Malformed SPair annotation {path}: key '{key}' must be an integer") from None


def draw_subset(paths: list[Path], size: int, draw: str, seed: int, rng: random.Random) -> list[Path]:
    """One category's subset of its sorted pair files.

    ``reference`` is the draw of the reference's ``load_spair_data`` (``pck_spair_pascal.py``, ``--SAMPLE``):
    for every category, ``np.random.seed(SEED)`` and then ``np.random.choice(len(pairs), SAMPLE)`` over the
    sorted pair files: numpy's legacy generator, reseeded per category, WITH replacement (a pair can come
    twice and then counts twice), and ``size`` draws even from a category with fewer pairs. ``uniform``
    samples ``size`` distinct pairs with ``rng`` (shared across categories) and keeps every pair of a
    category that has no more than ``size``.

    Args:
        paths: The category's pair files, sorted by file name.
        size: Pairs to draw.
        draw: One of :data:`SUBSET_DRAWS`.
        seed: The reference draw's seed (its ``--SEED``, 42 by default).
        rng: The uniform draw's generator.
    """
    if draw == "reference":
        return [paths[i] for i in np.random.RandomState(seed).choice(len(paths), size)]
    return rng.sample(paths, size) if len(paths) > size else list(paths)


class SPairDataset(PairRecordsDataset):
    """SPair-71k image pairs with keypoints in original pixels.

    Annotations are parsed eagerly (json only) so malformed files and missing images fail at
    construction; images are decoded lazily in :meth:`__getitem__`.

    Args:
        root: Dataset root holding ``PairAnnotation/`` and ``JPEGImages/``.
        split: ``"trn"`` (alias ``"train"``), ``"val"`` or ``"test"``.
        categories: Categories to keep; ``None`` keeps all categories of the split.
        pairs_per_category: Per-category subset size (``None`` keeps all pairs), drawn from each
            category's sorted pair list as ``subset_draw`` says (categories visited in sorted order over
            all categories of the split, so a category's subset does not depend on the ``categories``
            filter).
        seed: Seed of the per-category subset.
        subset_draw: ``uniform`` (at most ``pairs_per_category`` distinct pairs, ``random.Random(seed)``)
            or ``reference`` (the reference's ``--SAMPLE`` draw, with replacement, see :func:`draw_subset`).
            A pair drawn again is a record of its own whose ``pair_id`` gets the suffix ``#2``, ``#3``...

    Attributes:
        root: Dataset root.
        split: Canonical split folder name.
        categories: Sorted categories present after filtering.
        records: Parsed pair annotations, sorted by annotation file name.

    Raises:
        FileNotFoundError: If the root, the split folder or an image file is missing.
        ValueError: If the split is unknown or empty, a requested category is unknown,
            ``pairs_per_category`` is not positive, or an annotation file is malformed.
    """

    def __init__(
        self,
        root: str | Path,
        split: str = "test",
        categories: Sequence[str] | None = None,
        pairs_per_category: int | None = None,
        seed: int = 0,
        subset_draw: str = "uniform",
    ) -> None:
        super().__init__()
        self.root = Path(root).expanduser()
        if subset_draw not in SUBSET_DRAWS:
            raise ValueError(f"unknown subset_draw {subset_draw!r}; choose one of {list(SUBSET_DRAWS)}")
        self.split = normalize_split(split)
        if pairs_per_category is not None and (
            isinstance(pairs_per_category, bool) or int(pairs_per_category) < 1
        ):
            raise ValueError(
                f"pairs_per_category must be a positive int or None, got {pairs_per_category!r}"
            )
        categories = category_filter(categories)

        require_root_folder(self.root, ROOT_NAME, LAYOUT_HINT)
        split_dir = self.root / "PairAnnotation" / self.split
        if not split_dir.is_dir():
            raise FileNotFoundError(
                f"SPair-71k split folder not found: {split_dir}; {LAYOUT_HINT}"
            )
        files = sorted((p for p in split_dir.glob("*.json") if p.is_file()), key=lambda p: p.name)
        if not files:
            raise ValueError(f"SPair-71k split {self.split!r} is empty: no *.json in {split_dir}")
        images_dir = self.root / "JPEGImages"

        # Category of every file: from the file name (":<cat>" suffix) or, failing that, its json.
        by_category: dict[str, list[Path]] = {}
        hints: dict[Path, str | None] = {}
        for path in files:
            hint = _category_from_stem(path.stem)
            hints[path] = hint
            category = hint
            if category is None:
                data = _read_json(path)
                if not isinstance(data.get("category"), str) or not data["category"]:
                    raise ValueError(f"Malformed SPair annotation {path}: missing key 'category'")
                category = data["category"]
            by_category.setdefault(category, []).append(path)
        available = sorted(by_category)

        if categories is None:
            wanted = available
        else:
            unknown = sorted({c for c in categories if c not in by_category})
            if unknown:
                raise ValueError(
                    f"Unknown SPair-71k categor{'y' if len(unknown) == 1 else 'ies'} {unknown} in "
                    f"split {self.split!r}; available: {available}"
                )
            wanted = sorted(set(categories))

        selected: list[Path] = []
        rng = random.Random(seed)
        for category in available:
            paths = by_category[category]  # already sorted by file name
            if pairs_per_category is not None:
                paths = draw_subset(paths, int(pairs_per_category), subset_draw, seed, rng)
            if category in wanted:
                selected.extend(paths)
        selected.sort(key=lambda p: p.name)

        self.records: list[SPairRecord] = _records(selected, images_dir, hints)
        warn_points_outside("SPair-71k", [(str(r.annotation_path), r.outside) for r in self.records])
        for image_path in self.image_paths:
            if not image_path.is_file():
                raise FileNotFoundError(f"SPair-71k image file not found: {image_path}")
        self.categories: list[str] = sorted({r.category for r in self.records})

    def __getitem__(self, index: int) -> dict[str, Any]:
        """Load one pair.

        Args:
            index: Pair index.

        Returns:
            A dict with ``pair_id``, ``category``, ``src_image`` / ``trg_image`` (uint8
            ``[3, H, W]`` RGB), ``src_image_path`` / ``trg_image_path`` (str), ``src_kps`` /
            ``trg_kps`` (float32 ``[N, 2]`` original pixels ``(x, y)``), ``kps_valid`` (bool
            ``[N]``), ``kps_ids`` (list of int), ``threshold`` (float) and ``src_instance_box`` /
            ``trg_instance_box`` (the bbox, float32 ``[4]``), ``variations`` (difficulty levels, -1 = not annotated).

        Raises:
            FileNotFoundError: If an image file is missing.
            ValueError: If an image file cannot be decoded.
        """
        record = self.records[index]
        return {
            **self.load_pair(record),
            "kps_ids": list(record.kps_ids),
            "src_instance_box": record.src_bbox.clone(),
            "trg_instance_box": record.trg_bbox.clone(),
            "variations": dict(record.variations),
        }

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(root={str(self.root)!r}, split={self.split!r}, "
            f"pairs={len(self)}, categories={len(self.categories)})"
        )


#: How this benchmark is scored (its DataModule's ``protocol``; :func:`datamodules.protocols.get_protocol`).
PROTOCOL = Protocol(
    name="SPair-71k",
    key="spair",
    alphas=(0.01, 0.05, 0.1),
    threshold="max(w, h) of the target bbox",
    averages=("category_mean", "weighted", "per_point", "per_image"),
    groups=SPAIR_VARIATIONS,
    flip_pairs="spair",
)


class SPairDataModule(PairDataModule):
    """SPair-71k (``datamodules.spair.SPairDataset``), scored with the SPair protocol.

    Serves ``trainer.test`` / ``trainer.predict`` on ``test_split`` and ``trainer.fit`` /
    ``trainer.validate`` on ``train_split`` / ``val_split`` (all with the ``categories`` filter).

    Args:
        root: SPair-71k root (``PairAnnotation/``, ``JPEGImages/``).
        test_split: Split evaluated (``test``, ``val`` or ``trn``).
        categories: Categories to keep (``None``: all).
        pairs_per_category: Per-category subset size of the evaluated split (``None``: all; the paper's
            ablations use 20).
        seed: Seed of the per-category subsets (of every split).
        subset_draw: How the subsets are drawn: ``uniform`` (distinct pairs, the default) or ``reference``
            (the reference's ``--SAMPLE`` draw with replacement; with ``seed: 42`` the paper's ablation pairs,
            see ``configs/overlays/spair_subset20.yaml``).
        batch_size: Pairs per batch.
        num_workers: DataLoader workers.
        train_split: Split trained on (``trn`` alias ``train``, ``val`` or ``test``).
        val_split: Split validated on (model selection).
        train_pairs_per_category: Per-category subset size of the training split (``None``: all).
        val_pairs_per_category: Per-category subset size of the validation split (``None``: all).
        shuffle_seed: Base seed of the training shuffle (epoch ``e`` uses ``shuffle_seed + e``).
    """

    protocol = PROTOCOL
    layout_hint = LAYOUT_HINT
    root_name = ROOT_NAME
    supports_fit = True

    def __init__(
        self,
        root: str | None = None,
        test_split: str = "test",
        categories: list[str] | None = None,
        pairs_per_category: int | None = None,
        seed: int = 0,
        subset_draw: Literal["uniform", "reference"] = "uniform",
        batch_size: PositiveInt = 1,
        num_workers: NonNegativeInt = 0,
        train_split: str = "trn",
        val_split: str = "val",
        train_pairs_per_category: int | None = None,
        val_pairs_per_category: int | None = None,
        shuffle_seed: int = 0,
    ) -> None:
        super().__init__(root=root, batch_size=batch_size, num_workers=num_workers)
        self.test_split = normalize_split(test_split)
        self.category_filter = list(categories) if categories is not None else None
        self.pairs_per_category = pairs_per_category
        self.seed = seed
        if subset_draw not in SUBSET_DRAWS:  # the CLI checks the Literal; this is for Python callers
            raise ValueError(f"unknown subset_draw {subset_draw!r}; choose one of {list(SUBSET_DRAWS)}")
        self.subset_draw = subset_draw
        self.train_split = normalize_split(train_split)
        self.val_split = normalize_split(val_split)
        self.train_pairs_per_category = train_pairs_per_category
        self.val_pairs_per_category = val_pairs_per_category
        self.shuffle_seed = int(shuffle_seed)

    def _split_dataset(self, root: str, split: str, pairs_per_category: int | None) -> SPairDataset:
        return SPairDataset(
            root,
            split=split,
            categories=self.category_filter,
            pairs_per_category=pairs_per_category,
            seed=self.seed,
            subset_draw=self.subset_draw,
        )

    def build_dataset(self, root: str) -> SPairDataset:
        """The SPair split with the configured filter and subset."""
        return self._split_dataset(root, self.test_split, self.pairs_per_category)

    def build_train_dataset(self, root: str) -> SPairDataset:
        """The training split with the configured filter and subset."""
        return self._split_dataset(root, self.train_split, self.train_pairs_per_category)

    def build_val_dataset(self, root: str) -> SPairDataset:
        """The validation split with the configured filter and subset."""
        return self._split_dataset(root, self.val_split, self.val_pairs_per_category)
