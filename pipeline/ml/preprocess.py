"""The one place that turns a decoded image into a fixed-size network input.

mean and pack call `square_image`; the training loader, evaluate and predict use `InputSpec`; both
scale the shorter side and crop the same way, so the mean image is computed over exactly
the pixels the network sees (DESIGN.md: "after the same resize/crop that training uses").
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, NamedTuple

import numpy as np
from PIL import Image

from pipeline.core.images import decode_image


def resize_center_crop(image: Image.Image, size: int) -> Image.Image:
    """Scale the shorter side to `size`, then cut the central size x size square."""
    return _center_crop(_scale_shorter_side(image, size), size)


def square_image(path: str | Path | BinaryIO, size: int) -> Image.Image:
    """Decode `path` (at reduced JPEG scale when possible) into a size x size RGB image."""
    return resize_center_crop(decode_image(path, min_side=size), size)


def load_square(path: str | Path, size: int) -> np.ndarray:
    """`square_image` as a size x size x 3 uint8 array."""
    return np.asarray(square_image(path, size), dtype=np.uint8)


class Window(NamedTuple):
    """Where one network input comes from: the image scaled to width x height, the crop's
    top-left corner (the crop is InputSpec.crop square), and a horizontal flip."""

    width: int
    height: int
    left: int
    top: int
    flip: bool


@dataclass(frozen=True)
class InputSpec:
    """How an image becomes network input; saved in every checkpoint.

    Training: shorter side to `resize` (or to a random S in `jitter`, VGG's scale jittering),
    a random crop x crop window, a random horizontal flip. Evaluation: shorter side to
    `resize`, the central crop x crop window.
    """

    crop: int
    resize: int
    jitter: tuple[int, int] | None = None

    def to_state(self) -> dict[str, Any]:
        """Plain values, as a checkpoint and an export's metadata store them."""
        return {"crop": self.crop, "resize": self.resize,
                "jitter": list(self.jitter) if self.jitter else None}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> InputSpec:
        jitter = state.get("jitter")
        return cls(crop=state["crop"], resize=state["resize"],
                   jitter=tuple(jitter) if jitter else None)

    def train_window(self, width: int, height: int, rng: random.Random) -> Window:
        """Training's random choices for an image of this size, drawn in a fixed order, so
        the CPU path and the batched (GPU) path make the same crop of the same sample."""
        side = rng.randint(*self.jitter) if self.jitter else self.resize
        scaled = scaled_size(width, height, max(side, self.crop))
        left = rng.randint(0, scaled[0] - self.crop)
        top = rng.randint(0, scaled[1] - self.crop)
        return Window(*scaled, left, top, rng.random() < 0.5)

    def eval_window(self, width: int, height: int) -> Window:
        scaled = scaled_size(width, height, self.eval_side)
        return Window(*scaled, center_start(scaled[0], self.crop),
                      center_start(scaled[1], self.crop), False)

    def train_pixels(self, image: Image.Image, rng: random.Random) -> np.ndarray:
        return self.apply(image, self.train_window(*image.size, rng))

    def eval_pixels(self, image: Image.Image) -> np.ndarray:
        return self.apply(image, self.eval_window(*image.size))

    def window_of(self, width: int, height: int, train: bool,
                  rng: random.Random) -> Window:
        """Training's random window or evaluation's central one."""
        return self.train_window(width, height, rng) if train else self.eval_window(width,
                                                                                   height)

    def crop_slices(self, window: Window) -> tuple[slice, slice]:
        """The rows and columns `window` keeps of an image already at its scaled size: a
        pack's stored pixels can be cut without PIL (what `apply` does, minus the flip)."""
        return (slice(window.top, window.top + self.crop),
                slice(window.left, window.left + self.crop))

    def apply(self, image: Image.Image, window: Window) -> np.ndarray:
        """Scale, crop and maybe flip `image` as `window` says; a writable uint8 H x W x 3."""
        if (window.width, window.height) != image.size:
            image = image.resize((window.width, window.height), Image.BILINEAR,
                                 reducing_gap=3.0)
        image = image.crop((window.left, window.top, window.left + self.crop,
                            window.top + self.crop))
        if window.flip:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        return np.array(image, dtype=np.uint8)  # a writable copy: torch.from_numpy wants one

    @property
    def eval_side(self) -> int:
        """Evaluation scales the shorter side to this before the centre crop."""
        return max(self.resize, self.crop)

    @property
    def decode_side(self) -> int:
        """The smallest side decoding may reduce a JPEG to without losing needed detail."""
        return max(self.crop, self.resize, self.jitter[1] if self.jitter else 0)


def scaled_size(width: int, height: int, side: int) -> tuple[int, int]:
    """(width, height) with the shorter side scaled to `side`.

    Plain ints and floats only: `pipeline export` compiles this very function into the
    exported model (TorchScript), so served models resize to exactly the same size.
    """
    scale = side / min(width, height)
    return max(side, int(round(width * scale))), max(side, int(round(height * scale)))


def center_start(length: int, size: int) -> int:
    """Where a centred window of `size` starts along a side of `length` (also exported)."""
    return (length - size) // 2


def _scale_shorter_side(image: Image.Image, side: int) -> Image.Image:
    size = scaled_size(image.size[0], image.size[1], side)
    return image if size == image.size else image.resize(size, Image.BILINEAR, reducing_gap=3.0)


def _center_crop(image: Image.Image, size: int) -> Image.Image:
    if image.size == (size, size):
        return image
    left = center_start(image.size[0], size)
    top = center_start(image.size[1], size)
    return image.crop((left, top, left + size, top + size))
