"""The frozen-trunk feature cache (`--cache-features`): pay for the frozen layers once.

With layers up to L frozen, every epoch recomputes the same function of nearly the same crops.
Instead, the frozen trunk's output is computed once per training image and *view* (view 0 is
the centre crop, views 1..K-1 random crops and flips, seeded like the live loader's) and once
per validation image, stored as memory-mapped arrays (fp16 by default), and the unfrozen head
trains from them: each epoch draws one view per image, seeded by (seed, epoch, index), so a
resumed run draws exactly what an uninterrupted one would.

The trunk ends at the last frozen layer, extended over the parameter-free, deterministic
modules after it (ReLU, pooling, flatten), never past a Dropout: a cache must hold what the
live forward pass would compute, and frozen BatchNorm uses its running statistics either way.

A cache lives in a folder named by a digest of everything that determines it (the trunk's
weights, architecture and cut, the data files, preprocessing, normalization, views, seed,
storage type), so runs with the same key share it (a learning-rate sweep pays once), a stale
one is never used, and an unreadable one is rebuilt with a message. Building is resumable.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import math
import random
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler

from pipeline.core.fsutil import atomic_write_text
from pipeline.core.progress import Progress
from pipeline.formats.packfile import is_packfile, read_pack
from pipeline.ml.data import Batch, collate, open_images
from pipeline.ml.models import Layer
from pipeline.ml.normalization import Normalization
from pipeline.ml.preprocess import InputSpec
from pipeline.stages.finetune.options import FinetuneConfig

log = logging.getLogger(__name__)

FORMAT = 1
CACHE_DIR_NAME = ".feature-cache"
PASS_THROUGH = (nn.ReLU, nn.MaxPool2d, nn.AdaptiveAvgPool2d, nn.Flatten)
BUILD_BATCH = 64
SAVE_EVERY_SECONDS = 10.0
# --cache-features auto times the build on its first batches: PROBE_BATCHES after the first
# (which starts the loader's workers and warms the kernels), and at least PROBE_SECONDS.
PROBE_BATCHES = 3
PROBE_SECONDS = 10.0
STORAGE = {"fp16": (np.float16, torch.float16), "bf16": (np.uint16, torch.bfloat16),
           "fp32": (np.float32, torch.float32)}


def forward_modules(model: nn.Module) -> list[nn.Module]:
    """AlexNet's and VGG's forward pass as one list: features, avgpool, flatten, classifier."""
    return [*model.features, model.avgpool, nn.Flatten(1), *model.classifier]


def split_model(model: nn.Module, frozen: list[Layer]) -> tuple[nn.Sequential, nn.Sequential]:
    """(trunk, head) sharing the model's modules: head(trunk(x)) == model(x)."""
    modules = forward_modules(model)
    last = frozen[-1].modules[-1]
    cut = next(i for i, module in enumerate(modules) if module is last) + 1
    while cut < len(modules) and isinstance(modules[cut], PASS_THROUGH):
        cut += 1
    # Dropout draws anew every step: what follows it cannot be cached. Frozen layers after
    # it (fc6 and fc7 frozen) stay in the head and run live.
    cut = min([cut] + [i for i, m in enumerate(modules[:cut]) if isinstance(m, nn.Dropout)])
    return nn.Sequential(*modules[:cut]), nn.Sequential(*modules[cut:])


def pick_view(seed: int, epoch: int, index: int, views: int) -> int:
    """The cached view an epoch trains on for one image: fixed by (seed, epoch, index)."""
    if views == 1:
        return 0
    return random.Random(f"view {seed} {epoch} {index}").randrange(views)


def break_even_epochs(build_seconds: float, trunk_seconds_per_image: float,
                      images_per_epoch: int) -> int:
    """Epochs after which a build of `build_seconds` has paid for itself: each epoch from the
    cache saves the frozen layers' forward pass over the epoch's images (training and
    validation), which is what reading the cached features replaces."""
    saved_per_epoch = trunk_seconds_per_image * images_per_epoch
    return math.ceil(build_seconds / max(saved_per_epoch, 1e-9))


@dataclass
class BuildPlan:
    """--cache-features auto: how many epochs the cache would serve, and over how many images
    each; the build goes on only if they repay it."""

    epochs: int
    images_per_epoch: int


class NotWorthBuilding(Exception):
    """The probe's estimate: the planned epochs would not repay the rest of the build."""


@dataclass
class _Probe:
    """Times the first batches of a build (wall time per image and view, trunk time per
    image) and decides once, per `BuildPlan`, whether the rest of the build pays."""

    plan: BuildPlan
    views_left: int  # image-views still to compute when the build (re)started, val included
    batches: int = 0
    started: float = 0.0
    views: int = 0
    images: int = 0
    trunk_seconds: float = 0.0
    decided: bool = False

    def batch_done(self, views: int, images: int, trunk_seconds: float) -> None:
        self.batches += 1
        if self.batches == 1:  # start-up and warm-up: not what the rest will cost
            self.started, self.views_left = time.monotonic(), self.views_left - views
            return
        self.views += views
        self.images += images
        self.trunk_seconds += trunk_seconds
        elapsed = time.monotonic() - self.started
        if self.decided or self.batches <= PROBE_BATCHES or elapsed < PROBE_SECONDS:
            return
        self.decided = True
        remaining = elapsed / self.views * (self.views_left - self.views)
        per_image = self.trunk_seconds / max(self.images, 1)
        needed = break_even_epochs(remaining, per_image, self.plan.images_per_epoch)
        verdict = (f"the rest of the build would take ~{remaining:.0f} s and each epoch from "
                   f"the cache saves ~{per_image * self.plan.images_per_epoch:.1f} s of "
                   f"frozen layers: it pays off after {needed} epoch(s), the run has "
                   f"{self.plan.epochs}")
        if self.plan.epochs <= needed:
            raise NotWorthBuilding(verdict)
        log.info("--cache-features auto: %s: building it", verdict)


@dataclass
class CacheInfo:
    """What a run tells about its cache (metrics.json, the report)."""

    folder: str
    views: int
    dtype: str
    bytes: int
    reused: bool
    build_seconds: float
    trunk_seconds_per_image: float

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


class FeatureCache:
    """One cache folder: key.json, train.npy (N x views x features), val.npy, state.json."""

    def __init__(self, folder: Path, key: dict[str, Any]) -> None:
        self.folder = folder
        self.key = key

    @classmethod
    def for_run(cls, config: FinetuneConfig, trunk: nn.Sequential, spec: InputSpec,
                normalization: Normalization) -> FeatureCache:
        """The trunk itself (its length and weights) is the key, not --freeze-until: conv5,
        fc6 and fc7 frozen in AlexNet cut at the same place and share a cache."""
        key = {
            "format": FORMAT, "arch": config.arch, "trunk_modules": len(trunk),
            "trunk": _digest_module(trunk), "train": _data_identity(config.train),
            "val": _data_identity(config.val) if config.val else None,
            "crop": spec.crop, "resize": spec.resize,
            "jitter": list(spec.jitter) if spec.jitter else None,
            "normalization": _digest_normalization(normalization), "views": config.cache_views,
            "seed": config.seed, "dtype": config.cache_dtype,
        }
        digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
        root = config.cache_dir or Path(config.train).resolve().parent / CACHE_DIR_NAME
        return cls(root / digest, key)

    # -- building

    def ensure(self, trunk: nn.Module, config: FinetuneConfig, spec: InputSpec,
               normalization: Normalization, device: torch.device,
               plan: BuildPlan | None = None) -> CacheInfo | None:
        """Open the cache, building (or finishing) whatever is missing; with a `plan`
        (--cache-features auto), None when its first batches show that the planned epochs
        would not repay the rest (a folder this call started is removed). Two runs sharing a
        key take turns: the second finds the cache the first built."""
        self.folder.parent.mkdir(parents=True, exist_ok=True)
        with open(self.folder.with_suffix(".lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            fresh = not self.folder.exists()
            try:
                return self._ensure(trunk, config, spec, normalization, device, plan)
            except NotWorthBuilding as verdict:
                log.info("--cache-features auto: %s: training from images instead", verdict)
                if fresh:
                    shutil.rmtree(self.folder, ignore_errors=True)
                return None

    def is_complete(self) -> bool:
        """Whether a finished cache of this key is on disk (what other ranks check after
        rank 0 built it, or decided not to)."""
        state = self._usable_state()
        return state is not None and bool(state.get("complete", False))

    def _ensure(self, trunk: nn.Module, config: FinetuneConfig, spec: InputSpec,
                normalization: Normalization, device: torch.device,
                plan: BuildPlan | None) -> CacheInfo:
        state = self._usable_state()
        reused = state is not None and state.get("complete", False)
        started = time.monotonic()
        if state is None:
            state = self._start()
        timed_seconds, timed_images = 0.0, 0
        splits = [("train", config.train, True)] + ([("val", config.val, False)]
                                                     if config.val else [])
        opened = [(split, _Views(open_images(data, spec, train=False),
                                 open_images(data, spec, train=True, seed=config.seed)
                                 if train else None), train)
                  for split, data, train in splits]
        probe = None if plan is None or reused else _Probe(plan, sum(
            (len(views) - state["done"].get(split, 0)) * (config.cache_views if train else 1)
            for split, views, train in opened))
        for split, views, train in opened:
            seconds, images = self._build(split, views, train, trunk, config, normalization,
                                          device, state, probe)
            timed_seconds, timed_images = timed_seconds + seconds, timed_images + images
        # Over every image this build computed (both splits), else what an earlier one saved.
        trunk_seconds = (timed_seconds / timed_images if timed_images
                         else state.get("trunk_seconds_per_image", 0.0))
        state.update(complete=True, trunk_seconds_per_image=trunk_seconds)
        self._save_state(state)
        size = sum(p.stat().st_size for p in self.folder.iterdir())
        return CacheInfo(str(self.folder), config.cache_views, config.cache_dtype, size, reused,
                         round(time.monotonic() - started, 2), trunk_seconds)

    def _usable_state(self) -> dict[str, Any] | None:
        """The saved state if this folder holds this key's cache; None when it must start over
        (absent, foreign or unreadable: a derived file, so it is rebuilt, with a message)."""
        if not self.folder.exists():
            return None
        try:
            key = json.loads((self.folder / "key.json").read_text())
            state = json.loads((self.folder / "state.json").read_text())
            if key != self.key:
                raise ValueError("its key does not match this run's")
            for split, done in state["done"].items():
                if done and not self._array_matches(split, state["shapes"][split]):
                    raise ValueError(f"{split}.npy does not have the recorded shape")
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.warning("feature cache %s is unusable (%s): rebuilding it", self.folder, exc)
            shutil.rmtree(self.folder)
            return None
        return state

    def _array_matches(self, split: str, shape: list[int]) -> bool:
        try:
            array = np.load(self.folder / f"{split}.npy", mmap_mode="r")
        except (OSError, ValueError):
            return False
        return list(array.shape) == shape and array.dtype == STORAGE[self.key["dtype"]][0]

    def _start(self) -> dict[str, Any]:
        self.folder.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.folder / "key.json", json.dumps(self.key, indent=2) + "\n")
        state: dict[str, Any] = {"done": {}, "shapes": {}, "skipped": {}}
        self._save_state(state)
        return state

    def _save_state(self, state: dict[str, Any]) -> None:
        atomic_write_text(self.folder / "state.json", json.dumps(state) + "\n")

    @torch.no_grad()
    def _build(self, split: str, images: _Views, train: bool, trunk: nn.Module,
               config: FinetuneConfig, normalization: Normalization, device: torch.device,
               state: dict[str, Any], probe: _Probe | None = None) -> tuple[float, int]:
        """Fill `split`.npy from where an interrupted build stopped; (seconds of trunk, images
        through it), (0, 0) when there was nothing left to do. `probe` may stop it early
        (NotWorthBuilding)."""
        views = config.cache_views if train else 1
        count = len(images)
        done = state["done"].get(split, 0)
        if done >= count:
            return 0.0, 0
        feature_shape = _output_shape(trunk, images, device, normalization)
        shape = [count, views, *feature_shape] if train else [count, *feature_shape]
        array = self._open_array(split, shape, fresh=done == 0)
        state["shapes"][split] = shape
        skipped = set(state["skipped"].get(split, []))
        trunk.eval()
        loader = DataLoader(images, batch_size=BUILD_BATCH,
                            sampler=_ViewOrder(done, count, views), num_workers=config.workers,
                            collate_fn=_collate_views)
        progress = Progress(f"caching {split} features", total=(count - done) * views)
        trunk_seconds, computed, saved_at = 0.0, 0, time.monotonic()
        features = np.zeros(0)
        for keys, batch in loader:
            started = time.monotonic()
            if len(batch.labels):
                pixels = normalization(batch.images.to(device))
                if config.channels_last:
                    pixels = pixels.contiguous(memory_format=torch.channels_last)
                features = _to_storage(trunk(pixels), config.cache_dtype)
            spent = time.monotonic() - started
            trunk_seconds += spent
            if probe is not None:
                probe.batch_done(len(keys), len(batch.labels), spent)
            good = iter(range(len(batch.labels)))
            for index, view, ok in keys:
                if not ok:
                    skipped.add(index)
                    continue
                row = features[next(good)]
                if train:
                    array[index, view] = row
                else:
                    array[index] = row
            computed += len(batch.labels)
            progress.update(len(keys))
            last_index = keys[-1][0]
            if keys[-1][1] == views - 1 and time.monotonic() - saved_at > SAVE_EVERY_SECONDS:
                self._checkpoint(array, state, split, last_index + 1, skipped)
                saved_at = time.monotonic()
        progress.close()
        self._checkpoint(array, state, split, count, skipped)
        return trunk_seconds, computed

    def _open_array(self, split: str, shape: list[int], fresh: bool) -> np.memmap:
        path = self.folder / f"{split}.npy"
        dtype = STORAGE[self.key["dtype"]][0]
        if fresh or not path.exists():
            return np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=tuple(shape))
        return np.load(path, mmap_mode="r+")

    def _checkpoint(self, array: np.memmap, state: dict[str, Any], split: str, done: int,
                    skipped: set[int]) -> None:
        """Rows before `done` are on disk before the state says so: a kill loses no claim."""
        array.flush()
        state["done"][split] = done
        state["skipped"][split] = sorted(skipped)
        self._save_state(state)

    # -- reading

    def dataset(self, split: str, labels: np.ndarray, *, train: bool,
                seed: int) -> CachedFeatures:
        array = np.load(self.folder / f"{split}.npy", mmap_mode="r")
        state = json.loads((self.folder / "state.json").read_text())
        return CachedFeatures(array, labels, train=train, seed=seed,
                              views=self.key["views"] if train else 1,
                              skipped=set(state["skipped"].get(split, [])),
                              dtype=self.key["dtype"], name=f"{self.folder}/{split}.npy")


class CachedFeatures(Dataset):
    """(index, epoch) -> (features of the epoch's view, label), like the image datasets."""

    def __init__(self, array: np.ndarray, labels: np.ndarray, *, train: bool, seed: int,
                 views: int, skipped: set[int], dtype: str, name: str) -> None:
        self.array, self.labels, self.train, self.seed = array, labels, train, seed
        self.views, self.skipped, self.name = views, skipped, name
        self.torch_dtype = STORAGE[dtype][1]

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, key: tuple[int, int]) -> tuple[torch.Tensor, int] | str:
        index, epoch = key
        if index in self.skipped:
            return f"{self.name}[{index}]"
        row = (self.array[index, pick_view(self.seed, epoch, index, self.views)] if self.train
               else self.array[index])
        return torch.from_numpy(np.array(row)).view(self.torch_dtype), int(self.labels[index])


def features_to_input(device: torch.device,
                      channels_last: bool) -> Any:
    """What the head takes from a batch of cached features."""
    def convert(features: torch.Tensor) -> torch.Tensor:
        features = features.to(device, non_blocking=True).float()
        if channels_last and features.ndim == 4:
            features = features.contiguous(memory_format=torch.channels_last)
        return features
    return convert


# -- building blocks

class _Views(Dataset):
    """(index, view) -> pixels: view 0 the centre crop, view v > 0 the live loader's random
    augmentation of epoch v (so --cache-views K holds what K epochs of live training see)."""

    def __init__(self, centre: Any, augmented: Any | None) -> None:
        self.centre, self.augmented = centre, augmented
        self.spec = centre.spec

    def __len__(self) -> int:
        return len(self.centre)

    def __getitem__(self, key: tuple[int, int]) -> tuple[tuple[int, int, bool], Any]:
        index, view = key
        source = self.centre if view == 0 or self.augmented is None else self.augmented
        sample = source[(index, view)]
        return (index, view, not isinstance(sample, str)), sample


def _collate_views(items: list[tuple[tuple[int, int, bool], Any]]
                   ) -> tuple[list[tuple[int, int, bool]], Batch]:
    return [key for key, _ in items], collate([sample for _, sample in items])


class _ViewOrder(Sampler):
    """Every view of every image from `start`, image by image (resumable at image bounds)."""

    def __init__(self, start: int, count: int, views: int) -> None:
        self.start, self.count, self.views = start, count, views

    def __len__(self) -> int:
        return (self.count - self.start) * self.views

    def __iter__(self) -> Iterator[tuple[int, int]]:
        return ((index, view) for index in range(self.start, self.count)
                for view in range(self.views))


def _output_shape(trunk: nn.Module, images: Any, device: torch.device,
                  normalization: Normalization) -> list[int]:
    crop = images.spec.crop
    with torch.no_grad():
        probe = torch.zeros(1, 3, crop, crop, dtype=torch.uint8, device=device)
        return list(trunk.eval()(normalization(probe)).shape[1:])


def _to_storage(features: torch.Tensor, dtype: str) -> np.ndarray:
    features = features.float().cpu().contiguous()
    if dtype == "bf16":
        return features.to(torch.bfloat16).view(torch.uint16).numpy()
    return features.to(STORAGE[dtype][1]).numpy()


def _digest_module(module: nn.Module) -> str:
    digest = hashlib.sha256()
    for name, tensor in module.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def _digest_normalization(normalization: Normalization) -> str:
    digest = hashlib.sha256(normalization.kind.encode())
    for tensor in (normalization.mean, normalization.std):
        digest.update(tensor.float().contiguous().numpy().tobytes())
    return digest.hexdigest()


def _data_identity(path: Path | None) -> dict[str, Any]:
    """A pack by size and mtime (a shard set: of its index and of every shard, so a shard
    packed again changes the key); a manifest by its content too (it is small)."""
    resolved = Path(path).resolve()
    stat = resolved.stat()
    identity: dict[str, Any] = {"path": str(resolved), "size": stat.st_size,
                                "mtime_ns": stat.st_mtime_ns}
    if not is_packfile(resolved):
        identity["sha256"] = hashlib.sha256(resolved.read_bytes()).hexdigest()
        return identity
    shards = read_pack(resolved).files[1:]
    if shards:
        identity["shards"] = [[p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in shards]
    return identity
