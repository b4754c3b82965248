"""Real image files for tests: varied formats, modes and sizes, plus broken ones."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image


def pattern(seed: int, size: tuple[int, int] = (80, 64)) -> Image.Image:
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
    return Image.fromarray(base, "RGB").resize(size, Image.BILINEAR)


def encoded(image: Image.Image, fmt: str = "JPEG") -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt)
    return buffer.getvalue()


def write_image(path: Path, seed: int, fmt: str = "JPEG", size=(80, 64), mode="RGB") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image = pattern(seed, size)
    if mode != "RGB":
        image = image.convert(mode)
    path.write_bytes(encoded(image, fmt))
    return path


def make_dataset(root: Path, classes: int = 3, per_class: int = 10) -> dict[str, list[Path]]:
    """Class folders of good images in mixed formats and modes (no broken files)."""
    made: dict[str, list[Path]] = {}
    for c in range(classes):
        wnid = f"n0000000{c + 1}"
        made[wnid] = []
        for i in range(per_class):
            seed = c * 1000 + i
            if i % 5 == 3:
                path = write_image(root / wnid / f"{wnid}_{i}.png", seed, "PNG", mode="RGBA")
            elif i % 5 == 4:
                path = write_image(root / wnid / f"{wnid}_{i}.jpg", seed, mode="L")
            else:
                path = write_image(root / wnid / f"{wnid}_{i}.jpg", seed, size=(64 + i * 7, 90))
            made[wnid].append(path)
    return made


def colour_dataset(root: Path, per_class: int = 16) -> None:
    """Three classes a CNN learns in a few steps: noisy red, green and blue images."""
    rng = np.random.default_rng(0)
    for c in range(3):
        folder = root / f"n0000000{c + 1}"
        folder.mkdir(parents=True)
        for i in range(per_class):
            pixels = rng.integers(0, 90, (80, 80, 3))
            pixels[..., c] += 150
            Image.fromarray(pixels.astype(np.uint8)).save(folder / f"img_{i}.jpg", quality=90)
