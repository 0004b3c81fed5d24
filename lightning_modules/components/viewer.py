"""The interactive viewer: one self-contained HTML page per run (no server; it opens from disk).

Pick a pair, click a point on the source: the page marks its nearest neighbour on the target and draws the
similarity to every target cell as a heatmap. To keep the page small each pair's descriptors are reduced for it
(:func:`reduce_descriptors`: the top principal directions of the pair's own cells, then each cell's vector
normalised and stored as int8), and the page computes the similarity (integer dot products) itself. The page's
match is therefore the nearest neighbour on the reduced descriptors; the run's own matches (the method's, on
the full descriptors) are drawn over the images too. :func:`viewer_match` is the page's computation in Python
(the browser test checks the two agree). Plain torch / numpy / PIL.
"""

from __future__ import annotations

import base64
import io
import json
import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .features import extract_features
from .keypoints import annotation_geometry
from .samples import PairSample
from .visualize import inside_image, to_pil_image

__all__ = ["embed_json", "reduce_descriptors", "render_viewer", "viewer_match", "viewer_pair"]

_TEMPLATE = Path(__file__).with_name("viewer.html")


def reduce_descriptors(descriptors: torch.Tensor, dims: int = 32) -> torch.Tensor:
    """A pair's descriptors ``[2, D, G, G]`` as int8 ``[2, G*G, k]`` (``k = min(dims, D)``): projected on the
    top ``k`` principal directions of the pair's cells (uncentred, which keeps dot products best), each cell's
    vector L2-normalised and scaled to +-127."""
    cells = descriptors.detach().float().flatten(2).transpose(1, 2).reshape(-1, descriptors.shape[1]).cpu()
    k = min(int(dims), cells.shape[1])
    _, vectors = torch.linalg.eigh(cells.T.double() @ cells.double())  # ascending eigenvalues
    reduced = cells.double() @ vectors[:, -k:].flip(-1)
    reduced = reduced / reduced.norm(dim=1, keepdim=True).clamp_min(1e-12)
    return (reduced * 127).round().to(torch.int8).reshape(2, -1, k)


def _image_entry(image: torch.Tensor, geometry: Any, descriptors: torch.Tensor, side: int, quality: int,
                 file_size: Sequence[int] | None = None) -> dict[str, Any]:
    """One image of a viewer pair: a small JPEG, its size, the map to its feature square and its descriptors.

    Where the image was read downscaled from a file of ``file_size`` ``(width, height)``, the size and the map
    are the file's: the page reads and shows points in the file's pixels, as ``matches.jsonl`` writes them."""
    picture = to_pil_image(image)
    width, height = picture.size
    scale = float(geometry.scale)
    if file_size is not None and (int(file_size[0]), int(file_size[1])) != (width, height):
        # one factor for both axes (the page's map has one scale): the long side's, which the load kept exact
        scale *= max(width, height) / max(int(file_size[0]), int(file_size[1]))
        width, height = int(file_size[0]), int(file_size[1])
    factor = min(1.0, side / max(picture.size))
    if factor < 1.0:
        picture = picture.resize((max(1, round(picture.width * factor)), max(1, round(picture.height * factor))))
    buffer = io.BytesIO()
    picture.save(buffer, format="JPEG", quality=quality)
    return {
        "image": "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii"),
        "width": width,
        "height": height,
        "square": int(geometry.size),
        "scale": scale,
        "offset": [int(v) for v in geometry.offset],
        "descriptors": base64.b64encode(descriptors.numpy().tobytes()).decode("ascii"),
    }


@torch.no_grad()
def viewer_pair(
    pipeline: Any,
    sample: PairSample,
    points: dict[str, Sequence[Any]] | None = None,
    dims: int = 32,
    image_side: int = 512,
    quality: int = 85,
) -> dict[str, Any]:
    """One pair of the viewer page (JSON-able): both images, their reduced descriptors, and the run's matches.

    Features come through the pipeline's cache (a run that just predicted the pair finds them there; they are
    not counted as the run's extraction passes). The descriptors are the pipeline's own
    (:meth:`~.pipeline.FusedCorrespondence.describe_pair`: co-PCA and fusion, or the trained head).

    Args:
        pipeline: A :class:`~.pipeline.FusedCorrespondence`.
        sample: The pair (``src_image``, ``trg_image``, their paths, ``category``; ``src_file_size`` and
            ``trg_file_size`` where the images were read downscaled: the page is then in the files' pixels).
        points: The run's matches to draw: ``src`` and ``pred`` ``[[x, y], ...]`` (original pixels), optional
            ``mutual`` and ``inside`` flags (``inside`` defaults to :func:`~.visualize.inside_image` of ``pred``:
            the page draws a match outside the target as a square on its border, as the pictures do).
        dims: Dimensions kept per cell (:func:`reduce_descriptors`).
        image_side: Long side of the images embedded in the page (pixels).
        quality: JPEG quality of the embedded images.
    """
    images = [sample["src_image"], sample["trg_image"]]
    categories = [sample["category"], sample["category"]]
    features, _ = extract_features(pipeline.sd, pipeline.dino, images, categories, pipeline.device, pipeline.cache,
                                   extra=getattr(pipeline, "extra_featurizers", None))
    descriptors = pipeline.describe_pair(features[0], features[1])
    reduced = reduce_descriptors(descriptors, dims)
    file_sizes = [sample.get("src_file_size"), sample.get("trg_file_size")]
    entries = [
        _image_entry(
            image, annotation_geometry(f, pipeline.annotation_size), reduced[i], image_side, quality, file_sizes[i]
        )
        for i, (image, f) in enumerate(zip(images, features))
    ]
    pair = {
        "pair_id": str(sample["pair_id"]),
        "category": str(sample["category"]),
        "grid": int(descriptors.shape[-1]),
        "dims": int(reduced.shape[-1]),
        "source": entries[0],
        "target": entries[1],
    }
    if points:
        pair["points"] = {key: [bool(p) if key in ("mutual", "inside") else list(map(float, p)) for p in value]
                          for key, value in points.items() if value is not None}
        if "pred" in pair["points"] and "inside" not in pair["points"]:
            size = (entries[1]["width"], entries[1]["height"])
            pair["points"]["inside"] = inside_image(pair["points"]["pred"], size).tolist()
    return pair


def _decoded(entry: dict[str, Any], dims: int) -> np.ndarray:
    return np.frombuffer(base64.b64decode(entry["descriptors"]), dtype=np.int8).astype(np.int64).reshape(-1, dims)


def viewer_match(pair: dict[str, Any], x: float, y: float) -> tuple[int, int, tuple[float, float]]:
    """What the page shows for a click at source pixel ``(x, y)``: ``(source cell, target cell, target point)``,
    with the page's arithmetic (float64, the same formulas as its script; ties to the first cell)."""
    grid, source, target = pair["grid"], pair["source"], pair["target"]
    px, py = x * source["scale"] + source["offset"][0], y * source["scale"] + source["offset"][1]
    col = min(grid - 1, max(0, math.floor(px * (grid / source["square"]))))
    row = min(grid - 1, max(0, math.floor(py * (grid / source["square"]))))
    cell = row * grid + col
    scores = _decoded(target, pair["dims"]) @ _decoded(source, pair["dims"])[cell]
    best = int(np.argmax(scores))
    step = target["square"] / grid
    centre = ((best % grid) * step + step / 2 - 0.5, (best // grid) * step + step / 2 - 0.5)
    point = ((centre[0] - target["offset"][0]) / target["scale"], (centre[1] - target["offset"][1]) / target["scale"])
    return cell, best, point


def render_viewer(pairs: Sequence[dict[str, Any]], title: str = "SD-DINO correspondences",
                  display_height: int = 360, total_pairs: int | None = None, more_hint: str = "") -> str:
    """The self-contained HTML page of :func:`viewer_pair` entries (in the order given).

    ``total_pairs`` (the run's count, when more pairs were matched than the page holds) and ``more_hint`` (how
    to show more) are shown as "N of M pairs". Every id, category, file name and the title reach the page as
    data: the JSON is embedded with ``<``, ``>``, ``&`` and U+2028/U+2029 escaped (no text can end or re-open
    the script element that holds it), and the page puts text into the document with ``textContent`` only.
    """
    data = {"title": title, "display_height": int(display_height), "pairs": list(pairs),
            "total_pairs": int(total_pairs if total_pairs is not None else len(pairs)), "more_hint": str(more_hint)}
    payload = embed_json(data)
    template = _TEMPLATE.read_text(encoding="utf-8")
    values = {"__TITLE__": _html_escape(title), "__DATA__": payload}
    # one pass: a title holding "__DATA__" (or data holding "__TITLE__") is not substituted again
    return re.sub("__TITLE__|__DATA__", lambda m: values[m.group(0)], template)


def embed_json(data: Any) -> str:
    """``data`` as JSON that is safe inside an HTML ``<script>`` element: ASCII only (U+2028 and U+2029
    escaped), and ``<``, ``>``, ``&`` written as ``\\u003c``, ``\\u003e``, ``\\u0026`` (so neither ``</script>``
    nor ``<!--`` appears); ``JSON.parse`` of the element's text gives ``data`` back."""
    text = json.dumps(data, separators=(",", ":"), ensure_ascii=True)
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def _html_escape(text: str) -> str:
    return (str(text).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace('"', "&quot;")
            .replace("'", "&#39;"))
