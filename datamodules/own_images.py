"""Your own images: pairs listed in a JSON file, or one source image against every image of a folder.

A pairs file is a JSON list; paths are relative to the file's folder (or absolute)::

    [
      {"source": "cat.jpg", "target": "cat2.jpg", "source_keypoints": [[120, 80], [200, 95]], "category": "cat"},
      {"source": "dog.jpg", "target": "dog2.jpg", "source_box": [10, 20, 300, 240]},
      {"source": "a.jpg", "target": "b.jpg", "source_mask": "a_mask.png", "prompt": "a photo of a tabby cat"}
    ]

Required: ``source`` and ``target``. Optional: ``source_keypoints`` (``[[x, y], ...]`` in source pixels),
``category`` (fills the SD prompt template's ``{category}``; default the DataModule's ``category``), ``prompt``
(the whole SD prompt, used as is), ``source_mask`` (an image whose nonzero pixels mark the object, at the
source's size), ``source_box`` (``[x0, y0, x1, y1]``), ``pair_id``. A pair without keypoints gets a
``grid x grid`` lattice of points inside its mask, its box, or the whole image.

A collection is one ``source`` image (with ``source_keypoints``: a list, or a JSON file holding one) and a
``targets`` folder: the source is matched to every image of the folder (landmark transfer).

Everything is checked when the inputs are read (:func:`read_image_pairs`), which the CLI does before any model
is loaded: an unreadable image, a point outside its image, an empty folder or a missing field is an error
naming the file and the field.
"""

from __future__ import annotations

import json
import warnings
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import torch
from jsonargparse.typing import NonNegativeInt, PositiveInt
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

from lightning_modules.components.image_prep import (
    ImageTooLargeError,
    load_scale,
    load_user_image,
    open_user_image,
    upright,
    upright_size,
)
from lightning_modules.components.inputs import check_box, check_mask, check_points
from lightning_modules.components.samples import PairSample
from lightning_modules.components.sd_featurizer import WholePrompt

from .base import PairDataModule
from .own_image_paths import check_input_paths, no_such_image

__all__ = [
    "IMAGE_SUFFIXES",
    "ImagePair",
    "ImagePairsDataModule",
    "ImagePairsDataset",
    "grid_points",
    "read_image_pairs",
    "write_example_photos",
]

#: The files of a ``targets`` folder that are read as images.
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
_FIELDS = ("source", "target", "source_keypoints", "category", "prompt", "source_mask", "source_box", "pair_id")
PAIRS_HINT = (
    "a pairs file is a JSON list of {source, target, optional source_keypoints [[x, y], ...], category, prompt, "
    "source_mask, source_box [x0, y0, x1, y1], pair_id} with paths relative to the file (see docs/own-images.md)"
)

#: One checked pair: ``source`` / ``target`` (resolved paths), ``points`` ``[[x, y], ...]``, ``category`` (a str,
#: or a :class:`WholePrompt`) and ``pair_id`` (see :class:`ImagePairsDataset`).
ImagePair = dict[str, Any]


def _image_size(path: Path, where: str) -> tuple[int, int]:
    """``(width, height)`` of an image file as a photo viewer shows it (EXIF orientation applied), decoded to
    its last byte (a truncated file fails here, before any model is loaded, not in the middle of the run).

    Raises:
        FileNotFoundError: No such file.
        ValueError: The file is not an image PIL can read, is truncated, or has more pixels than
            :data:`~lightning_modules.components.image_prep.USER_IMAGE_MAX_PIXELS`.
    """
    if not path.is_file():
        raise no_such_image(path, where)
    try:
        with open_user_image(path) as image:
            size = upright_size(image)
            if image.format == "JPEG":  # decoded at 1/8 scale: every byte read, a 64th of the pixels held
                image.draft("RGB", (max(1, image.width // 8), max(1, image.height // 8)))
            image.load()
            return size
    except ImageTooLargeError as err:
        raise ValueError(f"{where}: {err}") from err
    except (UnidentifiedImageError, OSError, SyntaxError) as err:
        raise ValueError(f"{where}: {path} is not a readable image ({err})") from err


_points, _box = check_points, check_box  # the checks the Python call shares (lightning_modules.components.inputs)


def _mask(path: Path, size: tuple[int, int], where: str) -> np.ndarray:
    """A bool ``[H, W]`` mask file (nonzero pixels, read upright as its image) at its image's ``size``, with at
    least one pixel set."""
    _image_size(path, where)
    with open_user_image(path) as image:
        mask = np.asarray(upright(image).convert("L"))
    return check_mask(mask, size, where, f"mask {path}")


def grid_points(size: tuple[int, int], grid: int, box: tuple[float, ...] | None = None,
                mask: np.ndarray | None = None) -> list[list[float]]:
    """A ``grid x grid`` lattice of points (cell centres) over ``box`` (default the whole image), keeping those
    on the ``mask`` when one is given (the lattice then spans the mask's bounding box)."""
    if mask is not None:
        rows, cols = np.nonzero(mask)
        box = (float(cols.min()), float(rows.min()), float(cols.max()) + 1, float(rows.max()) + 1)
    x0, y0, x1, y1 = box if box is not None else (0.0, 0.0, float(size[0]), float(size[1]))
    steps = (np.arange(grid) + 0.5) / grid
    points = [[x0 + sx * (x1 - x0), y0 + sy * (y1 - y0)] for sy in steps for sx in steps]
    if mask is not None:
        points = [p for p in points if mask[int(p[1]), int(p[0])]] or [[float(cols.mean()), float(rows.mean())]]
    return points


def _read_json(path: Path, what: str) -> Any:
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from err


def _pair(entry: dict[str, Any], folder: Path, where: str, default_category: str, grid: int) -> ImagePair:
    """One checked pair of a pairs file (``where`` names the file and the entry in errors)."""
    for field in ("source", "target"):
        if not isinstance(entry.get(field), str) or not entry[field]:
            raise ValueError(f"{where}: missing field {field!r} (an image path); {PAIRS_HINT}")
    unknown = sorted(set(entry) - set(_FIELDS))
    if unknown:
        raise ValueError(f"{where}: unknown field(s) {unknown}; {PAIRS_HINT}")
    source, target = (folder / entry["source"]).resolve(), (folder / entry["target"]).resolve()
    size = _image_size(source, f"{where} 'source'")
    _image_size(target, f"{where} 'target'")
    box = _box(entry["source_box"], size, f"{where} 'source_box'") if "source_box" in entry else None
    mask = (_mask((folder / entry["source_mask"]).resolve(), size, f"{where} 'source_mask'")
            if "source_mask" in entry else None)
    if "source_keypoints" in entry:
        points = _points(entry["source_keypoints"], size, f"{where} 'source_keypoints'")
    else:
        points = grid_points(size, grid, box, mask)
    if "prompt" in entry and not isinstance(entry["prompt"], str):
        raise ValueError(f"{where} 'prompt': expected a string, got {entry['prompt']!r}")
    category = WholePrompt(entry["prompt"]) if "prompt" in entry else str(entry.get("category", default_category))
    pair_id = str(entry.get("pair_id") or f"{source.stem}->{target.stem}")
    return {"source": str(source), "target": str(target), "points": points, "category": category, "pair_id": pair_id}


def _pairs_from_file(path: Path, category: str, grid: int) -> list[ImagePair]:
    entries = _read_json(path, "pairs file")
    if not isinstance(entries, list) or not entries:
        raise ValueError(f"{path}: expected a non-empty JSON list; {PAIRS_HINT}")
    pairs = []
    for index, entry in enumerate(entries):
        where = f"{path} entry {index}"
        if not isinstance(entry, dict):
            raise ValueError(f"{where}: expected an object with 'source' and 'target', got {entry!r}")
        pairs.append(_pair(entry, path.parent, where, category, grid))
    return pairs


#: The skip warnings already given in this process (:func:`_folder_images`).
_SKIP_WARNINGS: set[str] = set()


def _folder_images(source: Path, targets: Path, strict: bool) -> list[Path]:
    """The readable images of the ``targets`` folder, sorted by name, the source itself left out.

    Hidden files (any name starting with ``.``: ``.DS_Store``, macOS's ``._IMG_0001.JPG``), files of other
    suffixes than :data:`IMAGE_SUFFIXES` and unreadable images (empty, truncated, too large) are skipped with one
    warning listing them, or, with ``strict``, stop the run with that list. Sub-folders are not read.
    """
    files, skipped = [], []
    for path in sorted(targets.iterdir()):
        if not path.is_file() or path.resolve() == source:
            continue
        if path.name.startswith("."):
            skipped.append(f"{path.name} (hidden)")
        elif path.suffix.lower() not in IMAGE_SUFFIXES:
            skipped.append(f"{path.name} (not an image suffix)")
        else:
            try:
                _image_size(path.resolve(), "data.targets")
            except ValueError as err:
                skipped.append(f"{path.name} ({str(err.__cause__ or err).splitlines()[0]})")
                continue
            files.append(path.resolve())
    if skipped and strict:
        raise ValueError(f"data.targets: folder {targets} holds {len(skipped)} file(s) that are not readable images "
                         f"(data.strict is true): {'; '.join(skipped)}")
    message = (f"data.targets: skipping {len(skipped)} file(s) of {targets} that are not readable images "
               f"({'; '.join(skipped)}); --data.strict true stops instead")
    if skipped and message not in _SKIP_WARNINGS:  # once a run: the CLI's check and the setup both read the folder
        _SKIP_WARNINGS.add(message)
        warnings.warn(message, UserWarning, stacklevel=2)
    return files


def _collection(source: Path, targets: Path, keypoints: Any, category: str, grid: int,
                strict: bool = False) -> list[ImagePair]:
    """The source matched to every image of the ``targets`` folder (sorted by name, the source itself left out;
    other files skipped, :func:`_folder_images`)."""
    size = _image_size(source, "data.source")
    files = _folder_images(source, targets, strict)
    if not files:
        raise ValueError(f"data.targets: folder {targets} holds no image ({', '.join(IMAGE_SUFFIXES)}) "
                         "besides the source")
    if isinstance(keypoints, str):
        file = Path(keypoints).expanduser()
        keypoints = _read_json(file, "data.source_keypoints file")
        points = _points(keypoints, size, f"data.source_keypoints ({file})")
    elif keypoints is not None:
        points = _points(keypoints, size, "data.source_keypoints")
    else:
        points = grid_points(size, grid)
    return [{"source": str(source), "target": str(f), "points": points, "category": category,
             "pair_id": f"{source.stem}->{f.stem}"} for f in files]


def read_image_pairs(
    pairs: str | None = None,
    source: str | None = None,
    targets: str | None = None,
    source_keypoints: list[list[float]] | str | None = None,
    category: str = "object",
    grid: int = 6,
    strict: bool = False,
) -> list[ImagePair]:
    """Read and check the inputs of :class:`ImagePairsDataModule` (its arguments): every image header, point,
    box and mask (every image decoded once, to its last byte). Images are read as a photo viewer shows them
    (EXIF orientation applied): sizes, points, boxes and masks are in that frame. ``strict`` stops on a file of
    the ``targets`` folder that is not a readable image instead of skipping it with a warning.

    Returns:
        The checked pairs, pair ids made unique (``#2``, ``#3``, ... on repeats).

    Raises:
        FileNotFoundError: A file or folder that does not exist (named).
        ValueError: Anything else that cannot work, naming the file and the field.
    """
    check_input_paths(pairs=pairs, source=source, targets=targets, source_keypoints=source_keypoints, grid=grid)
    if pairs is not None:
        checked = _pairs_from_file(Path(pairs).expanduser(), category, int(grid))
    else:
        checked = _collection(Path(source).expanduser().resolve(), Path(targets).expanduser(),  # type: ignore[arg-type]
                              source_keypoints, category, int(grid), bool(strict))
    seen: Counter[str] = Counter()
    for pair in checked:
        seen[pair["pair_id"]] += 1
        if seen[pair["pair_id"]] > 1:
            pair["pair_id"] = f"{pair['pair_id']}#{seen[pair['pair_id']]}"
    return checked


class PhotoPairSample(PairSample, total=False):
    """A pair of your own photos: :class:`~lightning_modules.components.samples.PairSample` (points to carry)
    and the files' own frame, which the outputs are written in (the images may be read downscaled).

    Attributes:
        src_file_size: The source file's size ``(width, height)``, upright.
        trg_file_size: The target file's size.
        src_file_kps: The source points as given, in the file's pixels ``[N, 2]`` float64.
    """

    src_file_size: tuple[int, int]
    trg_file_size: tuple[int, int]
    src_file_kps: torch.Tensor


class ImagePairsDataset(Dataset):
    """The checked pairs of :func:`read_image_pairs` as pair samples (images read lazily, upright).

    Items: ``pair_id``, ``category``, ``src_image`` / ``trg_image`` (uint8 ``[3, H, W]``, at most ``max_side``
    long), ``src_file`` / ``trg_file`` and ``src_image_path`` / ``trg_image_path`` (the files; a file matched
    under several categories gets the SD features of each prompt,
    :func:`lightning_modules.components.features.image_key`), ``src_kps`` ``[N, 2]`` float32 (the points to
    carry, in the pixels of ``src_image``; there is no ground truth), and the files' own frame:
    ``src_file_size`` / ``trg_file_size`` (``(width, height)`` upright) and ``src_file_kps`` (the points as
    given, float64). Outputs are written in the files' frame (:func:`lightning_modules.point_transfer.match_line`).

    Args:
        pairs: The checked pairs.
        max_side: Read an image whose long side exceeds it downscaled on load to that side
            (:func:`~lightning_modules.components.image_prep.load_user_image`: a large JPEG is never decoded
            whole, so memory stays bounded); None reads every image whole.
    """

    #: The keys its samples hold (the contract ``tests/test_sample_contract.py`` checks).
    sample_type = PhotoPairSample

    def __init__(self, pairs: list[ImagePair], max_side: int | None = None) -> None:
        self.pairs = pairs
        self.max_side = None if max_side is None else int(max_side)
        self.categories = sorted({str(p["category"]) for p in pairs})

    @property
    def pair_ids(self) -> list[str]:
        """The pair ids, in input order."""
        return [p["pair_id"] for p in self.pairs]

    def pair_images(self) -> list[tuple[str, str, str]]:
        """``(category, source, target)`` of every pair (the evaluation order groups pairs by image)."""
        return [(str(p["category"]), p["source"], p["target"]) for p in self.pairs]

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> dict[str, Any]:
        pair = self.pairs[index]
        src_image, src_size = load_user_image(pair["source"], self.max_side)
        trg_image, trg_size = load_user_image(pair["target"], self.max_side)
        points = torch.tensor(pair["points"], dtype=torch.float64).reshape(-1, 2)
        return {
            "pair_id": pair["pair_id"],
            "category": pair["category"],
            "src_image": src_image,
            "trg_image": trg_image,
            "src_image_path": pair["source"],
            "trg_image_path": pair["target"],
            "src_file": pair["source"],
            "trg_file": pair["target"],
            "src_kps": (points * load_scale(src_image, src_size)).float(),
            "src_file_kps": points,
            "src_file_size": src_size,
            "trg_file_size": trg_size,
        }


class ImagePairsDataModule(PairDataModule):
    """Your own images for ``trainer.predict`` (``configs/match.yaml``): a pairs file, or one source image
    against a folder (see :mod:`datamodules.own_images` for the formats). There is no benchmark protocol.

    The inputs are checked by :meth:`check_inputs` (the CLI calls it before loading any model) and again when
    the dataset is built.

    Args:
        pairs: A pairs file (JSON list).
        source: One source image, matched to every image of ``targets``.
        targets: The folder of target images (with ``source``).
        source_keypoints: The source's points ``[[x, y], ...]`` or a JSON file holding them (with ``source``).
        category: The category of pairs that name none (the SD prompt's ``{category}``).
        grid: Points per side of the lattice laid over pairs without keypoints.
        strict: Stop on a file of ``targets`` that is not a readable image (hidden, another suffix, empty,
            truncated) instead of skipping it with one warning that lists them.
        max_side: Read a photo whose long side exceeds this many pixels downscaled on load to it (a JPEG is
            decoded at a reduced scale: a 100-megapixel photo never sits in memory whole); points are read and
            written in the photo's own pixels all the same. 1920 is twice the largest featurizer input of the
            paper's configs (SD at 960 px: :meth:`~lightning_modules.components.FusedCorrespondence.load_side`,
            what the Python call uses); null reads every photo whole.
        batch_size: Pairs per batch.
        num_workers: DataLoader workers.
    """

    layout_hint = PAIRS_HINT

    def __init__(
        self,
        pairs: str | None = None,
        source: str | None = None,
        targets: str | None = None,
        source_keypoints: list[list[float]] | str | None = None,
        category: str = "object",
        grid: PositiveInt = 6,
        strict: bool = False,
        max_side: PositiveInt | None = 1920,
        batch_size: PositiveInt = 1,
        num_workers: NonNegativeInt = 0,
    ) -> None:
        super().__init__(root=None, batch_size=batch_size, num_workers=num_workers)
        self.inputs = {"pairs": pairs, "source": source, "targets": targets, "source_keypoints": source_keypoints,
                       "category": category, "grid": int(grid), "strict": bool(strict)}
        self.max_side = None if max_side is None else int(max_side)

    @staticmethod
    def check_inputs(**init_args: Any) -> None:
        """Check a config's ``data.init_args`` before any model is loaded (:func:`read_image_pairs`)."""
        names = ("pairs", "source", "targets", "source_keypoints", "category", "grid", "strict")
        read_image_pairs(**{k: v for k, v in init_args.items() if k in names})


    def setup(self, stage: str | None = None) -> None:
        """Read and check the pairs (``predict``)."""
        if stage in (None, "predict", "test") and self.test_dataset is None:
            self.test_dataset = ImagePairsDataset(read_image_pairs(**self.inputs), max_side=self.max_side)
        elif stage in ("fit", "validate"):
            raise NotImplementedError("ImagePairsDataModule serves trainer.predict (configs/match.yaml)")


def write_example_photos(root: str | Path, num_targets: int = 3, size: tuple[int, int] = (160, 120),
                         seed: int = 0) -> Path:
    """Write generated "own photos" into ``root`` (tests and docs; no data set needed).

    ``source.png`` (a textured object on a smooth background), ``targets/target_<k>.png`` (known homographies of
    it over new backgrounds, with photometric changes: the ``warps`` scene of :mod:`.synthetic`),
    ``source_mask.png``, ``pairs.json`` (one pair with keypoints and a category, one with a box, one with a mask
    and a prompt) and ``truth.json`` (each target's homography, source pixels -> target pixels).

    Returns:
        The path of ``pairs.json``.
    """
    from .synthetic import _background, _homography, _object_template, _warp_image  # the warps scene's parts

    root = Path(root)
    (root / "targets").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    width, height = size
    source = _background(rng, width, height)
    box = [width // 4, height // 4, 3 * width // 4, 3 * height // 4]
    source[box[1]:box[3], box[0]:box[2]] = _object_template(rng, box[2] - box[0], box[3] - box[1])
    Image.fromarray(source).save(root / "source.png")
    mask = np.zeros((height, width), dtype=np.uint8)
    mask[box[1]:box[3], box[0]:box[2]] = 255
    Image.fromarray(mask).save(root / "source_mask.png")
    truth = {}
    for k in range(num_targets):
        warped, annotation = _warp_image([seed, 7], k, source, {"kps": {}, "bndbox": box}, f"target_{k}")
        Image.fromarray(warped).save(root / "targets" / f"target_{k}.png")
        truth[f"target_{k}.png"] = _homography(np.random.default_rng([seed, 7, 3, k]), width, height).tolist()
    (root / "truth.json").write_text(json.dumps(truth, indent=1) + "\n", encoding="utf-8")
    points = [[box[0] + 8.0, box[1] + 8.0], [width / 2, height / 2], [box[2] - 9.0, box[3] - 9.0]]
    pairs = [
        {"source": "source.png", "target": "targets/target_0.png", "source_keypoints": points, "category": "toy"},
        {"source": "source.png", "target": f"targets/target_{min(1, num_targets - 1)}.png", "source_box": box},
        {"source": "source.png", "target": f"targets/target_{num_targets - 1}.png", "source_mask": "source_mask.png",
         "prompt": "a photo of a toy", "pair_id": "masked"},
    ]
    path = root / "pairs.json"
    path.write_text(json.dumps(pairs, indent=1) + "\n", encoding="utf-8")
    return path
