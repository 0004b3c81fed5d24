"""A tiny synthetic benchmark in the exact SPair-71k on-disk layout.

Every image of a category shows the same textured "object" (a random colour grid plus fixed fine
noise, derived from the seed and the category name) pasted on a random-texture background at a
random position, scale (0.7-1.2) and horizontal stretch; a few objects are partly cut by the image
border. Keypoints are fixed relative positions on the object mapped through the paste, so the
ground-truth correspondences are exact and learnable. Image sizes jitter per image and the second
image of every category is portrait, so aspect-preserving resizing is exercised.

Several splits (``trn``, ``val``, ``test``) coexist in one root: they share the images and differ in
their sampled pairs; each split has its own marker, so one can be added without touching the others.

The written root is read by the real reader, :class:`datamodules.spair.SPairDataset`.
"""

from __future__ import annotations

import inspect
import json
import math
import shutil
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
from PIL import Image

from .spair import SPLIT_ALIASES, SPairDataModule, normalize_split

__all__ = [
    "MARKER_NAME",
    "SPAIR_CATEGORIES",
    "SyntheticSPairDataModule",
    "default_synthetic_categories",
    "read_synthetic_marker",
    "split_marker_path",
    "synthetic_root_matches",
    "write_synthetic_spair",
]

#: The 18 SPair-71k categories (used as default synthetic category names).
SPAIR_CATEGORIES: tuple[str, ...] = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair",
    "cow", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "train", "tvmonitor",
)  # fmt: skip

#: Marker file of a synthetic root's images; it records the arguments the images depend on. Each
#: split has its own marker as well (:func:`split_marker_path`) with all generator arguments.
MARKER_NAME = ".synthetic_spair.json"
_MARKER_FORMAT = "sd-dino-lightning/synthetic-spair/v2"
_LEGACY_MARKER_FORMAT = "sd-dino-lightning/synthetic-spair/v1"  # one split per root
_IMAGE_ARG_KEYS = ("categories", "images_per_category", "num_keypoints", "image_size", "seed", "scene")
#: What the images of a category show: ``objects``, one textured object pasted at another place, scale and
#: stretch on another background in every image; ``warps``, image 0 of the category and known geometric warps
#: of it (rotation, scale, translation, mild perspective) with photometric changes, so that even random
#: networks find the correspondences (the demo).
SCENES = ("objects", "warps")
_SPLIT_SEED_OFFSETS = {"trn": 1, "val": 2}  # test keeps the original pair seed
_OWNED_DIRS = ("PairAnnotation", "JPEGImages", "ImageAnnotation", "Layout")
_FORBIDDEN_NAME_CHARS = set("-:/\\ ")


def default_synthetic_categories(num_categories: int) -> list[str]:
    """Category names for ``num_categories`` synthetic categories.

    Args:
        num_categories: How many categories (>= 1).

    Returns:
        The first SPair-71k category names, then ``"category18"``, ``"category19"``, ... .
    """
    if num_categories < 1:
        raise ValueError(f"num_categories must be >= 1, got {num_categories}")
    names = list(SPAIR_CATEGORIES[:num_categories])
    names += [f"category{i}" for i in range(len(SPAIR_CATEGORIES), num_categories)]
    return names


def split_marker_path(root: str | Path, split: str) -> Path:
    """Path of the marker of one split of a synthetic root (``.synthetic_spair.<split>.json``).

    Args:
        root: Synthetic root.
        split: Split name (aliases allowed).
    """
    return Path(root) / f".synthetic_spair.{normalize_split(split)}.json"


def read_synthetic_marker(root: str | Path, split: str | None = None) -> dict[str, Any] | None:
    """Read a marker of a synthetic root.

    Args:
        root: Synthetic root.
        split: None for the images marker (:data:`MARKER_NAME`, whose ``args`` are the arguments the
            images depend on), or a split for that split's marker (``args``: all generator arguments).

    Returns:
        The marker dict (keys ``format``, ``complete``, ``args``), or ``None`` when absent or
        unreadable. A marker of the earlier single-split format is returned too (it matches no
        arguments, so such a root is rewritten).
    """
    path = Path(root) / MARKER_NAME if split is None else split_marker_path(root, split)
    try:
        marker = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(marker, dict) or marker.get("format") not in (_MARKER_FORMAT, _LEGACY_MARKER_FORMAT):
        return None
    return marker


def _category_seed(seed: int, category: str) -> list[int]:
    return [int(seed), zlib.crc32(category.encode("utf-8"))]


def _resize(array: np.ndarray, width: int, height: int, resample: int) -> np.ndarray:
    return np.asarray(Image.fromarray(array).resize((width, height), resample=resample))


def _object_template(rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    """Distinctive object texture: a coarse random colour grid plus fixed fine noise and a frame."""
    grid = rng.integers(0, 256, size=(5, 6, 3), dtype=np.uint8)
    obj = _resize(grid, width, height, Image.NEAREST).astype(np.int16)
    obj += rng.integers(-30, 31, size=obj.shape, dtype=np.int16)
    obj[:2, :] = obj[-2:, :] = 0
    obj[:, :2] = obj[:, -2:] = 0
    return np.clip(obj, 0, 255).astype(np.uint8)


def _background(rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    """Random smooth colour field plus pixel noise, muted so the object stands out."""
    low = rng.integers(50, 206, size=(6, 8, 3), dtype=np.uint8)
    bg = _resize(low, width, height, Image.BILINEAR).astype(np.int16)
    bg += rng.integers(-15, 16, size=bg.shape, dtype=np.int16)
    return np.clip(bg, 0, 255).astype(np.uint8)


def _image_size(rng: np.random.Generator, base: tuple[int, int], portrait: bool) -> tuple[int, int]:
    """Jittered (width, height); ``portrait`` forces height > width."""
    w0, h0 = base
    w = w0 + int(rng.integers(-(w0 // 8), w0 // 8 + 1))
    h = h0 + int(rng.integers(-(h0 // 8), h0 // 8 + 1))
    if portrait:
        w, h = min(w, h), max(w, h)
        if h <= w:
            h = w + max(1, w // 4)
    return w, h


def _validate_args(
    categories: Sequence[str],
    images_per_category: int,
    pairs_per_category: int,
    num_keypoints: int,
    image_size: tuple[int, int],
    scene: str = "objects",
) -> None:
    if isinstance(categories, str) or len(categories) == 0:
        raise ValueError(f"categories must be a non-empty sequence of names, got {categories!r}")
    if len(set(categories)) != len(categories):
        raise ValueError(f"categories must be unique, got {list(categories)}")
    for category in categories:
        if (
            not isinstance(category, str)
            or not category
            or category.startswith(".")
            or _FORBIDDEN_NAME_CHARS & set(category)
        ):
            raise ValueError(
                f"Invalid category name {category!r}: SPair file names need non-empty names "
                "without '-', ':', '/', '\\' or spaces"
            )
    if images_per_category < 2:
        raise ValueError(f"images_per_category must be >= 2, got {images_per_category}")
    max_pairs = images_per_category * (images_per_category - 1)
    if not 1 <= pairs_per_category <= max_pairs:
        raise ValueError(
            f"pairs_per_category must be in [1, {max_pairs}] for {images_per_category} images, "
            f"got {pairs_per_category}"
        )
    if num_keypoints < 1:
        raise ValueError(f"num_keypoints must be >= 1, got {num_keypoints}")
    if len(image_size) != 2 or min(image_size) < 32:
        raise ValueError(f"image_size must be (width, height) with sides >= 32, got {image_size}")
    if scene not in SCENES:
        raise ValueError(f"scene must be one of {list(SCENES)}, got {scene!r}")


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=1) + "\n", encoding="utf-8")


def _marker_args(
    categories: Sequence[str],
    images_per_category: int,
    pairs_per_category: int,
    num_keypoints: int,
    image_size: tuple[int, int],
    seed: int,
    split: str,
    scene: str,
) -> dict[str, Any]:
    """The arguments a split marker records, normalised (JSON types, the split's canonical name)."""
    return {
        "categories": [str(c) for c in categories],
        "images_per_category": int(images_per_category),
        "pairs_per_category": int(pairs_per_category),
        "num_keypoints": int(num_keypoints),
        "image_size": [int(image_size[0]), int(image_size[1])],
        "seed": int(seed),
        "split": normalize_split(split),
        "scene": str(scene),
    }


def _generator_args(**generator_kwargs: Any) -> dict[str, Any]:
    """:func:`write_synthetic_spair`'s arguments (``root`` aside) with its defaults filled in, as the marker
    records them.

    Raises:
        TypeError: An argument the generator does not take.
    """
    bound = inspect.signature(write_synthetic_spair).bind(None, **generator_kwargs)
    bound.apply_defaults()
    return _marker_args(**{name: value for name, value in bound.arguments.items() if name != "root"})


def _image_args(args: dict[str, Any]) -> dict[str, Any]:
    """The part of the marker arguments that determines the images (shared by all splits)."""
    return {key: args[key] for key in _IMAGE_ARG_KEYS}


def _pair_seed(cat_seed: list[int], split: str) -> list[int]:
    """Seed of a category's pair sampling in ``split``: the test split keeps the original seed."""
    return [*cat_seed, 2] if split == "test" else [*cat_seed, 2, _SPLIT_SEED_OFFSETS[split]]


def _check_root(root: Path) -> None:
    """Refuse a non-directory and a non-empty directory without a synthetic marker (a real dataset)."""
    if not root.exists():
        return
    if not root.is_dir():
        raise ValueError(f"Synthetic SPair root {root} exists and is not a directory")
    if any(root.iterdir()) and read_synthetic_marker(root) is None:
        raise ValueError(
            f"Refusing to write a synthetic SPair benchmark into {root}: the directory is not "
            f"empty and has no {MARKER_NAME} marker (is it a real dataset?)"
        )


def _wipe(root: Path) -> None:
    """Remove everything a synthetic root owns: its folders and the markers of all splits."""
    for name in _OWNED_DIRS:
        if (root / name).exists():
            shutil.rmtree(root / name)
    for split in sorted(set(SPLIT_ALIASES.values())):
        split_marker_path(root, split).unlink(missing_ok=True)


def _write_images(
    root: Path,
    categories: Sequence[str],
    images_per_category: int,
    num_keypoints: int,
    image_size: tuple[int, int],
    seed: int,
    scene: str = "objects",
) -> dict[str, list[dict[str, Any]]]:
    """Write every category's images and image annotations; returns the annotations (plus ``name``)."""
    base_w, base_h = image_size
    short = min(base_w, base_h)
    obj_h0 = max(8, round(0.42 * short))
    obj_w0 = max(8, round(0.42 * short * 1.3))
    images: dict[str, list[dict[str, Any]]] = {}
    for category in categories:
        cat_seed = _category_seed(seed, category)
        cat_rng = np.random.default_rng(cat_seed)
        template = Image.fromarray(_object_template(cat_rng, obj_w0, obj_h0))
        rel_kps = cat_rng.uniform(0.08, 0.92, size=(num_keypoints, 2))
        img_dir = root / "JPEGImages" / category
        ann_dir = root / "ImageAnnotation" / category
        img_dir.mkdir(parents=True)
        ann_dir.mkdir(parents=True)
        images[category] = []
        source, source_annotation = np.zeros((1, 1, 3), np.uint8), {}  # image 0, which the warps transform
        for k in range(images_per_category):
            name = f"{category}_{k:04d}"
            if scene == "warps" and k > 0:
                canvas, annotation = _warp_image(cat_seed, k, source, source_annotation, name)
            else:
                canvas, annotation = _render_image(cat_seed, k, category, template, rel_kps, image_size, name)
                source, source_annotation = canvas, annotation
            Image.fromarray(canvas).save(img_dir / f"{name}.jpg", format="JPEG", quality=95)
            _write_json(ann_dir / f"{name}.json", annotation)
            images[category].append(annotation | {"name": name})
    return images


def _render_image(
    cat_seed: list[int],
    k: int,
    category: str,
    template: Image.Image,
    rel_kps: np.ndarray,
    image_size: tuple[int, int],
    name: str,
) -> tuple[np.ndarray, dict[str, Any]]:
    """Image ``k`` of a category (pixels) and its SPair image annotation."""
    rng = np.random.default_rng([*cat_seed, 1, k])
    width, height = _image_size(rng, image_size, portrait=(k == 1))
    canvas = _background(rng, width, height)
    obj_w0, obj_h0 = template.size

    scale = rng.uniform(0.7, 1.2)
    stretch = rng.uniform(0.85, 1.15)
    ow = max(8, round(obj_w0 * scale * stretch))
    oh = max(8, round(obj_h0 * scale))
    fit = min(1.0, width / ow, height / oh)
    ow, oh = max(8, int(ow * fit)), max(8, int(oh * fit))

    truncated = k > 0 and rng.uniform() < 0.3
    if truncated:  # up to 30% of the object outside the left/right or top/bottom border
        x1 = int(rng.integers(-int(0.3 * ow), width - int(0.7 * ow) + 1))
        y1 = int(rng.integers(-int(0.3 * oh), height - int(0.7 * oh) + 1))
    else:
        x1 = int(rng.integers(0, width - ow + 1))
        y1 = int(rng.integers(0, height - oh + 1))

    obj = np.asarray(template.resize((ow, oh), resample=Image.BILINEAR))
    cx1, cy1 = max(x1, 0), max(y1, 0)
    cx2, cy2 = min(x1 + ow, width), min(y1 + oh, height)
    canvas[cy1:cy2, cx1:cx2] = obj[cy1 - y1 : cy2 - y1, cx1 - x1 : cx2 - x1]

    # A relative point u on the template lands at pixel x1 + u * ow - 0.5 under PIL's
    # pixel-centre resize (pixel i is centred at i).
    kps: dict[str, list[float] | None] = {}
    for kp_id, (u, v) in enumerate(rel_kps):
        x = round(float(x1 + u * ow - 0.5), 2)
        y = round(float(y1 + v * oh - 0.5), 2)
        inside = 0.0 <= x <= width - 1 and 0.0 <= y <= height - 1
        kps[str(kp_id)] = [x, y] if inside else None
    annotation = {
        "filename": f"{name}.jpg",
        "src_database": "synthetic",
        "annotation": "synthetic",
        "image": "synthetic",
        "image_width": width,
        "image_height": height,
        "image_depth": 3,
        "category": category,
        "pose": "Unspecified",
        "truncated": int(cx1 != x1 or cy1 != y1 or cx2 != x1 + ow or cy2 != y1 + oh),
        "occluded": 0,
        "difficult": 0,
        "bndbox": [cx1, cy1, cx2 - 1, cy2 - 1],
        "kps": kps,
        "azimuth_id": 0,
    }
    return canvas, annotation


#: The warps of the ``warps`` scene: rotation (degrees), scale factor range, translation (fraction of the side),
#: perspective (fraction of the side), brightness and contrast factor ranges, pixel noise (std, 0..255).
WARP_RANGES = {"rotation": 10.0, "scale": 1.1, "shift": 0.05, "perspective": 0.05, "photometric": 0.15, "noise": 4.0}


def _homography(rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    """A random homography (``3 x 3``, source pixels -> target pixels) within :data:`WARP_RANGES`."""
    r = WARP_RANGES
    angle, scale = math.radians(rng.uniform(-r["rotation"], r["rotation"])), rng.uniform(1 / r["scale"], r["scale"])
    cos, sin = scale * math.cos(angle), scale * math.sin(angle)
    centre = np.array([[1, 0, -width / 2], [0, 1, -height / 2], [0, 0, 1]])
    similarity = np.array([[cos, -sin, 0], [sin, cos, 0], [0, 0, 1]])
    tilt = np.array([[1, 0, 0], [0, 1, 0], [rng.uniform(-1, 1) * r["perspective"] / width,
                                            rng.uniform(-1, 1) * r["perspective"] / height, 1]])
    shift = rng.uniform(-r["shift"], r["shift"], size=2) * (width, height)
    back = np.array([[1, 0, width / 2 + shift[0]], [0, 1, height / 2 + shift[1]], [0, 0, 1]])
    return back @ tilt @ similarity @ centre


def _apply_homography(matrix: np.ndarray, points: np.ndarray) -> np.ndarray:
    """``[N, 2]`` points mapped by a homography."""
    mapped = np.c_[points, np.ones(len(points))] @ matrix.T
    return mapped[:, :2] / mapped[:, 2:]


def _warp_image(
    cat_seed: list[int], k: int, source: np.ndarray, source_annotation: dict[str, Any], name: str
) -> tuple[np.ndarray, dict[str, Any]]:
    """Image ``k`` of a ``warps`` category: image 0 under a random homography over a new background, with
    brightness, contrast and noise changes; keypoints and the object box carried by the homography."""
    rng = np.random.default_rng([*cat_seed, 3, k])
    height, width = source.shape[:2]
    matrix = _homography(rng, width, height)
    inverse = np.linalg.inv(matrix)
    inverse = inverse / inverse[2, 2]  # PIL samples the source at inverse(target pixel)
    warped = Image.fromarray(source).convert("RGBA").transform(
        (width, height), Image.Transform.PERSPECTIVE, tuple(inverse.flatten()[:8]), resample=Image.BILINEAR
    )
    canvas = Image.fromarray(_background(rng, width, height)).convert("RGBA")
    canvas.alpha_composite(warped)
    pixels = np.asarray(canvas.convert("RGB")).astype(np.float32)
    jitter = WARP_RANGES["photometric"]
    mean = pixels.mean()
    pixels = (pixels - mean) * rng.uniform(1 - jitter, 1 + jitter) + mean * rng.uniform(1 - jitter, 1 + jitter)
    pixels = np.clip(pixels + rng.normal(0.0, WARP_RANGES["noise"], pixels.shape), 0, 255).astype(np.uint8)
    kps: dict[str, list[float] | None] = {}
    for kp_id, point in source_annotation["kps"].items():
        if point is None:
            kps[kp_id] = None
            continue
        x, y = (round(float(v), 2) for v in _apply_homography(matrix, np.array([point]))[0])
        kps[kp_id] = [x, y] if 0.0 <= x <= width - 1 and 0.0 <= y <= height - 1 else None
    x1, y1, x2, y2 = source_annotation["bndbox"]
    corners = _apply_homography(matrix, np.array([[x1, y1], [x2, y1], [x1, y2], [x2, y2]], dtype=float))
    low = np.clip(corners.min(0), 0, [width - 1, height - 1]).round().astype(int)
    high = np.clip(corners.max(0), 0, [width - 1, height - 1]).round().astype(int)
    annotation = {**source_annotation, "filename": f"{name}.jpg", "kps": kps, "truncated": 0,
                  "bndbox": [int(low[0]), int(low[1]), int(high[0]), int(high[1])]}
    return pixels, annotation


def _load_images(root: Path, categories: Sequence[str], images_per_category: int) -> dict[str, list[dict[str, Any]]]:
    """Read back the image annotations :func:`_write_images` wrote (plus ``name``)."""
    images: dict[str, list[dict[str, Any]]] = {}
    for category in categories:
        images[category] = []
        for k in range(images_per_category):
            name = f"{category}_{k:04d}"
            path = root / "ImageAnnotation" / category / f"{name}.json"
            images[category].append(json.loads(path.read_text(encoding="utf-8")) | {"name": name})
    return images


def _ensure_images(root: Path, args: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    """The image annotations of ``root``: reused when its images match ``args``, else (re)written from scratch."""
    image_args = _image_args(args)
    marker = read_synthetic_marker(root)
    if marker is not None and marker.get("complete") is True and marker.get("args") == image_args:
        try:
            return _load_images(root, args["categories"], args["images_per_category"])
        except (OSError, ValueError):
            pass  # damaged: rewrite everything below
    _wipe(root)
    root.mkdir(parents=True, exist_ok=True)
    marker_path = root / MARKER_NAME
    _write_json(marker_path, {"format": _MARKER_FORMAT, "complete": False, "args": image_args})
    images = _write_images(
        root,
        args["categories"],
        args["images_per_category"],
        args["num_keypoints"],
        (args["image_size"][0], args["image_size"][1]),
        args["seed"],
        args["scene"],
    )
    _write_json(marker_path, {"format": _MARKER_FORMAT, "complete": True, "args": image_args})
    return images


def _pair_annotation(stem: str, pair_id: int, category: str, src: dict, trg: dict, common: list[str]) -> dict:
    """The SPair pair annotation of ``src`` -> ``trg`` over their ``common`` visible keypoints."""
    sb, tb = src["bndbox"], trg["bndbox"]
    s_side = max(sb[2] - sb[0], sb[3] - sb[1])
    t_side = max(tb[2] - tb[0], tb[3] - tb[1])
    ratio = max(s_side, t_side) / max(1, min(s_side, t_side))
    return {
        "pair_id": pair_id,
        "filename": f"{stem}.json",
        "src_imname": src["filename"],
        "trg_imname": trg["filename"],
        "src_imsize": [src["image_width"], src["image_height"], 3],
        "trg_imsize": [trg["image_width"], trg["image_height"], 3],
        "src_bndbox": sb,
        "trg_bndbox": tb,
        "category": category,
        "src_pose": "Unspecified",
        "trg_pose": "Unspecified",
        "src_trunc": src["truncated"],
        "trg_trunc": trg["truncated"],
        "src_occl": 0,
        "trg_occl": 0,
        "src_kps": [src["kps"][kp] for kp in common],
        "trg_kps": [trg["kps"][kp] for kp in common],
        "kps_ids": common,
        "mirror": 0,
        "viewpoint_variation": 0,
        "scale_variation": 0 if ratio < 1.25 else (1 if ratio < 1.5 else 2),
        "truncation": src["truncated"] + trg["truncated"],
        "occlusion": 0,
    }


def _sample_pairs(
    images: list[dict[str, Any]], num_keypoints: int, count: int, seed: list[int]
) -> list[tuple[int, int, list[str]]]:
    """``count`` ordered image pairs sharing a visible keypoint, sampled with ``seed``, in candidate order."""
    candidates: list[tuple[int, int, list[str]]] = []
    for i in range(len(images)):
        for j in range(len(images)):
            if i == j:
                continue
            common = [
                kp
                for kp in map(str, range(num_keypoints))
                if images[i]["kps"][kp] is not None and images[j]["kps"][kp] is not None
            ]
            if common:
                candidates.append((i, j, common))
    pair_rng = np.random.default_rng(seed)
    count = min(count, len(candidates))
    chosen = sorted(pair_rng.choice(len(candidates), size=count, replace=False).tolist())
    return [candidates[idx] for idx in chosen]


def _write_split(root: Path, images: dict[str, list[dict[str, Any]]], args: dict[str, Any]) -> None:
    """(Re)write one split's pair annotations, layout file and marker; other splits are left alone."""
    split = args["split"]
    marker_path = split_marker_path(root, split)
    _write_json(marker_path, {"format": _MARKER_FORMAT, "complete": False, "args": args})
    pair_dir = root / "PairAnnotation" / split
    layout_path = root / "Layout" / "large" / f"{split}.txt"
    if pair_dir.exists():
        shutil.rmtree(pair_dir)
    layout_path.unlink(missing_ok=True)
    pair_dir.mkdir(parents=True)
    layout_path.parent.mkdir(parents=True, exist_ok=True)

    pair_stems: list[str] = []
    for category in args["categories"]:
        seed = _pair_seed(_category_seed(args["seed"], category), split)
        chosen = _sample_pairs(images[category], args["num_keypoints"], args["pairs_per_category"], seed)
        for i, j, common in chosen:
            src, trg = images[category][i], images[category][j]
            pair_id = len(pair_stems) + 1
            stem = f"{pair_id:06d}-{src['name']}-{trg['name']}:{category}"
            _write_json(pair_dir / f"{stem}.json", _pair_annotation(stem, pair_id, category, src, trg, common))
            pair_stems.append(stem)

    layout_path.write_text("".join(f"{stem}\n" for stem in pair_stems), encoding="utf-8")
    _write_json(marker_path, {"format": _MARKER_FORMAT, "complete": True, "args": args})


def write_synthetic_spair(
    root: str | Path,
    categories: Sequence[str] = ("cat", "dog"),
    images_per_category: int = 4,
    pairs_per_category: int = 6,
    num_keypoints: int = 8,
    image_size: tuple[int, int] = (160, 120),
    seed: int = 0,
    split: str = "test",
    scene: str = "objects",
) -> Path:
    """Write a small synthetic benchmark (or one more split of it) in the SPair-71k layout.

    Writes ``JPEGImages/<cat>/<name>.jpg`` (JPEG quality 95), ``ImageAnnotation/<cat>/<name>.json``
    (``filename``, ``category``, ``image_width``, ``image_height``, ``bndbox``, ``kps`` as a dict of
    keypoint id -> ``[x, y]`` or ``null`` when outside the image, ...),
    ``PairAnnotation/<split>/<id>-<src>-<trg>:<cat>.json`` (all SPair pair keys; only keypoints
    inside both images are listed) and ``Layout/large/<split>.txt`` (pair stems), plus two markers:
    :data:`MARKER_NAME` for the images (the arguments they depend on) and :func:`split_marker_path`
    for the split (all arguments). Output is deterministic given the arguments.

    Splits share the images (as in SPair-71k, pairs of all splits come from one image pool): when
    ``root`` already holds complete images generated with the same ``categories``,
    ``images_per_category``, ``num_keypoints``, ``image_size`` and ``seed``, only ``split`` is
    (re)written and the other splits are left untouched. Otherwise the synthetic root (one with a
    marker) is wiped and rewritten; a non-empty directory without a marker is refused so that a real
    dataset is never overwritten. Each split samples its pairs with its own seed, so splits differ;
    the test split's pairs are those of the original single-split generator.

    Args:
        root: Output directory (created if needed).
        categories: Category names (no ``'-'``, ``':'``, ``'/'`` or spaces).
        images_per_category: Images per category (>= 2); image 1 of every category is portrait.
        pairs_per_category: Ordered image pairs per category (<= n * (n - 1)); fewer are written
            only if some pairs share no visible keypoint.
        num_keypoints: Keypoints per object.
        image_size: Base ``(width, height)``; each image jitters by up to 1/8 per side.
        seed: Generator seed.
        split: Split folder to write (``"trn"``/``"train"``, ``"val"`` or ``"test"``).
        scene: What the images show (:data:`SCENES`): ``objects`` (the default) or ``warps`` (known warps of
            image 0 with photometric changes: correspondences random networks can find).

    Returns:
        The root path.

    Raises:
        ValueError: On invalid arguments or when ``root`` is a non-empty non-synthetic directory.
    """
    image_size = (int(image_size[0]), int(image_size[1]))
    args = _marker_args(categories, images_per_category, pairs_per_category, num_keypoints, image_size, seed, split,
                        scene)
    _validate_args(categories, images_per_category, pairs_per_category, num_keypoints, image_size, scene)
    root = Path(root).expanduser()
    _check_root(root)
    images = _ensure_images(root, args)
    _write_split(root, images, args)
    return root


def synthetic_root_matches(root: str | Path, **generator_kwargs: Any) -> bool:
    """Whether ``root`` holds a complete split written by :func:`write_synthetic_spair` with these args.

    Both the images (:data:`MARKER_NAME`) and the split named by ``split`` (its own marker) must be
    complete and generated with these arguments; other splits in ``root`` do not matter.

    Args:
        root: Synthetic root.
        **generator_kwargs: Arguments of :func:`write_synthetic_spair` (except ``root``).
    """
    args = _generator_args(**generator_kwargs)
    images = read_synthetic_marker(root)
    split = read_synthetic_marker(root, split=args["split"])
    return (
        images is not None
        and images.get("complete") is True
        and images.get("args") == _image_args(args)
        and split is not None
        and split.get("complete") is True
        and split.get("args") == args
    )


#: :func:`write_synthetic_spair`'s defaults (its signature is their one home; the DataModule's options use them).
_GENERATOR_DEFAULTS: dict[str, Any] = {
    name: param.default
    for name, param in inspect.signature(write_synthetic_spair).parameters.items()
    if param.default is not param.empty
}


class SyntheticSPairDataModule(SPairDataModule):
    """:class:`SPairDataModule` over a generated synthetic benchmark.

    See :func:`write_synthetic_spair` for what is generated.

    ``prepare_data`` (and ``setup``, for runs without a Trainer) write the splits a stage needs into
    ``root`` unless complete ones generated with identical arguments are already there: ``test_split``
    for test / predict, ``train_split`` and ``val_split`` for fit, ``val_split`` for validate (all
    three for ``prepare_data`` without a Trainer). The splits share the images and coexist in ``root``;
    the data is then read by the real SPair reader.

    The generator's options are below, under the names the DataModule gives them (the reader's ``categories``,
    ``pairs_per_category`` and ``seed`` are taken; defaults: :func:`write_synthetic_spair`'s). Every other option
    is :class:`SPairDataModule`'s (``test_split``, ``train_split``, ``val_split``, ``categories``,
    ``pairs_per_category``, ``seed``, ``subset_draw``, ``batch_size``, ``num_workers``, ...; documented there),
    forwarded: the splits named there are the ones written, and ``categories`` / ``pairs_per_category`` select when
    reading, among the generated ones.

    Args:
        root: Directory of the synthetic benchmark; None puts it in ``<trainer.default_root_dir>/synthetic_spair``.
        synthetic_categories: Generated category names; ``None`` uses
            :func:`default_synthetic_categories` with ``num_categories``.
        num_categories: Number of generated categories when ``synthetic_categories`` is ``None``.
        images_per_category: Generated images per category.
        synthetic_pairs_per_category: Generated pairs per category of ``test_split``.
        image_width: Base image width.
        image_height: Base image height.
        num_keypoints: Keypoints per object.
        generator_seed: Seed of the generator.
        synthetic_train_pairs_per_category: Generated pairs per category of ``train_split`` (capped at
            ``images_per_category * (images_per_category - 1)``).
        synthetic_val_pairs_per_category: Generated pairs per category of ``val_split`` (capped likewise).
        scene: What the generated images show (:data:`SCENES`; ``warps`` for the demo).
        **kwargs: :class:`SPairDataModule`'s options.
    """

    root_name = ""  # the root is generated where it is missing: nothing to check before the run

    def __init__(
        self,
        root: str | None = None,
        synthetic_categories: list[str] | None = None,
        num_categories: int = 2,
        images_per_category: int = _GENERATOR_DEFAULTS["images_per_category"],
        synthetic_pairs_per_category: int = _GENERATOR_DEFAULTS["pairs_per_category"],
        image_width: int = _GENERATOR_DEFAULTS["image_size"][0],
        image_height: int = _GENERATOR_DEFAULTS["image_size"][1],
        num_keypoints: int = _GENERATOR_DEFAULTS["num_keypoints"],
        generator_seed: int = _GENERATOR_DEFAULTS["seed"],
        synthetic_train_pairs_per_category: int = 12,
        synthetic_val_pairs_per_category: int = 6,
        scene: Literal["objects", "warps"] = _GENERATOR_DEFAULTS["scene"],
        **kwargs,
    ) -> None:
        super().__init__(root=root, **kwargs)
        names = (
            list(synthetic_categories)
            if synthetic_categories is not None
            else default_synthetic_categories(num_categories)
        )
        self.image_kwargs: dict[str, Any] = {
            "categories": names,
            "images_per_category": images_per_category,
            "num_keypoints": num_keypoints,
            "image_size": (image_width, image_height),
            "seed": generator_seed,
            "scene": scene,
        }
        # Generated pairs per split; a split named twice keeps its first role's count (test, then train).
        cap = max(1, images_per_category * (images_per_category - 1))
        self.synthetic_pairs: dict[str, int] = {self.test_split: synthetic_pairs_per_category}
        self.synthetic_pairs.setdefault(self.train_split, min(synthetic_train_pairs_per_category, cap))
        self.synthetic_pairs.setdefault(self.val_split, min(synthetic_val_pairs_per_category, cap))
        #: Generator arguments of the evaluated split.
        self.generator_kwargs: dict[str, Any] = self.split_generator_kwargs(self.test_split)

    def split_generator_kwargs(self, split: str) -> dict[str, Any]:
        """The :func:`write_synthetic_spair` arguments (``root`` aside) of one of the configured splits."""
        split = normalize_split(split)
        return {**self.image_kwargs, "pairs_per_category": self.synthetic_pairs[split], "split": split}

    def stage_splits(self, stage: str | None) -> list[str]:
        """The splits ``stage`` reads: fit: train and val; validate: val; test / predict: test; None: all."""
        if stage == "fit":
            splits = [self.train_split, self.val_split]
        elif stage == "validate":
            splits = [self.val_split]
        elif stage in ("test", "predict"):
            splits = [self.test_split]
        else:
            splits = [self.test_split, self.train_split, self.val_split]
        return list(dict.fromkeys(splits))

    def is_generated(self, split: str | None = None) -> bool:
        """Whether ``root`` holds a complete ``split`` (default: the evaluated one) generated with these arguments."""
        kwargs = self.split_generator_kwargs(self.test_split if split is None else split)
        return self.root is not None and synthetic_root_matches(self.root, **kwargs)

    def _ensure_generated(self, splits: list[str]) -> None:
        if self.root is None:
            # Without an explicit root the benchmark lives with the run: <default_root_dir>/synthetic_spair.
            if self.trainer is None:
                raise ValueError(f"{type(self).__name__} needs `root` when used without a Trainer")
            self.root = str(Path(self.trainer.default_root_dir) / "synthetic_spair")
        for split in splits:
            if not self.is_generated(split):
                write_synthetic_spair(self.root, **self.split_generator_kwargs(split))

    def _trainer_stage(self) -> str | None:
        """The running trainer function (``fit``, ``validate``, ``test``, ``predict``), None without one."""
        fn = getattr(getattr(self.trainer, "state", None), "fn", None)
        return None if fn is None else str(getattr(fn, "value", fn))

    def prepare_data(self) -> None:
        """Write the splits of the trainer's stage (all without a Trainer); those already generated are skipped."""
        self._ensure_generated(self.stage_splits(self._trainer_stage()))

    def setup(self, stage: str | None = None) -> None:
        """Generate the splits of ``stage`` if needed, then build its datasets.

        Args:
            stage: Lightning stage (None: the evaluated split, as :meth:`PairDataModule.setup`).
        """
        self._ensure_generated(self.stage_splits(stage or "test"))
        super().setup(stage)
