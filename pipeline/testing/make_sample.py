"""Generate the project's offline "ImageNet": a small synthetic image set, deterministic per seed.

Tests, demos and benchmarks need ImageNet-shaped inputs (synset folders, `words.txt`,
`wordnet.is_a.txt`, a `fall11_urls.txt`-style list full of realistic faults) without touching
the internet. Each class is a kind of figure (shape or texture) drawn with random colours,
placement, scale, rotation, clutter and noise, so a small CNN has to learn shape, not colour,
and features learned on some classes transfer to the others.

    python -m pipeline.testing.make_sample --out data/sample [--classes 10] [--per-class 300]
                                  [--base-url http://127.0.0.1:8765] [--workers N]

The URL list's faults are served by `pipeline/testing/serve_sample.py`.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import os
import random
import shutil
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageChops, ImageDraw, ImageFont

STAMP_VERSION = 1
# Below this many images, starting worker processes costs more than it saves.
PARALLEL_MIN_IMAGES = 400
PLACEHOLDER_SIZE = (500, 374)

Point = tuple[float, float]


class Pen:
    """Draws figures given in unit space (centred on 0, radius about 1) onto a mask.

    Every class goes through the same random affine map (scale, stretch, rotation, position),
    so the only thing that tells classes apart is the figure itself.
    """

    def __init__(self, mask: Image.Image, center: Point, scale: float,
                 matrix: tuple[float, float, float, float]) -> None:
        self.mask = mask
        self.scale = scale
        self._center = center
        self._matrix = matrix
        self._draw = ImageDraw.Draw(mask)

    def on(self, mask: Image.Image) -> Pen:
        """The same map drawing onto another mask (texture windows must line up)."""
        return Pen(mask, self._center, self.scale, self._matrix)

    def _map(self, points: list[Point]) -> list[Point]:
        a, b, c, d = self._matrix
        cx, cy = self._center
        return [(cx + a * u + b * v, cy + c * u + d * v) for u, v in points]

    def polygon(self, points: list[Point], fill: int = 255) -> None:
        self._draw.polygon(self._map(points), fill=fill)

    def disc(self, x: float, y: float, radius: float, fill: int = 255) -> None:
        self.polygon([(x + u, y + v) for u, v in _regular(40, radius)], fill)

    def line(self, points: list[Point], width: float, fill: int = 255) -> None:
        self._draw.line(self._map(points), fill=fill, width=max(1, round(width * self.scale)),
                        joint="curve")


def _regular(sides: int, radius: float, phase: float = -math.pi / 2) -> list[Point]:
    step = 2 * math.pi / sides
    return [(radius * math.cos(phase + i * step), radius * math.sin(phase + i * step))
            for i in range(sides)]


def _rect(x0: float, y0: float, x1: float, y1: float) -> list[Point]:
    return [(x0, y0), (x1, y0), (x1, y1), (x0, y1)]


# Shapes. Curves (circle, rings, crescent, dots), right angles (square, cross, checkers) and
# slanted edges (triangle, star, zigzag) each appear among both the first five classes and the
# last five, so a network pretrained on one half has useful features for the other.

def _circle(pen: Pen, rng: np.random.Generator) -> None:
    pen.disc(0, 0, 1.0)


def _square(pen: Pen, rng: np.random.Generator) -> None:
    pen.polygon(_regular(4, 1.0, math.pi / 4))


def _triangle(pen: Pen, rng: np.random.Generator) -> None:
    jitter = rng.uniform(-0.1, 0.1, size=(3, 2))
    corners = zip(_regular(3, 1.0), jitter, strict=True)
    pen.polygon([(x + dx, y + dy) for (x, y), (dx, dy) in corners])


def _star(pen: Pen, rng: np.random.Generator) -> None:
    points, inner = int(rng.integers(5, 7)), rng.uniform(0.35, 0.5)
    outer = _regular(points, 1.0)
    valleys = _regular(points, inner, -math.pi / 2 + math.pi / points)
    pen.polygon([p for pair in zip(outer, valleys, strict=True) for p in pair])


def _cross(pen: Pen, rng: np.random.Generator) -> None:
    w = rng.uniform(0.2, 0.32)
    pen.polygon([(-w, -1), (w, -1), (w, -w), (1, -w), (1, w), (w, w), (w, 1), (-w, 1),
                 (-w, w), (-1, w), (-1, -w), (-w, -w)])


def _rings(pen: Pen, rng: np.random.Generator) -> None:
    bands = 2 * int(rng.integers(2, 4))
    for i in range(bands):
        pen.disc(0, 0, 1.0 - i / bands, fill=0 if i % 2 else 255)


def _hexagon(pen: Pen, rng: np.random.Generator) -> None:
    pen.polygon(_regular(6, 1.0, 0.0))


def _crescent(pen: Pen, rng: np.random.Generator) -> None:
    pen.disc(0, 0, 1.0)
    pen.disc(rng.uniform(0.35, 0.55), 0, rng.uniform(0.8, 0.9), fill=0)


# Textures: a pattern over [-1, 1]^2, later seen through a disc or square window.

def _stripes(pen: Pen, rng: np.random.Generator) -> None:
    n = int(rng.integers(3, 7))
    step = 2 / n
    for i in range(n):
        pen.polygon(_rect(-1 + i * step, -1, -1 + (i + 0.5) * step, 1))


def _checkers(pen: Pen, rng: np.random.Generator) -> None:
    n = int(rng.integers(3, 6))
    step = 2 / n
    for i in range(n):
        for j in range(i % 2, n, 2):
            pen.polygon(_rect(-1 + i * step, -1 + j * step, -1 + (i + 1) * step,
                              -1 + (j + 1) * step))


def _zigzag(pen: Pen, rng: np.random.Generator) -> None:
    rows, teeth = int(rng.integers(2, 4)), int(rng.integers(3, 6))
    amplitude, width = rng.uniform(0.12, 0.22), rng.uniform(0.1, 0.16)
    xs = np.linspace(-1.2, 1.2, 2 * teeth + 1)
    for row in range(rows):
        y = -1 + (row + 0.5) * 2 / rows
        pen.line([(x, y + (amplitude if k % 2 else -amplitude)) for k, x in enumerate(xs)], width)


def _dots(pen: Pen, rng: np.random.Generator) -> None:
    n = int(rng.integers(3, 6))
    step = 2 / n
    radius = step * rng.uniform(0.25, 0.38)
    for i in range(n):
        for j in range(n):
            pen.disc(-1 + (i + 0.5) * step, -1 + (j + 0.5) * step, radius)


def _grid(pen: Pen, rng: np.random.Generator) -> None:
    n, width = int(rng.integers(3, 6)), rng.uniform(0.07, 0.12)
    for i in range(n + 1):
        offset = -1 + i * 2 / n
        pen.polygon(_rect(offset - width / 2, -1.2, offset + width / 2, 1.2))
        pen.polygon(_rect(-1.2, offset - width / 2, 1.2, offset + width / 2))


def _waves(pen: Pen, rng: np.random.Generator) -> None:
    rows, cycles = int(rng.integers(2, 4)), rng.uniform(1.5, 3.0)
    amplitude, width = rng.uniform(0.1, 0.2), rng.uniform(0.1, 0.16)
    xs = np.linspace(-1.2, 1.2, 60)
    for row in range(rows):
        y = -1 + (row + 0.5) * 2 / rows
        pen.line([(x, y + amplitude * math.sin(math.pi * cycles * x)) for x in xs], width)


def _bricks(pen: Pen, rng: np.random.Generator) -> None:
    rows, gap = int(rng.integers(3, 6)), rng.uniform(0.06, 0.1)
    height = 2 / rows
    length = height * rng.uniform(1.8, 2.6)
    for row in range(rows):
        y0 = -1 + row * height
        x = -1.2 - (length / 2 if row % 2 else 0)
        while x < 1.2:
            pen.polygon(_rect(x + gap / 2, y0 + gap / 2, x + length - gap / 2,
                              y0 + height - gap / 2))
            x += length


def _spiral(pen: Pen, rng: np.random.Generator) -> None:
    turns, width = rng.uniform(2.0, 3.0), rng.uniform(0.1, 0.15)
    angles = np.linspace(0, 2 * math.pi * turns, 160)
    radii = 0.12 + 0.88 * angles / angles[-1]
    pen.line([(r * math.cos(a), r * math.sin(a)) for r, a in zip(radii, angles, strict=True)],
             width)


def _windowed(pattern: Callable[[Pen, np.random.Generator], None]
              ) -> Callable[[Pen, np.random.Generator], None]:
    """A texture seen through a disc or a square, so its outline says nothing about the class."""
    def draw(pen: Pen, rng: np.random.Generator) -> None:
        pattern(pen, rng)
        window = Image.new("L", pen.mask.size, 0)
        if rng.random() < 0.5:
            pen.on(window).disc(0, 0, 1.0)
        else:
            pen.on(window).polygon(_rect(-0.85, -0.85, 0.85, 0.85))
        pen.mask.paste(ImageChops.darker(pen.mask, window))
    return draw


@dataclass(frozen=True)
class SampleClass:
    names: str  # words.txt names; the first is the label
    draw: Callable[[Pen, np.random.Generator], None]
    size: tuple[float, float]  # figure radius as a fraction of the image's shorter side


_SHAPE, _TEXTURE = (0.22, 0.42), (0.3, 0.48)
CLASSES: tuple[SampleClass, ...] = (
    SampleClass("circle, disc, disk", _circle, _SHAPE),
    SampleClass("square, box", _square, _SHAPE),
    SampleClass("triangle, trigon, trilateral", _triangle, _SHAPE),
    SampleClass("star", _star, _SHAPE),
    SampleClass("stripes, bands", _windowed(_stripes), _TEXTURE),
    SampleClass("rings, bullseye, concentric circles", _rings, _SHAPE),
    SampleClass("checkerboard, checker, chequer", _windowed(_checkers), _TEXTURE),
    SampleClass("cross, plus sign", _cross, _SHAPE),
    SampleClass("zigzag, chevron", _windowed(_zigzag), _TEXTURE),
    SampleClass("polka dots, dots, spots", _windowed(_dots), _TEXTURE),
    SampleClass("hexagon", _hexagon, _SHAPE),
    SampleClass("crescent, half moon", _crescent, _SHAPE),
    # More source-side figures for transfer demos: textures that make a network look inside a
    # figure's outline (grid, waves, bricks), and a curve that is not a closed shape (spiral).
    SampleClass("grid, lattice, grating", _windowed(_grid), _TEXTURE),
    SampleClass("waves, wavy lines", _windowed(_waves), _TEXTURE),
    SampleClass("brickwork, bricks", _windowed(_bricks), _TEXTURE),
    SampleClass("spiral, volute", _spiral, _SHAPE),
)


def wnid_for(index: int) -> str:
    """Fake but well-formed synset ids (n + 8 digits), far from real WordNet offsets."""
    return f"n{90000001 + index:08d}"


# Parent synsets: `polygon` has two of the classes as hyponyms, and `figure` has `polygon`, so
# `--with-hyponyms n90000101` reaches the squares and triangles through a grandchild relation.
PARENTS: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    ("n90000100", "polygon, polygonal shape", (wnid_for(1), wnid_for(2))),
    ("n90000101", "figure, shape", ("n90000100", wnid_for(0))),
)


# ---------------------------------------------------------------------------------------------
# Rendering

def render(class_index: int, rng: np.random.Generator) -> tuple[Image.Image, Image.Image]:
    """One RGB image of class `class_index`, and the mask of its figure (for alpha)."""
    width, height = _image_size(rng)
    base = rng.integers(0, 256, 3)
    background = _background(width, height, base, rng)
    mask = Image.new("L", (width, height), 0)
    spec = CLASSES[class_index]
    spec.draw(_random_pen(mask, spec.size, rng), rng)
    figure = Image.new("RGB", (width, height), _rgb(_contrasting(base, rng)))
    return _add_noise(Image.composite(figure, background, mask), rng), mask


def _image_size(rng: np.random.Generator) -> tuple[int, int]:
    short, aspect = int(rng.integers(96, 321)), rng.uniform(0.6, 1.8)
    if aspect >= 1:
        return round(short * aspect), short
    return short, round(short / aspect)


def _background(width: int, height: int, base: np.ndarray,
                rng: np.random.Generator) -> Image.Image:
    """A two-colour gradient in a random direction with faint clutter (lines, blobs)."""
    other = np.clip(base + rng.integers(-60, 61, 3), 0, 255)
    angle = rng.uniform(0, 2 * math.pi)
    ramp = (np.linspace(0, math.sin(angle), height, dtype=np.float32)[:, None]
            + np.linspace(0, math.cos(angle), width, dtype=np.float32)[None, :])
    ramp = (ramp - ramp.min()) * (255 / max(float(np.ptp(ramp)), 1e-6))
    image = Image.composite(Image.new("RGB", (width, height), _rgb(other)),
                            Image.new("RGB", (width, height), _rgb(base)),
                            Image.fromarray(ramp.astype(np.uint8), "L"))
    _clutter(ImageDraw.Draw(image), width, height, (base + other) / 2, rng)
    return image


def _clutter(draw: ImageDraw.ImageDraw, width: int, height: int, tone: np.ndarray,
             rng: np.random.Generator) -> None:
    """Low-contrast strokes the network must learn to ignore."""
    def colour() -> tuple[int, int, int]:
        return _rgb(np.clip(tone + rng.integers(-35, 36, 3), 0, 255))

    for _ in range(int(rng.integers(2, 9))):
        ends = rng.uniform(0, 1, 4) * (width, height, width, height)
        draw.line(ends.tolist(), fill=colour(), width=int(rng.integers(1, 4)))
    for _ in range(int(rng.integers(1, 5))):
        x, y, r = rng.uniform(0, width), rng.uniform(0, height), rng.uniform(4, 25)
        draw.ellipse((x - r, y - r, x + r, y + r), outline=colour(), width=2)


def _random_pen(mask: Image.Image, size: tuple[float, float], rng: np.random.Generator) -> Pen:
    width, height = mask.size
    scale = min(width, height) * rng.uniform(*size)
    cx = rng.uniform(min(scale, width / 2), max(width - scale, width / 2))
    cy = rng.uniform(min(scale, height / 2), max(height - scale, height / 2))
    angle, stretch = rng.uniform(0, 2 * math.pi), math.sqrt(rng.uniform(0.8, 1.25))
    cos, sin = math.cos(angle), math.sin(angle)
    sx, sy = scale * stretch, scale / stretch
    return Pen(mask, (cx, cy), scale, (cos * sx, -sin * sy, sin * sx, cos * sy))


def _rgb(colour: np.ndarray) -> tuple[int, int, int]:
    red, green, blue = (int(c) for c in colour)
    return red, green, blue


def _luma(colour: np.ndarray) -> float:
    return float(colour @ np.array([0.299, 0.587, 0.114]))


def _contrasting(base: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Any colour, as long as its brightness differs from the background's.

    Brightness, not hue, so the figure survives conversion to grayscale.
    """
    for _ in range(32):
        colour = rng.integers(0, 256, 3)
        if abs(_luma(colour) - _luma(base)) >= 60:
            return colour
    return 255 - base


def _add_noise(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Sensor-like noise (uniform, in integers: the generator's hot spot)."""
    pixels = np.asarray(image, dtype=np.int16)
    amplitude = int(rng.integers(3, 16))
    pixels = pixels + rng.integers(-amplitude, amplitude + 1, pixels.shape, dtype=np.int16)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")


# How ImageNet-like files are stored: mostly RGB JPEG, with the modes a loader must handle.
FORMAT_WEIGHTS = {"jpeg": 0.85, "gray": 0.05, "cmyk": 0.02, "rgba": 0.04, "palette": 0.04}


def encode(image: Image.Image, mask: Image.Image,
           rng: np.random.Generator) -> tuple[Image.Image, str, dict[str, int]]:
    """Pick a storage format: returns the image to save, its extension and save options."""
    kind = rng.choice(list(FORMAT_WEIGHTS), p=list(FORMAT_WEIGHTS.values()))
    jpeg = {"quality": int(rng.integers(70, 96))}
    if kind == "jpeg":
        return image, "jpg", jpeg
    if kind == "gray":
        return image.convert("L"), "jpg", jpeg
    if kind == "cmyk":
        return image.convert("CMYK"), "jpg", jpeg
    if kind == "rgba":
        floor = 0 if rng.random() < 0.5 else int(rng.integers(40, 256))
        rgba = image.convert("RGBA")
        rgba.putalpha(mask.point(lambda v: max(v, floor)))
        return rgba, "png", {}
    colors = int(rng.integers(32, 129))
    return image.quantize(colors, Image.Quantize.FASTOCTREE), "png", {}


def render_file(files_dir: str, class_index: int, num: int, seed: int) -> None:
    """Render and save `<wnid>_<num>`; seeded by (seed, class, num) so any process can do it."""
    rng = np.random.default_rng([seed, class_index, num])
    image, mask = render(class_index, rng)
    stored, ext, options = encode(image, mask, rng)
    wnid = wnid_for(class_index)
    stored.save(Path(files_dir, wnid, f"{wnid}_{num}.{ext}"), **options)


def placeholder_image() -> Image.Image:
    """Flickr's grey "This photo is no longer available" image, served for deleted photos."""
    image = Image.new("RGB", PLACEHOLDER_SIZE, (230, 230, 230))
    draw = ImageDraw.Draw(image)
    draw.rectangle((215, 120, 285, 170), outline=(170, 170, 170), width=4)
    draw.ellipse((238, 133, 262, 157), outline=(170, 170, 170), width=4)
    draw.text((250, 215), "This photo is no longer available", fill=(120, 120, 120),
              font=ImageFont.load_default(size=22), anchor="mm")
    return image


# ---------------------------------------------------------------------------------------------
# The sample directory

def make_sample(out: Path, *, classes: int = 10, per_class: int = 300, seed: int = 0,
                base_url: str | None = None, workers: int | None = None) -> list[str]:
    """Create (or reuse, when already complete for these parameters) a sample under `out`.

    Returns the class wnids. With `base_url`, also writes `urls.txt` and `expected.tsv`.
    """
    if not 1 <= classes <= len(CLASSES):
        raise ValueError(f"--classes must be between 1 and {len(CLASSES)}")
    if per_class < 1:
        raise ValueError("--per-class must be at least 1")
    wnids = [wnid_for(i) for i in range(classes)]
    stamp = {"version": STAMP_VERSION, "classes": classes, "per_class": per_class, "seed": seed}
    if not _is_complete(out, stamp, wnids):
        _generate(out, stamp, wnids, workers or os.cpu_count() or 1)
    if base_url:
        expected = build_url_list(out, base_url, out / "urls.txt", wnids=wnids, seed=seed)
        write_expected(out / "expected.tsv", expected)
    return wnids


def write_expected(path: Path, expected: dict[str, str]) -> None:
    """`expected.tsv`: a header, then `<id>\t<outcome>` per URL."""
    rows = [f"{image_id}\t{outcome}\n" for image_id, outcome in expected.items()]
    path.write_text("id\texpected_outcome\n" + "".join(rows), encoding="utf-8")


def read_expected(path: Path) -> dict[str, str]:
    """What `write_expected` wrote."""
    lines = path.read_text(encoding="utf-8").splitlines()[1:]
    return dict(line.split("\t", 1) for line in lines)


def _is_complete(out: Path, stamp: dict[str, int], wnids: list[str]) -> bool:
    try:
        found = json.loads((out / "sample.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    if found != {**stamp, "complete": True}:
        return False
    return all(_count_files(out / "files" / wnid) == stamp["per_class"] for wnid in wnids)


def _count_files(folder: Path) -> int:
    return sum(1 for _ in folder.iterdir()) if folder.is_dir() else 0


def _generate(out: Path, stamp: dict[str, int], wnids: list[str], workers: int) -> None:
    """Regenerate everything; the stamp is written first (incomplete) and completed last, so an
    interrupted run is redone and a directory that is not ours is never wiped."""
    files = out / "files"
    stamp_path = out / "sample.json"
    if files.exists() and any(files.iterdir()):
        if not stamp_path.exists():
            raise FileExistsError(f"{files} exists and was not made by make_sample.py")
        shutil.rmtree(files)
    out.mkdir(parents=True, exist_ok=True)
    stamp_path.write_text(json.dumps({**stamp, "complete": False}), encoding="utf-8")
    for wnid in wnids:
        (files / wnid).mkdir(parents=True, exist_ok=True)
    _render_all(files, len(wnids), stamp["per_class"], stamp["seed"], workers)
    _write_synsets(out, wnids)
    placeholder_image().save(out / "placeholder.png", optimize=False)
    stamp_path.write_text(json.dumps({**stamp, "complete": True}), encoding="utf-8")


def _render_all(files: Path, classes: int, per_class: int, seed: int, workers: int) -> None:
    tasks = [(str(files), c, num, seed) for c in range(classes) for num in range(1, per_class + 1)]
    if workers <= 1 or len(tasks) < PARALLEL_MIN_IMAGES:
        for task in tasks:
            render_file(*task)
        return
    # spawn, not fork: callers (tests) may have threads running, e.g. the mirror server.
    with multiprocessing.get_context("spawn").Pool(workers) as pool:
        pool.starmap(render_file, tasks, chunksize=32)


def _write_synsets(out: Path, wnids: list[str]) -> None:
    """words.txt and wordnet.is_a.txt, keeping only relations that reach a generated class."""
    present = set(wnids)
    words = [f"{wnid}\t{CLASSES[i].names}\n" for i, wnid in enumerate(wnids)]
    relations = []
    for parent, names, children in PARENTS:
        kept = [child for child in children if child in present]
        if kept:
            present.add(parent)
            words.append(f"{parent}\t{names}\n")
            relations += [f"{parent} {child}\n" for child in kept]
    (out / "words.txt").write_text("".join(words), encoding="utf-8")
    (out / "wordnet.is_a.txt").write_text("".join(relations), encoding="utf-8")


# ---------------------------------------------------------------------------------------------
# The URL list

# Kind of URL -> the journal outcome a correct downloader records for it.
KIND_OUTCOMES: dict[str, str] = {
    "404": "dead", "410": "dead", "reset": "dead",
    "500": "http_error", "403": "http_error",
    "flaky": "ok", "throttle": "ok", "redirect": "ok",
    "slow": "timeout", "stall": "timeout",
    "html": "not_image", "mislabeled": "not_image", "truncated": "not_image",
    "huge": "too_large", "tiny": "too_small",
    "unavailable": "placeholder", "placeholder": "placeholder",
    "noai": "opted_out", "tdm": "opted_out", "duplicate": "duplicate",
}
KINDS: tuple[str, ...] = tuple(KIND_OUTCOMES)
DEFAULT_MIX: dict[str, float] = {
    "404": 0.05, "410": 0.02, "500": 0.02, "403": 0.01, "flaky": 0.03, "throttle": 0.02,
    "slow": 0.02, "stall": 0.01, "reset": 0.01, "html": 0.02, "mislabeled": 0.01,
    "truncated": 0.02, "huge": 0.01, "unavailable": 0.02, "placeholder": 0.01, "noai": 0.01,
    "tiny": 0.01, "duplicate": 0.02, "redirect": 0.03,
}
SLOW_SECONDS = 30  # longer than any sensible per-request timeout
HUGE_MB = 64  # larger than any sensible size limit
_ROUTES = {
    "404": "status/404", "410": "status/410", "500": "status/500", "403": "status/403",
    "flaky": "flaky/503/1", "throttle": "throttle/1", "slow": f"slow/{SLOW_SECONDS}",
    "stall": "stall", "reset": "reset", "html": "html", "mislabeled": "mislabeled",
    "truncated": "truncated", "huge": f"huge/{HUGE_MB}", "unavailable": "unavailable",
    "placeholder": "placeholder", "noai": "noai", "tdm": "tdm", "tiny": "tiny",
    "redirect": "redirect",
}


@dataclass
class _Entry:
    id: str
    wnid: str
    kind: str
    tail: str  # "<wnid>/<file>"
    variant: int | None = None  # set when the file is reused: the server makes its bytes unique
    original: _Entry | None = None  # for duplicates: the earlier entry whose bytes it repeats

    def path(self) -> str:
        if self.kind == "duplicate" and self.original is not None:
            return f"{self.original.path()}?copy={self.id}"
        if self.kind == "ok":
            return f"uniq/{self.variant}/{self.tail}" if self.variant else f"img/{self.tail}"
        path = f"{_ROUTES[self.kind]}/{self.tail}"
        return f"{path}?v={self.variant}" if self.variant else path


def build_url_list(sample_dir: Path, base_url: str, out_path: Path, *,
                   wnids: list[str] | None = None, per_synset: int | None = None,
                   mix: dict[str, float] | None = None, seed: int = 0,
                   malformed: int = 3) -> dict[str, str]:
    """Write a `fall11_urls.txt`-style list for the mirror at `base_url`; return id -> outcome.

    Each synset gets exactly round(fraction * ids) URLs of each kind in `mix` (the rest are
    plain), then the whole list is shuffled so faults are interleaved. `malformed` unparseable
    lines are inserted at fixed positions; they are not in the returned mapping.
    """
    mix = DEFAULT_MIX if mix is None else mix
    _check_mix(mix)
    files_dir = Path(sample_dir) / "files"
    if wnids is None:
        wnids = sorted(p.name for p in files_dir.iterdir() if p.is_dir())
    rng = random.Random(seed)
    entries = [entry for wnid in wnids
               for entry in _synset_entries(files_dir, wnid, per_synset, mix, rng)]
    rng.shuffle(entries)
    _pair_duplicates(entries, rng)
    base = base_url.rstrip("/")
    lines = [f"{entry.id}\t{base}/{entry.path()}" for entry in entries]
    _insert_malformed(lines, malformed, wnids, base)
    _write_if_changed(Path(out_path), "".join(line + "\n" for line in lines))
    return {entry.id: KIND_OUTCOMES.get(entry.kind, "ok") for entry in entries}


def _write_if_changed(path: Path, text: str) -> None:
    """An unchanged list keeps its mtime, so a Makefile chain fed by it has nothing to redo."""
    if path.exists() and path.read_text(encoding="utf-8") == text:
        return
    path.write_text(text, encoding="utf-8")


def _check_mix(mix: dict[str, float]) -> None:
    unknown = sorted(set(mix) - set(KINDS))
    if unknown:
        raise ValueError(f"unknown URL kinds {unknown}; known: {', '.join(KINDS)}")
    if any(fraction < 0 for fraction in mix.values()) or sum(mix.values()) > 1:
        raise ValueError("mix fractions must be >= 0 and sum to at most 1")


def _synset_entries(files_dir: Path, wnid: str, per_synset: int | None,
                    mix: dict[str, float], rng: random.Random) -> list[_Entry]:
    """Ids `<wnid>_1..n`; the first ones use the synset's own files, the rest reuse its JPEGs."""
    files = sorted((p.name for p in (files_dir / wnid).iterdir()), key=_file_number)
    count = len(files) if per_synset is None else per_synset
    kinds = _kind_list(mix, count)
    rng.shuffle(kinds)
    jpegs = [name for name in files if name.endswith(".jpg")]
    if count > len(files) and not jpegs:
        raise ValueError(f"{wnid} has no JPEG to reuse for ids beyond its {len(files)} files")
    entries = []
    for num, kind in enumerate(kinds, 1):
        if num <= len(files):
            entries.append(_Entry(f"{wnid}_{num}", wnid, kind, f"{wnid}/{files[num - 1]}"))
        else:
            reused = jpegs[(num - len(files) - 1) % len(jpegs)]
            entries.append(_Entry(f"{wnid}_{num}", wnid, kind, f"{wnid}/{reused}", num))
    return entries


def _file_number(name: str) -> int:
    return int(name.rsplit(".", 1)[0].rsplit("_", 1)[1])


def _kind_list(mix: dict[str, float], count: int) -> list[str]:
    """Exact per-synset counts (rounded), so small samples are predictable, unlike draws."""
    kinds = [kind for kind, fraction in mix.items() for _ in range(int(fraction * count + 0.5))]
    if len(kinds) > count:
        raise ValueError(f"mix rounds to {len(kinds)} faulty URLs for only {count} ids")
    return kinds + ["ok"] * (count - len(kinds))


def _pair_duplicates(entries: list[_Entry], rng: random.Random) -> None:
    """Point each duplicate at a plain entry of its synset that comes earlier in the list.

    A duplicate with no earlier original becomes plain itself and hands its role to the next
    plain entry of the synset, so the per-synset counts stay exact.
    """
    originals: dict[str, list[_Entry]] = defaultdict(list)
    owed: Counter[str] = Counter()
    for entry in entries:
        if entry.kind == "duplicate" and not originals[entry.wnid]:
            entry.kind = "ok"
            owed[entry.wnid] += 1
        elif entry.kind == "ok" and owed[entry.wnid]:
            entry.kind = "duplicate"
            owed[entry.wnid] -= 1
        if entry.kind == "duplicate":
            entry.original = rng.choice(originals[entry.wnid])
        elif entry.kind == "ok":
            originals[entry.wnid].append(entry)


def _insert_malformed(lines: list[str], count: int, wnids: list[str], base: str) -> None:
    """Lines a parser must count and skip: no tab, an id without `_`, an id with no URL."""
    total = len(lines)
    for i in range(count):
        wnid = wnids[i % len(wnids)]
        bad = (f"{wnid}_0 {base}/img/{wnid}/missing.jpg",
               f"{wnid}\t{base}/img/{wnid}/missing.jpg",
               f"{wnid}_0\t")[i % 3]
        lines.insert((i + 1) * total // (count + 1) + i, bad)


# ---------------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="sample directory to create")
    parser.add_argument("--classes", type=int, default=10, help=f"1..{len(CLASSES)}")
    parser.add_argument("--per-class", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--base-url", help="also write urls.txt/expected.tsv for this mirror")
    parser.add_argument("--workers", type=int, help="processes (default: all CPUs)")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    try:
        wnids = make_sample(args.out, classes=args.classes, per_class=args.per_class,
                            seed=args.seed, base_url=args.base_url, workers=args.workers)
    except (ValueError, FileExistsError) as exc:
        print(f"make_sample: {exc}", file=sys.stderr)
        return 2
    print(f"{len(wnids) * args.per_class} images in {args.out} "
          f"({time.perf_counter() - start:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
