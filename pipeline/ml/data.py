"""The parallel batch loader: a manifest of files, a pack or a shard set (raw or JPEG), into uint8
batches; JPEG packs can instead be decoded whole batches at a time on the GPU.

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
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.transforms.v2.functional import resize

from pipeline.core.errors import InputError
from pipeline.core.images import ImageDecodeError, decode_image
from pipeline.formats.manifest import read_labels, read_manifest
from pipeline.formats.packfile import PackReader, is_packfile, read_pack
from pipeline.ml.preprocess import InputSpec, Window

log = logging.getLogger(__name__)


@dataclass
class Batch:
    images: torch.Tensor  # N x 3 x H x W, uint8 (empty while `encoded` awaits decoding)
    labels: torch.Tensor  # N, int64
    skipped: list[str]
    # Deferred decoding: the N JPEG files back to back (one tensor, not N: each tensor a
    # worker sends is a shared-memory segment and a file descriptor), their byte counts, and
    # N x 5 `Window`s.
    encoded: torch.Tensor | None = None
    encoded_sizes: torch.Tensor | None = None
    windows: torch.Tensor | None = None

    def pin_memory(self) -> Batch:
        """Called by DataLoader(pin_memory=True) on CUDA machines."""
        encoded = self.encoded.pin_memory() if self.encoded is not None else None
        return Batch(self.images.pin_memory(), self.labels.pin_memory(), self.skipped,
                     encoded, self.encoded_sizes, self.windows)

    def jpegs(self) -> list[torch.Tensor]:
        """The deferred batch's JPEG files, one tensor (a view) each."""
        return list(torch.split(self.encoded, self.encoded_sizes.tolist()))


class Encoded(NamedTuple):
    """A sample whose decoding is deferred to the batch: JPEG bytes and where to crop."""

    data: torch.Tensor  # uint8, the JPEG file's bytes
    window: Window
    label: int


def sample_rng(seed: int, epoch: int, index: int) -> random.Random:
    """The augmentation's random numbers for one sample: a function of (seed, epoch, index)
    only, so they do not depend on workers, on the decode device, or on a resume."""
    return random.Random((seed * 1_000_003 + epoch) * 10_000_019 + index)


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
            pixels = self.spec.train_pixels(image, sample_rng(self.seed, epoch, index))
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
    """A pack or shard set from `pipeline pack`, as one dataset; each worker opens its own
    handles, lazily, so a DDP rank opens only the shards its rows are in and reads only its
    rows. A raw pack whose images need no rescaling reads just the crop's pixels (an HDF5
    hyperslab) and flips and transposes them in numpy, no PIL: ~4x faster per image. A JPEG
    pack holds RGB JPEGs that `pack` wrote (EXIF, CMYK and the like were dealt with by the
    project's decoder then): they decode with libjpeg-turbo through torchvision, ~2x faster
    than PIL and already channels-first, exactly as the batched GPU path decodes them
    (`window_crop`, one place for both); or hand their bytes on for batched decoding
    (`defer_decoding`)."""

    def __init__(self, h5_path: Path, spec: InputSpec, train: bool, seed: int) -> None:
        super().__init__(spec, train, seed)
        self.h5_path = h5_path
        info = read_pack(h5_path)
        self.labels, self.classes = info.labels, info.classes
        self.encoding, self.size = info.encoding, info.size
        self.rows = PackReader(info)
        self.deferred = False

    def defer_decoding(self) -> None:
        """Yield `Encoded` samples (JPEG bytes and the crop to make) instead of pixels, for
        `DecodedBatches` to decode a whole batch at once (on the GPU)."""
        if self.encoding != "jpeg":
            raise InputError(f"{self.h5_path} stores {self.encoding} pixels: only a pack made "
                             "with --encoding jpeg can be decoded on the GPU")
        self.deferred = True

    def _row(self, index: int) -> np.ndarray:
        return self.rows.row(index)

    def image(self, index: int) -> Image.Image:
        if self.encoding == "raw":
            return Image.fromarray(self._row(index), "RGB")
        # The training decoder (libjpeg-turbo through torchvision), so a thumbnail shows
        # the very pixels the model saw.
        return Image.fromarray(self._decode(index).permute(1, 2, 0).numpy(), "RGB")

    def _decode(self, index: int) -> torch.Tensor:
        """A stored JPEG, 3 x H x W (RuntimeError when it cannot be decoded)."""
        return decode_jpeg(torch.from_numpy(self._row(index)), mode=ImageReadMode.RGB)

    def __getitem__(self, key: tuple[int, int]) -> tuple[torch.Tensor, int] | Encoded | str:
        index, epoch = key
        window = self.spec.window_of(self.size, self.size, self.train,
                                     sample_rng(self.seed, epoch, index))
        unscaled = (window.width, window.height) == (self.size, self.size)
        if self.encoding == "raw" and not unscaled:
            return super().__getitem__(key)
        try:
            if self.deferred:
                return Encoded(torch.from_numpy(self._row(index)), window,
                               int(self.labels[index]))
            if self.encoding == "raw":
                dataset, row = self.rows.locate(index)
                rows, columns = self.spec.crop_slices(window)
                pixels = _chw(dataset[row, rows, columns], window.flip)  # reads only the crop
            else:
                pixels = self._decode_crop(index, window)
        except (OSError, RuntimeError) as exc:
            log.warning("skipping %s: %s", self.path(index), exc)
            return self.path(index)
        return pixels, int(self.labels[index])

    def _decode_crop(self, index: int, window: Window) -> torch.Tensor:
        """`window` of a stored JPEG, decoded on the CPU (RuntimeError when it cannot be)."""
        image = self._decode(index)
        if tuple(image.shape[1:]) != (window.height, window.width):
            return window_crop(image, window, self.spec.crop).contiguous()
        rows, columns = self.spec.crop_slices(window)
        return _chw(image.permute(1, 2, 0).numpy()[rows, columns], window.flip)

    def path(self, index: int) -> str:
        return f"{self.h5_path}[{index}]"


def _chw(pixels: np.ndarray, flip: bool) -> torch.Tensor:
    """An H x W x 3 crop as a contiguous 3 x H x W tensor, mirrored when asked (numpy's
    transposing copy of uint8 is ~2x faster than torch's)."""
    if flip:
        pixels = pixels[:, ::-1]
    return torch.from_numpy(np.ascontiguousarray(pixels.transpose(2, 0, 1)))


def is_jpeg_pack(images: Dataset | None) -> bool:
    """Whether `images` can have its decoding deferred to the batch (`DecodedBatches`)."""
    return isinstance(images, PackedImages) and images.encoding == "jpeg"


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


def collate(samples: list[tuple[torch.Tensor, int] | Encoded | str]) -> Batch:
    """Stack the good samples; the paths of the ones that failed ride along as `skipped`."""
    good = [s for s in samples if not isinstance(s, str)]
    skipped = [s for s in samples if isinstance(s, str)]
    empty = torch.zeros(0, dtype=torch.uint8)
    if not good:
        return Batch(empty, torch.zeros(0, dtype=torch.int64), skipped)
    labels = torch.tensor([sample[-1] for sample in good], dtype=torch.int64)
    if isinstance(good[0], Encoded):
        return Batch(empty, labels, skipped, torch.cat([sample.data for sample in good]),
                     torch.tensor([len(sample.data) for sample in good], dtype=torch.int64),
                     torch.tensor([sample.window for sample in good], dtype=torch.int64))
    return Batch(torch.stack([image for image, _ in good]), labels, skipped)


def decode_batch(encoded: list[torch.Tensor], windows: torch.Tensor, crop: int,
                 device: torch.device) -> tuple[torch.Tensor, list[int]]:
    """Decode JPEGs on `device` (nvJPEG on CUDA, libjpeg on CPU) and make each one's crop
    there: (uint8 N x 3 x crop x crop, the positions that could not be decoded).

    Device-agnostic on purpose: the same code runs on CPU tensors in the tests. One call
    decodes the whole batch; a batch with a bad JPEG is decoded again one by one, so only
    that image is lost. Scaling uses torch's antialiased bilinear resize, which differs from
    PIL's by a few levels (the CPU path's crops are the same windows, not the same bytes).
    """
    try:
        images: list[torch.Tensor | None] = list(decode_jpeg(encoded, mode=ImageReadMode.RGB,
                                                             device=device))
    except RuntimeError:
        images = [_decode_one(data, device) for data in encoded]
    crops, bad = [], []
    for position, (image, window) in enumerate(zip(images, windows.tolist(), strict=True)):
        if image is None:
            bad.append(position)
            continue
        crops.append(window_crop(image, Window(*window), crop))
    pixels = (torch.stack(crops) if crops
              else torch.zeros(0, 3, crop, crop, dtype=torch.uint8, device=device))
    return pixels, bad


def window_crop(image: torch.Tensor, window: Window, crop: int) -> torch.Tensor:
    """A decoded C x H x W image scaled, cropped and maybe flipped as `window` says (a view
    where no scaling is needed)."""
    if tuple(image.shape[1:]) != (window.height, window.width):
        image = resize(image, [window.height, window.width], antialias=True)
    image = image[:, window.top:window.top + crop, window.left:window.left + crop]
    return image.flip(-1) if window.flip else image


def _decode_one(data: torch.Tensor, device: torch.device) -> torch.Tensor | None:
    try:
        return decode_jpeg(data, mode=ImageReadMode.RGB, device=device)
    except RuntimeError as exc:
        log.warning("skipping an undecodable JPEG in a batch: %s", exc)
        return None


class DecodedBatches:
    """A loader of deferred (`Encoded`) batches, yielding them decoded on `device`: the
    GPU path (`--decode-device cuda`). Workers only read bytes and draw the crops."""

    def __init__(self, loader: DataLoader, crop: int, device: torch.device) -> None:
        self.loader, self.crop, self.device = loader, crop, device

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[Batch]:
        for batch in self.loader:
            if batch.encoded is None:
                yield batch
                continue
            pixels, bad = decode_batch(batch.jpegs(), batch.windows, self.crop, self.device)
            keep = [i for i in range(len(batch.labels)) if i not in bad]
            yield Batch(pixels, batch.labels[keep], batch.skipped + [
                f"an undecodable JPEG (batch position {i})" for i in bad])


def make_loader(images: _ImageSource, sampler: EpochSampler, *, batch_size: int,
                workers: int) -> DataLoader:
    return DataLoader(images, batch_size=batch_size, sampler=sampler, num_workers=workers,
                      collate_fn=collate, pin_memory=torch.cuda.is_available(),
                      persistent_workers=workers > 0, prefetch_factor=4 if workers else None)
