"""The HDF5 layout of `pipeline pack`: the one place that knows its dataset and attribute names.

Written by the pack stage, read by the loader (pipeline/data.py) and the report; documented in
docs/FORMATS.md. Each reader opens the file itself (a DataLoader worker needs its own handle).
"""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np

from pipeline.errors import InputError
from pipeline.manifest import ClassRecord

SUFFIXES = (".h5", ".hdf5")
IMAGES = "images"  # uint8 N x S x S x 3, one image per chunk
LABELS = "labels"  # int64 N
PATHS = "paths"  # UTF-8 N, relative to the `root` attribute
PREPROCESSING = "decode_image -> shorter side to size (bilinear) -> center crop size x size"


def is_packfile(path: Path) -> bool:
    return Path(path).suffix.lower() in SUFFIXES


def create_images(h5: h5py.File, count: int, size: int) -> h5py.Dataset:
    """The images dataset, resizable so images that fail to decode can be left out."""
    return h5.create_dataset(IMAGES, (count, size, size, 3), dtype=np.uint8,
                             chunks=(1, size, size, 3), maxshape=(None, size, size, 3))


def write_index(h5: h5py.File, *, labels: np.ndarray, paths: list[str], size: int, root: Path,
                classes: list[ClassRecord], manifest: Path) -> None:
    """Everything but the pixels: labels, paths and the attributes."""
    h5.create_dataset(LABELS, data=labels.astype(np.int64))
    h5.create_dataset(PATHS, data=paths, dtype=h5py.string_dtype("utf-8"))
    h5.attrs.update({
        "size": size, "channels": "RGB", "layout": "NHWC uint8",
        "preprocessing": PREPROCESSING, "root": str(root),
        "label_wnids": [c.wnid for c in classes], "label_names": [c.name for c in classes],
        "manifest": str(Path(manifest).resolve()),
    })


def read_index(path: Path) -> tuple[np.ndarray, list[ClassRecord]]:
    """The labels and the classes of a pack (the pixels are read by index, lazily)."""
    try:
        with h5py.File(path, "r") as h5:
            labels = h5[LABELS][:]
            classes = [ClassRecord(i, str(w), str(n)) for i, (w, n) in enumerate(zip(
                h5.attrs["label_wnids"], h5.attrs["label_names"], strict=True))]
    except (OSError, KeyError) as exc:
        raise InputError(f"{path} is not an HDF5 file from `pipeline pack`: {exc}") from None
    return labels, classes


def manifest_of(path: Path) -> Path:
    """The manifest a pack was made from (as recorded when it was packed)."""
    with h5py.File(path, "r") as h5:
        return Path(str(h5.attrs.get("manifest", path)))
