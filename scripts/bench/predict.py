#!/usr/bin/env python3
"""Benchmark `pipeline predict` on a folder: batched in loader workers (the default) against
one image at a time in the main process (`--batch-size 1 --workers 0`, which is what predict
did before it batched: decode, crop, one forward pass, next image).

The checkpoint is a real one: AlexNet at the usual 224 crop of a 256 resize, fine-tuned for
one step by `pipeline finetune` on the offline sample (the weights do not change the speed).
The images are the sample's JPEG and PNG files (320 x 300). Both runs are the whole command
(start-up included), back to back after waiting for a quiet machine, in alternating order;
the figures are medians over --repeat rounds. bf16 (`--precision bf16`) is measured too.

    python scripts/bench/predict.py [--images 2000] [--repeat 3] [--workdir /tmp/bench-predict]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

from pipeline.stages.finetune import FinetuneConfig, finetune
from pipeline.stages.label import label
from pipeline.testing import make_sample

import benchlib

WAYS = {"one at a time": ["--batch-size", "1", "--workers", "0"], "batched (default)": [],
        "batched bf16": ["--precision", "bf16"]}


def prepare(workdir: Path, images: int) -> tuple[Path, Path]:
    """The sample's image folder and a fine-tuned AlexNet checkpoint (made once)."""
    sample = workdir / "sample"
    if not (sample / "files").exists():
        make_sample.make_sample(sample, classes=10, per_class=-(-images // 10))
    checkpoint = workdir / "run" / "checkpoint.pt"
    if not checkpoint.exists():
        label(sample / "files", workdir / "manifests", val_ratio=0.1)
        finetune(FinetuneConfig(train=workdir / "manifests" / "train.txt", weights="none",
                                epochs=1, max_steps=1, batch_size=8, workers=0,
                                out=workdir / "run"))
    return sample / "files", checkpoint


def run(checkpoint: Path, folder: Path, extra: list[str], out: Path) -> float:
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "pipeline", "-q", "predict", str(checkpoint),
                    str(folder), "--out", str(out), *extra], check=True)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/bench-predict"))
    benchlib.add_quiet_arguments(parser)
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    folder, checkpoint = prepare(args.workdir, args.images)
    count = sum(1 for path in folder.rglob("*.*") if path.suffix in (".jpg", ".png"))
    quiet = benchlib.quiet_from(args)
    ratios: dict[str, list[float]] = {name: [] for name in list(WAYS)[1:]}
    seconds: dict[str, list[float]] = {name: [] for name in WAYS}
    for round_ in range(args.repeat):
        order = list(WAYS) if round_ % 2 == 0 else list(reversed(WAYS))
        timed = {}
        for name in order:
            benchlib.wait_for_quiet(quiet)
            timed[name] = run(checkpoint, folder, WAYS[name], args.workdir / "out.csv")
            seconds[name].append(timed[name])
        for name in ratios:
            ratios[name].append(timed["one at a time"] / timed[name])
        print(f"round {round_ + 1}: " + ", ".join(
            f"{name} {count / timed[name]:.0f} images/s ({timed[name]:.1f} s)" for name in order))
    for name in WAYS:
        rate = count / statistics.median(seconds[name])
        ratio = (f", {statistics.median(ratios[name]):.2f}x one at a time (median of "
                 f"{len(ratios[name])} rounds; target >= 5x)" if name in ratios else "")
        print(f"summary {name}: {rate:.0f} images/s{ratio}")


if __name__ == "__main__":
    main()
