"""The training run: builds the pieces from the config and loops over epochs.

Built to be left running: one CSV line and one atomic checkpoint per epoch, `best.pt` on every
improvement, and `--resume` that continues bit-for-bit (model, optimizer, scheduler, epoch,
RNG; the data order, the augmentation and the cached view drawn are functions of seed and
epoch). Under `torchrun` it trains with DistributedDataParallel; only rank 0 writes.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from pipeline.core.errors import InputError
from pipeline.formats import checkpoint
from pipeline.ml.allocator import keep_freed_memory
from pipeline.ml.data import DecodedBatches, EpochSampler, is_jpeg_pack, make_loader, open_images
from pipeline.ml.metrics import EvalResult, evaluate_loader
from pipeline.ml.models import (
    LocalWeights,
    build_model,
    check_arch,
    freeze,
    frozen_layers,
    layer_table,
    resolve_weights,
    train_mode,
)
from pipeline.ml.normalization import Normalization
from pipeline.ml.preprocess import InputSpec
from pipeline.stages.finetune.cache import CacheInfo, FeatureCache, features_to_input, split_model
from pipeline.stages.finetune.distributed import Ranks, init_distributed, shutdown
from pipeline.stages.finetune.loop import EpochStats, autocast, train_one_epoch
from pipeline.stages.finetune.optim import (
    current_lr,
    make_optimizer,
    make_scheduler,
    step_scheduler,
)
from pipeline.stages.finetune.options import FinetuneConfig, check_config
from pipeline.stages.finetune.rundir import RunDir

log = logging.getLogger(__name__)


def finetune(config: FinetuneConfig) -> dict[str, Any]:
    """Train; returns the final metrics (also written to OUT/metrics.json)."""
    check_config(config)
    check_arch(config.arch)
    if config.precision == "fp16" and not torch.cuda.is_available():
        raise InputError("--precision fp16 needs a CUDA GPU; on CPU use bf16 or fp32")
    if config.decode_device == "cuda" and not torch.cuda.is_available():
        raise InputError("--decode-device cuda needs a CUDA GPU; use cpu (or auto)")
    keep_freed_memory()
    ranks = init_distributed()
    try:
        return _Run(config, ranks).train()
    finally:
        shutdown(ranks)


@dataclass
class _Feed:
    """Where training and validation batches come from, and how a batch becomes input."""

    net: nn.Module  # what a training batch goes through (the model, or the head over a cache)
    eval_net: nn.Module
    train: DataLoader
    val: DataLoader | None
    inputs: Callable[[torch.Tensor], torch.Tensor]
    eval_inputs: Callable[[torch.Tensor], torch.Tensor]
    sampler: EpochSampler
    cache: CacheInfo | None = None


class _Run:
    def __init__(self, config: FinetuneConfig, ranks: Ranks) -> None:
        self.config, self.ranks = config, ranks
        self.rundir = RunDir(config.out, config.tensorboard)
        torch.manual_seed(config.seed)
        self.spec = InputSpec(config.crop, config.resize, config.jitter)
        train_images = open_images(config.train, self.spec, train=True, seed=config.seed)
        self.classes = train_images.classes
        self.train_count = len(train_images)
        val_images = open_images(config.val, self.spec, train=False) if config.val else None
        weights = resolve_weights(config.weights)  # a file is read once: model + normalization
        self.model = build_model(config.arch, len(self.classes), weights)
        self.normalization = self._normalization(weights)
        layers = layer_table(self.model, config.arch)
        self.frozen = frozen_layers(layers, config.freeze_until)
        self.frozen_batchnorms = freeze(self.model, self.frozen)
        self.model.to(ranks.device)
        if config.channels_last:
            self.model.to(memory_format=torch.channels_last)
        self.optimizer = make_optimizer(self.model, layers, config)
        self.scheduler = make_scheduler(self.optimizer, config)
        self.scaler = torch.amp.GradScaler("cuda", enabled=config.precision == "fp16")
        self.criterion = nn.CrossEntropyLoss(label_smoothing=config.label_smoothing)
        self.start_epoch, self.best_top1 = 1, -1.0
        self.feed = (self._cached_feed(train_images, val_images) if config.cache_features
                     else self._image_feed(train_images, val_images))

    def _normalization(self, weights: str | LocalWeights) -> Normalization:
        """--mean: "imagenet", a mean.npy, or "auto" (the weights' own statistics)."""
        mean = self.config.mean
        if mean == "imagenet":
            return Normalization.imagenet()
        if mean != "auto":
            return Normalization.from_mean_file(Path(mean), self.spec)
        # A checkpoint of ours says how its weights were trained; a torchvision .pth does not.
        if isinstance(weights, LocalWeights) and weights.normalization is not None:
            return weights.normalization
        return Normalization.imagenet()

    def _distributed(self, module: nn.Module) -> nn.Module:
        if self.ranks.world == 1:
            return module
        device = self.ranks.device
        return nn.parallel.DistributedDataParallel(
            module, device_ids=[device.index] if device.type == "cuda" else None)

    def _loaders(self, train: Dataset, val: Dataset | None,
                 workers: int) -> tuple[EpochSampler, DataLoader, DataLoader | None]:
        config, ranks = self.config, self.ranks
        sampler = EpochSampler(len(train), shuffle=True, seed=config.seed, rank=ranks.rank,
                               world=ranks.world)
        loader = make_loader(train, sampler, batch_size=config.batch_size, workers=workers)
        # Built once: persistent workers then serve every epoch's validation (rank 0 only).
        val_loader = (make_loader(val, EpochSampler(len(val), shuffle=False),
                                  batch_size=config.batch_size, workers=workers)
                      if val is not None and ranks.is_main else None)
        return sampler, loader, val_loader

    def _image_feed(self, train: Dataset, val: Dataset | None) -> _Feed:
        device = self._decode_device(train)
        if device is not None:  # the workers only read bytes; whole batches decode on the GPU
            for images in (train, val):
                if is_jpeg_pack(images):
                    images.defer_decoding()
        sampler, loader, val_loader = self._loaders(train, val, self.config.workers)
        if device is not None:
            log.info("decoding JPEG batches on %s", device)
            crop = self.spec.crop
            loader = DecodedBatches(loader, crop, device)
            val_loader = DecodedBatches(val_loader, crop, device) if val_loader else None
        return _Feed(self._distributed(self.model), self.model, loader, val_loader,
                     self._pixels_to_input, self._pixels_to_input, sampler)

    def _decode_device(self, train: Dataset) -> torch.device | None:
        """The device that decodes JPEG packs batch by batch, or None: loader workers decode
        (on the CPU). auto picks the GPU when training on one and the data is a JPEG pack."""
        choice = self.config.decode_device
        if choice == "cuda" and not is_jpeg_pack(train):
            raise InputError(f"--decode-device cuda decodes JPEG packs, and {self.config.train} "
                             "is not one: pack it with --encoding jpeg, or use --decode-device "
                             "cpu")
        if choice == "cpu" or not is_jpeg_pack(train) or self.ranks.device.type != "cuda":
            return None
        return self.ranks.device

    def _pixels_to_input(self, pixels: torch.Tensor) -> torch.Tensor:
        images = self.normalization(pixels.to(self.ranks.device, non_blocking=True))
        if self.config.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        return images

    def _cached_feed(self, train: Any, val: Any | None) -> _Feed:
        """The head trains on the frozen trunk's cached output; the model stays whole."""
        config = self.config
        trunk, head = split_model(self.model, self.frozen)
        cache = FeatureCache.for_run(config, trunk, self.spec, self.normalization)
        # Building draws on torch's RNG (loader seeds): training must not depend on whether
        # the cache was built or found, or a resumed run would see other dropout masks.
        with torch.random.fork_rng(devices=[]):
            if self.ranks.is_main:
                info = cache.ensure(trunk, config, self.spec, self.normalization,
                                    self.ranks.device)
            self.ranks.barrier()  # the others read what rank 0 built
            if not self.ranks.is_main:
                info = cache.ensure(trunk, config, self.spec, self.normalization,
                                    self.ranks.device)
        cached_train = cache.dataset("train", train.labels, train=True, seed=config.seed)
        cached_val = (cache.dataset("val", val.labels, train=False, seed=config.seed)
                      if val is not None else None)
        # Features are memory-mapped: reading them costs less than handing them between
        # processes, so no loader workers.
        sampler, loader, val_loader = self._loaders(cached_train, cached_val, workers=0)
        to_input = features_to_input(self.ranks.device, config.channels_last)
        log.info("training the head from cached features in %s (%d views, %s, %.0f MB%s)",
                 info.folder, info.views, info.dtype, info.bytes / 2**20,
                 ", reused" if info.reused else f", built in {info.build_seconds:.0f} s")
        return _Feed(self._distributed(head), head, loader, val_loader, to_input, to_input,
                     sampler, info)

    # -- the run

    def train(self) -> dict[str, Any]:
        config = self.config
        if config.resume:
            self._restore()
        if self.ranks.is_main:
            self.rundir.start(config.to_json())
            self._log_summary()
        last: dict[str, Any] = {}
        for epoch in range(self.start_epoch, config.epochs + 1):
            last = self._epoch(epoch)
        if not self.ranks.is_main:
            return {}
        metrics = {"epochs": config.epochs, "best_val_top1": self.best_top1, **last}
        if self.feed.cache is not None:
            metrics["feature_cache"] = self._cache_summary(self.feed.cache)
        self.rundir.finish(metrics)
        return metrics

    def _cache_summary(self, info: CacheInfo) -> dict[str, Any]:
        epochs = self.config.epochs - self.start_epoch + 1
        saved = info.trunk_seconds_per_image * self.train_count * epochs - (
            0.0 if info.reused else info.build_seconds)
        return {**info.to_json(), "trunk_seconds_saved_estimate": round(saved, 1)}

    def _log_summary(self) -> None:
        trainable = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        total = sum(p.numel() for p in self.model.parameters())
        frozen = ", ".join(layer.name for layer in self.frozen) or "nothing"
        log.info("%s: %d classes, %d train images; frozen: %s; %s of %s parameters trainable;"
                 " device %s, precision %s, %d rank(s)", self.config.arch, len(self.classes),
                 self.train_count, frozen, f"{trainable:,}", f"{total:,}",
                 self.ranks.device, self.config.precision, self.ranks.world)

    def _epoch(self, epoch: int) -> dict[str, Any]:
        config, feed = self.config, self.feed
        started = time.monotonic()
        feed.sampler.set_epoch(epoch)
        train_mode(feed.net, self.frozen_batchnorms)
        lr = current_lr(self.optimizer)
        stats = train_one_epoch(
            feed.net, feed.train, inputs=feed.inputs, optimizer=self.optimizer,
            criterion=self.criterion, scaler=self.scaler, precision=config.precision,
            device=self.ranks.device, steps=len(feed.train), max_steps=config.max_steps,
            label=f"epoch {epoch}/{config.epochs}")
        stats = EpochStats(*self.ranks.sum(stats.loss_sum, stats.correct, stats.seen,
                                           stats.skipped))
        seconds = time.monotonic() - started
        row = {"epoch": epoch, "lr": lr, "train_loss": stats.loss, "train_top1": stats.top1,
               "skipped": int(stats.skipped), "train_images": int(stats.seen),
               "seconds": round(seconds, 2), "images_per_s": round(stats.seen / seconds, 2)}
        result = self._validate()
        if result is not None:
            row.update(val_loss=result.loss, val_top1=result.top1, val_top5=result.top5)
        step_scheduler(self.scheduler, result.top1 if result else None)
        if self.ranks.is_main:
            self._record(epoch, row, result)
        return row

    def _validate(self) -> EvalResult | None:
        """Rank 0 evaluates the whole validation set; the others learn its top-1."""
        if self.config.val is None:
            return None
        result = EvalResult()
        if self.feed.val is not None:
            result = evaluate_loader(self.feed.eval_net, self.feed.val, self.feed.eval_inputs,
                                     self.ranks.device, len(self.classes),
                                     lambda: autocast(self.config.precision, self.ranks.device),
                                     label="  validate")
        result.top1 = self.ranks.from_main(result.top1)
        return result

    def _record(self, epoch: int, row: dict[str, Any], result: EvalResult | None) -> None:
        top1 = result.top1 if result else row["train_top1"]
        improved = top1 > self.best_top1
        self.best_top1 = max(self.best_top1, top1)
        self.rundir.record_epoch(row, self._payload(epoch), improved)
        val = (f"val loss {result.loss:.4f} top1 {result.top1:.3f} top5 {result.top5:.3f}"
               if result else "no validation set")
        log.info("epoch %d: train loss %.4f top1 %.3f | %s | %.1f img/s, %d skipped%s", epoch,
                 row["train_loss"], row["train_top1"], val, row["images_per_s"], row["skipped"],
                 " | best so far" if improved else "")

    def _payload(self, epoch: int) -> dict[str, Any]:
        return {
            "arch": self.config.arch,
            "classes": checkpoint.classes_state(self.classes),
            "input": self.spec.to_state(),
            "normalization": self.normalization.state(),
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "epoch": epoch,
            "best_top1": self.best_top1,
            "rng": torch.get_rng_state(),
            "config": self.config.to_json(),
        }

    def _restore(self) -> None:
        payload = self.rundir.saved()
        if payload is None:
            log.info("no checkpoint in %s yet: starting from epoch 1", self.config.out)
            return
        if payload["arch"] != self.config.arch or len(payload["classes"]) != len(self.classes):
            raise InputError(f"{self.rundir.checkpoint} was trained as {payload['arch']} with "
                             f"{len(payload['classes'])} classes; it cannot resume this run")
        self.model.load_state_dict(payload["model"])
        self.optimizer.load_state_dict(payload["optimizer"])
        self.scheduler.load_state_dict(payload["scheduler"])
        self.scaler.load_state_dict(payload["scaler"])
        self.normalization = Normalization.from_state(payload["normalization"])
        torch.set_rng_state(payload["rng"])
        self.start_epoch = payload["epoch"] + 1
        self.best_top1 = payload["best_top1"]
        log.info("resuming %s after epoch %d", self.config.out, payload["epoch"])
