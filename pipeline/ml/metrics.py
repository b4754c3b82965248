"""The evaluation loop shared by `finetune` (per-epoch validation) and `evaluate`, so the
accuracy a run logs and the accuracy `evaluate` reports come from one piece of code."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from pipeline.core.progress import Progress
from pipeline.ml.data import EpochSampler, make_loader


@dataclass
class EvalResult:
    top1: float = 0.0
    top5: float = 0.0
    loss: float = 0.0
    count: int = 0
    skipped: list[str] = field(default_factory=list)
    confusion: np.ndarray = field(default_factory=lambda: np.zeros((0, 0), np.int64))
    # Per evaluated image, in data order (skipped images left out): top-1 class, its probability.
    predicted: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    confidence: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))

    def per_class_accuracy(self) -> np.ndarray:
        totals = self.confusion.sum(axis=1)
        return np.divide(np.diag(self.confusion), totals, out=np.zeros(len(totals)),
                         where=totals > 0)


def make_eval_loader(images: torch.utils.data.Dataset, batch_size: int,
                     workers: int) -> torch.utils.data.DataLoader:
    return make_loader(images, EpochSampler(len(images), shuffle=False),
                       batch_size=batch_size, workers=workers)


@torch.no_grad()
def evaluate_loader(model: nn.Module, loader: torch.utils.data.DataLoader,
                    normalization: Callable[[torch.Tensor], torch.Tensor],
                    device: torch.device, num_classes: int,
                    autocast: Callable[[], contextlib.AbstractContextManager] | None = None,
                    label: str = "evaluate") -> EvalResult:
    """Top-1, top-5 (top-k for fewer classes), mean loss and the confusion matrix."""
    was_training = model.training
    model.eval()
    result = EvalResult(confusion=np.zeros((num_classes, num_classes), np.int64))
    loss_sum, hits1, hits5 = 0.0, 0, 0
    k = min(5, num_classes)
    progress = Progress(label, total=len(loader))
    predicted, confidence = [], []
    for batch in loader:
        result.skipped += batch.skipped
        progress.update()
        if len(batch.labels) == 0:
            continue
        labels = batch.labels.to(device)
        with autocast() if autocast else contextlib.nullcontext():
            logits = model(normalization(batch.images.to(device))).float()
        loss_sum += nn.functional.cross_entropy(logits, labels, reduction="sum").item()
        top = logits.topk(k, dim=1).indices
        hits1 += int((top[:, 0] == labels).sum())
        hits5 += int((top == labels[:, None]).any(dim=1).sum())
        np.add.at(result.confusion, (labels.cpu().numpy(), top[:, 0].cpu().numpy()), 1)
        predicted.append(top[:, 0].cpu().numpy())
        confidence.append(logits.softmax(dim=1).max(dim=1).values.cpu().numpy())
        result.count += len(labels)
    progress.close()
    if predicted:
        result.predicted = np.concatenate(predicted).astype(np.int64)
        result.confidence = np.concatenate(confidence).astype(np.float32)
    model.train(was_training)
    if result.count:
        result.top1, result.top5 = hits1 / result.count, hits5 / result.count
        result.loss = loss_sum / result.count
    return result
