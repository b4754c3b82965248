"""`pipeline finetune`: fine-tune a pretrained AlexNet/VGG with its lower layers frozen.

Built to be left running: one CSV line and one atomic checkpoint per epoch, `best.pt` on every
improvement, and `--resume` that continues bit-for-bit (model, optimizer, scheduler, epoch,
RNG; the data order and augmentation are functions of seed and epoch, see data.py).
Under `torchrun` it trains with DistributedDataParallel (gloo on CPU); only rank 0 writes.
"""

from __future__ import annotations

import contextlib
import csv
import json
import logging
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from pipeline import checkpoint
from pipeline.checkpoint import Normalization
from pipeline.data import EpochSampler, make_loader, open_images
from pipeline.errors import InputError
from pipeline.evaluate import EvalResult, evaluate_loader, make_eval_loader
from pipeline.fsutil import atomic_link, atomic_write_text
from pipeline.models import (
    Layer,
    build_model,
    check_arch,
    freeze,
    frozen_layers,
    layer_table,
    train_mode,
)
from pipeline.preprocess import InputSpec
from pipeline.progress import Progress

log = logging.getLogger(__name__)

LOG_FIELDS = ["epoch", "lr", "train_loss", "train_top1", "val_loss", "val_top1", "val_top5",
              "skipped", "train_images", "seconds", "images_per_s"]
SCHEDULES = ("step", "cosine", "plateau")
PRECISIONS = ("fp32", "bf16", "fp16")


@dataclass
class FinetuneConfig:
    """Defaults follow the VGG paper and Caffe's fine-tuning example: SGD, momentum 0.9,
    weight decay 5e-4 (not on biases), the new fc8 at the full rate and pretrained layers at
    a tenth of it (Caffe's lr_mult), the rate divided by 10 on a schedule."""

    train: Path
    val: Path | None = None
    arch: str = "alexnet"
    weights: str = "imagenet"
    freeze_until: str | None = "conv4"
    epochs: int = 10
    batch_size: int = 32
    lr: float = 0.01
    lr_mult: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    schedule: str = "step"
    step_epochs: int | None = None
    plateau_patience: int = 1
    label_smoothing: float = 0.0
    crop: int = 224
    resize: int = 256
    jitter: tuple[int, int] | None = None
    mean: str = "auto"
    workers: int = 2
    out: Path = Path("runs/finetune")
    resume: bool = False
    seed: int = 0
    precision: str = "fp32"
    channels_last: bool = True
    max_steps: int | None = None  # a hard cap on optimizer steps per epoch (smoke runs)

    def to_json(self) -> dict[str, Any]:
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(self).items()}


@dataclass
class _Ranks:
    rank: int = 0
    world: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def finetune(config: FinetuneConfig) -> dict[str, Any]:
    """Train; returns the final metrics (also written to OUT/metrics.json)."""
    _check(config)
    ranks = _init_distributed()
    try:
        return _Trainer(config, ranks).run()
    finally:
        if ranks.world > 1:
            dist.destroy_process_group()


def _check(config: FinetuneConfig) -> None:
    check_arch(config.arch)
    if config.schedule not in SCHEDULES:
        raise InputError(f"unknown --schedule {config.schedule!r}; one of {', '.join(SCHEDULES)}")
    if config.precision not in PRECISIONS:
        raise InputError(f"unknown --precision {config.precision!r}; one of "
                         f"{', '.join(PRECISIONS)}")
    if config.precision == "fp16" and not torch.cuda.is_available():
        raise InputError("--precision fp16 needs a CUDA GPU; on CPU use bf16 or fp32")
    if config.crop > config.resize:
        raise InputError(f"--crop {config.crop} is larger than --resize {config.resize}")
    if config.arch == "alexnet" and config.crop < 63:
        raise InputError(f"--crop {config.crop} is too small for AlexNet (at least 63)")
    if config.arch.startswith("vgg") and config.crop < 32:
        raise InputError(f"--crop {config.crop} is too small for VGG (at least 32)")
    checkpoint_path = config.out / "checkpoint.pt"
    if checkpoint_path.exists() and not config.resume:
        raise InputError(f"{config.out} already holds a run; pass --resume to continue it or "
                         "choose another --out")


def _init_distributed() -> _Ranks:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    cuda = torch.cuda.is_available()
    if world <= 1:
        return _Ranks(device=torch.device("cuda" if cuda else "cpu"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dist.init_process_group("nccl" if cuda else "gloo")
    device = torch.device(f"cuda:{local_rank}" if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(device)
    return _Ranks(dist.get_rank(), world, device)


class _Trainer:
    def __init__(self, config: FinetuneConfig, ranks: _Ranks) -> None:
        self.config, self.ranks = config, ranks
        torch.manual_seed(config.seed)
        self.spec = InputSpec(config.crop, config.resize, config.jitter)
        self.train_images = open_images(config.train, self.spec, train=True, seed=config.seed)
        self.classes = self.train_images.classes
        val_images = open_images(config.val, self.spec, train=False) if config.val else None
        # Built once: its persistent workers then serve every epoch's validation.
        self.val_loader = (make_eval_loader(val_images, config.batch_size, config.workers)
                           if val_images is not None and ranks.is_main else None)
        self.model = build_model(config.arch, len(self.classes), config.weights)
        self.normalization = self._normalization()
        layers = layer_table(self.model, config.arch)
        self.frozen = frozen_layers(layers, config.freeze_until)
        self.frozen_batchnorms = freeze(self.model, self.frozen)
        self.model.to(ranks.device)
        if config.channels_last:
            self.model.to(memory_format=torch.channels_last)
        # fused: decay, momentum and update in one pass per tensor; on a CPU the unfused
        # version's temporaries for fc6/fc7 (54M weights) cost more than their matmuls.
        self.optimizer = torch.optim.SGD(self._param_groups(layers), lr=config.lr,
                                         momentum=config.momentum, fused=True)
        self.scheduler = self._scheduler()
        self.scaler = torch.amp.GradScaler("cuda", enabled=config.precision == "fp16")
        self.criterion = nn.CrossEntropyLoss(label_smoothing=config.label_smoothing)
        self.net: nn.Module = self.model
        if ranks.world > 1:
            self.net = nn.parallel.DistributedDataParallel(
                self.model, device_ids=[ranks.device.index] if ranks.device.type == "cuda"
                else None)
        self.sampler = EpochSampler(len(self.train_images), shuffle=True, seed=config.seed,
                                    rank=ranks.rank, world=ranks.world)
        self.loader = make_loader(self.train_images, self.sampler,
                                  batch_size=config.batch_size, workers=config.workers)
        self.start_epoch = 1
        self.best_top1 = -1.0

    def _normalization(self) -> Normalization:
        """--mean: "imagenet", a mean.npy, or "auto" (the weights' own statistics)."""
        mean = self.config.mean
        if mean == "imagenet":
            return Normalization.imagenet()
        if mean != "auto":
            return Normalization.from_mean_file(Path(mean), self.spec)
        weights = self.config.weights
        if weights not in ("imagenet", "none"):
            # A checkpoint of ours says how its weights were trained; a torchvision .pth does not.
            with contextlib.suppress(InputError):
                return Normalization.from_state(checkpoint.load(Path(weights))["normalization"])
        return Normalization.imagenet()

    def _param_groups(self, layers: list[Layer]) -> list[dict[str, Any]]:
        """fc8 (new) at --lr; pretrained unfrozen layers at --lr x --lr-mult; no decay on biases."""
        config = self.config
        pretrained_rate = config.lr if config.weights == "none" else config.lr * config.lr_mult
        fc8 = {id(p) for p in layers[-1].parameters()}
        groups: dict[tuple[float, float], list[nn.Parameter]] = {}
        for parameter in self.model.parameters():
            if not parameter.requires_grad:
                continue
            rate = config.lr if id(parameter) in fc8 else pretrained_rate
            decay = config.weight_decay if parameter.ndim > 1 else 0.0
            groups.setdefault((rate, decay), []).append(parameter)
        return [{"params": params, "lr": rate, "weight_decay": decay}
                for (rate, decay), params in groups.items()]

    def _scheduler(self) -> Any:
        config = self.config
        if config.schedule == "cosine":
            return torch.optim.lr_scheduler.CosineAnnealingLR(self.optimizer,
                                                              T_max=max(1, config.epochs))
        if config.schedule == "plateau":
            return torch.optim.lr_scheduler.ReduceLROnPlateau(
                self.optimizer, mode="max", factor=0.1, patience=config.plateau_patience)
        step = config.step_epochs or max(1, math.ceil(config.epochs / 3))
        return torch.optim.lr_scheduler.StepLR(self.optimizer, step_size=step, gamma=0.1)

    def run(self) -> dict[str, Any]:
        config = self.config
        if config.resume:
            self._restore()
        if self.ranks.is_main:
            config.out.mkdir(parents=True, exist_ok=True)
            _write_json(config.out / "config.json", config.to_json())
            self._log_summary()
        last: dict[str, Any] = {}
        for epoch in range(self.start_epoch, config.epochs + 1):
            last = self._epoch(epoch)
        if self.ranks.is_main:
            metrics = {"epochs": config.epochs, "best_val_top1": self.best_top1, **last}
            _write_json(config.out / "metrics.json", metrics)
            return metrics
        return {}

    def _log_summary(self) -> None:
        trainable = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        total = sum(p.numel() for p in self.model.parameters())
        frozen = ", ".join(layer.name for layer in self.frozen) or "nothing"
        log.info("%s: %d classes, %d train images; frozen: %s; %s of %s parameters trainable;"
                 " device %s, precision %s, %d rank(s)", self.config.arch, len(self.classes),
                 len(self.train_images), frozen, f"{trainable:,}", f"{total:,}",
                 self.ranks.device, self.config.precision, self.ranks.world)

    def _autocast(self) -> contextlib.AbstractContextManager:
        precision = self.config.precision
        if precision == "fp32":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if precision == "bf16" else torch.float16
        return torch.autocast(self.ranks.device.type, dtype=dtype)

    def _epoch(self, epoch: int) -> dict[str, Any]:
        config = self.config
        started = time.monotonic()
        self.sampler.set_epoch(epoch)
        train_mode(self.net, self.frozen_batchnorms)
        lr = max(group["lr"] for group in self.optimizer.param_groups)
        progress = Progress(f"epoch {epoch}/{config.epochs}", total=self._steps())
        loss_sum, correct, seen, skipped = 0.0, 0, 0, 0
        for step, batch in enumerate(self.loader):
            if config.max_steps is not None and step >= config.max_steps:
                break
            skipped += len(batch.skipped)
            if len(batch.labels) < 2:  # nothing to learn from; BatchNorm cannot take 1
                continue
            loss, hits = self._step(batch)
            loss_sum += loss * len(batch.labels)
            correct += hits
            seen += len(batch.labels)
            progress.status = f"loss {loss_sum / seen:.3f} top1 {correct / seen:.3f}"
            progress.update(count="skipped" if batch.skipped else None)
        progress.close()
        if self.ranks.world > 1:  # the epoch's figures over all ranks, not rank 0's share
            totals = torch.tensor([loss_sum, correct, seen, skipped], dtype=torch.float64)
            dist.all_reduce(totals)
            loss_sum, correct, seen, skipped = totals[0].item(), *map(int, totals[1:].tolist())
        seconds = time.monotonic() - started
        row = {"epoch": epoch, "lr": lr, "train_loss": loss_sum / max(seen, 1),
               "train_top1": correct / max(seen, 1), "skipped": skipped,
               "train_images": seen, "seconds": round(seconds, 2),
               "images_per_s": round(seen / seconds, 2)}
        result = self._validate()
        if result is not None:
            row.update(val_loss=result.loss, val_top1=result.top1, val_top5=result.top5)
        self._step_scheduler(result)
        if self.ranks.is_main:
            self._record(epoch, row, result)
        return row

    def _steps(self) -> int:
        steps = len(self.loader)
        return min(steps, self.config.max_steps) if self.config.max_steps else steps

    def _step(self, batch: Any) -> tuple[float, int]:
        device = self.ranks.device
        images = self.normalization(batch.images.to(device, non_blocking=True))
        if self.config.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        labels = batch.labels.to(device, non_blocking=True)
        with self._autocast():
            logits = self.net(images)
            loss = self.criterion(logits.float(), labels)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        return loss.item(), int((logits.argmax(1) == labels).sum())

    def _validate(self) -> EvalResult | None:
        """Rank 0 evaluates the whole validation set; the others wait for its top-1."""
        if self.config.val is None:
            return None
        result = None
        if self.val_loader is not None:
            result = evaluate_loader(self.model, self.val_loader, self.normalization,
                                     self.ranks.device, len(self.classes), self._autocast,
                                     label="  validate")
        if self.ranks.world > 1:
            top1 = torch.tensor([result.top1 if result else 0.0])
            dist.broadcast(top1, src=0)
            if result is None:
                result = EvalResult(top1=float(top1[0]))
        return result

    def _step_scheduler(self, result: EvalResult | None) -> None:
        if isinstance(self.scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            if result is None:
                raise InputError("--schedule plateau needs --val")
            self.scheduler.step(result.top1)
        else:
            self.scheduler.step()

    def _record(self, epoch: int, row: dict[str, Any], result: EvalResult | None) -> None:
        out = self.config.out
        _append_csv(out / "log.csv", row)
        top1 = result.top1 if result else row["train_top1"]
        improved = top1 > self.best_top1
        self.best_top1 = max(self.best_top1, top1)
        checkpoint.save(out / "checkpoint.pt", self._payload(epoch))
        if improved:  # the same bytes: a link, not a second write of a few hundred MB
            atomic_link(out / "checkpoint.pt", out / "best.pt")
        val = (f"val loss {result.loss:.4f} top1 {result.top1:.3f} top5 {result.top5:.3f}"
               if result else "no validation set")
        log.info("epoch %d: train loss %.4f top1 %.3f | %s | %.1f img/s, %d skipped%s", epoch,
                 row["train_loss"], row["train_top1"], val, row["images_per_s"], row["skipped"],
                 " | best so far" if improved else "")

    def _payload(self, epoch: int) -> dict[str, Any]:
        return {
            "arch": self.config.arch,
            "classes": [{"wnid": c.wnid, "name": c.name} for c in self.classes],
            "input": checkpoint.spec_state(self.spec),
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
        path = self.config.out / "checkpoint.pt"
        if not path.exists():
            log.info("no checkpoint in %s yet: starting from epoch 1", self.config.out)
            return
        payload = checkpoint.load(path)
        if payload["arch"] != self.config.arch or len(payload["classes"]) != len(self.classes):
            raise InputError(f"{path} was trained as {payload['arch']} with "
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


def _append_csv(path: Path, row: dict[str, Any]) -> None:
    new = not path.exists()
    with open(path, "a", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=LOG_FIELDS)
        if new:
            writer.writeheader()
        writer.writerow({k: (round(v, 6) if isinstance(v, float) else v)
                         for k, v in row.items()})
        handle.flush()


def _write_json(path: Path, data: dict[str, Any]) -> None:
    atomic_write_text(path, json.dumps(data, indent=2) + "\n")
