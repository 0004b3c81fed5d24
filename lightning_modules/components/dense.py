"""Dense pixel correspondence: every target pixel matched to its nearest source pixel, and its pictures.

The supplementary's dense-correspondence and swap figures colour the source image by position and paint
every target pixel with the colour of its nearest source pixel in feature space. This module computes that
pixel-level nearest neighbour from a pair's ``[D, G, G]`` descriptors without ever holding all pixel pairs.

Conventions:

* Descriptors live in each image's padded square (:class:`.image_prep.PadResize`: ``width``, ``height``,
  ``size``); cell ``c`` of a ``G``-cell side is centred at ``c * s + s / 2 - 0.5`` pixels (``s = size / G``),
  as in :mod:`.matching`.
* The **working size** of an image is its original ``height x width`` (``resolution=None``) or, with
  ``resolution``, the aspect-preserving size whose long side is ``resolution`` (see :func:`working_size`).
  Only pixels of the image itself are matched, never the padding.
* Working pixel centres are aligned with the centres of the resized image inside the padded square (the
  convention of PIL's resize, which built the model input): working pixel ``(col, row)`` of a ``w x h``
  working image sits at padded pixel ``((col + 0.5) * rw / w - 0.5 + ox, (row + 0.5) * rh / h - 0.5 + oy)``
  with ``(rw, rh) = PadResize.resized_wh`` and ``(ox, oy) = PadResize.offset``. There it gets the bilinearly
  interpolated descriptor (``F.grid_sample``, ``align_corners=False``, border padding: the normalised
  coordinate ``(2 p + 1) / size - 1`` puts cell centres exactly where :mod:`.matching` does). This differs
  from the keypoint map :meth:`.PadResize.forward_points` (``x * scale + offset``) by under half a padded
  pixel, far below a cell.
* Coordinates are ``(x, y)`` = ``(col, row)`` in working pixels of the image they refer to.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image

from .image_prep import PadResize
from .matching import nearest_neighbors
from .visualize import to_pil_image

__all__ = [
    "PixelCorrespondence",
    "dense_picture",
    "pixel_correspondence",
    "position_colour_map",
    "propagate_labels",
    "resize_nearest",
    "sample_descriptors",
    "transfer",
    "transfer_colours",
    "working_pixel_points",
    "working_size",
]


@dataclass(frozen=True)
class PixelCorrespondence:
    """Nearest source pixel of every target pixel, at the working sizes.

    Attributes:
        source_xy: ``[Ht, Wt, 2]`` float (x, y) of the matched source pixel in working source pixels
            (integer-valued), ``-1`` where invalid.
        valid: ``[Ht, Wt]`` bool: the target pixel was matched (inside ``target_mask`` and at least one
            source candidate).
        distance: ``[Ht, Wt]`` L2 descriptor distance of each match, ``inf`` where invalid.
        source_size: ``(Hs, Ws)`` working size of the source image.
        target_size: ``(Ht, Wt)`` working size of the target image.
    """

    source_xy: torch.Tensor
    valid: torch.Tensor
    distance: torch.Tensor
    source_size: tuple[int, int]
    target_size: tuple[int, int]

    @property
    def source_index(self) -> torch.Tensor:
        """``[Ht, Wt]`` long flat source index ``row * Ws + col`` of each match, ``-1`` where invalid."""
        xy = self.source_xy.round().long()
        index = xy[..., 1] * self.source_size[1] + xy[..., 0]
        return torch.where(self.valid, index, torch.full_like(index, -1))


def working_size(height: int, width: int, resolution: int | None = None) -> tuple[int, int]:
    """``(h, w)`` at which an image is matched: the original size, or long side ``resolution``.

    Args:
        height: Original height in pixels.
        width: Original width in pixels.
        resolution: Long side of the working size (may up- or downsample); None keeps the original size.
            The short side is rounded (half to even) and at least 1.
    """
    if resolution is None:
        return int(height), int(width)
    if int(resolution) <= 0:
        raise ValueError(f"resolution must be a positive number of pixels, got {resolution!r}")
    scale = int(resolution) / max(height, width)
    return max(1, round(height * scale)), max(1, round(width * scale))


def working_pixel_points(geometry: PadResize, size: tuple[int, int], device: Any = None) -> torch.Tensor:
    """Padded-square (x, y) of every working pixel's centre, ``[h * w, 2]`` in row-major order.

    Args:
        geometry: The image's map from original pixels to its padded square.
        size: ``(h, w)`` working size.
        device: Where to build the points.
    """
    h, w = size
    (resized_w, resized_h), (left, top) = geometry.resized_wh, geometry.offset
    xs = (torch.arange(w, device=device, dtype=torch.float32) + 0.5) * (resized_w / w) - 0.5 + left
    ys = (torch.arange(h, device=device, dtype=torch.float32) + 0.5) * (resized_h / h) - 0.5 + top
    grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack([grid_x, grid_y], dim=-1).reshape(-1, 2)


def sample_descriptors(descriptors: torch.Tensor, points: torch.Tensor, size: int) -> torch.Tensor:
    """Bilinear descriptors ``[N, D]`` at padded-square (x, y) ``points [N, 2]`` of a ``[D, Gh, Gw]`` map.

    Cell centres follow :mod:`.matching` (``c * s + s / 2 - 0.5``); points beyond the outer cell centres take
    the border cells' descriptors.
    """
    grid = (2 * points.float() + 1) / size - 1
    sampled = F.grid_sample(
        descriptors[None].float(), grid.view(1, 1, -1, 2), mode="bilinear", padding_mode="border", align_corners=False
    )
    return sampled[0, :, 0].T


def resize_nearest(values: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Resize an ``[H, W]`` or ``[C, H, W]`` map of any dtype to ``size`` by nearest pixel centre."""
    if tuple(values.shape[-2:]) == tuple(size):
        return values
    flat = values.reshape(-1, *values.shape[-2:])
    # Index arithmetic (not F.interpolate) keeps every dtype exact; centres as "nearest-exact".
    rows = ((torch.arange(size[0], device=values.device) + 0.5) * (flat.shape[-2] / size[0])).long()
    cols = ((torch.arange(size[1], device=values.device) + 0.5) * (flat.shape[-1] / size[1])).long()
    rows, cols = rows.clamp_(max=flat.shape[-2] - 1), cols.clamp_(max=flat.shape[-1] - 1)
    return flat[:, rows][:, :, cols].reshape(*values.shape[:-2], *size)


def _working_mask(
    mask: torch.Tensor | None, geometry: PadResize, size: tuple[int, int], device: Any, name: str
) -> torch.Tensor | None:
    """Flat bool mask at the working size, or None."""
    if mask is None:
        return None
    if tuple(mask.shape) != (geometry.height, geometry.width):
        raise ValueError(f"{name} must be [{geometry.height}, {geometry.width}] (the image), got {tuple(mask.shape)}")
    return resize_nearest(mask.to(device=device, dtype=torch.bool), size).flatten()


@torch.no_grad()
def pixel_correspondence(
    source_desc: torch.Tensor,
    target_desc: torch.Tensor,
    source_geometry: PadResize,
    target_geometry: PadResize,
    resolution: int | None = None,
    source_mask: torch.Tensor | None = None,
    target_mask: torch.Tensor | None = None,
    chunk: int = 4096,
) -> PixelCorrespondence:
    """L2 nearest source pixel of every target pixel, at the working resolution.

    Memory is bounded by ``D x Hs*Ws`` source descriptors plus ``chunk x Hs*Ws`` scores: target pixels are
    sampled and matched ``chunk`` at a time, never all pixel pairs at once.

    Args:
        source_desc: ``[D, G, G]`` source descriptors in the source's padded square.
        target_desc: ``[D, G, G]`` target descriptors in the target's padded square.
        source_geometry: Original source size and its padded square (e.g. ``pipeline.annotation_geometry``).
        target_geometry: Original target size and its padded square.
        resolution: Long side of the working size of both images; None matches at the original sizes.
            The returned maps are at the working sizes.
        source_mask: ``[H, W]`` bool at the original source size; only masked source pixels are candidates.
        target_mask: ``[H, W]`` bool at the original target size; other target pixels are left invalid.
        chunk: Target pixels matched at a time.

    Returns:
        The :class:`PixelCorrespondence`.
    """
    if chunk <= 0:
        raise ValueError(f"chunk must be positive, got {chunk}")
    device = source_desc.device
    src_hw = working_size(source_geometry.height, source_geometry.width, resolution)
    trg_hw = working_size(target_geometry.height, target_geometry.width, resolution)
    with torch.autocast(device_type=device.type, enabled=False):
        keys = sample_descriptors(
            source_desc, working_pixel_points(source_geometry, src_hw, device), source_geometry.size
        )
        candidates = torch.arange(len(keys), device=device)
        src_mask = _working_mask(source_mask, source_geometry, src_hw, device, "source_mask")
        if src_mask is not None:
            keys, candidates = keys[src_mask], candidates[src_mask]
        queries = torch.arange(trg_hw[0] * trg_hw[1], device=device)
        trg_mask = _working_mask(target_mask, target_geometry, trg_hw, device, "target_mask")
        if trg_mask is not None:
            queries = queries[trg_mask]
        points = working_pixel_points(target_geometry, trg_hw, device)
        index, distance = _match(target_desc, target_geometry.size, points, queries, keys, candidates, chunk)
    valid = index >= 0
    source_xy = torch.stack([index % src_hw[1], torch.div(index, src_hw[1], rounding_mode="floor")], dim=-1).float()
    source_xy[~valid] = -1.0
    return PixelCorrespondence(
        source_xy=source_xy.view(*trg_hw, 2),
        valid=valid.view(trg_hw),
        distance=distance.view(trg_hw),
        source_size=src_hw,
        target_size=trg_hw,
    )


def _match(
    target_desc: torch.Tensor,
    size: int,
    points: torch.Tensor,
    queries: torch.Tensor,
    keys: torch.Tensor,
    candidates: torch.Tensor,
    chunk: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat source index (``-1``: unmatched) and distance of every target pixel, ``chunk`` queries at a time.

    Args:
        target_desc: ``[D, G, G]`` target descriptors.
        size: Side of the target's padded square.
        points: ``[Nt, 2]`` padded-square (x, y) of every working target pixel.
        queries: Flat indices of the target pixels to match.
        keys: ``[M, D]`` candidate source descriptors.
        candidates: ``[M]`` flat working-source index of each key.
        chunk: Queries per step (``chunk x M`` scores at a time).
    """
    index = torch.full((len(points),), -1, dtype=torch.long, device=points.device)
    distance = torch.full((len(points),), float("inf"), device=points.device)
    if len(keys) == 0:
        return index, distance
    for part in queries.split(chunk):
        found, dist = nearest_neighbors(sample_descriptors(target_desc, points[part], size), keys)
        index[part], distance[part] = candidates[found], dist
    return index, distance


def position_colour_map(height: int, width: int) -> torch.Tensor:
    """Colour every pixel by its position: uint8 ``[3, height, width]``.

    With ``x = col / (width - 1)`` and ``y = row / (height - 1)`` in ``[0, 1]`` (0 for a side of 1 pixel):
    ``R = x``, ``G = y``, ``B = 1 - (x + y) / 2``, each ``round(255 * v)``. A smooth 2D ramp whose corners
    are distinct: top-left blue ``(0, 0, 255)``, top-right ``(255, 0, 128)``, bottom-left ``(0, 255, 128)``,
    bottom-right yellow ``(255, 255, 0)``.
    """
    x = torch.linspace(0.0, 1.0, width).view(1, width).expand(height, width)
    y = torch.linspace(0.0, 1.0, height).view(height, 1).expand(height, width)
    colours = torch.stack([x, y, 1.0 - (x + y) / 2])
    return (colours * 255).round().to(torch.uint8)


def transfer(values: torch.Tensor, correspondence: PixelCorrespondence, fill: float | int = 0) -> torch.Tensor:
    """Gather source values into the target layout through the matches.

    Args:
        values: ``[C, Hs, Ws]`` per-source-pixel values (colours, labels; any dtype) at the working source size.
        correspondence: The pixel matches.
        fill: Value of invalid target pixels.

    Returns:
        ``[C, Ht, Wt]`` of the dtype and device of ``values``: the value of each target pixel's source pixel.
    """
    if values.ndim != 3 or tuple(values.shape[1:]) != tuple(correspondence.source_size):
        raise ValueError(
            f"values must be [C, {correspondence.source_size[0]}, {correspondence.source_size[1]}], "
            f"got {tuple(values.shape)}"
        )
    index = correspondence.source_index.to(values.device)
    gathered = values.flatten(1)[:, index.clamp(min=0).flatten()].view(values.shape[0], *correspondence.target_size)
    return torch.where(index[None] >= 0, gathered, torch.full_like(gathered, fill))


def transfer_colours(correspondence: PixelCorrespondence, fill: int = 255) -> tuple[torch.Tensor, torch.Tensor]:
    """The source position colour map, transferred to the target.

    Args:
        correspondence: The pixel matches.
        fill: Grey level of invalid target pixels (255: white, like the figures' background).

    Returns:
        ``(transferred [3, Ht, Wt] uint8, source colour map [3, Hs, Ws] uint8)``.
    """
    colours = position_colour_map(*correspondence.source_size)
    return transfer(colours, correspondence, fill), colours


def propagate_labels(source_labels: torch.Tensor, correspondence: PixelCorrespondence) -> torch.Tensor:
    """Label every target pixel with its source pixel's label (invalid target pixels get 0, background).

    Args:
        source_labels: ``[H, W]`` integer label map of the source at any size (the original one, usually);
            resized to the working source size by nearest pixel.
        correspondence: The pixel matches.

    Returns:
        ``[Ht, Wt]`` labels of the dtype of ``source_labels``.
    """
    if source_labels.ndim != 2:
        raise ValueError(f"source_labels must be [H, W], got {tuple(source_labels.shape)}")
    labels = resize_nearest(source_labels, correspondence.source_size)
    return transfer(labels[None], correspondence, 0)[0]


def _hwc(image: torch.Tensor) -> Any:
    """uint8 ``[3, H, W]`` tensor as an ``[H, W, 3]`` array (unambiguous for ``to_pil_image`` at any size)."""
    return image.permute(1, 2, 0).cpu().numpy()


def dense_picture(
    source_image: Any, target_image: Any, correspondence: PixelCorrespondence, fill: int = 255
) -> Image.Image:
    """Side-by-side panel ``[source | source colour map | target | colour map transferred to the target]``.

    Images are resized (LANCZOS) to their working sizes; panels are top-aligned on a white canvas of size
    ``(2 * Ws + 2 * Wt, max(Hs, Ht))``.

    Args:
        source_image: Source image (PIL, uint8 ``[3, H, W]`` tensor or ``[H, W, 3]`` array).
        target_image: Target image, same kinds.
        correspondence: The pixel matches of the pair.
        fill: Grey level of unmatched target pixels in the last panel.
    """
    (hs, ws), (ht, wt) = correspondence.source_size, correspondence.target_size
    transferred, colours = transfer_colours(correspondence, fill)
    panels = [
        to_pil_image(source_image).resize((ws, hs), Image.Resampling.LANCZOS),
        to_pil_image(_hwc(colours)),
        to_pil_image(target_image).resize((wt, ht), Image.Resampling.LANCZOS),
        to_pil_image(_hwc(transferred)),
    ]
    canvas = Image.new("RGB", (sum(p.width for p in panels), max(hs, ht)), (255, 255, 255))
    left = 0
    for panel in panels:
        canvas.paste(panel, (left, 0))
        left += panel.width
    return canvas
