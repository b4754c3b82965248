"""`make demo`: the whole chain, offline, on the embedded sample, into demo/.

No machine here reaches ImageNet or its weights, so the demo makes its own "pretrained" model
the honest way: it trains a base AlexNet from scratch on five source synsets, fine-tunes it
on five *different* target synsets with few images per class and `--freeze-until conv4`,
trains the same target set from scratch with the same budget, and reports both. Every step is
a target of the project's Makefile, run against a local mirror that serves the sample with
realistic faults; the mirror is stopped at the end, also when a step fails.
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

import make_sample

ROOT = Path(__file__).resolve().parent.parent
MIRROR_PORT = 8765


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("demo"), help="demo folder")
    parser.add_argument("--per-class", type=int, default=300, help="sample images per synset")
    parser.add_argument("--target-limit", type=int, default=100,
                        help="good images gathered per target synset; --target-val of them "
                             "are held out, so few are left to train on, as in real "
                             "fine-tuning")
    parser.add_argument("--target-val", type=float, default=0.6,
                        help="share of each target synset held out for validation")
    parser.add_argument("--size", type=int, default=144, help="packed image size")
    parser.add_argument("--crop", type=int, default=128, help="network input size")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--source-epochs", type=int, default=14)
    parser.add_argument("--source-lr", type=float, default=0.005)
    parser.add_argument("--target-epochs", type=int, default=12)
    parser.add_argument("--finetune-lr", type=float, default=0.0003,
                        help="rate of the new fc8; the unfrozen pretrained layers get 10x")
    parser.add_argument("--scratch-lr", type=float, default=0.005)
    parser.add_argument("--weights", choices=["pretrain", "imagenet"], default="pretrain",
                        help="imagenet: use torchvision's cached ImageNet AlexNet instead of "
                             "pretraining on the source synsets")
    return parser.parse_args(argv)


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
    log = open(log_path, "w", encoding="utf-8")  # noqa: SIM115 - closed in finally
    server = subprocess.Popen(
        [sys.executable, str(ROOT / "scripts" / "serve_sample.py"), "--root", str(sample),
         "--port", str(mirror_port()), "--latency", "0.01", "--max-seconds", "1800"],
        stdout=subprocess.PIPE, stderr=log, text=True)
    try:
        line = server.stdout.readline().strip() if server.stdout else ""
        if not line.startswith("serving "):
            raise RuntimeError(f"the sample mirror did not start (see {log_path})")
        print(f"demo: local mirror {line.split()[1]} (pid {server.pid})", flush=True)
        yield line.split()[1]
    finally:
        server.terminate()
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        log.close()
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
    wnids = make_sample.make_sample(sample, classes=10, per_class=args.per_class)
    source, target = wnids[:5], wnids[5:]
    runs = out / "runs"
    common = {
        "URLS": sample / "urls.txt", "WORDS": sample / "words.txt", "RUNS": runs,
        "SIZE": args.size, "CROP": args.crop, "BATCH": args.batch, "ARCH": "alexnet",
        "GATHER_ARGS": f"--placeholder {sample / 'placeholder.png'} --timeout 2 --retries 2",
        "FINETUNE_ARGS": "--workers 2 --schedule cosine",
    }
    source_data = {**common, "DATA": out / "source", "MANIFESTS": out / "source" / "manifests",
                   "WNIDS": " ".join(source)}
    target_data = {**common, "DATA": out / "target", "MANIFESTS": out / "target" / "manifests",
                   "WNIDS": " ".join(target), "LIMIT": args.target_limit,
                   "VAL_RATIO": args.target_val, "EPOCHS": args.target_epochs}
    finetuned = {**target_data, "RUN": "finetuned", "FREEZE": "conv4", "LR": args.finetune_lr,
                 "FINETUNE_ARGS": common["FINETUNE_ARGS"] + " --lr-mult 10"}
    with mirror(sample, out / "mirror.log") as base_url:
        make_sample.build_url_list(sample, base_url, sample / "urls.txt")
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
    print_summary(runs, time.monotonic() - started)
    return 0


def print_summary(runs: Path, seconds: float) -> None:
    def best(run: str) -> float:
        return json.loads((runs / run / "metrics.json").read_text())["best_val_top1"]

    finetuned, scratch = best("finetuned"), best("scratch")
    print(f"\ndemo finished in {seconds / 60:.1f} min")
    if (runs / "source" / "metrics.json").exists():
        print(f"  source model (5 synsets, from scratch): best val top-1 {best('source'):.1%}")
    print(f"  target synsets, fine-tuned (frozen to conv4): best val top-1 {finetuned:.1%}")
    print(f"  target synsets, from scratch (same budget):   best val top-1 {scratch:.1%}")
    print(f"  transfer {'beats' if finetuned > scratch else 'does NOT beat'} scratch by "
          f"{finetuned - scratch:+.1%}")
    print(f"  report: {runs / 'finetuned' / 'report.html'}")


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
