"""Image quality flags, the checks of CleanVision and fastdup that no downloader has: `dark`,
`bright` (washed out), `blurry`, `low_information`, `odd_aspect`, `grayscale`.

Measured on the image `label` decodes anyway for its hashes (at a reduced JPEG scale, shrunk
to QUALITY_SIDE on its shorter side), so they cost a few array operations, not a decode.
Each flag is one measured value against one threshold, written to quality.csv beside it so a
user can see how close an image came. The thresholds were set on scikit-image's 20 sample
photographs (pipeline/testing/pictures.py), each as it is and darkened (x0.2), washed out
(75% white) and blurred (Gaussian, radius 2 px at 128 px), and on the hard negatives there:
- dark: the brightest 1% of the darkened photographs' pixels stayed under 53; of the
  photographs as they are, over 117.
- bright: the darkest 1% of the washed-out ones was 191 or more; of the photographs, under 129.
- blurry: the strongest edge (the largest Laplacian) of the blurred ones was at most 37; of
  the photographs, at least 46 (a soft medical image); a clear sky has no edge and is blurry.
- low_information: the grey-level entropy of flat fields, product shots on white and text
  cards was under 2 bits, of the photographs over 4 (but a black silhouette: 1.4).
- odd_aspect: panoramas and banners; the photographs are at most 2:1 but a text strip (2.6).
- grayscale: the mean spread of a pixel's channels: 0 for the grey photographs, 5 or more for
  the colour ones.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
from PIL import Image

QUALITY_SIDE = 128  # measured at this shorter side, whatever the image's size
DARK_HIGHLIGHTS = 64  # dark: even the brightest 1% of the pixels is below this luma
BRIGHT_SHADOWS = 185  # bright: even the darkest 1% is above this luma
BLURRY_EDGE = 40  # blurry: no Laplacian (of luma, 0-255) stronger than this
LOW_ENTROPY = 2.5  # low_information: bits of grey-level entropy
ODD_ASPECT = 2.5  # odd_aspect: the long side over the short one
GRAY_SPREAD = 3.0  # grayscale: mean (max - min) of a pixel's channels, in levels

FLAGS = ("dark", "bright", "blurry", "low_information", "odd_aspect", "grayscale")
_LUMA = np.array([0.299, 0.587, 0.114], np.float32)


class Quality(NamedTuple):
    """What the flags are decided on (quality.csv's columns, in this order)."""

    brightness: float  # mean luma
    shadows: float  # luma of the darkest 1%
    highlights: float  # luma of the brightest 1%
    sharpness: float  # the largest |Laplacian| of luma
    entropy: float  # bits, of the 256-level grey histogram
    aspect: float  # width / height
    colourfulness: float  # mean (max - min) of a pixel's channels

    def flags(self) -> list[str]:
        raised = {
            "dark": self.highlights < DARK_HIGHLIGHTS,
            "bright": self.shadows > BRIGHT_SHADOWS,
            "blurry": self.sharpness < BLURRY_EDGE,
            "low_information": self.entropy < LOW_ENTROPY,
            "odd_aspect": max(self.aspect, 1 / self.aspect) > ODD_ASPECT,
            "grayscale": self.colourfulness < GRAY_SPREAD,
        }
        return [flag for flag in FLAGS if raised[flag]]


def measure(image: Image.Image) -> Quality:
    """The measures of a decoded image (any mode, any size)."""
    rgb = image if image.mode == "RGB" else image.convert("RGB")
    width, height = rgb.size
    scale = QUALITY_SIDE / min(width, height)
    if scale < 1:
        rgb = rgb.resize((max(1, round(width * scale)), max(1, round(height * scale))),
                         Image.BOX)
    pixels = np.asarray(rgb, np.float32)
    luma = pixels @ _LUMA
    shadows, highlights = np.percentile(luma, [1, 99])
    laplacian = (luma[:-2, 1:-1] + luma[2:, 1:-1] + luma[1:-1, :-2] + luma[1:-1, 2:]
                 - 4 * luma[1:-1, 1:-1])
    histogram = np.bincount(luma.astype(np.uint8).ravel(), minlength=256) / luma.size
    histogram = histogram[histogram > 0]
    return Quality(
        brightness=round(float(luma.mean()), 1), shadows=round(float(shadows), 1),
        highlights=round(float(highlights), 1),
        sharpness=round(float(np.abs(laplacian).max()) if laplacian.size else 0.0, 1),
        entropy=round(float(-(histogram * np.log2(histogram)).sum()), 2),
        aspect=round(width / height, 3),
        colourfulness=round(float((pixels.max(axis=2) - pixels.min(axis=2)).mean()), 1))


def parse_flags(text: str) -> tuple[str, ...]:
    """`dark,blurry` -> ("dark", "blurry"); ValueError naming an unknown flag."""
    names = tuple(name.strip() for name in text.split(",") if name.strip())
    unknown = [name for name in names if name not in FLAGS]
    if unknown:
        raise ValueError(f"unknown quality flag(s) {', '.join(unknown)}; one of "
                         f"{', '.join(FLAGS)}")
    return names
