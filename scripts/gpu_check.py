#!/usr/bin/env python3
"""The Python half of scripts/gpu_check.sh: prove the CUDA path on a machine with an NVIDIA GPU.

On the offline sample (pipeline.testing.make_sample), packed as JPEG at 256: the loader's images/s
with JPEG decoding in the CPU workers vs in whole batches on the GPU (nvJPEG); one epoch of
`pipeline finetune` for AlexNet (bf16, fp16) and VGG16 (bf16) from scratch with
`--decode-device cuda`: training images/s and peak GPU memory. Ends with one summary line.

    python scripts/gpu_check.py [--workdir /tmp/gpu-check] [--per-class 400]
    python scripts/gpu_check.py --cpu-dry-run   # tiny, on CPU: the same code paths, no GPU

`--cpu-dry-run` (used by the tests) runs every step at toy size on the CPU: batches are
decoded by the batched (GPU) code on CPU tensors, fp16 (CUDA only) is left out.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from pipeline.ml.data import DecodedBatches, EpochSampler, make_loader, open_images
from pipeline.ml.preprocess import InputSpec
from pipeline.stages.finetune import FinetuneConfig, finetune
from pipeline.stages.label import label
from pipeline.stages.pack import pack
from pipeline.testing import make_sample

CASES = (("alexnet", "bf16"), ("alexnet", "fp16"), ("vgg16", "bf16"))


@dataclass(frozen=True)
class Size:
    """How big the check is: the real one, or the CPU dry run's toy version."""

    classes: int
    per_class: int
    packed: int
    crop: int
    batch: int
    max_steps: int | None


FULL = Size(classes=5, per_class=400, packed=256, crop=224, batch=64, max_steps=None)
DRY = Size(classes=3, per_class=12, packed=72, crop=64, batch=8, max_steps=1)


def prepare(workdir: Path, size: Size) -> tuple[Path, Path]:
    """Sample images, manifests and JPEG packs (made once, reused)."""
    sample = workdir / "sample"
    make_sample.make_sample(sample, classes=size.classes, per_class=size.per_class)
    manifests = workdir / "manifests"
    if not (manifests / "train.txt").exists():
        label(sample / "files", manifests, val_ratio=0.2)
    packs = []
    for split in ("train", "val"):
        path = workdir / f"{split}-jpeg-{size.packed}.h5"
        if not path.exists():
            pack(manifests / f"{split}.txt", path, size=size.packed, encoding="jpeg",
                 workers=os.cpu_count() or 1)
        packs.append(path)
    return packs[0], packs[1]


def loader_rate(data: Path, size: Size, device: torch.device | None, workers: int) -> float:
    """Training batches per epoch as images/s, after one warm-up batch; `device` decodes
    whole batches (the GPU path), None leaves decoding to the loader workers."""
    images = open_images(data, InputSpec(size.crop, size.packed), train=True)
    if device is not None:
        images.defer_decoding()
    loader = make_loader(images, EpochSampler(len(images), shuffle=True), batch_size=size.batch,
                         workers=workers)
    batches = iter(DecodedBatches(loader, size.crop, device) if device is not None else loader)
    next(batches)
    started, seen = time.perf_counter(), 0
    for batch in batches:
        seen += len(batch.labels)
    if device is not None and device.type == "cuda":
        torch.cuda.synchronize()
    return seen / max(time.perf_counter() - started, 1e-9)


def train_case(workdir: Path, train: Path, val: Path, size: Size, arch: str, precision: str,
               cuda: bool) -> tuple[float, float]:
    """One epoch from scratch: (training images/s, peak GPU memory in GiB, 0 on CPU)."""
    out = workdir / "runs" / f"{arch}-{precision}-{time.time_ns()}"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    metrics = finetune(FinetuneConfig(
        train=train, val=val, arch=arch, weights="none", freeze_until=None, epochs=1,
        batch_size=size.batch, crop=size.crop, resize=size.packed, workers=2, out=out,
        precision=precision, max_steps=size.max_steps,
        decode_device="cuda" if cuda else "auto"))
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else 0.0
    return metrics["images_per_s"], peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/gpu-check"))
    parser.add_argument("--per-class", type=int, default=FULL.per_class)
    parser.add_argument("--cpu-dry-run", action="store_true",
                        help="Tiny versions of every step on the CPU (no GPU needed).")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    cuda = torch.cuda.is_available() and not args.cpu_dry_run
    if not cuda and not args.cpu_dry_run:
        sys.exit(f"gpu_check: torch.cuda.is_available() is False (torch {torch.__version__}, "
                 f"CUDA build {torch.version.cuda}): no usable NVIDIA GPU or driver; nothing "
                 "measured (use --cpu-dry-run to try the code paths on the CPU)")
    size = DRY if args.cpu_dry_run else Size(**{**FULL.__dict__, "per_class": args.per_class})
    started = time.monotonic()
    train, val = prepare(args.workdir, size)
    device = torch.device("cuda" if cuda else "cpu")
    workers = 2
    rates = {"cpu-decode": loader_rate(train, size, None, workers),
             "gpu-decode": loader_rate(train, size, device, workers)}
    results = []
    for arch, precision in CASES:
        if precision == "fp16" and not cuda:
            continue  # fp16 autocast is CUDA only
        speed, peak = train_case(args.workdir, train, val, size, arch, precision, cuda)
        results.append(f"{arch} {precision} {speed:.0f} img/s peak {peak:.2f} GiB")
    where = torch.cuda.get_device_name() if cuda else "CPU dry run"
    print(f"GPU CHECK OK ({where}, {time.monotonic() - started:.0f} s): loader "
          f"{rates['cpu-decode']:.0f} img/s CPU decode vs {rates['gpu-decode']:.0f} img/s "
          f"{device.type} batch decode ({workers} workers, batch {size.batch}); train "
          + "; ".join(results))


if __name__ == "__main__":
    main()
