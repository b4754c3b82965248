"""The options of `pipeline finetune` and the checks that need no model: torch-free, so
`pipeline finetune --help` stays fast and a bad combination fails before epoch 1."""

from __future__ import annotations

import importlib.util
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from pipeline.core.errors import InputError
from pipeline.core.stage_options import SIZE
from pipeline.formats import runfolder

SCHEDULES = ("step", "cosine", "plateau")
PRECISIONS = ("fp32", "bf16", "fp16")
CACHE_DTYPES = ("fp16", "bf16", "fp32")
DECODE_DEVICES = ("auto", "cpu", "cuda")


@dataclass(frozen=True)
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
    resize: int = SIZE
    jitter: tuple[int, int] | None = None
    mean: str = "auto"
    workers: int = 2
    out: Path = Path("runs/finetune")
    resume: bool = False
    seed: int = 0
    precision: str = "fp32"
    channels_last: bool = True
    max_steps: int | None = None  # a hard cap on optimizer steps per epoch (smoke runs)
    cache_features: bool = False
    cache_views: int = 8
    cache_dir: Path | None = None  # default: .feature-cache/ beside the training data
    cache_dtype: str = "fp16"
    tensorboard: Path | None = None  # also write each epoch's log.csv figures here
    decode_device: str = "auto"  # where JPEG packs decode: auto = cuda when training on CUDA


    def to_json(self) -> dict[str, Any]:
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(self).items()}


def check_config(config: FinetuneConfig) -> None:
    """Every check that needs neither torch nor the data: fail before any work."""
    _check_choice("--schedule", config.schedule, SCHEDULES)
    _check_choice("--precision", config.precision, PRECISIONS)
    _check_choice("--cache-dtype", config.cache_dtype, CACHE_DTYPES)
    _check_choice("--decode-device", config.decode_device, DECODE_DEVICES)
    if config.cache_features and config.decode_device == "cuda":
        raise InputError("--decode-device cuda decodes live training batches; --cache-features "
                         "builds its cache from CPU-decoded images (drop one of them)")
    if config.crop > config.resize:
        raise InputError(f"--crop {config.crop} is larger than --resize {config.resize}")
    if config.arch == "alexnet" and config.crop < 63:
        raise InputError(f"--crop {config.crop} is too small for AlexNet (at least 63)")
    if config.arch.startswith("vgg") and config.crop < 32:
        raise InputError(f"--crop {config.crop} is too small for VGG (at least 32)")
    if config.schedule == "plateau" and config.val is None:
        raise InputError("--schedule plateau lowers the rate when validation top-1 stops "
                         "improving: it needs --val")
    if config.cache_features and config.freeze_until in (None, "none"):
        raise InputError("--cache-features caches the frozen layers' output, and nothing is "
                         "frozen: pass --freeze-until LAYER (see `pipeline layers`)")
    if config.tensorboard is not None and importlib.util.find_spec("tensorboard") is None:
        raise InputError("--tensorboard needs the tensorboard package: pip install "
                         "'synset-pipeline[tensorboard]' (or drop --tensorboard)")
    if config.cache_views < 1:
        raise InputError("--cache-views must be at least 1")
    if (config.out / runfolder.CHECKPOINT).exists() and not config.resume:
        raise InputError(f"{config.out} already holds a run; pass --resume to continue it or "
                         "choose another --out")


def _check_choice(option: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise InputError(f"unknown {option} {value!r}; one of {', '.join(choices)}")
