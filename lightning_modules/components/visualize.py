"""Correspondence pictures: source and target side by side, predictions against the ground truth.

Plain torch / numpy / PIL (no Lightning, no matplotlib) so that notebooks and scripts can draw the records of
``predictions.jsonl`` directly. Keypoints are ``(x, y)`` in ORIGINAL image pixels, as everywhere in this
collection; this module does the scaling to the drawn panels.

Conventions of the drawing (see :func:`draw_correspondences`):

* left panel: the source image, every source keypoint as a filled dot coloured by the outcome of its match;
* right panel: the target image, the ground-truth point as a hollow :data:`GT_COLOR` ring, the prediction as
  a filled dot (:data:`CORRECT_COLOR` when correct, :data:`WRONG_COLOR` otherwise) and a thin line from the
  prediction to its ground truth.
"""

from __future__ import annotations

import colorsys
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw

from .pck import keypoint_correct

__all__ = [
    "CORRECT_COLOR",
    "GT_COLOR",
    "UNKNOWN_COLOR",
    "WRONG_COLOR",
    "draw_correspondences",
    "draw_matches",
    "inside_image",
    "keypoints_correct",
    "point_colors",
    "scale_keypoints",
    "to_pil_image",
]

#: Fill of a correct prediction (and of its source keypoint).
CORRECT_COLOR: tuple[int, int, int] = (0, 255, 0)
#: Fill of a wrong prediction (and of its source keypoint).
WRONG_COLOR: tuple[int, int, int] = (255, 0, 0)
#: Fill when correctness is not given (``correct=None``).
UNKNOWN_COLOR: tuple[int, int, int] = (0, 160, 255)
#: Outline of the hollow ground-truth ring on the target panel.
GT_COLOR: tuple[int, int, int] = (255, 215, 0)
_OUTLINE = (0, 0, 0)


def to_pil_image(image: Any) -> Image.Image:
    """Convert an image to an RGB PIL image.

    Args:
        image: A PIL image, a uint8 torch tensor ``[3, H, W]`` (the datasets' layout) or a uint8 numpy array
            ``[H, W, 3]`` / ``[3, H, W]``. Float images are refused rather than guessed at (0-1 or 0-255?).

    Returns:
        The image as an RGB ``PIL.Image``.

    Raises:
        TypeError: For an unsupported type or a non-uint8 array.
        ValueError: For a shape that is not a 3-channel image.
    """
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    if isinstance(image, torch.Tensor):
        image = image.detach().cpu().numpy()
    if not isinstance(image, np.ndarray):
        raise TypeError(f"expected a PIL image, torch tensor or numpy array, got {type(image).__name__}")
    if image.dtype != np.uint8:
        raise TypeError(f"expected a uint8 image, got dtype {image.dtype}")
    if image.ndim != 3:
        raise ValueError(f"expected a 3-dimensional image ([3, H, W] or [H, W, 3]), got shape {tuple(image.shape)}")
    if image.shape[0] == 3 and image.shape[-1] != 3:
        image = np.transpose(image, (1, 2, 0))
    elif image.shape[-1] != 3:
        raise ValueError(f"expected 3 channels ([3, H, W] or [H, W, 3]), got shape {tuple(image.shape)}")
    if image.shape[0] == 0 or image.shape[1] == 0:
        raise ValueError(f"empty image of shape {tuple(image.shape)}")
    return Image.fromarray(np.ascontiguousarray(image), mode="RGB")


def _as_points(name: str, points: Any) -> np.ndarray:
    """``[N, 2]`` float64 array from a tensor / array / nested list (an empty list is ``[0, 2]``)."""
    if isinstance(points, torch.Tensor):
        points = points.detach().cpu().numpy()
    array = np.asarray(points, dtype=np.float64)
    if array.size == 0:
        return array.reshape(0, 2)
    if array.ndim != 2 or array.shape[1] != 2:
        raise ValueError(f"{name} must have shape [N, 2] (x, y), got {tuple(array.shape)}")
    return array


def scale_keypoints(points: Any, from_size: tuple[int, int], to_size: tuple[int, int]) -> np.ndarray:
    """Map ``(x, y)`` pixel coordinates of an image to the same points in a resized copy.

    Pixel centres are aligned (``x' = (x + 0.5) * W' / W - 0.5``), as PIL's resampling does, so a keypoint on
    a pixel stays on the matching pixel of the resized image.

    Args:
        points: ``[N, 2]`` points ``(x, y)``.
        from_size: Original ``(width, height)``.
        to_size: Resized ``(width, height)``.

    Returns:
        ``[N, 2]`` float64 points in the resized image.
    """
    array = _as_points("points", points)
    scale = np.array([to_size[0] / from_size[0], to_size[1] / from_size[1]])
    return (array + 0.5) * scale - 0.5


def keypoints_correct(
    pred_kps: Any, trg_kps: Any, threshold: float, alpha: float, inclusive: bool = False
) -> np.ndarray:
    """PCK outcome per keypoint at one ``alpha``, for a picture: :func:`.pck.keypoint_correct` (the rule every
    score uses: ``error < alpha * threshold``, ``<=`` when ``inclusive``) on NumPy-friendly inputs.

    Args:
        pred_kps: ``[N, 2]`` predicted points (original target pixels).
        trg_kps: ``[N, 2]`` ground-truth points (original target pixels).
        threshold: The pair's PCK threshold in pixels (its protocol's rule).
        alpha: The PCK alpha.
        inclusive: The protocol's comparison (see ``datamodules.protocols.Protocol.inclusive``).

    Returns:
        ``[N]`` bool array; keypoints with a non-finite coordinate are False.
    """
    pred, gt = _as_points("pred_kps", pred_kps), _as_points("trg_kps", trg_kps)
    if pred.shape != gt.shape:
        raise ValueError(f"pred_kps {pred.shape} and trg_kps {gt.shape} differ in shape")
    correct = keypoint_correct(torch.from_numpy(pred), torch.from_numpy(gt), float(threshold), [alpha],
                               inclusive=inclusive)
    return correct[0].numpy()


def _valid_point(point: np.ndarray) -> bool:
    # The readers mark a missing keypoint with NaN (CUB) or a negative coordinate (-1 in SPair / PF files).
    return bool(np.isfinite(point).all() and (point >= 0).all())


def _side_by_side(src: Image.Image, trg: Image.Image, height: int) -> tuple[Image.Image, list[tuple[int, int]]]:
    """Source and target resized to ``height`` (aspect kept) side by side: ``(canvas, panel sizes)``."""
    sizes = [(max(1, round(im.width * height / im.height)), height) for im in (src, trg)]
    canvas = Image.new("RGB", (sizes[0][0] + sizes[1][0], height))
    canvas.paste(src.resize(sizes[0], Image.BILINEAR), (0, 0))
    canvas.paste(trg.resize(sizes[1], Image.BILINEAR), (sizes[0][0], 0))
    return canvas, sizes


def _target_panel_points(points: np.ndarray, size: tuple[int, int], sizes: list[tuple[int, int]]) -> np.ndarray:
    """Predicted target points on the canvas of :func:`_side_by_side`: a prediction in the padding stays visible,
    clamped to the target panel."""
    scaled = scale_keypoints(points, size, sizes[1])
    return np.clip(scaled, 0, np.array([sizes[1][0] - 1, sizes[1][1] - 1])) + np.array([sizes[0][0], 0.0])


def inside_image(points: Any, size: tuple[int, int]) -> np.ndarray:
    """Which ``(x, y)`` points lie on an image of ``size = (width, height)``: ``-0.5 <= x <= width - 0.5`` and
    ``-0.5 <= y <= height - 0.5`` (pixel ``i`` is centred at ``i``, so the image spans ``[-0.5, width - 0.5]``).

    The rule of own-image matches that land in the padding of the square the features cover: ``matches.jsonl``
    keeps such a point as computed and flags it ``inside: false``; :func:`draw_matches` and the viewer page
    draw it at the nearest point of the target's border as a square instead of a dot. Non-finite points are
    outside.
    """
    array = _as_points("points", points)
    limit = np.array([size[0] - 0.5, size[1] - 0.5])
    with np.errstate(invalid="ignore"):
        return np.isfinite(array).all(axis=1) & (array >= -0.5).all(axis=1) & (array <= limit).all(axis=1)


def point_colors(count: int) -> list[tuple[int, int, int]]:
    """``count`` distinct, saturated colours (hues evenly spaced), one per point of :func:`draw_matches`."""
    return [tuple(int(255 * c) for c in colorsys.hsv_to_rgb(i / max(count, 1), 0.85, 1.0)) for i in range(count)]


def draw_matches(
    src_image: Any, trg_image: Any, src_kps: Any, pred_kps: Any, mutual: Sequence[bool] | None = None,
    height: int = 256, src_size: Sequence[int] | None = None, trg_size: Sequence[int] | None = None,
) -> Image.Image:
    """Draw where each source point went, without a ground truth (own images).

    Source left, target right, both ``height`` pixels high; point ``i`` has the same colour
    (:func:`point_colors`) on both panels and a thin line joins the two. A match that is not a mutual nearest
    neighbour (``mutual[i]`` False) is drawn hollow (a ring instead of a dot). A match outside the target
    (:func:`inside_image`: in the padding of the square the features cover) is drawn at the nearest point of the
    target panel's border as a square instead of a circle (filled or hollow by the same rule), as the viewer page
    does; ``matches.jsonl`` keeps its coordinates and flags it ``inside: false``.

    Args:
        src_image: Source image (uint8 ``[3, H, W]`` tensor, uint8 array or PIL image).
        trg_image: Target image, same types.
        src_kps: ``[N, 2]`` source points ``(x, y)``, original source pixels.
        pred_kps: ``[N, 2]`` their matches, original target pixels.
        mutual: ``[N]`` mutual-nearest-neighbour flags, or None (all drawn filled).
        height: Height of the output image in pixels.
        src_size: ``(width, height)`` of the frame ``src_kps`` are in, where the image was read downscaled
            from a file of that size (default: the image's own size).
        trg_size: The same for ``pred_kps`` and the target image (the frame of :func:`inside_image`).

    Returns:
        An RGB image of size ``(src_panel_width + trg_panel_width, height)``.
    """
    src, trg = to_pil_image(src_image), to_pil_image(trg_image)
    src_frame = tuple(int(v) for v in src_size) if src_size is not None else src.size
    trg_frame = tuple(int(v) for v in trg_size) if trg_size is not None else trg.size
    src_pts, pred_pts = _as_points("src_kps", src_kps), _as_points("pred_kps", pred_kps)
    if src_pts.shape != pred_pts.shape:
        raise ValueError(f"src_kps and pred_kps must hold the same number of points, got {len(src_pts)} and {len(pred_pts)}")
    canvas, sizes = _side_by_side(src, trg, int(height))
    src_xy = scale_keypoints(src_pts, src_frame, sizes[0])
    pred_xy = _target_panel_points(pred_pts, trg_frame, sizes)
    inside = inside_image(pred_pts, trg_frame)
    radius = max(2, round(height / 64))
    draw = ImageDraw.Draw(canvas)
    colors = point_colors(len(src_pts))
    for i, color in enumerate(colors):
        draw.line([tuple(src_xy[i]), tuple(pred_xy[i])], fill=color, width=1)
    for i, color in enumerate(colors):
        _dot(draw, src_xy[i], radius, color)
        hollow = mutual is not None and not bool(mutual[i])
        x, y = pred_xy[i]
        box = (x - radius, y - radius, x + radius, y + radius)
        shape = draw.ellipse if inside[i] else draw.rectangle
        if hollow:
            shape(box, outline=color, width=max(1, radius // 2))
        else:
            shape(box, fill=color, outline=_OUTLINE, width=1)
    return canvas


def _dot(draw: ImageDraw.ImageDraw, xy: np.ndarray, radius: int, fill: tuple[int, int, int]) -> None:
    x, y = float(xy[0]), float(xy[1])
    draw.ellipse((x - radius, y - radius, x + radius, y + radius), fill=fill, outline=_OUTLINE, width=1)


def draw_correspondences(
    src_image: Any,
    trg_image: Any,
    src_kps: Any,
    trg_kps: Any,
    pred_kps: Any,
    correct: Sequence[bool] | np.ndarray | torch.Tensor | None,
    height: int = 256,
    radius: int | None = None,
) -> Image.Image:
    """Draw one pair's keypoint correspondences.

    Both images are resized to ``height`` keeping their aspect ratio (panel widths ``round(w * height / h)``)
    and put side by side, source left. Keypoints follow the resize (:func:`scale_keypoints`). Per keypoint
    ``i``: a filled dot at the source point; on the target panel a hollow :data:`GT_COLOR` ring at the ground
    truth, a line from the prediction to it and a filled dot at the prediction, green when ``correct[i]``,
    red otherwise (:data:`UNKNOWN_COLOR` when ``correct`` is None). Predictions are drawn last so that they
    are never hidden by another keypoint's ring or line, correct ones after wrong ones (matches often share a
    target cell).

    A keypoint whose source or ground-truth point is missing (NaN or negative, the readers' marks) is skipped;
    a prediction is only skipped when it is not finite, since a match may legitimately land in the zero
    padding around the target (slightly outside the image): such a point is drawn at the panel border.

    Args:
        src_image: Source image (uint8 ``[3, H, W]`` tensor, uint8 array or PIL image).
        trg_image: Target image, same types.
        src_kps: ``[N, 2]`` source keypoints ``(x, y)``, original source pixels.
        trg_kps: ``[N, 2]`` ground-truth target keypoints, original target pixels.
        pred_kps: ``[N, 2]`` predicted target keypoints, original target pixels.
        correct: ``[N]`` outcome per keypoint (see :func:`keypoints_correct`), or None.
        height: Height of the output image in pixels.
        radius: Dot radius in output pixels (default: scales with ``height``).

    Returns:
        An RGB image of size ``(src_panel_width + trg_panel_width, height)``.

    Raises:
        ValueError: If shapes disagree, ``height`` or ``radius`` is not positive, or an image is malformed.
        TypeError: For an unsupported image type.
    """
    if int(height) != height or height < 1:
        raise ValueError(f"height must be a positive integer, got {height!r}")
    height = int(height)
    radius = max(2, round(height / 64)) if radius is None else int(radius)
    if radius < 1:
        raise ValueError(f"radius must be positive, got {radius}")
    src, trg = to_pil_image(src_image), to_pil_image(trg_image)
    src_pts, trg_pts, pred_pts = (_as_points(n, p) for n, p in
                                  (("src_kps", src_kps), ("trg_kps", trg_kps), ("pred_kps", pred_kps)))
    n = src_pts.shape[0]
    if trg_pts.shape[0] != n or pred_pts.shape[0] != n:
        raise ValueError(f"src_kps, trg_kps and pred_kps must hold the same number of points, "
                         f"got {n}, {trg_pts.shape[0]} and {pred_pts.shape[0]}")
    if correct is not None:
        if isinstance(correct, torch.Tensor):
            correct = correct.detach().cpu().numpy()
        correct = np.asarray(correct, dtype=bool).reshape(-1)
        if correct.shape[0] != n:
            raise ValueError(f"correct must hold one flag per keypoint ({n}), got {correct.shape[0]}")

    canvas, sizes = _side_by_side(src, trg, height)
    offset = np.array([sizes[0][0], 0.0])
    src_xy = scale_keypoints(src_pts, src.size, sizes[0])
    trg_xy = scale_keypoints(trg_pts, trg.size, sizes[1]) + offset
    pred_xy = _target_panel_points(pred_pts, trg.size, sizes)

    keep = [i for i in range(n) if _valid_point(src_pts[i]) and _valid_point(trg_pts[i])]
    has_pred = {i for i in keep if np.isfinite(pred_pts[i]).all()}
    colors = {i: UNKNOWN_COLOR if correct is None else CORRECT_COLOR if correct[i] else WRONG_COLOR for i in keep}

    draw = ImageDraw.Draw(canvas)
    line_width = max(1, radius // 3)
    for i in keep:  # lines first: everything else is drawn over them
        if i in has_pred:
            draw.line([tuple(pred_xy[i]), tuple(trg_xy[i])], fill=colors[i], width=line_width)
    ring = radius + 2
    for i in keep:
        x, y = trg_xy[i]
        draw.ellipse((x - ring, y - ring, x + ring, y + ring), outline=GT_COLOR, width=max(1, radius // 2))
    for i in keep:
        _dot(draw, src_xy[i], radius, colors[i])
    # Several keypoints often match the same target cell: draw the correct predictions last so that a wrong
    # match at the same spot never hides a correct one.
    for i in sorted(has_pred, key=lambda i: (correct is not None and bool(correct[i]), i)):
        _dot(draw, pred_xy[i], radius, colors[i])
    return canvas
