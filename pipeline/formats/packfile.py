"""The HDF5 layout of `pipeline pack`: the one place that knows its dataset and attribute names.

Written by the pack stage, read by the loader (pipeline/ml/data.py), the feature cache and the
report; documented in docs/FORMATS.md. Each reader opens the file itself (a DataLoader worker
needs its own handle).

A pack is one file (`train.h5`: images, labels, paths, attributes) or a shard set: an index
file (`train.h5`: labels and attributes, the `shards` attribute naming its shard files) and
shard files beside it (`train-00000.h5`, ...), each of which is itself an ordinary pack of a
contiguous run of the manifest's rows. Images are raw uint8 pixels or, with `--encoding jpeg`,
the JPEG files back to back in one uint8 dataset with their offsets (`EncodedImages`): any
h5py user slices a file out; HDF5's variable-length type cost ~640 bytes an image and ~110 us
a read, this ~35 bytes and one slice.
"""

from __future__ import annotations

import hashlib
import os
from array import array
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from pipeline.core.errors import InputError
from pipeline.core.stage_options import ENCODINGS
from pipeline.formats.manifest import ClassRecord

SUFFIXES = (".h5", ".hdf5")
IMAGES = "images"  # raw: uint8 N x S x S x 3, one image per chunk; jpeg: uint8, N files
OFFSETS = "offsets"  # jpeg: int64 N + 1, image i is images[offsets[i]:offsets[i + 1]]
LABELS = "labels"  # int64 N
PATHS = "paths"  # UTF-8 N (fixed width, gzip), relative to the `root` attribute
PREPROCESSING = "decode_image -> shorter side to size (bilinear) -> center crop size x size"
LAYOUTS = {"raw": "NHWC uint8", "jpeg": "N JPEG files back to back (uint8), offsets"}
ENCODED_CHUNK = 1 << 16  # bytes per chunk of a jpeg `images` dataset: a read touches 1-2
SHARDS = "shards"  # index attribute: shard file names, relative to the index
SHARD_COUNTS = "shard_counts"  # index attribute: images per shard
SOURCE = "source"  # shard attribute: digest of what it was packed from (resume check)


@dataclass(frozen=True)
class PackInfo:
    """What a reader needs before touching pixels: labels, classes, and where images live."""

    path: Path
    labels: np.ndarray
    classes: list[ClassRecord]
    size: int
    encoding: str
    shards: list[tuple[Path, int]]  # (file holding images, how many); one entry for one file

    @property
    def files(self) -> list[Path]:
        """Every file the dataset consists of (a shard set: the index and its shards)."""
        return list(dict.fromkeys([self.path, *(path for path, _ in self.shards)]))


def is_packfile(path: Path) -> bool:
    return Path(path).suffix.lower() in SUFFIXES


def shard_path(index: Path, number: int) -> Path:
    """`train.h5` -> `train-00003.h5`: shard files sit beside their index."""
    index = Path(index)
    return index.with_name(f"{index.stem}-{number:05d}{index.suffix}")


def create_raw_images(h5: h5py.File, count: int, size: int) -> h5py.Dataset:
    """The raw images dataset, resizable so images that fail to decode can be left out."""
    return h5.create_dataset(IMAGES, (count, size, size, 3), dtype=np.uint8,
                             chunks=(1, size, size, 3), maxshape=(None, size, size, 3))


class EncodedImages:
    """A JPEG pack's images: written by appending files, read by row (a uint8 array of the
    file's bytes)."""

    def __init__(self, images: h5py.Dataset, offsets: np.ndarray | array) -> None:
        self.images, self.offsets = images, offsets

    @classmethod
    def create(cls, h5: h5py.File) -> EncodedImages:
        """Offsets grow in an `array` (appending copies nothing), written at close."""
        images = h5.create_dataset(IMAGES, (0,), dtype=np.uint8, chunks=(ENCODED_CHUNK,),
                                   maxshape=(None,))
        return cls(images, array("q", [0]))

    @classmethod
    def open(cls, h5: h5py.File) -> EncodedImages:
        return cls(h5[IMAGES], h5[OFFSETS][:])

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, row: int) -> np.ndarray:
        return self.images[self.offsets[row]:self.offsets[row + 1]]

    def append(self, files: list[bytes]) -> None:
        data = b"".join(files)
        end = int(self.offsets[-1])
        self.images.resize((end + len(data),))
        self.images[end:] = np.frombuffer(data, np.uint8)
        for file in files:
            end += len(file)
            self.offsets.append(end)

    def close(self) -> None:
        """Write the offsets: until then the pack is incomplete (and stays a temp file)."""
        self.images.file.create_dataset(OFFSETS, data=np.asarray(self.offsets, np.int64),
                                        **_compressed(len(self.offsets)))


def open_images_of(h5: h5py.File) -> h5py.Dataset | EncodedImages:
    """A pack file's images, by row: `images[row]` is the pixels (raw) or the JPEG's bytes."""
    return h5[IMAGES] if h5.attrs.get("encoding", "raw") == "raw" else EncodedImages.open(h5)


class PackReader:
    """A pack or shard set's images by global row: the pixels (raw) or the JPEG's bytes.

    Each process opens its own handles, lazily, so a DDP rank opens only the shards its rows
    are in and reads only its rows; an open HDF5 handle never crosses a fork or a pickle.
    """

    def __init__(self, info: PackInfo) -> None:
        self.files = [path for path, _ in info.shards]
        self.starts = np.cumsum([0] + [count for _, count in info.shards])
        self._handles: dict[int, h5py.File] = {}
        # h5py's lookup of a dataset by name costs ~0.1 ms a read: each is looked up once
        self._datasets: dict[int, h5py.Dataset | EncodedImages] = {}
        self._pid = -1

    def locate(self, index: int) -> tuple[h5py.Dataset | EncodedImages, int]:
        """The images dataset holding row `index`, and the row within it."""
        shard = int(np.searchsorted(self.starts, index, side="right")) - 1
        if self._pid != os.getpid():
            self._handles, self._datasets, self._pid = {}, {}, os.getpid()
        if shard not in self._datasets:
            self._handles[shard] = h5py.File(self.files[shard], "r")
            self._datasets[shard] = open_images_of(self._handles[shard])
        return self._datasets[shard], index - int(self.starts[shard])

    def row(self, index: int) -> np.ndarray:
        dataset, row = self.locate(index)
        return dataset[row]

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_handles": {}, "_datasets": {}}


def write_index(h5: h5py.File, *, labels: np.ndarray, paths: list[str] | None, size: int,
                root: Path, classes: list[ClassRecord], manifest: Path, encoding: str = "raw",
                quality: int | None = None) -> None:
    """Everything but the pixels: labels, paths (a shard set's index has none: its shards
    hold them) and the attributes."""
    h5.create_dataset(LABELS, data=labels.astype(np.int64), **_compressed(len(labels)))
    if paths is not None:  # fixed-width, compressed: variable-length strings cost ~50 B each
        encoded = [path.encode() for path in paths]
        width = max((len(path) for path in encoded), default=1)
        utf8 = h5py.string_dtype("utf-8", width)
        h5.create_dataset(PATHS, data=np.array(encoded, dtype=utf8), **_compressed(len(paths)))
    h5.attrs.update({
        "size": size, "channels": "RGB", "layout": LAYOUTS[encoding], "encoding": encoding,
        "preprocessing": PREPROCESSING, "root": str(root),
        "label_wnids": [c.wnid for c in classes], "label_names": [c.name for c in classes],
        "manifest": str(Path(manifest).resolve()),
    })
    if quality is not None:
        h5.attrs["quality"] = quality


def _compressed(length: int) -> dict[str, str | bool]:
    """gzip after byte shuffling (both built into every HDF5; offsets shrink ~4x) for a
    non-empty dataset; an empty one cannot be chunked."""
    return {"compression": "gzip", "shuffle": True} if length else {}


def write_shard_table(h5: h5py.File, shards: list[tuple[Path, int]]) -> None:
    """Make an index of `h5`: its shard files (names relative to it) and their counts."""
    h5.attrs[SHARDS] = [path.name for path, _ in shards]
    h5.attrs[SHARD_COUNTS] = np.array([count for _, count in shards], dtype=np.int64)


def source_digest(*parts: object) -> str:
    """A digest of what a shard is made from: equal digests, equal shard."""
    digest = hashlib.sha256()
    for part in parts:
        data = part.tobytes() if isinstance(part, np.ndarray) else repr(part).encode()
        digest.update(data + b"\0")
    return digest.hexdigest()


def finished_shard(path: Path, source: str) -> int | None:
    """The image count of a complete shard made from `source`, or None (absent, from other
    data or settings, or unreadable): such a shard is written again."""
    try:
        with h5py.File(path, "r") as h5:
            if (h5.attrs.get(SOURCE) != source
                    or len(open_images_of(h5)) != len(h5[LABELS])):
                return None
            return len(h5[LABELS])
    except (OSError, KeyError):
        return None


def shard_number(path: Path) -> int | None:
    """The number of a shard file written by `pipeline pack`, or None for any other file (a
    user's `train-20240.h5` is never taken for a stale shard)."""
    try:
        with h5py.File(path, "r") as h5:
            number = h5.attrs.get("shard")
            return int(number) if number is not None and SOURCE in h5.attrs else None
    except OSError:
        return None


def read_pack(path: Path) -> PackInfo:
    """The labels, classes, size, encoding and image files of a pack or shard set."""
    path = Path(path)
    try:
        with h5py.File(path, "r") as h5:
            labels = h5[LABELS][:]
            classes = [ClassRecord(i, str(w), str(n)) for i, (w, n) in enumerate(zip(
                h5.attrs["label_wnids"], h5.attrs["label_names"], strict=True))]
            size = int(h5.attrs["size"])
            encoding = str(h5.attrs.get("encoding", "raw"))  # packs from before jpeg: raw
            layout = str(h5.attrs.get("layout", LAYOUTS["raw"]))
            if SHARDS in h5.attrs:
                shards = [(path.with_name(str(name)), int(count)) for name, count in zip(
                    h5.attrs[SHARDS], h5.attrs[SHARD_COUNTS], strict=True)]
            else:
                shards = [(path, len(labels))]
    except (OSError, KeyError) as exc:
        raise InputError(f"{path} is not an HDF5 file from `pipeline pack`: {exc}") from None
    missing = [str(p) for p, _ in shards if not p.exists()]
    if missing:
        raise InputError(f"{path} is a shard set but {missing[0]} is missing "
                         f"({len(missing)} shard(s) in all); pack it again with --shard-size")
    if sum(count for _, count in shards) != len(labels):
        raise InputError(f"{path}: its shards hold {sum(c for _, c in shards)} images but it "
                         f"lists {len(labels)} labels; pack it again")
    if encoding not in ENCODINGS:
        raise InputError(f"{path} has unknown encoding {encoding!r} (a newer pipeline?)")
    if layout != LAYOUTS[encoding]:
        raise InputError(f"{path} stores its images as {layout!r}, an earlier layout of "
                         f"`pipeline pack`; pack it again")
    return PackInfo(path, labels, classes, size, encoding, shards)


def manifest_of(path: Path) -> Path:
    """The manifest a pack was made from (as recorded when it was packed)."""
    with h5py.File(path, "r") as h5:
        return Path(str(h5.attrs.get("manifest", path)))
