"""DAVIS-2017 video object segmentation reader for label propagation, and a synthetic DAVIS-format writer.

Layout of DAVIS-2017 (trainval, semi-supervised)::

    <root>/JPEGImages/<resolution>/<sequence>/00000.jpg, 00001.jpg, ...
    <root>/Annotations/<resolution>/<sequence>/00000.png, 00001.png, ...   (palette PNGs of object ids)
    <root>/ImageSets/2017/{train,val}.txt                                  (one sequence per line)

``resolution`` is ``480p`` or ``Full-Resolution``. An annotation holds object ids: 0 background, ``1..N``
the objects, 255 a void label where present. Label propagation (supplementary B.1 of "A Tale of Two
Features") carries the first frame's annotation to every later frame through dense correspondence, so an
item is the pair (frame 0 with its annotation as the source, frame ``t > 0`` as the target), the target's
annotation being the ground truth. Every item of a sequence shares its source image, so a per-image feature
cache extracts it once. ``num_objects`` of a sequence is the largest object id of its first annotation
(void excluded), as in the DAVIS toolkit; scoring is :class:`lightning_modules.segmentation_metrics.JAndF`.

The toolkit's semi-supervised evaluation scores frames ``1 .. T-2`` (never the last one):
``skip_last_frame=True`` reproduces that frame set.
"""

from __future__ import annotations

import inspect
import json
import shutil
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from jsonargparse.typing import NonNegativeInt, PositiveInt
from PIL import Image, UnidentifiedImageError

from lightning_modules.components.image_prep import load_rgb_image
from lightning_modules.components.samples import PairSample

from .base import PairDataModule, require_root_folder
from .masked_pairs import MaskedPairsDataModule
from .protocols import Protocol
from .records import PairRecordsDataset, category_filter
from .samplers import collate_pairs

__all__ = [
    "DAVISDataModule",
    "DAVISDataset",
    "DAVISFrame",
    "DAVISInstancePairs",
    "DAVISSwapDataModule",
    "DAVIS_LAYOUT_HINT",
    "LAYOUT_HINT",
    "SyntheticDAVISDataModule",
    "VOID_LABEL",
    "collate_davis",
    "davis_palette",
    "read_davis_annotation",
    "write_synthetic_davis",
]

#: The benchmark's name in messages ("DAVIS root not found: ...").
ROOT_NAME = "DAVIS"
LAYOUT_HINT = (
    "expected the DAVIS-2017 layout: '<root>/JPEGImages/<resolution>/<sequence>/%05d.jpg', "
    "'<root>/Annotations/<resolution>/<sequence>/%05d.png' (palette PNGs of object ids; resolution 480p or "
    "Full-Resolution) and, for a split, '<root>/ImageSets/2017/<split>.txt'"
)
DAVIS_LAYOUT_HINT = LAYOUT_HINT

#: Annotation value of pixels to ignore ("void"), where a DAVIS annotation has any.
VOID_LABEL = 255

SYNTHETIC_MARKER = ".synthetic_davis.json"
_SYNTHETIC_FORMAT = "sd-dino-lightning/synthetic-davis/v1"


def davis_palette() -> list[int]:
    """The DAVIS (PASCAL VOC) annotation palette, 256 RGB triples flattened: 0 black, 1 (128, 0, 0),
    2 (0, 128, 0), 3 (128, 128, 0), 4 (0, 0, 128), ... (bits of the id spread over the colour bytes)."""
    palette = []
    for index in range(256):
        r = g = b = 0
        c = index
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        palette += [r, g, b]
    return palette


def read_davis_annotation(path: str | Path) -> torch.Tensor:
    """Read a DAVIS annotation (a palette or grayscale PNG whose values are object ids).

    Returns:
        int64 ``[H, W]`` object ids (0 background, 255 void where present).

    Raises:
        FileNotFoundError: If the file does not exist.
        ValueError: If it cannot be decoded, or is a colour image (the ids would be lost).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"DAVIS annotation file not found: {path}")
    try:
        with Image.open(path) as img:
            img.load()
            if img.mode not in ("P", "L", "1"):
                raise ValueError(
                    f"DAVIS annotation {path} is a {img.mode!r} image; expected a palette ('P') or grayscale "
                    "('L') PNG whose values are object ids"
                )
            array = np.array(img, dtype=np.int64)
    except (UnidentifiedImageError, OSError, SyntaxError) as err:
        raise ValueError(f"Could not read DAVIS annotation {path}: {err}") from err
    return torch.from_numpy(array)


@dataclass(frozen=True)
class DAVISFrame:
    """One label-propagation item: frame 0 of a sequence (source) and its frame ``frame_index`` (target)."""

    pair_id: str
    category: str
    frame_index: int
    src_image_path: Path
    trg_image_path: Path
    src_annotation_path: Path
    trg_annotation_path: Path
    num_objects: int


def _positive_int(name: str, value: Any, allow_none: bool = False) -> int | None:
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be a positive int{' or None' if allow_none else ''}, got {value!r}")
    return int(value)


def _stems(folder: Path, suffix: str) -> list[str]:
    return sorted(p.stem for p in folder.iterdir() if p.is_file() and p.suffix.lower() == suffix)


class DAVISFrameSample(PairSample, total=False):
    """A DAVIS label-propagation pair: :class:`~lightning_modules.components.samples.PairSample` (labels) and
    where its frames are.

    Attributes:
        frame_index: Index of the target frame in its sequence.
        src_annotation_path: The source frame's annotation file.
        trg_annotation_path: The target frame's annotation file.
    """

    frame_index: int
    src_annotation_path: str
    trg_annotation_path: str


class DAVISDataset(PairRecordsDataset):
    """DAVIS-2017 label propagation items: (first frame + annotation, frame ``t``) for every ``t > 0``.

    Frame lists are read and checked eagerly (every frame has its annotation, the first annotation has at
    least one object); images and annotations are decoded lazily in :meth:`__getitem__`.

    Args:
        root: DAVIS root holding ``JPEGImages/`` and ``Annotations/``.
        sequences: Sequences to keep (a name or a list); None keeps all of the split (or, without a split, all
            sequence folders under ``JPEGImages/<resolution>``).
        resolution: ``"480p"`` or ``"Full-Resolution"`` (the folder under ``JPEGImages`` / ``Annotations``).
        split: Read the sequence list from ``ImageSets/2017/<split>.txt`` (e.g. ``"val"``); None lists folders.
        frame_stride: Keep target frames ``t = stride, 2 * stride, ...`` (1: every frame after the first).
        max_frames: Keep at most this many target frames per sequence (the earliest); None keeps all.
        skip_last_frame: Leave out each sequence's last frame, as the DAVIS toolkit's semi-supervised
            evaluation does (it scores frames ``1 .. T-2``).

    Attributes:
        root: Dataset root.
        categories: Sorted names of the sequences read (a sequence is a "category").
        records: One :class:`DAVISFrame` per item, by sequence then frame.
        sequence_lengths: ``{sequence: number of frames on disk}``.
        objects_per_sequence: ``{sequence: number of objects of its first annotation}``.

    Raises:
        FileNotFoundError: If the root, a resolution folder, the split file or a sequence folder is missing.
        ValueError: On an unknown sequence, an empty split, a frame without its annotation (or the reverse),
            a sequence of fewer than two frames, a first annotation without objects, or a bad argument.
    """

    #: The keys its samples hold (the contract ``tests/test_sample_contract.py`` checks).
    sample_type = DAVISFrameSample

    def __init__(
        self,
        root: str | Path,
        sequences: str | Sequence[str] | None = None,
        resolution: str = "480p",
        split: str | None = None,
        frame_stride: int = 1,
        max_frames: int | None = None,
        skip_last_frame: bool = False,
    ) -> None:
        super().__init__()
        self.root = Path(root).expanduser()
        self.resolution = str(resolution)
        self.split = split
        self.frame_stride = _positive_int("frame_stride", frame_stride)
        self.max_frames = _positive_int("max_frames", max_frames, allow_none=True)
        self.skip_last_frame = bool(skip_last_frame)
        wanted = category_filter(sequences)

        require_root_folder(self.root, ROOT_NAME, LAYOUT_HINT)
        self.image_root = self.root / "JPEGImages" / self.resolution
        self.annotation_root = self.root / "Annotations" / self.resolution
        for folder in (self.image_root, self.annotation_root):
            if not folder.is_dir():
                raise FileNotFoundError(f"DAVIS folder not found: {folder}; {LAYOUT_HINT}")

        available = self._split_sequences() if split is not None else _folders(self.image_root)
        if wanted is None:
            selected = sorted(set(available))
        else:
            unknown = sorted(set(wanted) - set(available))
            if unknown:
                where = f"split file {self._split_file()}" if split is not None else f"{self.image_root}"
                raise ValueError(
                    f"Unknown DAVIS sequence{'s' if len(unknown) > 1 else ''} {unknown} (not in {where}); "
                    f"available: {sorted(set(available))}"
                )
            selected = sorted(set(wanted))
        if not selected:
            raise ValueError(f"no DAVIS sequences under {self.image_root}; {LAYOUT_HINT}")

        self.records: list[DAVISFrame] = []
        self.sequence_lengths: dict[str, int] = {}
        self.objects_per_sequence: dict[str, int] = {}
        for name in selected:
            self.records.extend(self._sequence_records(name))
        self.categories: list[str] = list(selected)

    def _split_file(self) -> Path:
        return self.root / "ImageSets" / "2017" / f"{self.split}.txt"

    def _split_sequences(self) -> list[str]:
        path = self._split_file()
        if not path.is_file():
            raise FileNotFoundError(f"DAVIS split file not found: {path}; {LAYOUT_HINT}")
        names = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        if not names:
            raise ValueError(f"DAVIS split file {path} lists no sequence")
        return names

    def _sequence_records(self, name: str) -> list[DAVISFrame]:
        image_dir, annotation_dir = self.image_root / name, self.annotation_root / name
        for folder in (image_dir, annotation_dir):
            if not folder.is_dir():
                raise FileNotFoundError(f"DAVIS sequence folder not found: {folder}; {LAYOUT_HINT}")
        frames, annotations = _stems(image_dir, ".jpg"), _stems(annotation_dir, ".png")
        if frames != annotations:
            missing = sorted(set(frames) - set(annotations))[:3]
            extra = sorted(set(annotations) - set(frames))[:3]
            raise ValueError(
                f"DAVIS sequence {name!r}: {len(frames)} frames in {image_dir} but {len(annotations)} annotations "
                f"in {annotation_dir}"
                + (f"; frames without annotation: {[f'{s}.jpg' for s in missing]}" if missing else "")
                + (f"; annotations without frame: {[f'{s}.png' for s in extra]}" if extra else "")
            )
        if len(frames) < 2:
            raise ValueError(f"DAVIS sequence {name!r} has {len(frames)} frame(s) in {image_dir}; need at least 2")
        first_annotation = annotation_dir / f"{frames[0]}.png"
        ids = torch.unique(read_davis_annotation(first_annotation))
        ids = ids[ids != VOID_LABEL]
        num_objects = int(ids.max()) if ids.numel() else 0
        if num_objects < 1:
            raise ValueError(f"DAVIS first-frame annotation {first_annotation} holds no object (all background)")
        self.sequence_lengths[name] = len(frames)
        self.objects_per_sequence[name] = num_objects

        last = len(frames) - 1 if self.skip_last_frame else len(frames)
        targets = list(range(self.frame_stride, last, self.frame_stride))
        if self.max_frames is not None:
            targets = targets[: self.max_frames]
        return [
            DAVISFrame(
                pair_id=f"{name}/{frames[t]}",
                category=name,
                frame_index=t,
                src_image_path=image_dir / f"{frames[0]}.jpg",
                trg_image_path=image_dir / f"{frames[t]}.jpg",
                src_annotation_path=first_annotation,
                trg_annotation_path=annotation_dir / f"{frames[t]}.png",
                num_objects=num_objects,
            )
            for t in targets
        ]

    def __getitem__(self, index: int) -> dict[str, Any]:
        """Load one item.

        Returns:
            A dict with ``pair_id`` (``"<sequence>/<frame:05d>"``), ``category`` (the sequence name),
            ``dataset`` (``"davis"``), ``frame_index`` (``t``), ``src_image`` / ``trg_image`` (uint8
            ``[3, H, W]``: frame 0 and frame ``t``), ``src_image_path`` / ``trg_image_path`` (str),
            ``src_labels`` (int64 ``[H, W]``, frame 0's object ids), ``trg_labels`` (int64 ``[H, W]``, frame
            ``t``'s, the ground truth), ``src_annotation_path`` / ``trg_annotation_path`` (str) and
            ``num_objects`` (int).

        Raises:
            FileNotFoundError: If a file vanished since construction.
            ValueError: If a file cannot be decoded or an annotation's size differs from its frame's.
        """
        record = self.records[index]
        src_image, trg_image = load_rgb_image(record.src_image_path), load_rgb_image(record.trg_image_path)
        src_labels = _labels_for(record.src_annotation_path, record.src_image_path, src_image)
        trg_labels = _labels_for(record.trg_annotation_path, record.trg_image_path, trg_image)
        return {
            "pair_id": record.pair_id,
            "category": record.category,
            "dataset": "davis",
            "frame_index": record.frame_index,
            "src_image": src_image,
            "trg_image": trg_image,
            "src_image_path": str(record.src_image_path),
            "trg_image_path": str(record.trg_image_path),
            "src_labels": src_labels,
            "trg_labels": trg_labels,
            "src_annotation_path": str(record.src_annotation_path),
            "trg_annotation_path": str(record.trg_annotation_path),
            "num_objects": record.num_objects,
        }

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(root={str(self.root)!r}, resolution={self.resolution!r}, split={self.split!r}, "
            f"items={len(self)}, sequences={len(self.categories)})"
        )


def _folders(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def _labels_for(annotation_path: Path, image_path: Path, image: torch.Tensor) -> torch.Tensor:
    labels = read_davis_annotation(annotation_path)
    if tuple(labels.shape) != tuple(image.shape[1:]):
        raise ValueError(
            f"DAVIS annotation {annotation_path} is {labels.shape[1]}x{labels.shape[0]} but its frame {image_path} "
            f"is {image.shape[2]}x{image.shape[1]}"
        )
    return labels


#: Identity collate (items keep their own image sizes): the one the SPair reader uses.
collate_davis = collate_pairs


# --------------------------------------------------------------------------------------------------
# synthetic DAVIS-format root
# --------------------------------------------------------------------------------------------------
def write_synthetic_davis(
    root: str | Path,
    sequences: Sequence[str] = ("blob", "bars"),
    num_frames: int = 4,
    size: tuple[int, int] = (96, 64),
    num_objects: int = 2,
    seed: int = 0,
) -> Path:
    """Write a small deterministic DAVIS-2017-format root (480p folder names, ``ImageSets/2017/val.txt``).

    Every sequence shows a static textured background and ``num_objects`` textured objects (alternately
    ellipses and rectangles, each with its own random colour grid that moves with it) which start in
    separate vertical slots and move by one to three pixels per frame, bouncing off the borders; later
    objects are drawn over earlier ones. Annotations are palette PNGs (:func:`davis_palette`) of object ids
    ``1..num_objects``. The result is read by :class:`DAVISDataset`.

    Args:
        root: Output folder (created; refused if it is non-empty and not an earlier synthetic root). The
            folders of the given sequences are replaced; ``ImageSets/2017/val.txt`` lists them.
        sequences: Sequence names.
        num_frames: Frames per sequence (>= 2).
        size: ``(width, height)`` of the frames (sides >= 16).
        num_objects: Objects per sequence (1 .. width // 8).
        seed: Seed; each sequence's content also depends on its name.

    Returns:
        The root path.
    """
    root = Path(root).expanduser()
    sequences = [sequences] if isinstance(sequences, str) else list(sequences)
    width, height = (int(v) for v in size)
    if not sequences or len(set(sequences)) != len(sequences):
        raise ValueError(f"sequences must be a non-empty list of unique names, got {sequences!r}")
    for name in sequences:
        if not isinstance(name, str) or not name or name.startswith(".") or set("/\\") & set(name):
            raise ValueError(f"Invalid sequence name {name!r}")
    if isinstance(num_frames, bool) or int(num_frames) < 2:
        raise ValueError(f"num_frames must be >= 2, got {num_frames!r}")
    if min(width, height) < 16:
        raise ValueError(f"size must be (width, height) with sides >= 16, got {size!r}")
    if not 1 <= int(num_objects) <= min(254, width // 8):
        raise ValueError(f"num_objects must be in [1, {min(254, width // 8)}] for width {width}, got {num_objects!r}")
    if root.exists() and (not root.is_dir() or (any(root.iterdir()) and not (root / SYNTHETIC_MARKER).is_file())):
        raise ValueError(
            f"Refusing to write a synthetic DAVIS root into {root}: it exists, is not empty and has no "
            f"{SYNTHETIC_MARKER} marker (is it a real dataset?)"
        )
    root.mkdir(parents=True, exist_ok=True)
    (root / SYNTHETIC_MARKER).write_text(
        json.dumps({"format": _SYNTHETIC_FORMAT, "sequences": sequences, "num_frames": int(num_frames),
                    "size": [width, height], "num_objects": int(num_objects), "seed": int(seed)}) + "\n",
        encoding="utf-8",
    )
    palette = davis_palette()
    for index, name in enumerate(sequences):
        image_dir, annotation_dir = root / "JPEGImages" / "480p" / name, root / "Annotations" / "480p" / name
        for folder in (image_dir, annotation_dir):
            if folder.exists():
                shutil.rmtree(folder)
            folder.mkdir(parents=True)
        rng = np.random.default_rng([int(seed), zlib.crc32(name.encode("utf-8"))])
        for t, (frame, labels) in enumerate(_render_sequence(rng, index, int(num_frames), width, height,
                                                             int(num_objects))):
            Image.fromarray(frame).save(image_dir / f"{t:05d}.jpg", format="JPEG", quality=95)
            annotation = Image.frombytes("P", (width, height), labels.tobytes())
            annotation.putpalette(palette)
            annotation.save(annotation_dir / f"{t:05d}.png")
    split_dir = root / "ImageSets" / "2017"
    split_dir.mkdir(parents=True, exist_ok=True)
    (split_dir / "val.txt").write_text("".join(f"{name}\n" for name in sequences), encoding="utf-8")
    return root


#: :func:`write_synthetic_davis`'s defaults (its signature is their one home; the DataModule's options use them).
_DAVIS_GENERATOR_DEFAULTS: dict[str, Any] = {
    name: param.default
    for name, param in inspect.signature(write_synthetic_davis).parameters.items()
    if param.default is not param.empty
}


def _texture(
    rng: np.random.Generator, width: int, height: int, cells: tuple[int, int], noise: int, span: tuple[int, int]
) -> np.ndarray:
    """A random colour grid of ``cells`` (rows, cols), values in ``span``, blown up to ``width x height``, plus
    pixel noise."""
    grid = rng.integers(span[0], span[1], size=(*cells, 3), dtype=np.uint8)
    tex = np.asarray(Image.fromarray(grid).resize((width, height), resample=Image.NEAREST)).astype(np.int16)
    tex = tex + rng.integers(-noise, noise + 1, size=tex.shape, dtype=np.int16)
    return np.clip(tex, 0, 255).astype(np.uint8)


def _render_sequence(
    rng: np.random.Generator, index: int, num_frames: int, width: int, height: int, num_objects: int
) -> list[tuple[np.ndarray, np.ndarray]]:
    """``num_frames`` (RGB ``[H, W, 3]``, uint8 label ``[H, W]``) of one synthetic sequence."""
    background = _texture(rng, width, height, (4, 6), 10, (70, 186))
    slot = width // num_objects
    objects = []
    for k in range(num_objects):
        obj_w = max(4, min(slot - 2, int(rng.integers(width // 6, width // 3 + 1))))
        obj_h = max(4, int(rng.integers(height // 4, height // 2 + 1)))
        x = k * slot + int(rng.integers(0, max(1, slot - obj_w)))
        y = int(rng.integers(0, height - obj_h + 1))
        velocity = [int(v) * int(rng.choice([-1, 1])) for v in rng.integers(1, 4, size=2)]
        if (index + k) % 2 == 0:  # ellipse
            yy, xx = np.mgrid[0:obj_h, 0:obj_w]
            shape = ((yy + 0.5 - obj_h / 2) / (obj_h / 2)) ** 2 + ((xx + 0.5 - obj_w / 2) / (obj_w / 2)) ** 2 <= 1
        else:  # rectangle
            shape = np.ones((obj_h, obj_w), dtype=bool)
        objects.append({"pos": [x, y], "vel": velocity, "shape": shape,
                        "texture": _texture(rng, obj_w, obj_h, (3, 3), 25, (0, 256))})
    out = []
    for _ in range(num_frames):
        frame, labels = background.copy(), np.zeros((height, width), dtype=np.uint8)
        for k, obj in enumerate(objects):
            x, y = obj["pos"]
            obj_h, obj_w = obj["shape"].shape
            window = (slice(y, y + obj_h), slice(x, x + obj_w))
            frame[window][obj["shape"]] = obj["texture"][obj["shape"]]
            labels[window][obj["shape"]] = k + 1
        out.append((frame, labels))
        for obj in objects:  # move, bouncing off the borders
            obj_h, obj_w = obj["shape"].shape
            for axis, limit in ((0, width - obj_w), (1, height - obj_h)):
                step = obj["pos"][axis] + obj["vel"][axis]
                if not 0 <= step <= limit:
                    obj["vel"][axis] = -obj["vel"][axis]
                    step = min(max(obj["pos"][axis] + obj["vel"][axis], 0), limit)
                obj["pos"][axis] = step
    return out


class DAVISInstancePairs(torch.utils.data.Dataset):
    """Instance-swap inputs from a DAVIS root: frame 0 of one sequence and frame 0 of another, each with the
    mask of one annotated object (the dataset's own instance masks).

    Items have the keys of :class:`datamodules.masked_pairs.MaskedPairsDataset`: ``pair_id`` (``"<a>-<b>"``),
    ``category`` (the source sequence's name: the refinement prompt), ``src_image`` / ``trg_image``,
    ``src_mask`` / ``trg_mask`` (bool, annotation == ``object_id``), ``src_image_path`` / ``trg_image_path``.

    Args:
        root: DAVIS root holding ``JPEGImages/`` and ``Annotations/``.
        pairs: ``[[source sequence, target sequence], ...]``; None pairs each sequence with the next one in
            sorted order.
        object_id: The annotated object whose mask is used, in both frames.
        resolution: ``480p`` or ``Full-Resolution``.
        split: Restrict the sequences to ``ImageSets/2017/<split>.txt``.

    Raises:
        ValueError: An unknown sequence, fewer than two sequences, or an object absent from a frame (named).
    """

    def __init__(
        self,
        root: str | Path,
        pairs: Sequence[Sequence[str]] | None = None,
        object_id: int = 1,
        resolution: str = "480p",
        split: str | None = None,
    ) -> None:
        davis = DAVISDataset(root, resolution=resolution, split=split, max_frames=1)
        first: dict[str, tuple[str, str]] = {}
        for record in davis.records:
            first.setdefault(record.category, (str(record.src_image_path), str(record.src_annotation_path)))
        names = sorted(first)
        if pairs is None:
            if len(names) < 2:
                raise ValueError(f"{root}: instance swapping pairs two sequences, found {names}")
            pairs = list(zip(names, names[1:]))
        unknown = sorted({name for pair in pairs for name in pair} - set(first))
        if unknown:
            raise ValueError(f"{root}: unknown sequences {unknown}; available: {names}")
        self.object_id = int(object_id)
        self.entries = [(str(a), str(b), first[a], first[b]) for a, b in pairs]
        self.categories = sorted({entry[0] for entry in self.entries})

    @property
    def pair_ids(self) -> list[str]:
        """``"<source sequence>-<target sequence>"`` of every pair."""
        return [f"{a}-{b}" for a, b, _, _ in self.entries]

    def pair_images(self) -> list[tuple[str, str, str]]:
        """``(category, source image, target image)`` of every pair."""
        return [(a, src[0], trg[0]) for a, _, src, trg in self.entries]

    def __len__(self) -> int:
        return len(self.entries)

    def _mask(self, annotation: str) -> torch.Tensor:
        mask = read_davis_annotation(annotation) == self.object_id
        if not mask.any():
            raise ValueError(f"{annotation}: object {self.object_id} is not annotated in this frame")
        return mask

    def __getitem__(self, index: int) -> dict[str, Any]:
        source, target, (src_image, src_annotation), (trg_image, trg_annotation) = self.entries[index]
        return {
            "pair_id": f"{source}-{target}",
            "category": source,
            "src_image": load_rgb_image(src_image),
            "trg_image": load_rgb_image(trg_image),
            "src_mask": self._mask(src_annotation),
            "trg_mask": self._mask(trg_annotation),
            "src_image_path": src_image,
            "trg_image_path": trg_image,
        }


def _reader_arguments(reader: Any, kwargs: dict[str, Any]) -> None:
    """Refuse an argument ``reader`` (a dataset class, called with the root first) does not take.

    Raises:
        TypeError: An unknown name (named), as a direct call would.
    """
    try:
        inspect.signature(reader).bind("root", **kwargs)
    except TypeError as err:
        raise TypeError(f"{reader.__name__}: {err}") from None


#: How this benchmark is scored (its DataModule's ``protocol``; :func:`datamodules.protocols.get_protocol`).
PROTOCOL = Protocol(
    # label propagation (supplementary B.1): the first frame's annotation carried to every later frame;
    # J = region IoU and F = boundary F-measure per object (the DAVIS-2017 toolkit's definitions)
    name="DAVIS-2017 label propagation",
    key="davis",
    alphas=(),
    threshold="none: J is IoU, F matches boundaries within 0.008 x the image diagonal",
    averages=("JF_mean", "J_mean", "F_mean"),
    metric="label_jf",
    group_label="per_sequence",
)


class DAVISDataModule(PairDataModule):
    """DAVIS-2017 label propagation (``datamodules.davis.DAVISDataset``): the first frame's annotation carried to
    every later frame of its sequence, scored with J and F (``lightning_modules.segmentation_metrics``).

    The reader's options are the DataModule's: ``sequences``, ``resolution``, ``split``, ``frame_stride``,
    ``max_frames`` and ``skip_last_frame`` are :class:`DAVISDataset`'s arguments (documented there), forwarded as
    they are; the CLI lists them with the reader's types, defaults and documentation.

    Args:
        root: The DAVIS root holding ``JPEGImages/`` and ``Annotations/``.
        batch_size: Pairs (frames) per batch.
        num_workers: DataLoader workers.
        **dataset_kwargs: :class:`DAVISDataset`'s arguments other than ``root``; an unknown name is refused here
            (``TypeError``), the values are checked by the reader in ``setup``.
    """

    protocol = PROTOCOL
    layout_hint = DAVIS_LAYOUT_HINT
    root_name = ROOT_NAME

    def __init__(
        self, root: str | None = None, batch_size: PositiveInt = 1, num_workers: NonNegativeInt = 0, **dataset_kwargs
    ) -> None:
        super().__init__(root=root, batch_size=batch_size, num_workers=num_workers)
        _reader_arguments(DAVISDataset, dataset_kwargs)
        self.dataset_kwargs: dict[str, Any] = dataset_kwargs

    def build_dataset(self, root: str) -> DAVISDataset:
        """The selected sequences' (first frame, frame t) items."""
        return DAVISDataset(root, **self.dataset_kwargs)


class SyntheticDAVISDataModule(DAVISDataModule):
    """:class:`DAVISDataModule` over a generated DAVIS-format root (``datamodules.davis.write_synthetic_davis``).

    The root is written unless one generated before is there (its marker file); with ``root`` None it lives in
    ``<trainer.default_root_dir>/synthetic_davis``. The generator's options are below, under the names the
    DataModule gives them (defaults: :func:`write_synthetic_davis`'s); every other option is
    :class:`DAVISDataModule`'s (``batch_size``, ``num_workers`` and the reader's, documented there), forwarded.

    Args:
        root: Where the generated root goes.
        num_sequences: Generated sequences (named ``seq0``, ``seq1``, ...).
        num_frames: Frames per sequence.
        image_width: Frame width.
        image_height: Frame height.
        num_objects: Objects per sequence.
        generator_seed: Seed of the generator.
        **kwargs: :class:`DAVISDataModule`'s options (``batch_size``, ``num_workers``, the reader's).
    """

    root_name = ""  # the root is generated where it is missing: nothing to check before the run

    def __init__(
        self,
        root: str | None = None,
        num_sequences: int = 2,
        num_frames: int = _DAVIS_GENERATOR_DEFAULTS["num_frames"],
        image_width: int = _DAVIS_GENERATOR_DEFAULTS["size"][0],
        image_height: int = _DAVIS_GENERATOR_DEFAULTS["size"][1],
        num_objects: int = _DAVIS_GENERATOR_DEFAULTS["num_objects"],
        generator_seed: int = _DAVIS_GENERATOR_DEFAULTS["seed"],
        **kwargs,
    ) -> None:
        super().__init__(root=root, **kwargs)
        self.generator_kwargs: dict[str, Any] = {
            "sequences": tuple(f"seq{i}" for i in range(num_sequences)), "num_frames": num_frames,
            "size": (image_width, image_height), "num_objects": num_objects, "seed": generator_seed,
        }

    def prepare_data(self) -> None:
        """Write the generated root (skipped when one is there)."""
        self._ensure_generated()

    def _ensure_generated(self) -> None:
        if self.root is None:
            if self.trainer is None:
                raise ValueError(f"{type(self).__name__} needs `root` when used without a Trainer")
            self.root = str(Path(self.trainer.default_root_dir) / "synthetic_davis")
        if not (Path(self.root) / SYNTHETIC_MARKER).is_file():
            write_synthetic_davis(self.root, **self.generator_kwargs)

    def setup(self, stage: str | None = None) -> None:
        """Generate the root if needed, then build the dataset."""
        if stage in (None, "test", "predict"):
            self._ensure_generated()
        super().setup(stage)


class DAVISSwapDataModule(MaskedPairsDataModule):
    """Instance-swap inputs with the dataset's own instance masks: DAVIS frame-0 pairs of two sequences
    (``datamodules.davis.DAVISInstancePairs``), served to ``trainer.predict``.

    Args:
        root: DAVIS root holding ``JPEGImages/`` and ``Annotations/``.
        pairs: ``[[source sequence, target sequence], ...]``; None pairs each sequence with the next.
        object_id: The annotated object swapped (its mask in both frames).
        resolution: ``480p`` or ``Full-Resolution``.
        split: Restrict the sequences to ``ImageSets/2017/<split>.txt``.
        batch_size: Pairs per batch.
        num_workers: DataLoader workers.
    """

    layout_hint = DAVIS_LAYOUT_HINT

    def __init__(self, root: str | None = None, pairs: list[list[str]] | None = None, object_id: int = 1,
                 resolution: str = "480p", split: str | None = None, batch_size: PositiveInt = 1,
                 num_workers: NonNegativeInt = 0) -> None:
        super().__init__(root=root, batch_size=batch_size, num_workers=num_workers)
        self.pair_kwargs: dict[str, Any] = {"pairs": pairs, "object_id": object_id, "resolution": resolution,
                                            "split": split}

    def build_dataset(self, root: str) -> DAVISInstancePairs:
        """The configured sequence pairs with their object masks."""
        return DAVISInstancePairs(root, **self.pair_kwargs)
