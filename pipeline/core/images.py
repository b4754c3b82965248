"""The project's single image-decoding function.

gather, validate, mean, pack and the training loader all decode through `decode_image`, so an
image that passes validation is exactly an image that training can read, and every stage sees
the same pixels (same orientation, same alpha handling, same colour conversion).
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

# A truncated file must fail loudly, never decode as grey padding.
ImageFile.LOAD_TRUNCATED_IMAGES = False

SUPPORTED_FORMATS = frozenset({"JPEG", "MPO", "PNG", "GIF", "BMP", "WEBP", "TIFF"})
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".jpe", ".png", ".gif", ".bmp", ".webp", ".tif",
                            ".tiff"})
# 89 megapixels (PIL's own default); anything larger is treated as a decompression bomb.
MAX_PIXELS = 89_478_485
BACKGROUND = (255, 255, 255)

_MAGIC = (
    (b"\xff\xd8\xff", "jpg"),
    (b"\x89PNG\r\n\x1a\n", "png"),
    (b"GIF87a", "gif"),
    (b"GIF89a", "gif"),
    (b"BM", "bmp"),
    (b"II*\x00", "tif"),
    (b"MM\x00*", "tif"),
)


class ImageDecodeError(Exception):
    """An image that cannot be used; `reason` is a short machine-readable word."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


def sniff_extension(head: bytes) -> str | None:
    """The file extension implied by the magic bytes, or None when it is not an image."""
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "webp"
    for magic, ext in _MAGIC:
        if head.startswith(magic):
            return ext
    return None


def is_image_path(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_SUFFIXES


def decode_image(
    source: str | Path | bytes | BinaryIO,
    *,
    min_side: int | None = None,
    min_size: int = 0,
    max_pixels: int = MAX_PIXELS,
) -> Image.Image:
    """Fully decode `source` into an RGB image, or raise ImageDecodeError with a reason.

    `min_side` lets JPEGs decode at a reduced DCT scale as long as both sides stay at least
    that large (several times faster when the caller will shrink the image anyway).
    `min_size` rejects images whose shorter side is smaller (thumbnails, tracking pixels).
    """
    if isinstance(source, bytes):
        source = io.BytesIO(source)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(source)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageDecodeError("bomb", str(exc)) from None
    except UnidentifiedImageError:
        raise ImageDecodeError("not_image", "not a recognised image format") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageDecodeError("not_image", str(exc) or type(exc).__name__) from None
    with image:
        return _decode_opened(image, min_side, min_size, max_pixels)


def _decode_opened(image: Image.Image, min_side: int | None, min_size: int,
                   max_pixels: int) -> Image.Image:
    if image.format not in SUPPORTED_FORMATS:
        raise ImageDecodeError("unsupported", f"format {image.format} is not supported")
    width, height = image.size
    if width * height > max_pixels:
        raise ImageDecodeError("bomb", f"{width}x{height} exceeds {max_pixels} pixels")
    if min(width, height) < min_size:
        raise ImageDecodeError("too_small", f"{width}x{height} is below {min_size} px")
    if min_side and image.format == "JPEG":
        image.draft(image.mode, _draft_request(image.size, min_side))
    try:
        image.load()
        image = ImageOps.exif_transpose(image)
        return to_rgb(image)
    except ImageDecodeError:
        raise
    except (OSError, SyntaxError, ValueError, EOFError, IndexError, TypeError) as exc:
        reason = "truncated" if "truncated" in str(exc) else "undecodable"
        raise ImageDecodeError(reason, str(exc) or type(exc).__name__) from None


def _draft_request(size: tuple[int, int], min_side: int) -> tuple[int, int]:
    """The draft size that keeps the shorter side >= min_side after DCT down-scaling."""
    width, height = size
    scale = min_side / min(width, height)
    return (max(1, int(width * scale)), max(1, int(height * scale)))


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any PIL mode to RGB; transparency is composited onto a white background."""
    if image.mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    mode = image.mode
    if mode == "RGB":
        return image
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        return _high_depth_to_rgb(image)
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        canvas = Image.new("RGB", rgba.size, BACKGROUND)
        canvas.paste(rgba, mask=rgba.getchannel("A"))
        return canvas
    if mode in ("L", "1", "CMYK", "YCbCr", "LAB", "HSV", "RGBX"):
        return image.convert("RGB")
    raise ImageDecodeError("unsupported", f"image mode {mode} is not supported")


def _high_depth_to_rgb(image: Image.Image) -> Image.Image:
    """16-bit and float greyscale: scale the full range to 8 bits instead of clipping."""
    array = np.asarray(image, dtype=np.float64)
    if image.mode == "F":
        peak = 1.0 if array.max(initial=0.0) <= 1.0 else 255.0
    else:
        peak = 65535.0 if array.max(initial=0) > 255 else 255.0
    scaled = np.clip(array * (255.0 / peak), 0, 255).round().astype(np.uint8)
    return Image.fromarray(scaled, "L").convert("RGB")
