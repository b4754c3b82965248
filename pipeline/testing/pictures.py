"""Pictures that test a near-duplicate matcher: hard negatives (distinct pictures with little
in them, which a grey-level hash confuses) and copies of real photographs.

The hard negatives are what logos, plain backgrounds and product shots look like: flat colour
fields with four small rectangles, a disc or square on white, smooth skies, a few words on a
plain background. The real photographs are scikit-image's bundled sample images (the dev
extra installs scikit-image); `tiles` cuts each into four distinct images with real-photo
statistics, and `copies` makes what the same photo becomes on the web: a JPEG re-encode at
q60, a 0.5x rescale, a 3% crop (1.5% a side) and a 5% white border.
"""

from __future__ import annotations

import io
from collections.abc import Callable

import numpy as np
from PIL import Image, ImageDraw, ImageFont, ImageOps

# scikit-image's sample photographs (skimage.data), by function name
PHOTOGRAPHS = ("astronaut", "camera", "chelsea", "coffee", "coins", "hubble_deep_field",
               "retina", "rocket", "moon", "grass", "gravel", "brick", "page", "text", "cell",
               "immunohistochemistry", "horse", "clock", "logo", "microaneurysms")
WORDS = ("the", "quick", "brown", "fox", "jumps", "over", "lazy", "dog", "sale", "open", "closed",
         "menu", "price", "today", "only", "new")


def jpeg(image: Image.Image, quality: int = 90) -> bytes:
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, "JPEG", quality=quality)
    return buffer.getvalue()


def _colour(rng: np.random.Generator, low: int = 0, high: int = 256) -> tuple[int, ...]:
    return tuple(int(v) for v in rng.integers(low, high, 3))


def flat_field(rng: np.random.Generator) -> Image.Image:
    image = Image.new("RGB", (96, 96), _colour(rng))
    draw = ImageDraw.Draw(image)
    for _ in range(4):
        width, height = rng.integers(6, 20, 2)
        left, top = rng.integers(0, 96 - 20, 2)
        draw.rectangle([left, top, left + width, top + height], fill=_colour(rng))
    return image


def product_shot(rng: np.random.Generator) -> Image.Image:
    image = Image.new("RGB", (200, 200), (255, 255, 255))
    radius = int(rng.integers(20, 70))
    x, y = (int(v) for v in rng.integers(70, 130, 2))
    draw = ImageDraw.Draw(image)
    shape = draw.ellipse if rng.random() < 0.5 else draw.rectangle
    shape([x - radius, y - radius, x + radius, y + radius], fill=_colour(rng))
    return image


def sky(rng: np.random.Generator) -> Image.Image:
    top = rng.integers(60, 160, 3)
    bottom = np.clip(top + rng.integers(20, 90, 3), 0, 255)
    shade = np.linspace(0, 1, 160)[:, None, None]
    pixels = (top * (1 - shade) + bottom * shade) * np.ones((1, 240, 1))
    pixels += rng.normal(0, 2, pixels.shape)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def text_card(rng: np.random.Generator) -> Image.Image:
    image = Image.new("RGB", (240, 120), _colour(rng, 150))
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default()
    for line in range(int(rng.integers(1, 4))):
        words = " ".join(rng.choice(WORDS, int(rng.integers(2, 5))))
        draw.text((int(rng.integers(5, 60)), 10 + 35 * line), words, fill=_colour(rng, 0, 100),
                  font=font)
    return image


HARD_NEGATIVES: dict[str, Callable[[np.random.Generator], Image.Image]] = {
    "flat field": flat_field, "product shot": product_shot, "sky": sky, "text": text_card}


def hard_negatives(per_kind: int, seed: int = 0) -> dict[str, list[bytes]]:
    """`per_kind` distinct JPEGs of each kind of HARD_NEGATIVES."""
    rng = np.random.default_rng(seed)
    return {kind: [jpeg(make(rng)) for _ in range(per_kind)]
            for kind, make in HARD_NEGATIVES.items()}


def photographs() -> dict[str, Image.Image]:
    """scikit-image's sample photographs as RGB images (ImportError without scikit-image)."""
    import skimage.data

    found = {}
    for name in PHOTOGRAPHS:
        pixels = getattr(skimage.data, name)()
        if pixels.dtype != np.uint8:
            pixels = (pixels.astype(np.float64) / pixels.max() * 255).astype(np.uint8)
        found[name] = Image.fromarray(pixels).convert("RGB")
    return found


def tiles(photos: dict[str, Image.Image]) -> list[bytes]:
    """Four distinct images from each photograph: its quarters."""
    found = []
    for image in photos.values():
        width, height = image.size
        for left, top in ((0, 0), (width // 2, 0), (0, height // 2), (width // 2, height // 2)):
            found.append(jpeg(image.crop((left, top, left + width // 2, top + height // 2))))
    return found


def copies(image: Image.Image) -> dict[str, bytes]:
    """What the same photo becomes on the web, by name."""
    width, height = image.size
    cut_x, cut_y = round(0.015 * width), round(0.015 * height)
    border = round(0.05 * min(width, height))
    return {
        "re-encoded q60": jpeg(image, 60),
        "rescaled 0.5x": jpeg(image.resize((width // 2, height // 2), Image.BILINEAR)),
        "cropped 3%": jpeg(image.crop((cut_x, cut_y, width - cut_x, height - cut_y))),
        "bordered 5%": jpeg(ImageOps.expand(image, border=border, fill=(255, 255, 255))),
    }
