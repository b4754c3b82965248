"""How uint8 pixels become network input: (pixels - mean) / std, saved in every checkpoint.

Apart from preprocess.py because it needs torch, which the stages that only decode images
(validate, mean, pack) never import.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from pipeline.core.errors import InputError
from pipeline.ml.preprocess import InputSpec

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


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
            array = np.load(path)
        except (OSError, ValueError) as exc:
            raise InputError(
                f"--mean {path} is not a mean image from `pipeline mean`: {exc}") from None
        # Checked before any reshaping, so a wrong file is this message, not a torch traceback.
        if not isinstance(array, np.ndarray) or array.ndim != 3 or array.shape[2] != 3:
            shape = getattr(array, "shape", type(array).__name__)
            raise InputError(f"--mean {path} has shape {shape}, expected H x W x 3")
        image = torch.from_numpy(array).float().permute(2, 0, 1)
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
