"""One epoch of training as a free function over explicit arguments (like torchvision's
reference `train_one_epoch`): the same loop trains from images and from cached features."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import nn

from pipeline.core.progress import Progress
from pipeline.ml.data import Batch
from pipeline.ml.models import autocast


@dataclass
class EpochStats:
    loss_sum: float = 0.0
    correct: int = 0
    seen: int = 0
    skipped: int = 0

    @property
    def loss(self) -> float:
        return self.loss_sum / max(self.seen, 1)

    @property
    def top1(self) -> float:
        return self.correct / max(self.seen, 1)


def train_one_epoch(net: nn.Module, batches: Iterable[Batch], *,
                    inputs: Callable[[torch.Tensor], torch.Tensor],
                    optimizer: torch.optim.Optimizer, criterion: nn.Module,
                    scaler: torch.amp.GradScaler, precision: str, device: torch.device,
                    steps: int, max_steps: int | None = None,
                    label: str = "train") -> EpochStats:
    """`inputs` turns a batch's `images` (uint8 pixels, or cached features) into what `net`
    takes. Batches of fewer than two samples are skipped (BatchNorm cannot take one)."""
    stats = EpochStats()
    progress = Progress(label, total=min(steps, max_steps) if max_steps else steps)
    for step, batch in enumerate(batches):
        if max_steps is not None and step >= max_steps:
            break
        stats.skipped += len(batch.skipped)
        if len(batch.labels) < 2:
            continue
        labels = batch.labels.to(device, non_blocking=True)
        with autocast(precision, device):
            logits = net(inputs(batch.images))
            loss = criterion(logits.float(), labels)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        stats.loss_sum += loss.item() * len(labels)
        stats.correct += int((logits.argmax(1) == labels).sum())
        stats.seen += len(labels)
        progress.status = f"loss {stats.loss:.3f} top1 {stats.top1:.3f}"
        progress.update(count="skipped" if batch.skipped else None)
    progress.close()
    return stats
