"""`pipeline pack`: pre-decode a manifest into one HDF5 file for fast training input.

Decoding JPEGs is the usual bottleneck of a CPU data loader; packing does it once. Images are
stored resized/cropped (the same `load_square` as mean) as uint8, one image per HDF5 chunk, so
the loader reads any image with a single chunk read.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np

from pipeline.errors import InputError
from pipeline.fsutil import TEMP_SUFFIX
from pipeline.images import ImageDecodeError
from pipeline.manifest import LabelClass, Manifest, read_labels, read_manifest
from pipeline.parallel import imap
from pipeline.preprocess import DEFAULT_SIZE, load_square
from pipeline.progress import Progress

log = logging.getLogger(__name__)
PREPROCESSING = "decode_image -> shorter side to size (bilinear) -> center crop size x size"


@dataclass
class PackResult:
    path: Path
    count: int
    failed: list[tuple[str, str]] = field(default_factory=list)


def pack(manifest_path: Path, out: Path, *, size: int = DEFAULT_SIZE,
         workers: int = 1) -> PackResult:
    """Write `out` atomically; images that fail to decode are left out and reported."""
    manifest = read_manifest(manifest_path)
    if len(manifest) == 0:
        raise InputError(f"manifest {manifest_path} lists no images")
    classes = read_labels(Path(manifest_path).parent)
    out.parent.mkdir(parents=True, exist_ok=True)
    temp = out.with_name(f".{out.name}.{os.getpid()}{TEMP_SUFFIX}")
    try:
        result = _write(manifest, classes, temp, size, workers)
        with h5py.File(temp, "a") as h5:
            h5.attrs["manifest"] = str(Path(manifest_path).resolve())
        os.replace(temp, out)
    finally:
        temp.unlink(missing_ok=True)
    for path, error in result.failed:
        log.warning("pack: left out %s: %s", path, error)
    result.path = out
    return result


def _write(manifest: Manifest, classes: list[LabelClass], temp: Path, size: int,
           workers: int) -> PackResult:
    count = len(manifest)
    result = PackResult(temp, 0)
    jobs = ((manifest.root / str(p), size) for p in manifest.paths)
    progress = Progress("pack", total=count)
    with h5py.File(temp, "w") as h5:
        images = h5.create_dataset("images", (count, size, size, 3), dtype=np.uint8,
                                   chunks=(1, size, size, 3), maxshape=(None, size, size, 3))
        labels = h5.create_dataset("labels", (count,), dtype=np.int64, maxshape=(None,))
        paths = h5.create_dataset("paths", (count,), dtype=h5py.string_dtype("utf-8"),
                                  maxshape=(None,))
        for index, (pixels, error) in enumerate(imap(_load, jobs, workers, chunksize=8)):
            relative = str(manifest.paths[index])
            if error is not None:
                result.failed.append((relative, error))
                progress.update(count="failed")
                continue
            row = result.count
            images[row] = pixels
            labels[row] = manifest.labels[index]
            paths[row] = relative
            result.count += 1
            progress.update(count="ok")
        for dataset in (images, labels, paths):
            dataset.resize(result.count, axis=0)
        h5.attrs.update({
            "size": size, "channels": "RGB", "layout": "NHWC uint8",
            "preprocessing": PREPROCESSING, "root": str(manifest.root),
            "label_wnids": [c.wnid for c in classes], "label_names": [c.name for c in classes],
        })
    progress.close()
    return result


def _load(job: tuple[Path, int]) -> tuple[np.ndarray | None, str | None]:
    path, size = job
    try:
        return load_square(path, size), None
    except (ImageDecodeError, OSError) as exc:
        return None, str(exc)
