"""Image preparation shared by all featurizers: reading image files as RGB, aspect-preserving resize and
centred zero padding.

The reference implementation resizes the long side to the model resolution (LANCZOS), keeps the aspect
ratio (rounding the short side), and pastes the result in the centre of a black square. Keypoints follow
the same affine map. Both directions of the map live in :class:`PadResize` so predictions can be mapped
back to original pixels exactly.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

__all__ = ["USER_IMAGE_MAX_PIXELS", "ImageTooLargeError", "PadResize", "load_rgb_image", "load_scale", "load_user_image",
           "open_user_image", "pad_resize_image", "to_pil",
           "upright", "upright_size"]

#: The most pixels a user's image (own images, :meth:`.pipeline.FusedCorrespondence.match`) may hold: 250
#: megapixels (PIL's own guard stops at 179; a phone or camera photo is 12-60, a panorama up to about 200). A
#: file above it is refused with one line naming the file, its pixel count and this limit.
USER_IMAGE_MAX_PIXELS = 250_000_000

#: EXIF orientations that turn the stored image by 90 degrees (its width and height swap when shown upright).
_TURNED = (5, 6, 7, 8)
_PIL_LIMIT = threading.Lock()


class ImageTooLargeError(ValueError):
    """A user's image above :data:`USER_IMAGE_MAX_PIXELS`: its message is one line naming the file, its pixel
    count and the limit."""


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


#: 16-bit (and 32-bit integer) grey modes: scaled to 8 bits as an image viewer shows them.
_WIDE_GREY_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")


def upright(image: Image.Image) -> Image.Image:
    """``image`` turned as a photo viewer shows it (its EXIF orientation applied,
    :func:`PIL.ImageOps.exif_transpose`); the image itself when it has no orientation tag."""
    if _orientation(image) in (None, 1):  # exif_transpose would return a copy of the whole image
        return image
    return ImageOps.exif_transpose(image) or image


def _orientation(image: Image.Image) -> int | None:
    try:
        return image.getexif().get(0x0112)
    except Exception:  # noqa: BLE001 - a broken EXIF block: PIL shows the pixels as stored
        return None


def upright_size(image: Image.Image) -> tuple[int, int]:
    """``(width, height)`` of an opened image as a photo viewer shows it (without decoding its pixels)."""
    width, height = image.size
    return (height, width) if _orientation(image) in _TURNED else (width, height)


@contextmanager
def open_user_image(path: str | Path) -> Iterator[Image.Image]:
    """Open a user's image file with PIL's decompression-bomb guard replaced by :data:`USER_IMAGE_MAX_PIXELS`.

    Raises:
        ValueError: The image holds more pixels than :data:`USER_IMAGE_MAX_PIXELS` (the file, its pixel count
            and the limit in one line).
        OSError, UnidentifiedImageError: As :func:`PIL.Image.open`.
    """
    with _PIL_LIMIT:
        previous, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
        try:
            image = Image.open(path)
        finally:
            Image.MAX_IMAGE_PIXELS = previous
    with image:
        pixels = image.width * image.height
        if pixels > USER_IMAGE_MAX_PIXELS:
            raise ImageTooLargeError(f"{path}: {image.width}x{image.height} = {pixels / 1e6:.1f} megapixels, above "
                                     f"the limit of {USER_IMAGE_MAX_PIXELS / 1e6:.0f} megapixels for own images "
                                     "(image_prep.USER_IMAGE_MAX_PIXELS); downscale it")
        yield image


def load_rgb_image(path: str | Path, upright: bool = False) -> torch.Tensor:
    """Load an image file as the RGB ``uint8`` pixels a viewer shows.

    - 8-bit grey, bilevel, palette, CMYK and YCbCr images convert to RGB;
    - 16-bit grey (PNG, TIFF) is scaled to 8 bits, ``round(v * 255 / 65535)`` (a plain conversion would
      clip every value above 255 to white);
    - transparency (RGBA, grey + alpha, a palette or colour key with a transparent entry) is composited over
      white, as on a page;
    - with ``upright`` (a user's photo), the EXIF orientation is applied (the image as a photo viewer shows it)
      and PIL's decompression-bomb guard is :data:`USER_IMAGE_MAX_PIXELS`. Benchmark readers keep the default:
      the pixels as stored, the frame of the benchmarks' annotations and of the reference.

    Args:
        path: Image file path.
        upright: Read a user's image (see above).

    Returns:
        A ``torch.uint8`` tensor of shape ``[3, H, W]``.

    Raises:
        FileNotFoundError: If the file does not exist.
        ValueError: If the file cannot be decoded as an image (corrupt, truncated, not an image), or holds
            pixels with no 8-bit RGB meaning (32-bit float, integers outside 0..65535, unsupported modes).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Image file not found: {path}")
    try:
        with (open_user_image(path) if upright else Image.open(path)) as img:
            img.load()
            array = _rgb_pixels(_upright(img) if upright else img, path)
    except ImageTooLargeError:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise ValueError(f"Could not read image {path}: {err}") from err
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


def load_user_image(path: str | Path, max_side: int | None = None) -> tuple[torch.Tensor, tuple[int, int]]:
    """Read a user's image file upright (:func:`load_rgb_image` with ``upright``), downscaled ON LOAD to a long
    side of at most ``max_side`` pixels when it is larger: a JPEG is decoded at a reduced scale
    (:meth:`PIL.Image.Image.draft`, 1/2 to 1/8: a 100-megapixel photo never holds its full pixels), then
    resized (LANCZOS) to ``max_side``. Points of the original image map to the loaded one by
    ``x * loaded_width / width``, ``y * loaded_height / height`` (and back), as :class:`PadResize` maps them.

    Args:
        path: Image file path.
        max_side: The longest side to keep, or None for the whole image.

    Returns:
        The uint8 ``[3, h, w]`` pixels, and the ``(width, height)`` of the original image as a viewer shows it.

    Raises:
        FileNotFoundError, ValueError: As :func:`load_rgb_image`.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Image file not found: {path}")
    try:
        with open_user_image(path) as img:
            size = upright_size(img)
            if max_side is not None and max(img.size) > max_side and img.format == "JPEG":
                scale = max_side / max(img.size)
                img.draft("RGB", (int(np.ceil(img.width * scale)), int(np.ceil(img.height * scale))))
            img.load()
            array = _rgb_pixels(_upright(img), path)
    except ImageTooLargeError:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise ValueError(f"Could not read image {path}: {err}") from err
    if max_side is not None and max(array.shape[:2]) > max_side:
        height, width = array.shape[:2]
        scale = max_side / max(width, height)
        new = (max(1, int(round(width * scale))), max(1, int(round(height * scale))))
        array = np.array(Image.fromarray(array).resize(new, Image.Resampling.LANCZOS, reducing_gap=3.0))
    return torch.from_numpy(np.ascontiguousarray(array)).permute(2, 0, 1).contiguous(), size


def load_scale(image: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """``(sx, sy)`` float64: the pixels of a loaded ``[3, h, w]`` ``image`` per pixel of the original image of
    ``size`` ``(width, height)`` along each axis (ones when it was read whole; :func:`load_user_image`)."""
    return torch.tensor([image.shape[-1] / size[0], image.shape[-2] / size[1]], dtype=torch.float64)


_upright = upright  # the function, under a name the ``upright`` argument does not hide


def _rgb_pixels(img: Image.Image, path: Path) -> np.ndarray:
    """``[H, W, 3]`` uint8 RGB of a loaded PIL image (see :func:`load_rgb_image`)."""
    if img.mode in _WIDE_GREY_MODES:
        grey = np.asarray(img).astype(np.int64)
        if grey.size and (grey.min() < 0 or grey.max() > 65535):
            raise ValueError(f"{img.mode} pixels outside 0..65535 have no 8-bit meaning")
        scaled = np.floor(grey * 255 / 65535 + 0.5).astype(np.uint8)
        return np.repeat(scaled[..., None], 3, axis=2)
    if img.mode == "F":
        raise ValueError("32-bit float pixels have no fixed 8-bit meaning; save the image with 8 or 16 bits")
    if img.mode in ("RGBA", "LA", "PA", "La", "RGBa") or "transparency" in img.info:
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return np.array(Image.alpha_composite(white, rgba).convert("RGB"), dtype=np.uint8)
    return np.array(img.convert("RGB"), dtype=np.uint8)
