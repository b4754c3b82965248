"""Benchmark the training input and the training loop against plain PyTorch, in one run.

1. Loader alone (2 workers, batch 32, 224 crops with flips): our loader over image files and
   over a packed HDF5 file, beside a plain torchvision `ImageFolder` + `DataLoader`.
2. Training AlexNet at 224 frozen to conv4: `pipeline finetune` in fp32 and with
   `--precision bf16`, beside a plain PyTorch loop (same model, data, frozen layers, fp32).

Prints images/s, the memory of each `pipeline finetune` run (benchlib: exact max RSS of its
largest process, sampled peak PSS of its whole tree with the DataLoader workers) and ratios,
then a one-line summary. Usage:
    python scripts/bench_train.py [--workdir /tmp/bench-train] [--per-class 200] [--epochs 3]
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torchvision
from torch import nn
from torchvision import transforms

from pipeline.checkpoint import Normalization
from pipeline.data import EpochSampler, make_loader, open_images
from pipeline.manifest import label
from pipeline.models import freeze, frozen_layers, layer_table
from pipeline.pack import pack
from pipeline.preprocess import InputSpec

import benchlib
import make_sample

CLASSES = 5


def prepare(workdir: Path, per_class: int) -> Path:
    """Sample images, manifests and packs, made once and reused."""
    sample = workdir / "sample"
    make_sample.make_sample(sample, classes=CLASSES, per_class=per_class)
    manifests = workdir / "manifests"
    if not (manifests / "train.txt").exists():
        label(sample / "files", manifests, val_ratio=0.2)
    for split in ("train", "val"):
        if not (workdir / f"{split}.h5").exists():
            pack(manifests / f"{split}.txt", workdir / f"{split}.h5", size=256, workers=2)
    return manifests


def time_loader(loader: torch.utils.data.DataLoader, batches: int) -> float:
    """Images per second over `batches` batches (at most one epoch), after a warm-up batch."""
    batches = min(batches, len(loader) - 1)
    iterator = iter(loader)
    next(iterator)
    started, images = time.perf_counter(), 0
    for _ in range(batches):
        batch = next(iterator)
        images += len(batch[1] if isinstance(batch, list | tuple) else batch.labels)
    return images / (time.perf_counter() - started)


def loader_rates(workdir: Path, manifests: Path, batches: int) -> dict[str, float]:
    spec = InputSpec(crop=224, resize=256)
    rates = {}
    for name, source in (("ours, files", manifests / "train.txt"),
                         ("ours, HDF5", workdir / "train.h5")):
        images = open_images(source, spec, train=True)
        loader = make_loader(images, EpochSampler(len(images), shuffle=True), batch_size=32,
                             workers=2)
        rates[name] = time_loader(loader, batches)
    plain = torchvision.datasets.ImageFolder(
        str(workdir / "sample" / "files"),
        transforms.Compose([transforms.Resize(256), transforms.RandomCrop(224),
                            transforms.RandomHorizontalFlip(), transforms.ToTensor()]))
    rates["plain ImageFolder"] = time_loader(
        torch.utils.data.DataLoader(plain, batch_size=32, shuffle=True, num_workers=2,
                                    persistent_workers=True), batches)
    return rates


def run_ours(workdir: Path, precision: str, args: argparse.Namespace) -> dict[str, float]:
    """`pipeline finetune` as a user runs it; speed and accuracy from its log.csv.

    Memory is this run's alone, measured by benchlib (getrusage(RUSAGE_CHILDREN) would be the
    peak over every child so far): max RSS of its largest process, exact, and peak PSS of its
    whole tree, which counts the DataLoader workers (without double counting shared pages).
    """
    out = workdir / f"run-{precision}"
    subprocess.run(["rm", "-rf", str(out)], check=True)
    run = benchlib.run_measured(
        [sys.executable, "-m", "pipeline", "-q", "finetune", "--train",
         str(workdir / "train.h5"), "--val", str(workdir / "val.h5"), "--weights", args.weights,
         "--freeze-until", "conv4", "--epochs", str(args.epochs), "--precision", precision,
         "--workers", "2", "--out", str(out), "--lr", str(args.lr)],
        workdir / f"finetune-{precision}.log", sample_seconds=2.0)
    with open(out / "log.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    rates = [float(row["images_per_s"]) for row in rows]
    return {"images_per_s": statistics.median(rates), "epoch_rates": rates,
            "val_top1": float(rows[-1]["val_top1"]),
            "max_rss_mb": run.max_rss_mb, "peak_pss_mb": run.peak_pss_mb}


def run_plain(workdir: Path, epochs: int) -> dict[str, float]:
    """The textbook loop: same model, frozen layers, data and optimizer settings, fp32."""
    torch.manual_seed(0)
    model = torchvision.models.alexnet(num_classes=CLASSES)
    freeze(model, frozen_layers(layer_table(model, "alexnet"), "conv4"))
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01,
                                momentum=0.9, weight_decay=5e-4)
    images = open_images(workdir / "train.h5", InputSpec(224, 256), train=True)
    sampler = EpochSampler(len(images), shuffle=True)
    loader = make_loader(images, sampler, batch_size=32, workers=2)
    normalize = Normalization.imagenet()
    criterion = nn.CrossEntropyLoss()
    rates = []
    for epoch in range(1, epochs + 1):
        sampler.set_epoch(epoch)
        model.train()
        seen, started = 0, time.perf_counter()
        for batch in loader:
            loss = criterion(model(normalize(batch.images)), batch.labels)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            seen += len(batch.labels)
        rates.append(seen / (time.perf_counter() - started))
    return {"images_per_s": statistics.median(rates), "epoch_rates": rates}


def epoch_rates(result: dict) -> str:
    return " ".join(f"{rate:.1f}" for rate in result["epoch_rates"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/bench-train"))
    parser.add_argument("--per-class", type=int, default=200)
    parser.add_argument("--epochs", type=int, default=3,
                        help="the median epoch's rate is reported (one disturbed epoch on a "
                             "shared machine does not decide)")
    parser.add_argument("--loader-batches", type=int, default=30)
    parser.add_argument("--weights", default="none",
                        help="start both finetune runs from this checkpoint: with trained "
                             "weights the bf16-vs-fp32 accuracy comparison means something "
                             "(from scratch, a few epochs stay near chance)")
    parser.add_argument("--lr", type=float, default=0.01, help="finetune's --lr")
    args = parser.parse_args()
    torch.set_num_threads(2)
    manifests = prepare(args.workdir, args.per_class)
    rates = loader_rates(args.workdir, manifests, args.loader_batches)
    print("loader alone (2 workers, batch 32, 224 crops):")
    for name, rate in rates.items():
        print(f"  {name:<20} {rate:8.1f} images/s")
    plain = run_plain(args.workdir, args.epochs)
    fp32 = run_ours(args.workdir, "fp32", args)
    bf16 = run_ours(args.workdir, "bf16", args)
    print(f"training AlexNet at 224, frozen to conv4, {args.epochs} epoch(s):")
    print(f"  plain PyTorch loop, fp32    {plain['images_per_s']:8.1f} images/s"
          f"   (epochs: {epoch_rates(plain)})")
    for name, result in (("pipeline finetune fp32", fp32), ("pipeline finetune bf16", bf16)):
        print(f"  {name:<27} {result['images_per_s']:8.1f} images/s"
              f"   (epochs: {epoch_rates(result)})   val top-1 {result['val_top1']:.3f}"
              f"   max RSS {result['max_rss_mb']:.0f} MB   peak PSS {result['peak_pss_mb']:.0f} MB")
    summary = {
        "hdf5_loader_vs_training": rates["ours, HDF5"] / bf16["images_per_s"],
        "hdf5_loader_vs_plain_loader": rates["ours, HDF5"] / rates["plain ImageFolder"],
        "bf16_vs_plain_fp32": bf16["images_per_s"] / plain["images_per_s"],
        "fp32_vs_plain_fp32": fp32["images_per_s"] / plain["images_per_s"],
        "bf16_minus_fp32_val_top1": bf16["val_top1"] - fp32["val_top1"],
    }
    print("summary: " + json.dumps({k: round(v, 2) for k, v in summary.items()}))


if __name__ == "__main__":
    main()
