"""`pipeline pack`: pre-decode a manifest into HDF5 for fast training input.

Decoding JPEGs is the usual bottleneck of a CPU data loader; packing does it once. Images are
resized/cropped (the same `square_image` as mean) and stored either raw (uint8, one image per
HDF5 chunk, so the loader reads any image with a single chunk read) or, with `--encoding
jpeg`, re-encoded at `--quality` (5-10x smaller; the loader then decodes them, on the CPU or
on the GPU). A source that is already what the pack would hold (a JPEG of exactly size x
size, RGB, baseline, upright, encoded no finer than `--quality`) is stored as it is, as
LitData and WebDataset store files: no generation loss, no bigger, ~5x faster.

With `--shard-size N` the pack is a shard set (see pipeline/formats/packfile.py): shards are written
in parallel, each atomically, and a pack that was killed resumes at the shards it had not
finished (finished ones are verified against what they were made from, and kept).
"""

from __future__ import annotations

import io
import logging
import mmap
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np
from PIL import Image

from pipeline.core.errors import InputError
from pipeline.core.fsutil import TEMP_SUFFIX
from pipeline.core.images import ImageDecodeError, decode_image
from pipeline.core.parallel import chunks_in_flight, imap
from pipeline.core.progress import Progress
from pipeline.core.stage_options import PACK, PackOptions
from pipeline.formats.manifest import ClassRecord, Manifest, read_labels, read_manifest
from pipeline.formats.packfile import (
    LABELS,
    PREPROCESSING,
    SOURCE,
    EncodedImages,
    create_raw_images,
    finished_shard,
    shard_number,
    shard_path,
    source_digest,
    write_index,
    write_shard_table,
)
from pipeline.ml.preprocess import load_square, square_image

log = logging.getLogger(__name__)
CHUNK = 32
EXIF_ORIENTATION = 0x0112
# The IJG luminance table (JPEG standard, Annex K) that libjpeg scales for a quality setting.
STANDARD_LUMA = (16, 11, 10, 16, 24, 40, 51, 61, 12, 12, 14, 19, 26, 58, 60, 55,
                 14, 13, 16, 24, 40, 57, 69, 56, 14, 17, 22, 29, 51, 87, 80, 62,
                 18, 22, 37, 56, 68, 109, 103, 77, 24, 35, 55, 64, 81, 104, 113, 92,
                 49, 64, 78, 87, 103, 121, 120, 101, 72, 92, 95, 98, 112, 100, 103, 99)


@dataclass
class PackResult:
    path: Path
    count: int
    size: int
    failed: list[tuple[str, str]] = field(default_factory=list)
    shards: int = 0  # of a shard set; 0 for one file
    reused_shards: int = 0  # finished by an earlier, interrupted run

    def summary(self) -> str:
        where = (f"{self.path} ({self.shards} shard(s), {self.reused_shards} kept from an "
                 "earlier run)" if self.shards else str(self.path))
        return (f"packed {self.count} image(s) at {self.size}x{self.size} into {where}; "
                f"{len(self.failed)} failed")


def pack(manifest_path: Path, out: Path, *, size: int = PACK.size, workers: int = 1,
         encoding: str = PACK.encoding, quality: int = PACK.quality,
         shard_size: int | None = None) -> PackResult:
    """Write `out` atomically (with `shard_size`, a shard set indexed by `out`); images that
    fail to decode are left out and reported."""
    options = PackOptions(size, encoding, quality)
    options.check()
    if shard_size is not None and shard_size < 1:
        raise InputError(f"--shard-size {shard_size} must be at least 1")
    manifest = read_manifest(manifest_path)
    if len(manifest) == 0:
        raise InputError(f"manifest {manifest_path} lists no images")
    classes = read_labels(Path(manifest_path).parent)
    out.parent.mkdir(parents=True, exist_ok=True)
    _remove_temp_files(out)
    if shard_size is None:
        progress = Progress("pack", total=len(manifest))
        result = _atomic(out, lambda temp: _write(manifest, classes, temp, options, workers,
                                                  Path(manifest_path), progress))
        _remove_shards(out, keep=0)  # a shard set packed here before is no longer current
    else:
        result = _write_shard_set(manifest, classes, out, options, workers, shard_size,
                                  Path(manifest_path))
    for path, error in result.failed:
        log.warning("pack: left out %s: %s", path, error)
    result.path = out
    return result


def _atomic(out: Path, write: Callable[[Path], PackResult]) -> PackResult:
    """write(temp) then rename it to `out`: a reader never sees a half-written pack."""
    temp = out.with_name(f".{out.name}.{os.getpid()}{TEMP_SUFFIX}")
    try:
        result = write(temp)
        os.replace(temp, out)
    finally:
        temp.unlink(missing_ok=True)
    return result


def _remove_temp_files(out: Path) -> None:
    """Temp files a killed pack of `out` (or of its shards) left behind."""
    for pattern in (f".{out.name}.*{TEMP_SUFFIX}", f".{out.stem}-?????{out.suffix}.*{TEMP_SUFFIX}"):
        for temp in out.parent.glob(pattern):
            temp.unlink(missing_ok=True)


def _remove_shards(out: Path, keep: int) -> None:
    """Shard files of `out` numbered `keep` and above: left from an earlier, larger set."""
    for path in out.parent.glob(f"{out.stem}-?????{out.suffix}"):
        number = shard_number(path)
        if number is not None and number >= keep:
            path.unlink()


# -- one file

def _write(manifest: Manifest, classes: list[ClassRecord], temp: Path, options: PackOptions,
           workers: int, manifest_path: Path, progress: Progress | None) -> PackResult:
    count = len(manifest)
    result = PackResult(temp, 0, options.size)
    paths = [str(manifest.root / str(p)) for p in manifest.paths]
    with h5py.File(temp, "w") as h5:
        if options.encoding == "raw":
            images = create_raw_images(h5, count, options.size)
            kept = _fill_raw(images, paths, options, workers, errors := {}, progress)
            images.resize(len(kept), axis=0)
        else:
            encoded = EncodedImages.create(h5)
            kept = _fill_encoded(encoded, paths, options, workers, errors := {}, progress)
            encoded.close()
        result.failed = [(str(manifest.paths[row]), error) for row, error in errors.items()]
        write_index(h5, labels=manifest.labels[kept], paths=[str(p) for p in manifest.paths[kept]],
                    size=options.size, root=manifest.root, classes=classes,
                    manifest=manifest_path, encoding=options.encoding,
                    quality=options.stored_quality)
    if progress is not None:
        progress.close()
    result.count = len(kept)
    return result


def _fill_raw(images: h5py.Dataset, paths: list[str], options: PackOptions, workers: int,
              failed: dict[int, str], progress: Progress | None) -> list[int]:
    """Workers decode chunks straight into a shared ring of buffers and send back only counts
    and errors; this process copies each buffer into the HDF5 file. Shipping the decoded
    pixels through pipes instead cost more CPU than decoding them. Returns the kept rows;
    the others' errors go to `failed`."""
    size, count = options.size, len(paths)
    slots = chunks_in_flight(workers)
    ring = mmap.mmap(-1, slots * CHUNK * size * size * 3)
    buffers = np.frombuffer(ring, np.uint8).reshape(slots, CHUNK, size, size, 3)
    jobs = [(index % slots, paths[start:start + CHUNK])
            for index, start in enumerate(range(0, count, CHUNK))]
    kept: list[int] = []
    decoded = imap(_decode_into_slot, jobs, workers, chunksize=1,
                   initializer=_attach_ring, initargs=(buffers,))
    for start, (slot, _), (good, errors) in zip(range(0, count, CHUNK), jobs, decoded,
                                                strict=True):
        for row in range(good):  # one image is one unfiltered chunk: raw bytes, no cache
            images.id.write_direct_chunk((len(kept) + row, 0, 0, 0), buffers[slot, row])
        kept.extend(_account(start, min(CHUNK, count - start), errors, failed))
        if progress is not None:
            progress.update(min(CHUNK, count - start))
    return kept


def _fill_encoded(images: EncodedImages, paths: list[str], options: PackOptions, workers: int,
                  failed: dict[int, str], progress: Progress | None) -> list[int]:
    """Workers decode, square and JPEG-encode; the bytes are small enough to send back."""
    jobs = [(paths[start:start + CHUNK], options.size, options.quality)
            for start in range(0, len(paths), CHUNK)]
    kept: list[int] = []
    encoded = imap(_encode_chunk, jobs, workers, chunksize=1)
    for start, (good, errors) in zip(range(0, len(paths), CHUNK), encoded, strict=True):
        if good:
            images.append(good)
        chunk = len(jobs[start // CHUNK][0])
        kept.extend(_account(start, chunk, errors, failed))
        if progress is not None:
            progress.update(chunk)
    return kept


def _account(start: int, length: int, errors: dict[int, str],
             failed: dict[int, str]) -> list[int]:
    """The manifest rows of a chunk that were kept; the others' errors go to `failed`."""
    kept = []
    for offset in range(length):
        if offset in errors:
            failed[start + offset] = errors[offset]
        else:
            kept.append(start + offset)
    return kept


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


def _encode_chunk(job: tuple[list[str], int, int]) -> tuple[list[bytes], dict[int, str]]:
    """The JPEG bytes of a chunk's good images, in order, and the errors by position."""
    paths, size, quality = job
    good, errors = [], {}
    for offset, path in enumerate(paths):
        try:
            good.append(_jpeg_bytes(path, size, quality))
        except (ImageDecodeError, OSError) as exc:
            errors[offset] = str(exc)
    return good, errors


def _jpeg_bytes(path: str, size: int, quality: int) -> bytes:
    """What the pack stores for one image: the file itself when it already fits, else the
    squared image encoded at `quality`."""
    data = Path(path).read_bytes()
    if _fits_as_is(data, size, quality):
        return _without_metadata(data)
    buffer = io.BytesIO()
    square_image(io.BytesIO(data), size).save(buffer, "JPEG", quality=quality)
    return buffer.getvalue()


def _fits_as_is(data: bytes, size: int, quality: int) -> bool:
    """A JPEG of size x size, RGB (YCbCr), baseline, upright and quantised no finer than
    `quality` would be: re-encoding it could only lose detail. It must also decode to the
    end (at 1/8 scale: fast, and a truncated file still fails)."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            if (image.format != "JPEG" or image.mode != "RGB" or image.size != (size, size)
                    or "progression" in image.info or "progressive" in image.info
                    or image.getexif().get(EXIF_ORIENTATION, 1) != 1
                    or not image.quantization):
                return False
            luma = sum(image.quantization[0])
        decode_image(data, min_side=1)
    except (ImageDecodeError, OSError, SyntaxError, ValueError):
        return False
    return luma >= sum(_luma_table(quality))


# Segments a decoder needs besides the frame, tables and scan: JFIF (APP0) and Adobe's (APP14,
# which says whether the channels are YCbCr or RGB). EXIF (orientation checked upright),
# ICC profiles (no stage applies them), XMP, comments and embedded thumbnails are left out.
_KEPT_APPS = frozenset({0xE0, 0xEE})
_STANDALONE = frozenset({0x01, *range(0xD0, 0xD8)})  # markers without a length


def _without_metadata(data: bytes) -> bytes:
    """A baseline JPEG without its metadata segments and anything after its end: the same
    pixels, often kilobytes smaller (a camera's EXIF thumbnail, an editor's XMP)."""
    kept, at = [data[:2]], 2
    while at + 4 <= len(data) and data[at] == 0xFF:
        marker = data[at + 1]
        if marker in _STANDALONE or marker == 0xFF:
            kept.append(data[at:at + 2])
            at += 2
            continue
        end = at + 2 + int.from_bytes(data[at + 2:at + 4], "big")
        if marker == 0xDA:  # start of scan: entropy-coded data up to the end marker
            stop = data.find(b"\xff\xd9", end)
            kept.append(data[at:stop + 2] if stop >= 0 else data[at:])
            return b"".join(kept)
        if not (0xE0 <= marker <= 0xEF or marker == 0xFE) or marker in _KEPT_APPS:
            kept.append(data[at:end])
        at = end
    return data  # not laid out as expected: stored untouched


def _luma_table(quality: int) -> list[int]:
    """The luminance quantisation table libjpeg (and so Pillow) uses at `quality`."""
    scale = 5000 // quality if quality < 50 else 200 - 2 * quality
    return [min(255, max(1, (value * scale + 50) // 100)) for value in STANDARD_LUMA]


# -- a shard set

def _write_shard_set(manifest: Manifest, classes: list[ClassRecord], out: Path,
                     options: PackOptions, workers: int, shard_size: int,
                     manifest_path: Path) -> PackResult:
    """Shards in parallel (one process each, `workers` at a time), then the index."""
    count = len(manifest)
    jobs = [_ShardJob(number, start, min(start + shard_size, count), shard_path(out, number),
                      _shard_source(manifest, start, min(start + shard_size, count), options))
            for number, start in enumerate(range(0, count, shard_size))]
    counts = {job.number: finished_shard(job.path, job.source) for job in jobs}
    todo = [job for job in jobs if counts[job.number] is None]
    result = PackResult(out, 0, options.size, shards=len(jobs),
                        reused_shards=len(jobs) - len(todo))
    if result.reused_shards:
        log.info("pack: resuming %s: %d of %d shard(s) already finished", out,
                 result.reused_shards, len(jobs))
    progress = Progress("pack", total=sum(job.end - job.start for job in todo))
    _context.update(manifest=manifest, classes=classes, options=options,
                    manifest_path=manifest_path)  # inherited by the forked workers
    for job, (written, failed) in zip(todo, imap(_write_shard, todo, workers, chunksize=1),
                                      strict=True):
        counts[job.number] = written
        result.failed.extend(failed)
        progress.update(job.end - job.start)
    progress.close()
    shards = [(job.path, counts[job.number]) for job in jobs]
    labels = _labels_of(shards)
    result.count = len(labels)

    def write_index_file(temp: Path) -> PackResult:
        with h5py.File(temp, "w") as h5:
            write_index(h5, labels=labels, paths=None, size=options.size, root=manifest.root,
                        classes=classes, manifest=manifest_path, encoding=options.encoding,
                        quality=options.stored_quality)
            write_shard_table(h5, shards)
        return result

    _atomic(out, write_index_file)
    _remove_shards(out, keep=len(jobs))
    return result


@dataclass(frozen=True)
class _ShardJob:
    number: int
    start: int  # manifest rows start..end
    end: int
    path: Path
    source: str


_context: dict = {}  # what every shard job shares; set before the workers are forked


def _shard_source(manifest: Manifest, start: int, end: int, options: PackOptions) -> str:
    return source_digest(PREPROCESSING, options.size, options.encoding, options.stored_quality,
                         str(manifest.root), start,
                         "\n".join(manifest.paths[start:end].tolist()),
                         manifest.labels[start:end])


def _write_shard(job: _ShardJob) -> tuple[int, list[tuple[str, str]]]:
    """One shard: an ordinary pack of its rows (one process), renamed into place when done."""
    manifest: Manifest = _context["manifest"]
    rows = Manifest(manifest.root, manifest.paths[job.start:job.end],
                    manifest.labels[job.start:job.end])

    def write(temp: Path) -> PackResult:
        written = _write(rows, _context["classes"], temp, _context["options"], 1,
                         _context["manifest_path"], None)
        with h5py.File(temp, "r+") as h5:
            h5.attrs.update({SOURCE: job.source, "shard": job.number, "first_row": job.start})
        return written

    result = _atomic(job.path, write)
    return result.count, result.failed


def _labels_of(shards: list[tuple[Path, int]]) -> np.ndarray:
    parts = []
    for path, _ in shards:
        with h5py.File(path, "r") as h5:
            parts.append(h5[LABELS][:])
    return np.concatenate(parts).astype(np.int64)
