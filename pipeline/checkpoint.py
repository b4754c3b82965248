"""Checkpoints that carry their own input pipeline.

A checkpoint holds the architecture, the label map, the crop/resize and the normalization next
to the weights, so `evaluate` and `predict` feed a model exactly as it was trained. Everything
in it is a tensor or a plain Python value, so it loads with `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torchvision
from torch import nn

from pipeline.data import ClassInfo
from pipeline.errors import InputError
from pipeline.fsutil import atomic_open
from pipeline.models import IMAGENET_MEAN, IMAGENET_STD, replace_fc8
from pipeline.preprocess import InputSpec

FORMAT = "pipeline-checkpoint-1"


@dataclass
class Normalization:
    """(pixels - mean) / std on uint8 batches; mean is per channel or a whole mean image."""

    kind: str  # "channel" or "mean_image"
    mean: torch.Tensor  # 3 x 1 x 1 or 3 x crop x crop, in 0-255 units
    std: torch.Tensor  # 3 x 1 x 1, in 0-255 units

    @classmethod
    def imagenet(cls) -> Normalization:
        return cls("channel", torch.tensor(IMAGENET_MEAN).view(3, 1, 1) * 255,
                   torch.tensor(IMAGENET_STD).view(3, 1, 1) * 255)

    @classmethod
    def from_mean_file(cls, path: Path, spec: InputSpec) -> Normalization:
        """The dataset mean image (`pipeline mean`), brought to the crop the network sees."""
        try:
            image = torch.from_numpy(np.load(path)).float().permute(2, 0, 1)
        except (OSError, ValueError) as exc:
            raise InputError(
                f"--mean {path} is not a mean image from `pipeline mean`: {exc}") from None
        if image.shape[0] != 3 or image.ndim != 3:
            raise InputError(f"--mean {path} has shape {tuple(image.shape)}, expected H x W x 3")
        side = max(spec.resize, spec.crop)
        image = nn.functional.interpolate(image[None], size=(side, side), mode="bilinear",
                                          align_corners=False)[0]
        start = (side - spec.crop) // 2
        image = image[:, start:start + spec.crop, start:start + spec.crop].contiguous()
        std = _channel_std(path.with_suffix(".json"))
        return cls("mean_image", image, std.view(3, 1, 1))

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        mean = self.mean.to(images.device)
        std = self.std.to(images.device)
        return (images.float() - mean) / std

    def state(self) -> dict[str, Any]:
        return {"kind": self.kind, "mean": self.mean, "std": self.std}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> Normalization:
        return cls(state["kind"], state["mean"], state["std"])


def _channel_std(meta_path: Path) -> torch.Tensor:
    """The channel std that `pipeline mean` writes beside the mean image. Without it the
    inputs would be scaled by 1 instead of ~60: never guessed, always an error."""
    try:
        std = json.loads(meta_path.read_text(encoding="utf-8"))["std"]
        return torch.tensor(std, dtype=torch.float32).view(3)
    except (OSError, ValueError, KeyError, TypeError, RuntimeError) as exc:
        raise InputError(
            f"--mean {meta_path.with_suffix('.npy')}: its statistics {meta_path} are missing or "
            f"unreadable ({type(exc).__name__}); keep the files `pipeline mean` writes together "
            "or run it again") from None


def save(path: Path, payload: dict[str, Any]) -> None:
    """Atomic (temp file + rename): a kill mid-save never corrupts a checkpoint."""
    with atomic_open(path) as handle:
        torch.save({"format": FORMAT, **payload}, handle)


def load(path: Path) -> dict[str, Any]:
    if not Path(path).is_file():
        raise InputError(f"checkpoint {path} does not exist")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - one message for any unreadable file
        raise InputError(f"{path} is not a readable checkpoint: {exc}") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise InputError(f"{path} is not a `pipeline finetune` checkpoint")
    return payload


@dataclass
class Inference:
    """What evaluate and predict need, all taken from one checkpoint."""

    model: nn.Module
    spec: InputSpec
    normalization: Normalization
    classes: list[ClassInfo]


def inference_from(path: Path, device: torch.device) -> Inference:
    payload = load(path)
    model = torchvision.models.get_model(payload["arch"], weights=None)
    replace_fc8(model, len(payload["classes"]))
    model.load_state_dict(payload["model"])
    model.to(device).eval()
    return Inference(model, spec_from(payload["input"]),
                     Normalization.from_state(payload["normalization"]),
                     [ClassInfo(c["wnid"], c["name"]) for c in payload["classes"]])


def spec_state(spec: InputSpec) -> dict[str, Any]:
    return {"crop": spec.crop, "resize": spec.resize,
            "jitter": list(spec.jitter) if spec.jitter else None}


def spec_from(state: dict[str, Any]) -> InputSpec:
    jitter = state.get("jitter")
    return InputSpec(crop=state["crop"], resize=state["resize"],
                     jitter=tuple(jitter) if jitter else None)
