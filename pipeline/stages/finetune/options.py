"""The options of `pipeline finetune` and the checks that need no model: torch-free, so
`pipeline finetune --help` stays fast and a bad combination fails before epoch 1."""

from __future__ import annotations

import importlib.util
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from pipeline.core.errors import InputError
from pipeline.core.options import option
from pipeline.core.stage_options import PRECISIONS, SIZE
from pipeline.formats import runfolder
from pipeline.ml.archs import ARCHS

SCHEDULES = ("step", "cosine", "plateau")
CACHE_DTYPES = ("fp16", "bf16", "fp32")
CACHE_MODES = ("off", "on", "auto")  # --cache-features
DECODE_DEVICES = ("auto", "cpu", "cuda")


def _none_is_none(layer: str) -> str | None:
    return None if layer == "none" else layer


@dataclass(frozen=True)
class FinetuneConfig:
    """Defaults follow the VGG paper and Caffe's fine-tuning example: SGD, momentum 0.9,
    weight decay 5e-4 (not on biases), the new fc8 at the full rate and pretrained layers at
    a tenth of it (Caffe's lr_mult), the rate divided by 10 on a schedule."""

    train: Path = option(type=Path, required=True, help=(
        "Training data: a manifest (manifests/train.txt) or a packed .h5 file."))
    val: Path | None = option(None, type=Path, help=(
        "Validation data (manifest or .h5), evaluated after every epoch."))
    arch: str = option("alexnet", choices=ARCHS, help="The network to fine-tune.")
    weights: str = option("imagenet", help=(
        "imagenet (torchvision's cache), none (from scratch), or a .pt/.pth file."))
    freeze_until: str | None = option("conv4", metavar="NAME", parse=_none_is_none, help=(
        "Freeze this layer and all before it (see `pipeline layers`); 'none' trains "
        "everything."))
    epochs: int = option(10, min=1, help="Passes over the training data.")
    batch_size: int = option(32, min=1, help="Images per step (per rank under torchrun).")
    lr: float = option(0.01, min=0, min_open=True, help=(
        "Learning rate of the new fc8 (and of all layers with --weights none)."))
    lr_mult: float = option(0.1, min=0, help=(
        "Pretrained unfrozen layers learn at LR x LR_MULT (Caffe's lr_mult)."))
    momentum: float = option(0.9, min=0, max=1, help="SGD momentum.")
    weight_decay: float = option(5e-4, min=0, help="L2 on weights (not biases).")
    schedule: str = option("step", choices=SCHEDULES, help=(
        "step: /10 every --step-epochs; plateau: /10 when validation top-1 stops improving "
        "(the VGG paper's rule)."))
    step_epochs: int | None = option(None, type=int, min=1, help=(
        "Epochs between /10 steps.  [default: a third of --epochs]"))
    plateau_patience: int = 1
    label_smoothing: float = option(0.0, min=0, max=1, max_open=True, help=(
        "Share of the target spread over the other classes."))
    crop: int = option(224, min=8, help="Network input size.")
    resize: int = option(SIZE, min=8, help="Shorter side before cropping.")
    jitter: tuple[int, int] | None = option(
        None, flag="--scale-jitter", type=int, min=8, nargs=2, metavar="MIN MAX", parse=tuple,
        help="Train with the shorter side drawn from [MIN, MAX] (VGG: 256 512).")
    mean: str = option("auto", help=(
        "Normalization: auto (the weights' own), imagenet, or a mean.npy from `pipeline "
        "mean`."))
    workers: int = option(2, min=0, help="Loader processes.")
    out: Path = option(Path("runs/finetune"), path="dir", help="Run folder.")
    resume: bool = option(False, help="Continue the run in --out from its checkpoint.")
    checkpoint_every: float = option(300.0, min=0, help=(
        "Seconds between checkpoints (checkpoint.pt, for --resume); the best epoch (best.pt) "
        "and the last one are always saved, 0 saves every epoch. An AlexNet checkpoint with "
        "its optimizer is ~450 MB: with the feature cache an epoch can take less time than "
        "writing it."))
    seed: int = option(0, help="Seed of initialisation, sampling and augmentation.")
    precision: str = option("fp32", choices=PRECISIONS, help=(
        "bf16 autocast on CPU/GPU, fp16 (+grad scaling) on CUDA."))
    channels_last: bool = option(True, flag="--channels-last/--no-channels-last", help=(
        "NHWC memory format (faster convolutions on CPUs with oneDNN and on tensor-core "
        "GPUs)."))
    max_steps: int | None = option(None, type=int, min=1, hidden=True, help=(
        "A hard cap on optimizer steps per epoch (smoke runs)."))
    cache_features: str = option("off", choices=CACHE_MODES, flag_value="on", help=(
        "Compute the frozen layers' output once per image and view, store it, and train the "
        "rest from it: much faster per epoch, after a build that costs about --cache-views "
        "live epochs (docs/TRAINING.md). auto: build it only when the planned epochs repay "
        "the build, as measured on its first batches (a finished cache is always used). "
        "The bare flag means on."))
    cache_views: int = option(8, min=1, help=(
        "Augmented views cached per training image (view 0: the centre crop); each epoch "
        "trains on one of them."))
    cache_dir: Path | None = option(None, type=Path, path="dir", help=(
        "Where caches live, shared by runs with the same key.  [default: .feature-cache/ "
        "beside the training data]"))
    cache_dtype: str = option("fp16", choices=CACHE_DTYPES, help="Storage type of cached "
                                                                  "features.")
    tensorboard: Path | None = option(None, type=Path, path="dir", help=(
        "Also log every epoch's figures (those of log.csv) to TensorBoard in this folder "
        "(needs the tensorboard package)."))
    decode_device: str = option("auto", choices=DECODE_DEVICES, help=(
        "Where JPEG packs (pack --encoding jpeg) are decoded: cpu (loader workers), cuda "
        "(whole batches with nvJPEG, crops on the GPU), auto (cuda when training on CUDA)."))

    def to_json(self) -> dict[str, Any]:
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(self).items()}


def check_config(config: FinetuneConfig) -> None:
    """Every check that needs neither torch nor the data: fail before any work."""
    _check_choice("--schedule", config.schedule, SCHEDULES)
    _check_choice("--precision", config.precision, PRECISIONS)
    _check_choice("--cache-dtype", config.cache_dtype, CACHE_DTYPES)
    _check_choice("--decode-device", config.decode_device, DECODE_DEVICES)
    _check_choice("--cache-features", config.cache_features, CACHE_MODES)
    if config.cache_features != "off" and config.decode_device == "cuda":
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
    if config.cache_features != "off" and config.freeze_until in (None, "none"):
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
