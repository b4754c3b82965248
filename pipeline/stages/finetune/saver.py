"""The run folder's writer and reader, like timm's CheckpointSaver: config.json, log.csv (a
line per epoch), checkpoint.pt (atomic; every --checkpoint-every seconds, and for the best and
the last epoch), best.pt (a hard link to the best epoch's
checkpoint, so no second write of a few hundred MB), metrics.json; with --tensorboard,
log.csv's figures as TensorBoard scalars too. Saving a checkpoint and restoring it live here
side by side, so what --resume reads is by construction what an epoch wrote."""

from __future__ import annotations

import csv
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pipeline.core.errors import InputError
from pipeline.core.fsutil import atomic_link, atomic_write_text
from pipeline.formats import checkpoint, runfolder
from pipeline.formats.manifest import ClassRecord
from pipeline.ml.normalization import Normalization
from pipeline.ml.preprocess import InputSpec

log = logging.getLogger(__name__)

LOG_FIELDS = ["epoch", "lr", "train_loss", "train_top1", "val_loss", "val_top1", "val_top5",
              "skipped", "train_images", "seconds", "images_per_s"]


@dataclass
class TrainingState:
    """Everything an epoch changes, hence what a checkpoint saves and --resume restores
    (with the RNG); normalization too, since --resume must feed the model as before."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any  # an LRScheduler, or ReduceLROnPlateau
    scaler: torch.amp.GradScaler
    normalization: Normalization
    epoch: int = 0  # the last finished epoch
    best_top1: float = -1.0


@dataclass(frozen=True)
class RunIdentity:
    """What the model is: saved beside the weights so evaluate, predict and export feed it
    exactly as it was trained, and so a resume of another run is refused."""

    arch: str
    classes: list[ClassRecord]
    spec: InputSpec
    config: dict[str, Any]


class RunSaver:
    """`every`: seconds between checkpoints; the best and the last epoch are always saved."""

    def __init__(self, path: Path, identity: RunIdentity, tensorboard: Path | None = None,
                 every: float = 0.0) -> None:
        self.path = Path(path)
        self.identity = identity
        self.every = every
        self._saved_at = time.monotonic()
        self.checkpoint = self.path / runfolder.CHECKPOINT
        self.best = self.path / runfolder.BEST
        self.tensorboard_dir = tensorboard
        self._tensorboard: Any = None  # a SummaryWriter, opened by start()

    def restore(self, state: TrainingState) -> None:
        """Load the run's checkpoint into `state` (and the RNG); nothing when there is none."""
        payload = checkpoint.load(self.checkpoint) if self.checkpoint.exists() else None
        if payload is None:
            log.info("no checkpoint in %s yet: starting from epoch 1", self.path)
            return
        if (payload["arch"] != self.identity.arch
                or len(payload["classes"]) != len(self.identity.classes)):
            raise InputError(f"{self.checkpoint} was trained as {payload['arch']} with "
                             f"{len(payload['classes'])} classes; it cannot resume this run")
        state.model.load_state_dict(payload["model"])
        state.optimizer.load_state_dict(payload["optimizer"])
        state.scheduler.load_state_dict(payload["scheduler"])
        state.scaler.load_state_dict(payload["scaler"])
        state.normalization = Normalization.from_state(payload["normalization"])
        state.epoch, state.best_top1 = payload["epoch"], payload["best_top1"]
        torch.set_rng_state(payload["rng"])
        log.info("resuming %s after epoch %d", self.path, payload["epoch"])

    def start(self) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        write_json(self.path / runfolder.CONFIG, self.identity.config)
        if self.tensorboard_dir is not None:
            # Imported here: tensorboard is optional, and only this option needs it.
            from torch.utils.tensorboard import SummaryWriter

            self._tensorboard = SummaryWriter(log_dir=str(self.tensorboard_dir))

    def record_epoch(self, row: dict[str, Any], state: TrainingState, *, improved: bool,
                     last: bool) -> bool:
        """Log line first, then the checkpoint when it is due (the best epoch, the last one,
        or `every` seconds after the previous one): a resume after a kill in between redoes
        the epochs since, appending a second line for each (the last one counts). Whether a
        checkpoint was written."""
        self._append_log(row)
        self._log_tensorboard(row)
        due = improved or last or time.monotonic() - self._saved_at >= self.every
        if due:
            checkpoint.save(self.checkpoint, self._payload(state))
            self._saved_at = time.monotonic()
        if improved:
            atomic_link(self.checkpoint, self.best)
        return due

    def finish(self, metrics: dict[str, Any]) -> None:
        write_json(self.path / runfolder.METRICS, metrics)
        if self._tensorboard is not None:
            self._tensorboard.close()

    def _payload(self, state: TrainingState) -> dict[str, Any]:
        identity = self.identity
        return {
            "arch": identity.arch,
            "classes": checkpoint.classes_state(identity.classes),
            "input": identity.spec.to_state(),
            "normalization": state.normalization.state(),
            "model": state.model.state_dict(),
            "optimizer": state.optimizer.state_dict(),
            "scheduler": state.scheduler.state_dict(),
            "scaler": state.scaler.state_dict(),
            "epoch": state.epoch,
            "best_top1": state.best_top1,
            "rng": torch.get_rng_state(),
            "config": identity.config,
        }

    def _append_log(self, row: dict[str, Any]) -> None:
        path = self.path / runfolder.LOG
        new = not path.exists()
        with open(path, "a", newline="", encoding="utf-8") as handle:
            writer = csv.DictWriter(handle, fieldnames=LOG_FIELDS)
            if new:
                writer.writeheader()
            writer.writerow({k: (round(v, 6) if isinstance(v, float) else v)
                             for k, v in row.items() if k in LOG_FIELDS})
            handle.flush()

    def _log_tensorboard(self, row: dict[str, Any]) -> None:
        """log.csv's figures under its column names, the epoch as the step; flushed every
        epoch so a live TensorBoard sees it (a resumed epoch is simply logged again)."""
        if self._tensorboard is None:
            return
        for field in LOG_FIELDS[1:]:
            if field in row:
                self._tensorboard.add_scalar(field, row[field], global_step=row["epoch"])
        self._tensorboard.flush()


def write_json(path: Path, data: dict[str, Any]) -> None:
    atomic_write_text(path, json.dumps(data, indent=2) + "\n")
