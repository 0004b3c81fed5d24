"""Instance swapping, step 1: the pixel-level swap (paper section 4.3, supplementary A.8 / B.2).

The target image's instance keeps its pose and takes the source instance's appearance: every target
pixel inside the target instance mask takes the colour of its corresponding source pixel. The
correspondence is given as plain tensors (a dense target -> source map, e.g. ``PixelCorrespondence``'s
``source_xy`` and ``valid``), so any matcher can feed it. Step 2, the Stable Diffusion refinement of the
swapped image (DDIM inversion, then DDIM sampling), is :class:`.ddim.DDIMRefiner`.

The reference (``demo_swap.ipynb``) does the same at 256 px: for each pixel of the pose image's mask, the
nearest (L2) upsampled fused feature among the appearance image's masked pixels picks the pixel copied.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["edge_alpha", "swap_instance"]


def _check_inputs(
    source_image: torch.Tensor,
    target_image: torch.Tensor,
    target_mask: torch.Tensor,
    source_xy: torch.Tensor,
    valid: torch.Tensor,
) -> None:
    for name, image in (("source_image", source_image), ("target_image", target_image)):
        if image.dtype != torch.uint8 or image.dim() != 3 or image.shape[0] != 3:
            raise ValueError(f"{name} must be a uint8 [3, H, W] image, got {image.dtype} {tuple(image.shape)}")
    size = tuple(target_image.shape[-2:])
    if tuple(target_mask.shape) != size or tuple(valid.shape) != size:
        raise ValueError(
            f"target_mask {tuple(target_mask.shape)} and valid {tuple(valid.shape)} must have the target size {size}"
        )
    if tuple(source_xy.shape) != (*size, 2):
        raise ValueError(f"source_xy must be [{size[0]}, {size[1]}, 2] (x, y per target pixel), got "
                         f"{tuple(source_xy.shape)}")


def edge_alpha(region: torch.Tensor, width: int) -> torch.Tensor:
    """Feathering weight of a region: ramps from ``1 / (width + 1)`` on its edge to 1 at ``width`` px inside.

    A pixel's weight is ``(1 + k) / (width + 1)`` where ``k <= width`` is how many 3x3 erosions it survives
    (its chessboard distance to the nearest pixel outside the region, minus one). The image border does
    not count as outside. Pixels outside the region weigh exactly 0.

    Args:
        region: ``[H, W]`` bool.
        width: Feathering width in pixels (0: weight 1 everywhere in the region).

    Returns:
        ``[H, W]`` float32 weights in [0, 1].
    """
    if width < 0:
        raise ValueError(f"blend width must be >= 0, got {width}")
    inside = region.float()[None, None]
    depth = inside.clone()
    eroded = inside
    for _ in range(width):
        # max-pooling the outside pads with -inf: beyond the border counts as inside
        eroded = 1 - F.max_pool2d(1 - eroded, kernel_size=3, stride=1, padding=1)
        depth += eroded
    return (depth / (width + 1))[0, 0]


def swap_instance(
    source_image: torch.Tensor,
    target_image: torch.Tensor,
    target_mask: torch.Tensor,
    source_xy: torch.Tensor,
    valid: torch.Tensor,
    blend_edges: int = 0,
) -> torch.Tensor:
    """Fill the target instance's pose with the source instance's appearance, pixel by pixel.

    Every target pixel inside ``target_mask`` with a valid correspondence takes the colour of the source
    pixel at ``source_xy`` (rounded to the nearest pixel, clamped into the source image). Every other pixel
    is the target's, bit for bit. Both images must already be at the working sizes the correspondence was
    computed at (the caller resizes them, and the mask).

    Args:
        source_image: ``[3, Hs, Ws]`` uint8, the appearance (identity) to transfer.
        target_image: ``[3, Ht, Wt]`` uint8, the pose; the result is this image with its instance replaced.
        target_mask: ``[Ht, Wt]`` bool (nonzero = inside), the target instance.
        source_xy: ``[Ht, Wt, 2]`` float, the source pixel (x, y) matching each target pixel, in source
            pixels (e.g. ``PixelCorrespondence.source_xy``; -1 or non-finite where there is none).
        valid: ``[Ht, Wt]`` bool, where ``source_xy`` holds a correspondence.
        blend_edges: Feathering width in pixels (0: off). Within ``blend_edges`` px of the swapped region's
            edge the swapped colour is mixed with the target's (see :func:`edge_alpha`); pixels outside the
            region are still unchanged.

    Returns:
        ``[3, Ht, Wt]`` uint8, the swapped image, on the target image's device.
    """
    _check_inputs(source_image, target_image, target_mask, source_xy, valid)
    region = target_mask.bool() & valid.bool() & torch.isfinite(source_xy).all(dim=-1)
    height, width = source_image.shape[-2:]
    xy = torch.nan_to_num(source_xy.float(), nan=0.0).round().long()  # the region excludes non-finite entries
    xs, ys = xy[..., 0].clamp(0, width - 1), xy[..., 1].clamp(0, height - 1)
    swapped = source_image.to(target_image.device)[:, ys, xs]  # [3, Ht, Wt]
    if blend_edges > 0:
        alpha = edge_alpha(region, blend_edges)
        mixed = alpha * swapped.float() + (1 - alpha) * target_image.float()
        swapped = mixed.round().clamp(0, 255).to(torch.uint8)
    return torch.where(region, swapped, target_image)
