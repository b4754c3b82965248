"""The checkpoint format, and the project's one `torch.load`.

A checkpoint holds the architecture, the label map, the crop/resize and the normalization next
to the weights, so `evaluate` and `predict` feed a model exactly as it was trained. Everything
in it is a tensor or a plain Python value, so it loads with `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import torch

from pipeline.core.errors import InputError
from pipeline.core.fsutil import atomic_open
from pipeline.formats.manifest import ClassRecord

FORMAT = "pipeline-checkpoint-1"


def read_torch_file(path: Path, what: str) -> Any:
    """`torch.load` of a file the user named, weights only (no code runs from it); a missing,
    corrupt or foreign file is one InputError naming `what` it was meant to be."""
    if not Path(path).is_file():
        raise InputError(f"{what} {path} does not exist")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise InputError(f"{what} {path} holds Python objects that a weights-only load refuses "
                         "(a whole pickled model?): save its state_dict instead, "
                         "torch.save(model.state_dict(), PATH)") from None
    except Exception as exc:  # noqa: BLE001 - one message for any unreadable file
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InputError(f"{what} {path} is not a readable PyTorch file: {reason}") from None


def save(path: Path, payload: dict[str, Any]) -> None:
    """Atomic (temp file + rename): a kill mid-save never corrupts a checkpoint."""
    with atomic_open(path) as handle:
        torch.save({"format": FORMAT, **payload}, handle)


def load(path: Path) -> dict[str, Any]:
    payload = read_torch_file(path, "checkpoint")
    if not is_checkpoint(payload):
        raise InputError(f"{path} is not a `pipeline finetune` checkpoint")
    return payload


def is_checkpoint(payload: Any) -> bool:
    return isinstance(payload, dict) and payload.get("format") == FORMAT


def classes_state(classes: list[ClassRecord]) -> list[dict[str, str]]:
    return [{"wnid": c.wnid, "name": c.name} for c in classes]


def classes_from(state: list[dict[str, str]]) -> list[ClassRecord]:
    return [ClassRecord(i, c["wnid"], c["name"]) for i, c in enumerate(state)]

