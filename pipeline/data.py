"""The parallel batch loader: a manifest of files or a packed HDF5 file, into uint8 batches.

Design choices, each for a reason:
- Samples are addressed as (index, epoch) and augmented with an RNG seeded from
  (seed, epoch, index), so augmentation does not depend on worker count or scheduling and a
  resumed run sees exactly the batches an uninterrupted one would.
- Batches stay uint8 until the training loop normalizes them: 4x less to pass between
  processes than float32.
- A file that fails to decode is skipped and reported with its batch, never fatal.
"""

from __future__ import annotations

import logging
import os
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler

from pipeline.errors import InputError
from pipeline.images import ImageDecodeError, decode_image
from pipeline.manifest import read_labels, read_manifest
from pipeline.packfile import IMAGES, is_packfile, read_index
from pipeline.preprocess import InputSpec

log = logging.getLogger(__name__)


@dataclass
class Batch:
    images: torch.Tensor  # N x 3 x H x W, uint8
    labels: torch.Tensor  # N, int64
    skipped: list[str]

    def pin_memory(self) -> Batch:
        """Called by DataLoader(pin_memory=True) on CUDA machines."""
        return Batch(self.images.pin_memory(), self.labels.pin_memory(), self.skipped)


class _ImageSource(Dataset):
    """Shared sampling logic; subclasses only know how to fetch an image and its path."""

    def __init__(self, spec: InputSpec, train: bool, seed: int) -> None:
        self.spec, self.train, self.seed = spec, train, seed
        self.labels: np.ndarray = np.zeros(0, np.int64)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, key: tuple[int, int]) -> tuple[torch.Tensor, int] | str:
        index, epoch = key
        try:
            image = self.image(index)
        except (ImageDecodeError, OSError) as exc:
            log.warning("skipping %s: %s", self.path(index), exc)
            return self.path(index)
        if self.train:
            rng = random.Random((self.seed * 1_000_003 + epoch) * 10_000_019 + index)
            pixels = self.spec.train_pixels(image, rng)
        else:
            pixels = self.spec.eval_pixels(image)
        return torch.from_numpy(pixels).permute(2, 0, 1).contiguous(), int(self.labels[index])

    def image(self, index: int) -> Image.Image:
        raise NotImplementedError

    def path(self, index: int) -> str:
        raise NotImplementedError


class ManifestImages(_ImageSource):
    """Image files listed in a manifest, decoded with the project's one decoding function."""

    def __init__(self, manifest_path: Path, spec: InputSpec, train: bool, seed: int) -> None:
        super().__init__(spec, train, seed)
        manifest = read_manifest(manifest_path)
        self.root = manifest.root
        self.paths = manifest.paths  # numpy, not a list: forked workers share the pages
        self.labels = manifest.labels
        self.classes = read_labels(manifest_path.parent)

    def image(self, index: int) -> Image.Image:
        return decode_image(self.root / str(self.paths[index]), min_side=self.spec.decode_side)

    def path(self, index: int) -> str:
        return str(self.paths[index])


class PackedImages(_ImageSource):
    """An HDF5 file from `pipeline pack`; each worker opens its own handle."""

    def __init__(self, h5_path: Path, spec: InputSpec, train: bool, seed: int) -> None:
        super().__init__(spec, train, seed)
        self.h5_path = h5_path
        self.labels, self.classes = read_index(h5_path)
        self._file: h5py.File | None = None
        self._pid = -1

    def _images(self) -> h5py.Dataset:
        if self._file is None or self._pid != os.getpid():
            self._file = h5py.File(self.h5_path, "r")
            self._pid = os.getpid()
        return self._file[IMAGES]

    def image(self, index: int) -> Image.Image:
        return Image.fromarray(self._images()[index], "RGB")

    def path(self, index: int) -> str:
        return f"{self.h5_path}[{index}]"

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_file"] = None  # an open HDF5 handle must never cross a fork or a pickle
        return state


def open_images(source: Path, spec: InputSpec, *, train: bool, seed: int = 0) -> _ImageSource:
    source = Path(source)
    if not source.exists():
        raise InputError(f"{source} does not exist (a manifest from `pipeline label` or an "
                         "HDF5 file from `pipeline pack`)")
    if is_packfile(source):
        return PackedImages(source, spec, train, seed)
    return ManifestImages(source, spec, train, seed)


class EpochSampler(Sampler):
    """Yields (index, epoch): a seeded permutation per epoch, sharded across DDP ranks.

    Every rank gets the same number of samples (padded by wrapping around), as DDP needs.
    """

    def __init__(self, size: int, *, shuffle: bool, seed: int = 0, rank: int = 0,
                 world: int = 1) -> None:
        self.size, self.shuffle, self.seed, self.rank, self.world = size, shuffle, seed, rank, world
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return -(-self.size // self.world)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
            order = torch.randperm(self.size, generator=generator).tolist()
        else:
            order = list(range(self.size))
        padded = order + order[: len(self) * self.world - self.size]
        return ((index, self.epoch) for index in padded[self.rank::self.world])


def collate(samples: list[tuple[torch.Tensor, int] | str]) -> Batch:
    """Stack the good samples; the paths of the ones that failed ride along as `skipped`."""
    good = [s for s in samples if not isinstance(s, str)]
    skipped = [s for s in samples if isinstance(s, str)]
    if not good:
        return Batch(torch.zeros(0, dtype=torch.uint8), torch.zeros(0, dtype=torch.int64),
                     skipped)
    return Batch(torch.stack([image for image, _ in good]),
                 torch.tensor([label for _, label in good], dtype=torch.int64), skipped)


def make_loader(images: _ImageSource, sampler: EpochSampler, *, batch_size: int,
                workers: int) -> DataLoader:
    return DataLoader(images, batch_size=batch_size, sampler=sampler, num_workers=workers,
                      collate_fn=collate, pin_memory=torch.cuda.is_available(),
                      persistent_workers=workers > 0, prefetch_factor=4 if workers else None)
