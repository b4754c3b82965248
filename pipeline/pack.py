"""`pipeline pack`: pre-decode a manifest into one HDF5 file for fast training input.

Decoding JPEGs is the usual bottleneck of a CPU data loader; packing does it once. Images are
stored resized/cropped (the same `square_image` as mean) as uint8, one image per HDF5 chunk, so
the loader reads any image with a single chunk read.
"""

from __future__ import annotations

import logging
import mmap
import os
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np

from pipeline.errors import InputError
from pipeline.fsutil import TEMP_SUFFIX
from pipeline.images import ImageDecodeError
from pipeline.manifest import ClassRecord, Manifest, read_labels, read_manifest
from pipeline.packfile import create_images, write_index
from pipeline.parallel import chunks_in_flight, imap
from pipeline.preprocess import load_square
from pipeline.progress import Progress
from pipeline.stage_options import SIZE

log = logging.getLogger(__name__)
CHUNK = 32


@dataclass
class PackResult:
    path: Path
    count: int
    size: int
    failed: list[tuple[str, str]] = field(default_factory=list)

    def summary(self) -> str:
        return (f"packed {self.count} image(s) at {self.size}x{self.size} into {self.path}; "
                f"{len(self.failed)} failed")


def pack(manifest_path: Path, out: Path, *, size: int = SIZE,
         workers: int = 1) -> PackResult:
    """Write `out` atomically; images that fail to decode are left out and reported."""
    manifest = read_manifest(manifest_path)
    if len(manifest) == 0:
        raise InputError(f"manifest {manifest_path} lists no images")
    classes = read_labels(Path(manifest_path).parent)
    out.parent.mkdir(parents=True, exist_ok=True)
    temp = out.with_name(f".{out.name}.{os.getpid()}{TEMP_SUFFIX}")
    try:
        result = _write(manifest, classes, temp, size, workers, Path(manifest_path))
        os.replace(temp, out)
    finally:
        temp.unlink(missing_ok=True)
    for path, error in result.failed:
        log.warning("pack: left out %s: %s", path, error)
    result.path = out
    return result


def _write(manifest: Manifest, classes: list[ClassRecord], temp: Path, size: int,
           workers: int, manifest_path: Path) -> PackResult:
    """Workers decode chunks straight into a shared ring of buffers and send back only counts
    and errors; this process copies each buffer into the HDF5 file. Shipping the decoded
    pixels through pipes instead cost more CPU than decoding them."""
    count = len(manifest)
    result = PackResult(temp, 0, size)
    slots = chunks_in_flight(workers)
    ring = mmap.mmap(-1, slots * CHUNK * size * size * 3)
    buffers = np.frombuffer(ring, np.uint8).reshape(slots, CHUNK, size, size, 3)
    paths = [str(manifest.root / str(p)) for p in manifest.paths]
    jobs = [(index % slots, paths[start:start + CHUNK])
            for index, start in enumerate(range(0, count, CHUNK))]
    kept: list[int] = []
    progress = Progress("pack", total=count)
    with h5py.File(temp, "w") as h5:
        images = create_images(h5, count, size)
        decoded = imap(_decode_into_slot, jobs, workers, chunksize=1,
                       initializer=_attach_ring, initargs=(buffers,))
        for start, (slot, _), (good, errors) in zip(range(0, count, CHUNK), jobs, decoded,
                                                    strict=True):
            for row in range(good):  # one image is one unfiltered chunk: raw bytes, no cache
                images.id.write_direct_chunk((len(kept) + row, 0, 0, 0), buffers[slot, row])
            for offset in range(min(CHUNK, count - start)):
                if offset in errors:
                    result.failed.append((str(manifest.paths[start + offset]), errors[offset]))
                else:
                    kept.append(start + offset)
            progress.update(min(CHUNK, count - start))
        images.resize(len(kept), axis=0)
        write_index(h5, labels=manifest.labels[kept], paths=[str(p) for p in manifest.paths[kept]],
                    size=size, root=manifest.root, classes=classes, manifest=manifest_path)
    progress.close()
    result.count = len(kept)
    return result


_ring = np.zeros((0, CHUNK, 0, 0, 3), np.uint8)  # the shared buffers, as a worker sees them


def _attach_ring(buffers: np.ndarray) -> None:
    global _ring
    _ring = buffers


def _decode_into_slot(job: tuple[int, list[str]]) -> tuple[int, dict[int, str]]:
    """Decode a chunk's images into its slot, good ones packed to the front, in order;
    return how many were good and the errors by position in the chunk."""
    slot, paths = job
    size = _ring.shape[2]
    good, errors = 0, {}
    for offset, path in enumerate(paths):
        try:
            _ring[slot, good] = load_square(path, size)
        except (ImageDecodeError, OSError) as exc:
            errors[offset] = str(exc)
        else:
            good += 1
    return good, errors
