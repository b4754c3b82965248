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
from pipeline.ml.data import DecodedBatches, EpochSampler, is_jpeg_pack, make_loader, open_images
from pipeline.ml.metrics import EvalResult, evaluate_loader
from pipeline.ml.models import (
    LocalWeights,
    autocast,
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
from pipeline.stages.finetune.cache import (
    BuildPlan,
    CacheInfo,
    FeatureCache,
    break_even_epochs,
    features_to_input,
    split_model,
)
from pipeline.stages.finetune.distributed import Ranks, init_distributed, shutdown
from pipeline.stages.finetune.loop import EpochStats, train_one_epoch
from pipeline.stages.finetune.optim import (
    current_lr,
    make_optimizer,
    make_scheduler,
    step_scheduler,
)
from pipeline.stages.finetune.options import FinetuneConfig, check_config
from pipeline.stages.finetune.saver import RunIdentity, RunSaver, TrainingState

log = logging.getLogger(__name__)


def finetune(config: FinetuneConfig) -> dict[str, Any]:
    """Train; returns the final metrics (also written to OUT/metrics.json)."""
    check_config(config)
    check_arch(config.arch)
    if config.precision == "fp16" and not torch.cuda.is_available():
        raise InputError("--precision fp16 needs a CUDA GPU; on CPU use bf16 or fp32")
    if config.decode_device == "cuda" and not torch.cuda.is_available():
        raise InputError("--decode-device cuda needs a CUDA GPU; use cpu (or auto)")
    ranks = init_distributed()
    try:
        return _train(config, ranks)
    finally:
        shutdown(ranks)


def _train(config: FinetuneConfig, ranks: Ranks) -> dict[str, Any]:
    """The run, top to bottom as torchvision's reference main: data, model, optimizer, feed,
    resume, then the epochs."""
    torch.manual_seed(config.seed)
    spec = InputSpec(config.crop, config.resize, config.jitter)
    train_images = open_images(config.train, spec, train=True, seed=config.seed)
    val_images = open_images(config.val, spec, train=False) if config.val else None

    weights = resolve_weights(config.weights)  # a file is read once: model + normalization
    model = build_model(config.arch, len(train_images.classes), weights)
    layers = layer_table(model, config.arch)
    frozen = frozen_layers(layers, config.freeze_until)
    frozen_batchnorms = freeze(model, frozen)
    model.to(ranks.device)
    if config.channels_last:
        model.to(memory_format=torch.channels_last)

    optimizer = make_optimizer(model, layers, config)
    state = TrainingState(model, optimizer, make_scheduler(optimizer, config),
                          torch.amp.GradScaler("cuda", enabled=config.precision == "fp16"),
                          _normalization(config, weights, spec))
    criterion = nn.CrossEntropyLoss(label_smoothing=config.label_smoothing)
    parts = _Parts(config, ranks, spec, state, frozen)
    saver = RunSaver(config.out, RunIdentity(config.arch, train_images.classes, spec,
                                             config.to_json()), config.tensorboard,
                     every=config.checkpoint_every)
    if config.resume:  # before the feed: a cache is keyed by the run's own normalization
        saver.restore(state)
    first_epoch = state.epoch + 1
    feed = None
    if config.cache_features != "off":
        feed = _cached_feed(parts, train_images, val_images, config.epochs - state.epoch)
    if feed is None:
        feed = _image_feed(parts, train_images, val_images)
    if ranks.is_main:
        saver.start()
        _log_summary(parts, len(train_images.classes), len(train_images))

    last: dict[str, Any] = {}
    for epoch in range(first_epoch, config.epochs + 1):
        feed.sampler.set_epoch(epoch)
        train_mode(feed.net, frozen_batchnorms)
        last = _train_epoch(parts, feed, criterion, epoch)
        result = _validate(parts, feed, len(train_images.classes))
        if result is not None:
            last.update(val_loss=result.loss, val_top1=result.top1, val_top5=result.top5)
        step_scheduler(state.scheduler, result.top1 if result else None)
        if ranks.is_main:
            _record(saver, state, epoch, last, result, final=epoch == config.epochs)

    if not ranks.is_main:
        return {}
    metrics = {"epochs": config.epochs, "best_val_top1": state.best_top1, **last}
    if feed.cache is not None:
        images = len(train_images) + (len(val_images) if val_images is not None else 0)
        summary = _cache_summary(feed.cache, images, config.epochs - first_epoch + 1)
        metrics["feature_cache"] = summary
        log.info("feature cache: built in %.0f s, pays for itself after %d epoch(s) (the frozen "
                 "layers cost ~%.1f s an epoch live); this run saved ~%.0f s",
                 feed.cache.build_seconds, summary["break_even_epochs"],
                 summary["trunk_seconds_per_epoch"], summary["trunk_seconds_saved_estimate"])
    saver.finish(metrics)
    return metrics


@dataclass
class _Parts:
    """What the steps below share; `state.normalization` may change on --resume, so it is
    read when used."""

    config: FinetuneConfig
    ranks: Ranks
    spec: InputSpec
    state: TrainingState
    frozen: list[Any]


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


# -- building


def _normalization(config: FinetuneConfig, weights: str | LocalWeights,
                   spec: InputSpec) -> Normalization:
    """--mean: "imagenet", a mean.npy, or "auto" (the weights' own statistics)."""
    if config.mean == "imagenet":
        return Normalization.imagenet()
    if config.mean != "auto":
        return Normalization.from_mean_file(Path(config.mean), spec)
    # A checkpoint of ours says how its weights were trained; a torchvision .pth does not.
    if isinstance(weights, LocalWeights) and weights.normalization is not None:
        return weights.normalization
    return Normalization.imagenet()


def _distributed(module: nn.Module, ranks: Ranks) -> nn.Module:
    if ranks.world == 1:
        return module
    device = ranks.device
    return nn.parallel.DistributedDataParallel(
        module, device_ids=[device.index] if device.type == "cuda" else None)


def _loaders(parts: _Parts, train: Dataset, val: Dataset | None,
             workers: int) -> tuple[EpochSampler, DataLoader, DataLoader | None]:
    config, ranks = parts.config, parts.ranks
    sampler = EpochSampler(len(train), shuffle=True, seed=config.seed, rank=ranks.rank,
                           world=ranks.world)
    loader = make_loader(train, sampler, batch_size=config.batch_size, workers=workers)
    # Built once: persistent workers then serve every epoch's validation (rank 0 only).
    val_loader = (make_loader(val, EpochSampler(len(val), shuffle=False),
                              batch_size=config.batch_size, workers=workers)
                  if val is not None and ranks.is_main else None)
    return sampler, loader, val_loader


def _image_feed(parts: _Parts, train: Dataset, val: Dataset | None) -> _Feed:
    device = _decode_device(parts, train)
    if device is not None:  # the workers only read bytes; whole batches decode on the GPU
        for images in (train, val):
            if is_jpeg_pack(images):
                images.defer_decoding()
    sampler, loader, val_loader = _loaders(parts, train, val, parts.config.workers)
    if device is not None:
        log.info("decoding JPEG batches on %s", device)
        crop = parts.spec.crop
        loader = DecodedBatches(loader, crop, device)
        val_loader = DecodedBatches(val_loader, crop, device) if val_loader else None

    def to_input(pixels: torch.Tensor) -> torch.Tensor:
        images = parts.state.normalization(pixels.to(parts.ranks.device, non_blocking=True))
        if parts.config.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        return images

    model = parts.state.model
    return _Feed(_distributed(model, parts.ranks), model, loader, val_loader, to_input,
                 to_input, sampler)


def _decode_device(parts: _Parts, train: Dataset) -> torch.device | None:
    """The device that decodes JPEG packs batch by batch, or None: loader workers decode
    (on the CPU). auto picks the GPU when training on one and the data is a JPEG pack."""
    choice = parts.config.decode_device
    if choice == "cuda" and not is_jpeg_pack(train):
        raise InputError(f"--decode-device cuda decodes JPEG packs, and {parts.config.train} "
                         "is not one: pack it with --encoding jpeg, or use --decode-device "
                         "cpu")
    if choice == "cpu" or not is_jpeg_pack(train) or parts.ranks.device.type != "cuda":
        return None
    return parts.ranks.device


def _cached_feed(parts: _Parts, train: Any, val: Any | None, epochs_left: int) -> _Feed | None:
    """The head trains on the frozen trunk's cached output; the model stays whole. None when
    --cache-features auto finds that the `epochs_left` would not repay the build."""
    config, ranks, spec = parts.config, parts.ranks, parts.spec
    normalization = parts.state.normalization
    trunk, head = split_model(parts.state.model, parts.frozen)
    cache = FeatureCache.for_run(config, trunk, spec, normalization)
    plan = (BuildPlan(epochs_left, len(train) + (len(val) if val is not None else 0))
            if config.cache_features == "auto" else None)
    # Building draws on torch's RNG (loader seeds): training must not depend on whether
    # the cache was built or found, or a resumed run would see other dropout masks.
    with torch.random.fork_rng(devices=[]):
        if ranks.is_main:
            info = cache.ensure(trunk, config, spec, normalization, ranks.device, plan)
        ranks.barrier()  # the others read what rank 0 built (or did not: auto)
        if not ranks.is_main:
            info = (cache.ensure(trunk, config, spec, normalization, ranks.device)
                    if plan is None or cache.is_complete() else None)
    if info is None:
        return None
    cached_train = cache.dataset("train", train.labels, train=True, seed=config.seed)
    cached_val = (cache.dataset("val", val.labels, train=False, seed=config.seed)
                  if val is not None else None)
    # Features are memory-mapped: reading them costs less than handing them between
    # processes, so no loader workers.
    sampler, loader, val_loader = _loaders(parts, cached_train, cached_val, workers=0)
    to_input = features_to_input(ranks.device, config.channels_last)
    log.info("training the head from cached features in %s (%d views, %s, %.0f MB%s)",
             info.folder, info.views, info.dtype, info.bytes / 2**20,
             ", reused" if info.reused else f", built in {info.build_seconds:.0f} s")
    return _Feed(_distributed(head, ranks), head, loader, val_loader, to_input, to_input,
                 sampler, info)


# -- each epoch


def _train_epoch(parts: _Parts, feed: _Feed, criterion: nn.Module,
                 epoch: int) -> dict[str, Any]:
    config, ranks, state = parts.config, parts.ranks, parts.state
    started = time.monotonic()
    lr = current_lr(state.optimizer)
    stats = train_one_epoch(
        feed.net, feed.train, inputs=feed.inputs, optimizer=state.optimizer,
        criterion=criterion, scaler=state.scaler, precision=config.precision,
        device=ranks.device, steps=len(feed.train), max_steps=config.max_steps,
        label=f"epoch {epoch}/{config.epochs}")
    stats = EpochStats(*ranks.sum(stats.loss_sum, stats.correct, stats.seen, stats.skipped))
    seconds = time.monotonic() - started
    return {"epoch": epoch, "lr": lr, "train_loss": stats.loss, "train_top1": stats.top1,
            "skipped": int(stats.skipped), "train_images": int(stats.seen),
            "seconds": round(seconds, 2), "images_per_s": round(stats.seen / seconds, 2)}


def _validate(parts: _Parts, feed: _Feed, classes: int) -> EvalResult | None:
    """Rank 0 evaluates the whole validation set; the others learn its top-1."""
    config, ranks = parts.config, parts.ranks
    if config.val is None:
        return None
    result = EvalResult()
    if feed.val is not None:
        result = evaluate_loader(feed.eval_net, feed.val, feed.eval_inputs, ranks.device,
                                 classes, lambda: autocast(config.precision, ranks.device),
                                 label="  validate")
    result.top1 = ranks.from_main(result.top1)
    return result


def _record(saver: RunSaver, state: TrainingState, epoch: int, row: dict[str, Any],
            result: EvalResult | None, *, final: bool) -> None:
    top1 = result.top1 if result else row["train_top1"]
    improved = top1 > state.best_top1
    state.epoch, state.best_top1 = epoch, max(state.best_top1, top1)
    saver.record_epoch(row, state, improved=improved, last=final)
    val = (f"val loss {result.loss:.4f} top1 {result.top1:.3f} top5 {result.top5:.3f}"
           if result else "no validation set")
    log.info("epoch %d: train loss %.4f top1 %.3f | %s | %.1f img/s, %d skipped%s", epoch,
             row["train_loss"], row["train_top1"], val, row["images_per_s"], row["skipped"],
             " | best so far" if improved else "")


# -- reporting


def _log_summary(parts: _Parts, classes: int, train_count: int) -> None:
    model, config, ranks = parts.state.model, parts.config, parts.ranks
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    frozen = ", ".join(layer.name for layer in parts.frozen) or "nothing"
    log.info("%s: %d classes, %d train images; frozen: %s; %s of %s parameters trainable;"
             " device %s, precision %s, %d rank(s)", config.arch,
             classes, train_count, frozen, f"{trainable:,}",
             f"{total:,}", ranks.device, config.precision, ranks.world)


def _cache_summary(info: CacheInfo, images_per_epoch: int, epochs: int) -> dict[str, Any]:
    """What the cache cost and saved: its build is paid once, and each epoch from it saves the
    frozen layers' forward pass over the training and validation images; it pays for itself
    after `break_even_epochs` (a reused cache at once)."""
    per_epoch = info.trunk_seconds_per_image * images_per_epoch
    saved = per_epoch * epochs - (0.0 if info.reused else info.build_seconds)
    break_even = 0 if info.reused else break_even_epochs(
        info.build_seconds, info.trunk_seconds_per_image, images_per_epoch)
    return {**info.to_json(), "trunk_seconds_saved_estimate": round(saved, 1),
            "trunk_seconds_per_epoch": round(per_epoch, 2), "break_even_epochs": break_even}
