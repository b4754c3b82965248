"""`make demo`: the whole chain, offline, on the embedded sample, into demo/.

No machine here reaches ImageNet or its weights, so the demo makes its own "pretrained" model
the honest way: it trains a base AlexNet from scratch on eleven source synsets (shapes and
textures), fine-tunes it on five *different* target synsets with few images per class, frozen
to --freeze and trained from a feature cache (the frozen layers run once per image and view),
trains the same target set from scratch with the same number of epochs, and reports both.
Every step is a target of the project's Makefile, run against a local mirror that serves the
sample with realistic faults; the mirror is stopped at the end, also when a step fails.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from pipeline.testing import make_sample
from pipeline.testing.serve_sample import serve_in_process

ROOT = Path(__file__).resolve().parent.parent
MIRROR_PORT = 8765


# The target synsets: rings, checkerboard, cross, zigzag, polka dots (make_sample.CLASSES
# order). Every other sample class is a source synset.
TARGET_CLASSES = range(5, 10)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("demo"), help="demo folder")
    parser.add_argument("--per-class", type=int, default=240, help="sample URLs per synset")
    parser.add_argument("--source-limit", type=int, default=150,
                        help="good images gathered per source synset")
    parser.add_argument("--target-limit", type=int, default=100,
                        help="good images gathered per target synset; --target-val of them "
                             "are held out, so few are left to train on, as in real "
                             "fine-tuning")
    parser.add_argument("--target-val", type=float, default=0.6,
                        help="share of each target synset held out for validation")
    parser.add_argument("--size", type=int, default=112, help="packed image size")
    parser.add_argument("--crop", type=int, default=96, help="network input size")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--source-epochs", type=int, default=16)
    parser.add_argument("--source-lr", type=float, default=0.005)
    parser.add_argument("--target-epochs", type=int, default=15)
    parser.add_argument("--freeze", default="conv3", help="fine-tuning: frozen up to this layer")
    parser.add_argument("--finetune-lr", type=float, default=0.003,
                        help="rate of the new fc8 and of the unfrozen pretrained layers")
    parser.add_argument("--cache-views", type=int, default=8,
                        help="augmented views of each training image in the feature cache")
    parser.add_argument("--scratch-lr", type=float, default=0.005)
    parser.add_argument("--weights", choices=["pretrain", "imagenet"], default="pretrain",
                        help="imagenet: use torchvision's cached ImageNet AlexNet instead of "
                             "pretraining on the source synsets")
    return parser.parse_args(argv)


def demo_mix() -> dict[str, float]:
    """Every fault kind of the mirror, but few 429s: a Retry-After pauses the whole host (as
    it must on the real web), and on a one-host mirror that is a pause of everything."""
    return {**make_sample.DEFAULT_MIX, "throttle": 0.002}


def mirror_port() -> int:
    """MIRROR_PORT when it is free, else any free port. A fixed port keeps the URL list (and
    so the whole chain) unchanged between two `make demo`s; the second then redoes nothing."""
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", MIRROR_PORT))
        except OSError:
            return 0
    return MIRROR_PORT


@contextmanager
def mirror(sample: Path, log_path: Path) -> Iterator[str]:
    """The sample mirror in its own process; always stopped on the way out."""
    try:
        with serve_in_process(sample, latency=0.01, max_seconds=1800, port=mirror_port(),
                              log_path=log_path) as handle:
            print(f"demo: local mirror {handle.base_url} (pid {handle.pid})", flush=True)
            yield handle.base_url
    finally:
        print("demo: mirror stopped", flush=True)


def make(target: str, **variables: str | int | float) -> None:
    """One Makefile target with the demo's variables, as a user would type it."""
    command = ["make", "--no-print-directory", "-C", str(ROOT), target,
               *(f"{name}={value}" for name, value in variables.items())]
    print("demo: $ " + " ".join(command[4:]), flush=True)
    subprocess.run(command, check=True)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.monotonic()
    out = args.out.resolve()
    sample = out / "sample"
    wnids = make_sample.make_sample(sample, classes=len(make_sample.CLASSES),
                                    per_class=args.per_class)
    target = [wnids[i] for i in TARGET_CLASSES]
    source = [wnid for wnid in wnids if wnid not in target]
    runs = out / "runs"
    common = {
        "URLS": sample / "urls.txt", "WORDS": sample / "words.txt", "RUNS": runs,
        "SIZE": args.size, "CROP": args.crop, "BATCH": args.batch, "ARCH": "alexnet",
        "GATHER_ARGS": f"--placeholder {sample / 'placeholder.png'} --timeout 2 --retries 2",
        "FINETUNE_ARGS": "--workers 2 --schedule cosine",
    }
    source_data = {**common, "DATA": out / "source", "MANIFESTS": out / "source" / "manifests",
                   "WNIDS": " ".join(source), "LIMIT": args.source_limit}
    target_data = {**common, "DATA": out / "target", "MANIFESTS": out / "target" / "manifests",
                   "WNIDS": " ".join(target), "LIMIT": args.target_limit,
                   "VAL_RATIO": args.target_val, "EPOCHS": args.target_epochs}
    finetuned = {**target_data, "RUN": "finetuned", "FREEZE": args.freeze,
                 "LR": args.finetune_lr,
                 "FINETUNE_ARGS": f"{common['FINETUNE_ARGS']} --lr-mult 1 --cache-features "
                                  f"--cache-views {args.cache_views}"}
    with mirror(sample, out / "mirror.log") as base_url:
        make_sample.build_url_list(sample, base_url, sample / "urls.txt", mix=demo_mix())
        if args.weights == "pretrain":
            make("finetune", **source_data, RUN="source", WEIGHTS="none", FREEZE="none",
                 EPOCHS=args.source_epochs, LR=args.source_lr)
            base_weights = runs / "source" / "best.pt"
        else:
            base_weights = "imagenet"
        make("finetune", **finetuned, WEIGHTS=base_weights)
        make("finetune", **target_data, RUN="scratch", WEIGHTS="none", FREEZE="none",
             LR=args.scratch_lr)
        make("report", **finetuned, WEIGHTS=base_weights, COMPARE=runs / "scratch")
        make("card", **target_data)
    print_summary(runs, args, time.monotonic() - started)
    return 0


def print_summary(runs: Path, args: argparse.Namespace, seconds: float) -> None:
    def metrics(run: str) -> dict:
        return json.loads((runs / run / "metrics.json").read_text())

    finetuned, scratch = metrics("finetuned"), metrics("scratch")
    gap = finetuned["best_val_top1"] - scratch["best_val_top1"]
    print(f"\ndemo finished in {seconds / 60:.1f} min")
    if (runs / "source" / "metrics.json").exists():
        print(f"  source model ({len(make_sample.CLASSES) - len(TARGET_CLASSES)} synsets, from "
              f"scratch): best val top-1 {metrics('source')['best_val_top1']:.1%}")
    print(f"  target synsets, fine-tuned (frozen to {args.freeze}): "
          f"best val top-1 {finetuned['best_val_top1']:.1%}")
    print(f"  target synsets, from scratch (same epochs): "
          f"best val top-1 {scratch['best_val_top1']:.1%}")
    print(f"  transfer {'beats' if gap > 0 else 'does NOT beat'} scratch by {gap:+.1%}")
    cache = finetuned.get("feature_cache")
    if cache:
        print(f"  feature cache: {args.cache_views} views per image, built in "
              f"{cache['build_seconds']:.0f} s, saved ~{cache['trunk_seconds_saved_estimate']:.0f}"
              " s of frozen-layer compute")
    print(f"  report: {runs / 'finetuned' / 'report.html'}")
    print(f"  dataset card: {runs.parent / 'target' / 'manifests' / 'croissant.json'}")


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    try:
        sys.exit(main())
    except subprocess.CalledProcessError as failure:
        print(f"demo: step failed (exit {failure.returncode}): {' '.join(failure.cmd[4:6])}; "
              "see the messages above", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        sys.exit(130)
