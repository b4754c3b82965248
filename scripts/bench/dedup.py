#!/usr/bin/env python3
"""Benchmark `pipeline label`'s near-duplicate search: hashing and grouping.

Hashing is measured on real JPEG/PNG files of the synthetic sample (pipeline.testing.make_sample),
the rate extrapolated to 10,000 and 100,000 images. Grouping runs on synthetic hashes at
10,000 and 100,000 images (uniform random 64/256-bit hashes, a share of them planted as
near copies 0-10 coarse bits and 0-60 fine bits away): it must find every planted pair, and
at --check images it is compared with brute force.

--precision measures what the matcher gets right on real pictures instead: false pairs among
distinct hard negatives (pipeline.testing.pictures: flat fields with small shapes, product
shots on white, skies, text on plain backgrounds), tiles of real photographs (scikit-image's
samples) and images of the synthetic sample; and copies found (re-encoded, rescaled, cropped,
bordered) of the real photographs and of sample images. The same sets are measured with the
hashes alone (no colour confirmation, as before) for comparison.

    python scripts/bench/dedup.py [--hash-images 600] [--sizes 10000 100000] [--workers 2]
    python scripts/bench/dedup.py --precision [--per-kind 100] [--sample-images 175]
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import statistics
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from pipeline.core import perceptual
from pipeline.core.images import decode_image
from pipeline.core.parallel import imap
from pipeline.core.perceptual import (
    COLOUR_BYTES,
    DECODE_SIDE,
    FINE_WORDS,
    HashTable,
    Signature,
    hash_image,
    near_pairs,
    signatures,
)
from pipeline.core.stage_options import LABEL
from pipeline.stages.label import FINE_DISTANCE, hash_file
from pipeline.testing import make_sample, pictures

import benchlib


def hash_without_flags(path: Path) -> tuple[str, list]:
    """label's worker without the quality flags: one read, SHA-256, one decode, signatures."""
    data = path.read_bytes()
    image = decode_image(data, min_side=DECODE_SIDE)
    return hashlib.sha256(data).hexdigest(), signatures(image)


def time_hashing(images: int, workers: int, repeat: int = 5) -> tuple[float, float, float]:
    """Images per second of label's worker (SHA-256, one decode, perceptual signatures and
    quality flags) and of the same without the flags, medians of `repeat` back-to-back pairs
    (each after waiting for a quiet machine), and the median of the pairs' time ratios."""
    classes = 10
    with tempfile.TemporaryDirectory() as folder:
        make_sample.make_sample(Path(folder), classes=classes,
                                per_class=max(1, images // classes), workers=workers)
        files = sorted((Path(folder) / "files").rglob("*.*"))
        pairs = []
        for _ in range(repeat):
            benchlib.wait_for_quiet(benchlib.Quiet())
            seconds = []
            for function in (hash_file, hash_without_flags):
                started = time.perf_counter()
                for _ in imap(function, files, workers):
                    pass
                seconds.append(time.perf_counter() - started)
            pairs.append(seconds)
        with_flags, alone = (statistics.median(s[k] for s in pairs) for k in (0, 1))
        ratio = statistics.median(flags / base for flags, base in pairs)
        return len(files) / with_flags, len(files) / alone, ratio


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
    flat = bytes(COLOUR_BYTES)  # one colour and plenty of structure: the hashes decide
    views = [[Signature((int(c), tuple(int(w) for w in f)), flat, 50.0)]
             for c, f in zip(coarse, fine, strict=True)]
    return views, planted


def brute_force(table: HashTable) -> set[tuple[int, int]]:
    coarse = np.bitwise_count(table.coarse[:, None] ^ table.coarse[None, :])
    found = set()
    for i, j in zip(*np.nonzero(coarse <= LABEL.near_distance), strict=True):
        fine = int(np.bitwise_count(table.fine[i] ^ table.fine[j]).sum())
        if i < j and fine <= FINE_DISTANCE:
            found.add((int(i), int(j)))
    return found


@contextlib.contextmanager
def hashes_alone() -> Iterator[None]:
    """The matcher as it was before colours confirmed a match (for comparison only)."""
    saved = {name: getattr(perceptual, name) for name in
             ("COLOUR_WORST", "COLOUR_MEAN", "FLAT_STRUCTURE")}
    perceptual.COLOUR_WORST, perceptual.COLOUR_MEAN, perceptual.FLAT_STRUCTURE = 255, 255, 0
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(perceptual, name, value)


def precision(per_kind: int, sample_images: int) -> None:
    """False pairs among distinct pictures, and copies found, with and without colours."""
    photos = pictures.photographs()
    negatives = {kind: [hash_image(data) for data in images]
                 for kind, images in pictures.hard_negatives(per_kind).items()}
    negatives["photo tile"] = [hash_image(data) for data in pictures.tiles(photos)]
    with tempfile.TemporaryDirectory() as folder:
        make_sample.make_sample(Path(folder), classes=10, per_class=-(-sample_images // 10))
        files = sorted((Path(folder) / "files").rglob("*.jpg"))[:sample_images]
        sample = {f"sample {path.stem}": pictures.Image.open(path).convert("RGB")
                  for path in files}
    negatives["sample"] = [hash_image(pictures.jpeg(image, 95)) for image in sample.values()]
    kinds = [kind for kind, views in negatives.items() for _ in views]
    table = HashTable(views for group in negatives.values() for views in group)
    originals = {**photos, **sample}
    copies = [(hash_image(pictures.jpeg(image, 95)), how, hash_image(data))
              for image in originals.values() for how, data in pictures.copies(image).items()]
    pairs = len(kinds) * (len(kinds) - 1) // 2
    print(f"precision: {len(kinds)} distinct images ({dict(Counter(kinds))}), {pairs:,} pairs; "
          f"{len(copies)} copies of {len(photos)} real photographs and {len(sample)} sample "
          "images")
    for name, matcher in (("hashes + colours (now)", contextlib.nullcontext),
                          ("hashes alone (before)", hashes_alone)):
        with matcher():
            false = near_pairs(table, LABEL.near_distance, FINE_DISTANCE)
            found = Counter(how for original, how, copy in copies
                            if near_pairs(HashTable([original, copy]), LABEL.near_distance,
                                          FINE_DISTANCE))
        by_kind = Counter(" / ".join(sorted({kinds[i], kinds[j]})) for i, j in false)
        print(f"  {name}: {len(false)} false pair(s) {dict(by_kind)}; copies found "
              f"{sum(found.values())}/{len(copies)} {dict(found)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hash-images", type=int, default=600)
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--share", type=float, default=0.05, help="planted near copies")
    parser.add_argument("--check", type=int, default=3000, help="brute-force check size")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--precision", action="store_true",
                        help="measure false pairs and copies found on real pictures instead")
    parser.add_argument("--per-kind", type=int, default=100, help="hard negatives per kind")
    parser.add_argument("--sample-images", type=int, default=175)
    args = parser.parse_args()
    if args.precision:
        precision(args.per_kind, args.sample_images)
        return
    rng = np.random.default_rng(0)

    rate, alone, ratio = time_hashing(args.hash_images, args.workers)
    print(f"hashing: {rate:.0f} images/s with {args.workers} worker(s), quality flags "
          f"included ({alone:.0f} images/s without them: the flags cost {ratio - 1:.0%} more "
          f"time, median of 5 pairs), measured on {args.hash_images} sample images")
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
