#!/usr/bin/env python3
"""Benchmark `pipeline label`'s near-duplicate search: hashing and grouping.

Hashing is measured on real JPEG/PNG files of the synthetic sample (pipeline.testing.make_sample),
the rate extrapolated to 10,000 and 100,000 images. Grouping runs on synthetic hashes at
10,000 and 100,000 images (uniform random 64/256-bit hashes, a share of them planted as
near copies 0-10 coarse bits and 0-60 fine bits away): it must find every planted pair, and
at --check images it is compared with brute force.

    python scripts/bench/dedup.py [--hash-images 600] [--sizes 10000 100000] [--workers 2]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from pipeline.core.parallel import imap  # noqa: E402
from pipeline.core.perceptual import FINE_WORDS, HashTable, near_pairs  # noqa: E402
from pipeline.core.stage_options import LABEL  # noqa: E402
from pipeline.stages.label import FINE_DISTANCE, hash_file  # noqa: E402
from pipeline.testing import make_sample  # noqa: E402


def time_hashing(images: int, workers: int) -> float:
    """Images per second: SHA-256 plus perceptual hash, decoding each file once."""
    classes = 10
    with tempfile.TemporaryDirectory() as folder:
        make_sample.make_sample(Path(folder), classes=classes,
                                per_class=max(1, images // classes), workers=workers)
        files = sorted((Path(folder) / "files").rglob("*.*"))
        started = time.perf_counter()
        for _ in imap(hash_file, files, workers):
            pass
        return len(files) / (time.perf_counter() - started)


def synthetic(count: int, share: float, rng: np.random.Generator) -> tuple[list, set]:
    """Random hashes with `share` of them near copies of another; the planted pairs."""
    coarse = rng.integers(0, 2**64, count, dtype=np.uint64)
    fine = rng.integers(0, 2**64, (count, FINE_WORDS), dtype=np.uint64)
    copies = int(count * share)
    planted = set()
    for k, source in enumerate(rng.integers(0, count - copies, copies)):
        target = count - copies + k
        flips = rng.choice(64, rng.integers(0, LABEL.near_distance + 1), replace=False)
        coarse[target] = coarse[source] ^ np.uint64(sum(1 << int(b) for b in flips))
        fine[target] = fine[source]
        for bit in rng.choice(256, rng.integers(0, FINE_DISTANCE - 3), replace=False):
            fine[target, bit // 64] ^= np.uint64(1 << int(bit % 64))
        planted.add((int(source), int(target)))
    views = [[(int(c), tuple(int(w) for w in f))] for c, f in zip(coarse, fine, strict=True)]
    return views, planted


def brute_force(table: HashTable) -> set[tuple[int, int]]:
    coarse = np.bitwise_count(table.coarse[:, None] ^ table.coarse[None, :])
    found = set()
    for i, j in zip(*np.nonzero(coarse <= LABEL.near_distance), strict=True):
        fine = int(np.bitwise_count(table.fine[i] ^ table.fine[j]).sum())
        if i < j and fine <= FINE_DISTANCE:
            found.add((int(i), int(j)))
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hash-images", type=int, default=600)
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--share", type=float, default=0.05, help="planted near copies")
    parser.add_argument("--check", type=int, default=3000, help="brute-force check size")
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    rng = np.random.default_rng(0)

    rate = time_hashing(args.hash_images, args.workers)
    print(f"hashing: {rate:.0f} images/s with {args.workers} worker(s) "
          f"(measured on {args.hash_images} sample images)")
    views, _ = synthetic(args.check, args.share, rng)
    table = HashTable(views)
    exact = near_pairs(table, LABEL.near_distance, FINE_DISTANCE) == brute_force(table)
    print(f"check: grouping == brute force at {args.check} images: {exact}")
    results = []
    for size in args.sizes:
        views, planted = synthetic(size, args.share, rng)
        started = time.perf_counter()
        pairs = near_pairs(HashTable(views), LABEL.near_distance, FINE_DISTANCE)
        seconds = time.perf_counter() - started
        found = len(planted & pairs) / max(1, len(planted))
        results.append((size, size / rate, seconds))
        print(f"grouping {size:>7,} images: {seconds:6.2f} s, {len(pairs):,} pair(s), "
              f"planted pairs found {found:.1%}")
    print("summary (hashing extrapolated from the measured rate; grouping measured):")
    for size, hashing, grouping in results:
        print(f"  {size:>7,} images: hashing ~{hashing:7.0f} s, grouping {grouping:6.2f} s")


if __name__ == "__main__":
    main()
