"""Image quality flags, the checks of CleanVision and fastdup that no downloader has: `dark`,
`bright` (washed out), `blurry`, `low_information`, `odd_aspect`, `grayscale`.

Measured on the image `label` decodes anyway for its hashes (at a reduced JPEG scale, then
box-reduced by an integer factor to a shorter side of QUALITY_SIDE to twice that), so they
cost a few array operations, not a decode. Each flag is one measured value against one
threshold, written to quality.csv beside it so a user can see how close an image came. The
thresholds were set on scikit-image's 20 sample photographs (pipeline/testing/pictures.py),
each as it is and darkened (x0.2), washed out (75% white) and blurred (Gaussian, radius 2 px
at a 128 px side), and on the hard negatives there:
- dark: the brightest 1% of the darkened photographs' pixels stayed under 53; of the
  photographs as they are, 117 or more.
- bright: the darkest 1% of the washed-out ones was 190 or more; of the photographs, at most
  127.
- blurry: the strongest edge (the largest Laplacian) of the blurred ones was at most 19; of
  the photographs, at least 60 (a microscope image); a clear sky has no edge and is blurry. A
  dark or washed-out image has weak edges for that reason: it is flagged dark or bright only.
- low_information: the grey-level entropy of flat fields, product shots on white and text
  cards was under 1.8 bits, of the photographs over 4 (but a black silhouette: 1.3).
- odd_aspect: panoramas and banners; the photographs are at most 2:1 but a text strip (2.6).
- grayscale: the mean spread of a thumbnail pixel's channels: 0 for the grey photographs,
  3.5 or more for the colour ones.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
from PIL import Image

QUALITY_SIDE = 128  # measured at this shorter side or up to twice it, whatever the size
COLOUR_SIDE = 32  # colour is judged on a thumbnail of about this shorter side
DARK_HIGHLIGHTS = 64  # dark: even the brightest 1% of the pixels is below this luma
BRIGHT_SHADOWS = 185  # bright: even the darkest 1% is above this luma
BLURRY_EDGE = 40  # blurry: no Laplacian (of luma, 0-255) stronger than this
LOW_ENTROPY = 2.5  # low_information: bits of grey-level entropy
ODD_ASPECT = 2.5  # odd_aspect: the long side over the short one
GRAY_SPREAD = 2.0  # grayscale: mean (max - min) of a thumbnail pixel's channels, in levels

FLAGS = ("dark", "bright", "blurry", "low_information", "odd_aspect", "grayscale")


class Quality(NamedTuple):
    """What the flags are decided on (quality.csv's columns, in this order)."""

    brightness: float  # mean luma (ITU-R 601: 0.299 R + 0.587 G + 0.114 B)
    shadows: float  # luma of the darkest 1%
    highlights: float  # luma of the brightest 1%
    sharpness: float  # the largest |Laplacian| of luma
    entropy: float  # bits, of the 256-level grey histogram
    aspect: float  # width / height
    colourfulness: float  # mean (max - min) of a thumbnail pixel's channels: 0 for grey

    def flags(self) -> list[str]:
        dark, bright = self.highlights < DARK_HIGHLIGHTS, self.shadows > BRIGHT_SHADOWS
        raised = {
            "dark": dark,
            "bright": bright,
            # a dark or washed-out image has weak edges because of its exposure: not blurry
            "blurry": self.sharpness < BLURRY_EDGE and not (dark or bright),
            "low_information": self.entropy < LOW_ENTROPY,
            "odd_aspect": max(self.aspect, 1 / self.aspect) > ODD_ASPECT,
            "grayscale": self.colourfulness < GRAY_SPREAD,
        }
        return [flag for flag in FLAGS if raised[flag]]


def measure(image: Image.Image, grey: Image.Image | None = None) -> Quality:
    """The measures of a decoded image (any mode, any size; `grey`: its "L" conversion when
    the caller has it): a histogram, one 3x3 Laplacian and a 32-pixel thumbnail for colour,
    so the flags cost little next to the decode and the hashes that label pays anyway
    (BENCHMARKS.md)."""
    rgb = image if image.mode == "RGB" else image.convert("RGB")
    grey = grey if grey is not None else rgb.convert("L")  # ITU-R 601 luma
    width, height = rgb.size
    factor = min(width, height) // QUALITY_SIDE
    if factor > 1:  # an integer box reduction: several times cheaper than a resize
        grey = grey.reduce(factor)
    counts = np.array(grey.histogram(), np.float64)
    share = counts / counts.sum()
    cumulative = np.cumsum(share)
    present = share[share > 0]
    luma = np.asarray(grey).astype(np.int16)
    laplacian = (luma[:-2, 1:-1] + luma[2:, 1:-1] + luma[1:-1, :-2] + luma[1:-1, 2:]
                 - 4 * luma[1:-1, 1:-1])
    thumb = np.asarray(rgb.reduce(max(1, min(width, height) // COLOUR_SIDE)), np.int16)
    return Quality(
        brightness=round(float(share @ np.arange(256)), 1),
        shadows=float(np.searchsorted(cumulative, 0.01)),
        highlights=float(np.searchsorted(cumulative, 0.99)),
        sharpness=float(np.abs(laplacian).max()) if laplacian.size else 0.0,
        entropy=round(float(-(present * np.log2(present)).sum()), 2),
        aspect=round(width / height, 3),
        colourfulness=round(float((thumb.max(axis=2) - thumb.min(axis=2)).mean()), 1))


def parse_flags(text: str) -> tuple[str, ...]:
    """`dark,blurry` -> ("dark", "blurry"); ValueError naming an unknown flag."""
    names = tuple(name.strip() for name in text.split(",") if name.strip())
    unknown = [name for name in names if name not in FLAGS]
    if unknown:
        raise ValueError(f"unknown quality flag(s) {', '.join(unknown)}; one of "
                         f"{', '.join(FLAGS)}")
    return names
