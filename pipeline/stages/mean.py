"""`pipeline mean`: the per-pixel mean image of a manifest, streamed and in parallel.

Images go through `preprocess.square_image`, the same resize/crop as training; sums are kept as
exact integers (int64) per worker chunk and merged, so memory is one image-sized accumulator
per worker whatever the dataset size.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from pipeline.core.errors import InputError
from pipeline.core.fsutil import atomic_open, atomic_write_bytes, atomic_write_text
from pipeline.core.images import ImageDecodeError
from pipeline.core.parallel import imap
from pipeline.core.progress import Progress
from pipeline.core.stage_options import MEAN
from pipeline.formats.manifest import read_manifest
from pipeline.ml.preprocess import square_image

log = logging.getLogger(__name__)
CHUNK = 64  # at most 257: a chunk's pixel sums are kept in 16 bits (257 * 255 < 2**16)


@dataclass
class _Sums:
    """Running sums over a chunk of images; adding two gives the sums over both."""

    pixels: np.ndarray  # int64 H x W x 3: integer sums are exact and cheaper than floats
    histogram: np.ndarray  # int64 3 x 256 value counts per channel: the exact std, cheaply
    count: int
    used: list[str]
    failed: list[tuple[str, str]]

    def add(self, other: _Sums) -> None:
        self.pixels += other.pixels
        self.histogram += other.histogram
        self.count += other.count
        self.used += other.used
        self.failed += other.failed


@dataclass
class MeanResult:
    mean: np.ndarray
    channel_mean: list[float]
    channel_std: list[float]
    count: int
    failed: list[tuple[str, str]]
    outputs: list[Path]

    def summary(self) -> str:
        size = self.mean.shape[0]
        rgb = ", ".join(f"{m:.2f}" for m in self.channel_mean)
        std = ", ".join(f"{s:.2f}" for s in self.channel_std)
        return (f"mean of {self.count} image(s) at {size}x{size}: RGB mean [{rgb}], "
                f"std [{std}]; {len(self.failed)} failed\n"
                "wrote " + ", ".join(str(p) for p in self.outputs))


def compute_mean(manifest_path: Path, out: Path, *, size: int = MEAN.size,
                 workers: int = 1) -> MeanResult:
    """Write OUT (.npy), OUT.png, OUT.json and OUT.images.txt (the images actually used)."""
    manifest = read_manifest(manifest_path)
    if len(manifest) == 0:
        raise InputError(f"manifest {manifest_path} lists no images")
    chunks = [(manifest.root, [str(p) for p in manifest.paths[i:i + CHUNK]], size)
              for i in range(0, len(manifest), CHUNK)]
    total = _empty_sums(size)
    progress = Progress("mean", total=len(manifest))
    for sums in imap(_sum_chunk, chunks, workers, chunksize=1):
        total.add(sums)
        progress.update(sums.count + len(sums.failed))
    progress.close()
    if total.count == 0:
        raise InputError(f"none of the {len(manifest)} images in {manifest_path} could be read")
    return _save(total, out, size)


def _sum_chunk(job: tuple[Path, list[str], int]) -> _Sums:
    root, paths, size = job
    sums = _empty_sums(size)
    pixel_sums = np.zeros((size, size, 3), np.uint16)  # 4x less memory traffic than int64
    for relative in paths:
        try:
            image = square_image(root / relative, size)
        except (ImageDecodeError, OSError) as exc:
            sums.failed.append((relative, str(exc)))
            continue
        np.add(pixel_sums, np.asarray(image), out=pixel_sums)
        sums.histogram += np.asarray(image.histogram(), np.int64).reshape(3, 256)
        sums.count += 1
        sums.used.append(relative)
    sums.pixels += pixel_sums
    return sums


def _empty_sums(size: int) -> _Sums:
    return _Sums(np.zeros((size, size, 3), np.int64), np.zeros((3, 256), np.int64), 0, [],
                 [])


def _save(total: _Sums, out: Path, size: int) -> MeanResult:
    mean = total.pixels.astype(np.float64) / total.count
    channel_mean = mean.mean(axis=(0, 1))
    values = np.arange(256, dtype=np.float64)
    n_values = total.count * size * size
    squares = total.histogram @ values**2  # exact: integer counts times integer squares
    channel_std = np.sqrt(np.maximum(squares / n_values - channel_mean**2, 0.0))
    npy, png, meta, used = (out.with_suffix(s) for s in (".npy", ".png", ".json", ".images.txt"))
    with atomic_open(npy) as handle:
        np.save(handle, mean.astype(np.float32))
    with atomic_open(png) as handle:
        Image.fromarray(np.clip(mean.round(), 0, 255).astype(np.uint8), "RGB").save(handle, "PNG")
    atomic_write_text(meta, json.dumps({
        "size": [size, size], "count": total.count, "channels": "RGB",
        "mean": channel_mean.round(4).tolist(), "std": channel_std.round(4).tolist(),
        "failed": [{"path": p, "error": e} for p, e in total.failed]}, indent=2) + "\n")
    atomic_write_bytes(used, "".join(f"{p}\n" for p in total.used).encode("utf-8"))
    for path, error in total.failed:
        log.warning("mean: skipped %s: %s", path, error)
    return MeanResult(mean.astype(np.float32), channel_mean.tolist(), channel_std.tolist(),
                      total.count, total.failed, [npy, png, meta, used])
