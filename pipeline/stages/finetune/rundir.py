"""A run folder, like timm's CheckpointSaver: config.json, log.csv (a line per epoch),
checkpoint.pt (every epoch, atomic), best.pt (a hard link to the best epoch's checkpoint, so
no second write of a few hundred MB) and metrics.json; with --tensorboard, log.csv's figures
as TensorBoard scalars too."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

from pipeline.core.fsutil import atomic_link, atomic_write_text
from pipeline.formats import checkpoint, runfolder

LOG_FIELDS = ["epoch", "lr", "train_loss", "train_top1", "val_loss", "val_top1", "val_top5",
              "skipped", "train_images", "seconds", "images_per_s"]


class RunDir:
    def __init__(self, path: Path, tensorboard: Path | None = None) -> None:
        self.path = Path(path)
        self.checkpoint = self.path / runfolder.CHECKPOINT
        self.best = self.path / runfolder.BEST
        self.tensorboard_dir = tensorboard
        self._tensorboard: Any = None  # a SummaryWriter, opened by start()

    def start(self, config: dict[str, Any]) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        write_json(self.path / runfolder.CONFIG, config)
        if self.tensorboard_dir is not None:
            # Imported here: tensorboard is optional, and only this option needs it.
            from torch.utils.tensorboard import SummaryWriter

            self._tensorboard = SummaryWriter(log_dir=str(self.tensorboard_dir))

    def record_epoch(self, row: dict[str, Any], payload: dict[str, Any], improved: bool) -> None:
        """Log line first, then the checkpoint: a resume after a kill in between redoes the
        epoch, which appends a second line for it (the last one counts)."""
        self._append_log(row)
        self._log_tensorboard(row)
        checkpoint.save(self.checkpoint, payload)
        if improved:
            atomic_link(self.checkpoint, self.best)

    def finish(self, metrics: dict[str, Any]) -> None:
        write_json(self.path / runfolder.METRICS, metrics)
        if self._tensorboard is not None:
            self._tensorboard.close()

    def saved(self) -> dict[str, Any] | None:
        return checkpoint.load(self.checkpoint) if self.checkpoint.exists() else None

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
