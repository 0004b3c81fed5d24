"""Image preparation shared by all featurizers: aspect-preserving resize and centred zero padding.

The reference implementation resizes the long side to the model resolution (LANCZOS), keeps the aspect
ratio (rounding the short side), and pastes the result in the centre of a black square. Keypoints follow
the same affine map. Both directions of the map live in :class:`PadResize` so predictions can be mapped
back to original pixels exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

__all__ = ["PadResize", "pad_resize_image", "to_pil"]


@dataclass(frozen=True)
class PadResize:
    """The affine map from original pixels to a ``size`` x ``size`` padded square.

    Attributes:
        width: Original image width in pixels.
        height: Original image height in pixels.
        size: Side of the square model input.
    """

    width: int
    height: int
    size: int

    @property
    def scale(self) -> float:
        """Resize factor applied to the original image."""
        return self.size / max(self.width, self.height)

    @property
    def resized_wh(self) -> tuple[int, int]:
        """(width, height) of the resized image before padding (the reference's rounding)."""
        if self.height <= self.width:
            return self.size, int(np.around(self.size * self.height / self.width))
        return int(np.around(self.size * self.width / self.height)), self.size

    @property
    def offset(self) -> tuple[int, int]:
        """(x, y) offset of the resized image inside the square."""
        new_w, new_h = self.resized_wh
        return (self.size - new_w) // 2, (self.size - new_h) // 2

    def forward_points(self, points: torch.Tensor) -> torch.Tensor:
        """Map (x, y) points from original pixels to padded-square pixels."""
        off = points.new_tensor(self.offset)
        return points * self.scale + off

    def inverse_points(self, points: torch.Tensor) -> torch.Tensor:
        """Map (x, y) points from padded-square pixels back to original pixels."""
        off = points.new_tensor(self.offset)
        return (points - off) / self.scale


def to_pil(image: torch.Tensor | np.ndarray | Image.Image) -> Image.Image:
    """Convert a uint8 ``[3, H, W]`` tensor, an ``[H, W, 3]`` array or a PIL image to an RGB PIL image."""
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    if isinstance(image, torch.Tensor):
        if image.dtype != torch.uint8 or image.ndim != 3 or image.shape[0] != 3:
            raise ValueError(f"expected a uint8 [3, H, W] image tensor, got {image.dtype} {tuple(image.shape)}")
        image = image.permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(np.ascontiguousarray(image)).convert("RGB")


def pad_resize_image(image: torch.Tensor | Image.Image, size: int) -> tuple[torch.Tensor, PadResize]:
    """Resize the long side to ``size`` (LANCZOS) and zero-pad to a centred square.

    Args:
        image: A uint8 ``[3, H, W]`` tensor or a PIL image.
        size: Side of the output square.

    Returns:
        A float tensor ``[3, size, size]`` with values in [0, 1], and the :class:`PadResize` map.
    """
    pil = to_pil(image)
    geometry = PadResize(pil.width, pil.height, size)
    resized = pil.resize(geometry.resized_wh, Image.Resampling.LANCZOS)
    canvas = Image.new("RGB", (size, size))
    canvas.paste(resized, geometry.offset)
    array = torch.from_numpy(np.asarray(canvas).copy()).permute(2, 0, 1)
    return array.float().div_(255.0), geometry
