"""Benchmark the training input and the training loop against plain PyTorch, in one run.

`--part loop` (with `all`, the default):
1. Loader alone (2 workers, batch 32, 224 crops with flips): our loader over image files and
   over a packed HDF5 file, beside a plain torchvision `ImageFolder` + `DataLoader`.
2. Training AlexNet at 224 frozen to conv4: `pipeline finetune` in fp32 and with
   `--precision bf16`, beside a plain PyTorch loop (same model, data, frozen layers, fp32).

`--part cache`: `pipeline finetune --cache-features` against the same command without it, for
AlexNet frozen to conv4 and conv5 and VGG16 frozen to conv4 and conv5_3, at the demo's crop
(128, packed at 144) and at 224 (packed at 256): images/s per epoch (median), the one-off
cache build, the cache's size, peak memory, and validation top-1 at equal epochs (K cached
views vs live augmentation; meaningful with trained --weights).

Prints images/s, the memory of each `pipeline finetune` run (benchlib: exact max RSS of its
largest process, sampled peak PSS of its whole tree with the DataLoader workers) and ratios,
then a one-line summary per part. Usage:
    python scripts/bench/train.py [--workdir /tmp/bench-train] [--per-class 200] [--epochs 3]
                                  [--part all|loop|cache] [--cache-views 8]
                                  [--vgg-train-images 96] [--accuracy-epochs 10]
"""

from __future__ import annotations

import argparse
import csv
import json
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torchvision
from torch import nn
from torchvision import transforms

from pipeline.formats import runfolder
from pipeline.ml.data import EpochSampler, make_loader, open_images
from pipeline.ml.models import freeze, frozen_layers, layer_table
from pipeline.ml.normalization import Normalization
from pipeline.ml.preprocess import InputSpec
from pipeline.stages.label import label
from pipeline.stages.pack import pack
from pipeline.testing import make_sample

import benchlib

CLASSES = 5
CACHE_CASES = (("alexnet", "conv4"), ("alexnet", "conv5"), ("vgg16", "conv4"),
               ("vgg16", "conv5_3"))
CROPS = {128: 144, 224: 256}  # crop -> packed size (the demo's, and the classic)


def prepare(workdir: Path, per_class: int, small_train: int) -> Path:
    """Sample images, manifests and packs (at 256, and at 144 for the demo's crop), made once
    and reused; plus a small set (`small_train` training images) for VGG16, which a CPU
    runs at a few images/s."""
    sample = workdir / "sample"
    make_sample.make_sample(sample, classes=CLASSES, per_class=per_class)
    manifests = workdir / "manifests"
    if not (manifests / "train.txt").exists():
        label(sample / "files", manifests, val_ratio=0.2)
    small = workdir / f"manifests-small-{small_train}"
    if not (small / "train.txt").exists():
        shrink(manifests, small, small_train)
    for folder, name in ((manifests, ""), (small, f"-small-{small_train}")):
        for split in ("train", "val"):
            for size in CROPS.values():
                path = pack_path(workdir, split, size, name)
                if not path.exists():
                    pack(folder / f"{split}.txt", path, size=size, workers=2)
    return manifests


def shrink(manifests: Path, out: Path, train_images: int) -> None:
    """The first images of each class (train: `train_images` in all, val: half as many)."""
    out.mkdir(parents=True, exist_ok=True)
    for name in ("labels.txt", "root.txt"):
        shutil.copy(manifests / name, out / name)
    for split, count in (("train", train_images), ("val", max(CLASSES, train_images // 2))):
        kept: list[str] = []
        taken: dict[str, int] = {}
        for line in (manifests / f"{split}.txt").read_text(encoding="utf-8").splitlines():
            klass = line.rsplit(None, 1)[1]
            if taken.get(klass, 0) < count // CLASSES:
                taken[klass] = taken.get(klass, 0) + 1
                kept.append(line)
        (out / f"{split}.txt").write_text("".join(f"{line}\n" for line in kept),
                                          encoding="utf-8")


def pack_path(workdir: Path, split: str, size: int, name: str = "") -> Path:
    return workdir / (f"{split}{name}.h5" if size == 256 else f"{split}{name}-{size}.h5")


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
    with open(out / runfolder.LOG, newline="") as handle:
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


def run_finetune(workdir: Path, name: str, args: list[str],
                 quiet: benchlib.Quiet) -> dict[str, Any]:
    """One `pipeline finetune` command, measured; its log.csv and metrics.json read back."""
    out = workdir / "runs" / name
    shutil.rmtree(out, ignore_errors=True)
    benchlib.wait_for_quiet(quiet)
    run = benchlib.run_measured([sys.executable, "-m", "pipeline", "-q", "finetune", *args,
                                 "--out", str(out)], workdir / f"{name}.log",
                                sample_seconds=2.0)
    with open(out / runfolder.LOG, newline="") as handle:
        rows = list(csv.DictReader(handle))
    metrics = json.loads((out / runfolder.METRICS).read_text())
    return {"rates": [float(r["images_per_s"]) for r in rows],
            "val_top1": [float(r["val_top1"]) for r in rows], "metrics": metrics,
            "seconds": run.seconds, "max_rss_mb": run.max_rss_mb,
            "peak_pss_mb": run.peak_pss_mb, "other_load": run.other_load}


def cache_speed(workdir: Path, args: argparse.Namespace,
                quiet: benchlib.Quiet) -> list[dict[str, Any]]:
    """Per case: live vs cached images/s (median epoch), build time, size, memory."""
    results = []
    for arch, until in CACHE_CASES:
        for crop, size in CROPS.items():
            if args.cases and f"{arch}-{until}-{crop}" not in args.cases:
                continue
            # VGG16 runs at ~2-5 images/s live at 224 here: it gets the small set.
            name = f"-small-{args.vgg_train_images}" if arch.startswith("vgg") else ""
            data = ["--train", str(pack_path(workdir, "train", size, name)),
                    "--val", str(pack_path(workdir, "val", size, name))]
            common = [*data, "--arch", arch, "--weights", "none", "--freeze-until", until,
                      "--epochs", str(args.epochs), "--crop", str(crop), "--resize", str(size),
                      "--workers", "2", "--lr", "0.001"]
            name = f"{arch}-{until}-{crop}"
            live = run_finetune(workdir, f"{name}-live", common, quiet)
            cache_dir = workdir / "caches" / name
            shutil.rmtree(cache_dir, ignore_errors=True)
            cached = run_finetune(workdir, f"{name}-cached", [
                *common, "--cache-features", "--cache-views", str(args.cache_views),
                "--cache-dir", str(cache_dir)], quiet)
            results.append({"case": name, "live": live, "cached": cached})
            info = cached["metrics"]["feature_cache"]
            fast, slow = statistics.median(cached["rates"]), statistics.median(live["rates"])
            print(f"  {name:<20} live {slow:7.1f} img/s   cached {fast:8.1f} img/s "
                  f"({fast / slow:5.1f}x)   build {info['build_seconds']:6.1f} s "
                  f"(pays off after {info['break_even_epochs']} epochs)   "
                  f"cache {info['bytes'] / 2**20:7.1f} MB   peak PSS live/cached "
                  f"{live['peak_pss_mb']:.0f}/{cached['peak_pss_mb']:.0f} MB   "
                  f"other load {max(live['other_load'], cached['other_load']):.0%}", flush=True)
    return results


def cache_accuracy(workdir: Path, args: argparse.Namespace,
                   quiet: benchlib.Quiet) -> dict[str, Any]:
    """AlexNet frozen to conv5 from --weights, equal epochs: live augmentation vs K views."""
    common = ["--train", str(pack_path(workdir, "train", 144)),
              "--val", str(pack_path(workdir, "val", 144)), "--arch", "alexnet",
              "--weights", args.weights, "--freeze-until", "conv5",
              "--epochs", str(args.accuracy_epochs), "--crop", "128", "--resize", "144",
              "--workers", "2", "--lr", str(args.lr), "--schedule", "cosine"]
    live = run_finetune(workdir, "accuracy-live", common, quiet)
    cached = run_finetune(workdir, "accuracy-cached", [
        *common, "--cache-features", "--cache-views", str(args.cache_views),
        "--cache-dir", str(workdir / "caches" / "accuracy")], quiet)
    return {"live": live, "cached": cached}


def report_cache(speed: list[dict[str, Any]], accuracy: dict[str, Any] | None) -> None:
    def ratio(case: str) -> float | None:
        row = next((r for r in speed if r["case"] == case), None)
        if row is None:
            return None
        return statistics.median(row["cached"]["rates"]) / statistics.median(row["live"]["rates"])

    summary: dict[str, Any] = {f"{r['case']}_cached_vs_live": round(ratio(r["case"]), 1)
                               for r in speed}
    summary.update({f"{r['case']}_break_even_epochs":
                    r["cached"]["metrics"]["feature_cache"]["break_even_epochs"] for r in speed})
    verdicts = []
    for case, target in (("vgg16-conv5_3-224", 20), ("alexnet-conv5-224", 5)):
        measured = ratio(case)
        if measured is not None:
            verdicts.append(f"{case} >= {target}x: {'met' if measured >= target else 'MISSED'}")
    if accuracy is not None:
        live, cached = accuracy["live"], accuracy["cached"]
        print(f"accuracy, AlexNet frozen to conv5 at 128, {len(live['val_top1'])} epochs: "
              f"live best val top-1 {max(live['val_top1']):.3f} ({live['seconds']:.0f} s), "
              f"cached best {max(cached['val_top1']):.3f} ({cached['seconds']:.0f} s incl. "
              "build)")
        gap = round(max(cached["val_top1"]) - max(live["val_top1"]), 3)
        summary["cached_minus_live_best_val_top1"] = gap
        verdicts.append(f"accuracy within 1 point: {'met' if abs(gap) <= 0.01 else 'MISSED'}")
    print("summary (cache): " + json.dumps(summary) + "; targets " + ", ".join(verdicts))


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
    parser.add_argument("--part", choices=["all", "loop", "cache"], default="all")
    parser.add_argument("--cache-views", type=int, default=8)
    parser.add_argument("--vgg-train-images", type=int, default=100,
                        help="VGG16 cases train on this many images (and validate on half as "
                             "many): live VGG16 runs at a few images/s on a CPU")
    parser.add_argument("--accuracy-epochs", type=int, default=10,
                        help="0: no accuracy comparison")
    parser.add_argument("--cases", nargs="*", default=[],
                        help="only these speed cases, e.g. alexnet-conv5-224 vgg16-conv5_3-128")
    benchlib.add_quiet_arguments(parser, wait=300.0)
    args = parser.parse_args()
    torch.set_num_threads(2)
    manifests = prepare(args.workdir, args.per_class, args.vgg_train_images)
    if args.part in ("all", "loop"):
        bench_loop(args, manifests)
    if args.part in ("all", "cache"):
        quiet = benchlib.quiet_from(args)
        print(f"feature cache ({args.cache_views} views, fp16), {args.epochs} epochs per run:")
        speed = cache_speed(args.workdir, args, quiet)
        report_cache(speed, cache_accuracy(args.workdir, args, quiet)
                     if args.accuracy_epochs else None)


def bench_loop(args: argparse.Namespace, manifests: Path) -> None:
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
