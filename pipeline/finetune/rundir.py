"""A run folder, like timm's CheckpointSaver: config.json, log.csv (a line per epoch),
checkpoint.pt (every epoch, atomic), best.pt (a hard link to the best epoch's checkpoint, so
no second write of a few hundred MB) and metrics.json."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

from pipeline import checkpoint
from pipeline.finetune.options import CHECKPOINT_NAME
from pipeline.fsutil import atomic_link, atomic_write_text

LOG_FIELDS = ["epoch", "lr", "train_loss", "train_top1", "val_loss", "val_top1", "val_top5",
              "skipped", "train_images", "seconds", "images_per_s"]


class RunDir:
    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.checkpoint = self.path / CHECKPOINT_NAME
        self.best = self.path / "best.pt"

    def start(self, config: dict[str, Any]) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        write_json(self.path / "config.json", config)

    def record_epoch(self, row: dict[str, Any], payload: dict[str, Any], improved: bool) -> None:
        """Log line first, then the checkpoint: a resume after a kill in between redoes the
        epoch, which appends a second line for it (the last one counts)."""
        self._append_log(row)
        checkpoint.save(self.checkpoint, payload)
        if improved:
            atomic_link(self.checkpoint, self.best)

    def finish(self, metrics: dict[str, Any]) -> None:
        write_json(self.path / "metrics.json", metrics)

    def saved(self) -> dict[str, Any] | None:
        return checkpoint.load(self.checkpoint) if self.checkpoint.exists() else None

    def _append_log(self, row: dict[str, Any]) -> None:
        path = self.path / "log.csv"
        new = not path.exists()
        with open(path, "a", newline="", encoding="utf-8") as handle:
            writer = csv.DictWriter(handle, fieldnames=LOG_FIELDS)
            if new:
                writer.writeheader()
            writer.writerow({k: (round(v, 6) if isinstance(v, float) else v)
                             for k, v in row.items() if k in LOG_FIELDS})
            handle.flush()


def write_json(path: Path, data: dict[str, Any]) -> None:
    atomic_write_text(path, json.dumps(data, indent=2) + "\n")
