"""The one place that turns a decoded image into a fixed-size training input.

mean, pack and evaluation all call `load_square`, so the mean image is computed over exactly
the pixels the network sees (DESIGN.md: "after the same resize/crop that training uses").
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from pipeline.images import decode_image

DEFAULT_SIZE = 256


def resize_center_crop(image: Image.Image, size: int) -> Image.Image:
    """Scale the shorter side to `size`, then cut the central size x size square."""
    width, height = image.size
    scale = size / min(width, height)
    new_size = (max(size, round(width * scale)), max(size, round(height * scale)))
    if new_size != image.size:
        image = image.resize(new_size, Image.BILINEAR, reducing_gap=3.0)
    left = (new_size[0] - size) // 2
    top = (new_size[1] - size) // 2
    return image.crop((left, top, left + size, top + size))


def load_square(path: str | Path, size: int = DEFAULT_SIZE) -> np.ndarray:
    """Decode `path` (at reduced JPEG scale when possible) into a size x size x 3 uint8 array."""
    image = decode_image(path, min_side=size)
    return np.asarray(resize_center_crop(image, size), dtype=np.uint8)
