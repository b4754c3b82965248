"""`pipeline label`: train/val manifests and the label map from a folder of class folders.

The split is stratified and seeded, and copies of one photo always land on the same side, so
validation accuracy is not inflated by leakage: byte-identical files, and near-duplicates
(re-encoded, rescaled, slightly cropped or bordered copies) found by a perceptual hash
(pipeline/core/perceptual.py). A copy in two classes carries two labels: it is reported and, by
default, left out of both (`--cross-class`), never deleted. The files it writes are the
manifest format (pipeline/formats/manifest.py).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

from pipeline.core.errors import InputError
from pipeline.core.fsutil import atomic_write_text
from pipeline.core.images import ImageDecodeError, decode_image, is_image_path
from pipeline.core.parallel import imap
from pipeline.core.perceptual import (
    DECODE_SIDE,
    HashTable,
    Signature,
    components,
    near_pairs,
    signature_from_json,
    signature_to_json,
    signatures,
)
from pipeline.core.progress import Progress
from pipeline.core.quality import FLAGS, Quality, measure
from pipeline.core.stage_options import CROSS_CLASS, LABEL
from pipeline.core.tables import format_table
from pipeline.formats.manifest import (
    ClassRecord,
    DuplicateGroup,
    write_conflicts,
    write_duplicates,
    write_labels,
    write_manifest,
    write_quality_table,
    write_root,
)

CACHE_NAME = ".label-cache.json"  # in OUT, or in --cache-dir: what each image's hashing found
CACHE_VERSION = 2
FINE_DISTANCE = 64  # of 256 bits: confirms a coarse match (see pipeline/core/perceptual.py)


@dataclass
class LabelReport:
    classes: list[ClassRecord]
    train: Counter[int] = field(default_factory=Counter)
    val: Counter[int] = field(default_factory=Counter)
    ignored: int = 0
    duplicate_groups: int = 0
    perceptual_groups: int = 0  # of duplicate_groups, those found by the perceptual hash
    duplicate_files: int = 0
    cross_class_groups: int = 0
    cross_class_dropped: int = 0
    hashed: int = 0  # images hashed this run (the others came from the cache)
    quality_flags: Counter[str] = field(default_factory=Counter)  # images per flag
    quality_dropped: int = 0  # images left out by --drop-quality
    unhashable: int = 0  # images that could not be decoded (validate quarantines them)

    def summary(self) -> str:
        rows = [["index", "class", "train", "val", "name"]]
        rows += [[str(c.index), c.wnid, str(self.train[c.index]), str(self.val[c.index]),
                  c.display_name] for c in self.classes]
        lines = [format_table(rows),
                 f"{sum(self.train.values())} train, {sum(self.val.values())} val; "
                 f"{self.ignored} non-image file(s) ignored; {self.duplicate_groups} group(s) of "
                 f"copies ({self.perceptual_groups} found by the perceptual hash; "
                 f"{self.duplicate_files} files) kept on one side; {self.hashed} image(s) "
                 "hashed, the rest cached",
                 f"{self.cross_class_groups} group(s) of copies across classes; "
                 f"{self.cross_class_dropped} file(s) left out of the manifests "
                 "(listed in conflicts.txt, still on disk)"]
        flags = ", ".join(f"{flag} {self.quality_flags[flag]}" for flag in FLAGS
                          if self.quality_flags[flag])
        lines.append(f"quality flags: {flags or 'none'} (quality.csv); "
                     f"{self.quality_dropped} image(s) left out by --drop-quality")
        if self.unhashable:
            lines.append(f"{self.unhashable} image(s) could not be decoded, compared by bytes "
                         "only (run `pipeline validate` first)")
        return "\n".join(lines)


@dataclass
class _Images:
    """Every image, in class order: its path (relative to the root), class index, hashes."""

    paths: list[str]
    labels: list[int]
    digests: list[str] = field(default_factory=list)
    views: list[list[Signature] | None] = field(default_factory=list)
    quality: list[Quality | None] = field(default_factory=list)


def label(root: Path, out: Path, *, val_ratio: float = LABEL.val_ratio, seed: int = LABEL.seed,
          words: dict[str, str] | None = None, near_distance: int = LABEL.near_distance,
          cross_class: str = LABEL.cross_class,
          drop_quality: tuple[str, ...] = LABEL.drop_quality,
          cache_dir: Path | None = LABEL.cache_dir, workers: int = 1) -> LabelReport:
    """Write train/val manifests, the label map, root.txt, duplicates.txt and conflicts.txt
    for the class folders of `root`."""
    if not 0.0 <= val_ratio < 1.0:
        raise InputError(f"--val-ratio {val_ratio} must be in [0, 1)")
    if cross_class not in CROSS_CLASS:
        raise InputError(f"--cross-class {cross_class!r} must be one of {', '.join(CROSS_CLASS)}")
    class_dirs = _class_dirs(root)
    classes = [ClassRecord(i, d.name, (words or {}).get(d.name, d.name))
               for i, d in enumerate(class_dirs)]
    report = LabelReport(classes)
    images = _Images([], [])
    for klass, folder in zip(classes, class_dirs, strict=True):
        found, ignored = _list_images(root, folder)
        images.paths += found
        images.labels += [klass.index] * len(found)
        report.ignored += ignored
    if not images.paths:
        raise InputError(f"no images under {root} (expected {root}/<class>/<image files>)")
    _hash_all(root, images, (cache_dir or out) / CACHE_NAME, workers, report)
    groups = _groups(images, near_distance)
    dropped = _resolve_cross_class(out, images, groups, cross_class, report)
    dropped |= _judge_quality(out, images, drop_quality, report)
    split = _split(images, groups, dropped, val_ratio, seed)
    _write_outputs(root, out, classes, split, report)
    write_duplicates(out, [group for group, _ in _described(images, groups)])
    report.duplicate_files = sum(len(group) for group in groups)
    return report


def _class_dirs(root: Path) -> list[Path]:
    if not root.is_dir():
        raise InputError(f"dataset folder {root} does not exist or is not a folder")
    try:
        dirs = sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    except OSError as exc:
        raise InputError(f"cannot list {root}: {exc}") from None
    if len(dirs) < 2:
        raise InputError(f"{root} has {len(dirs)} class folder(s); a classifier needs at least "
                         "2 (one folder per class, e.g. data/raw/n02123045/)")
    return dirs


def _list_images(root: Path, folder: Path) -> tuple[list[str], int]:
    """Every image below `folder` (nested folders belong to it), sorted; and non-images."""
    found, ignored = [], 0
    for dirpath, dirnames, filenames in os.walk(folder, onerror=_raise_unreadable):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in filenames:
            path = Path(dirpath, name)
            if name.startswith("."):
                continue
            if is_image_path(path):
                found.append(path.relative_to(root).as_posix())
            else:
                ignored += 1
    return sorted(found), ignored


def _raise_unreadable(error: OSError) -> None:
    raise InputError(f"cannot read folder {error.filename}: {error.strerror}")


class _Hashed(NamedTuple):
    """What hashing one file found, as label's cache holds it: the file's size and mtime it
    was found for, its SHA-256, its views' signatures and its quality (None: undecodable)."""

    file: tuple[int, int]
    sha256: str
    views: list[Signature] | None
    quality: Quality | None

    def to_json(self) -> dict:
        return {"file": list(self.file), "sha256": self.sha256,
                "views": None if self.views is None else [signature_to_json(v)
                                                          for v in self.views],
                "quality": None if self.quality is None else list(self.quality)}

    @classmethod
    def from_json(cls, entry: dict) -> _Hashed:
        """The inverse of to_json; ValueError, TypeError or KeyError for anything else."""
        size, mtime = entry["file"]
        if not isinstance(entry["sha256"], str):
            raise TypeError("sha256 is not a string")
        views = entry["views"]
        return cls((int(size), int(mtime)), entry["sha256"],
                   None if views is None else [signature_from_json(v) for v in views],
                   None if entry["quality"] is None else Quality(*entry["quality"]))


def _hash_all(root: Path, images: _Images, cache_path: Path, workers: int,
              report: LabelReport) -> None:
    """SHA-256 and perceptual signatures of every image, in parallel, cached by absolute path,
    size and mtime with the outputs (never in the input folder: it may be read-only, or
    shared)."""
    cache = _read_cache(cache_path)
    keys = [str((root / path).resolve()) for path in images.paths]
    stats = [_size_and_mtime(Path(key)) for key in keys]
    todo = [i for i, key in enumerate(keys)
            if key not in cache or cache[key].file != stats[i]]
    progress = Progress("label: hashing", total=len(todo))
    jobs = (Path(keys[i]) for i in todo)
    for i, found in zip(todo, imap(hash_file, jobs, workers), strict=True):
        cache[keys[i]] = _Hashed(stats[i], *found)
        progress.update()
    progress.close()
    report.hashed = len(todo)
    if todo or len(cache) != len(set(keys)):
        kept = {key: cache[key].to_json() for key in keys}
        cache_path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(cache_path, json.dumps({"version": CACHE_VERSION, "images": kept}))
    for key in keys:
        images.digests.append(cache[key].sha256)
        images.views.append(cache[key].views)
        images.quality.append(cache[key].quality)
    report.unhashable = sum(views is None for views in images.views)


def hash_file(path: Path) -> tuple[str, list[Signature] | None, Quality | None]:
    """SHA-256, perceptual signatures and quality measures of a file (None: undecodable),
    from one read and one decode; runs in a worker, and scripts/bench/dedup.py times it."""
    data = path.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    try:
        image = decode_image(data, min_side=DECODE_SIDE).convert("RGB")
    except ImageDecodeError:
        return digest, None, None
    grey = image.convert("L")
    return digest, signatures(image, grey), measure(image, grey)


def _size_and_mtime(path: Path) -> tuple[int, int]:
    stat = path.stat()
    return stat.st_size, stat.st_mtime_ns


def _read_cache(path: Path) -> dict[str, _Hashed]:
    """The cache's entries, parsed once; an unreadable, foreign or older cache is empty
    (derived data: everything is hashed again)."""
    try:
        cache = json.loads(path.read_text(encoding="utf-8"))
        images = cache["images"] if cache.get("version") == CACHE_VERSION else {}
        return {key: _Hashed.from_json(entry) for key, entry in images.items()}
    except (OSError, ValueError, TypeError, KeyError, AttributeError):
        return {}


def _groups(images: _Images, near_distance: int) -> list[list[int]]:
    """Groups of copies (image indices): identical bytes, or near perceptual hashes."""
    first_of: dict[str, int] = {}
    pairs = {(first_of.setdefault(digest, i), i) for i, digest in enumerate(images.digests)
             if first_of.get(digest, i) != i}
    if near_distance:
        hashed = [i for i, views in enumerate(images.views) if views is not None]
        table = HashTable(images.views[i] for i in hashed)
        pairs |= {(hashed[a], hashed[b])
                  for a, b in near_pairs(table, near_distance, FINE_DISTANCE)}
    return components(len(images.paths), pairs)


def _described(images: _Images, groups: list[list[int]]) -> list[tuple[DuplicateGroup, set[int]]]:
    """Each group as written to duplicates.txt, with the classes it spans."""
    described = []
    for group in groups:
        how = "bytes" if len({images.digests[i] for i in group}) == 1 else "perceptual"
        described.append((DuplicateGroup(how, tuple(images.paths[i] for i in group)),
                          {images.labels[i] for i in group}))
    return described


def _resolve_cross_class(out: Path, images: _Images, groups: list[list[int]], policy: str,
                         report: LabelReport) -> set[int]:
    """Images left out of the manifests, by `--cross-class`; conflicts.txt lists every file
    of every group that spans classes, with what was done to it."""
    dropped: set[int] = set()
    rows = []
    for number, (group, (described, classes)) in enumerate(
            zip(groups, _described(images, groups), strict=True), 1):
        report.duplicate_groups += 1
        report.perceptual_groups += described.how == "perceptual"
        if len(classes) < 2:
            continue
        report.cross_class_groups += 1
        keep_label = min(classes) if policy == "first" else None
        for i in group:
            drop = policy == "drop" or (policy == "first" and images.labels[i] != keep_label)
            dropped.update([i] if drop else [])
            rows.append((number, described.how, images.paths[i].split("/", 1)[0],
                         images.paths[i], "dropped" if drop else "kept"))
    report.cross_class_dropped = len(dropped)
    out.mkdir(parents=True, exist_ok=True)
    write_conflicts(out, rows)
    return dropped


def _judge_quality(out: Path, images: _Images, drop: tuple[str, ...],
                   report: LabelReport) -> set[int]:
    """Images left out by --drop-quality; quality.csv lists every decodable image with its
    flags and measures."""
    dropped: set[int] = set()
    rows = []
    for i, quality in enumerate(images.quality):
        if quality is None:
            continue
        flags = quality.flags()
        report.quality_flags.update(flags)
        if set(flags) & set(drop):
            dropped.add(i)
        rows.append((images.paths[i], images.paths[i].split("/", 1)[0], flags, i in dropped,
                     quality))
    report.quality_dropped = len(dropped)
    write_quality_table(out, rows)
    return dropped


def _split(images: _Images, groups: list[list[int]], dropped: set[int], val_ratio: float,
           seed: int) -> dict[str, list[tuple[str, int]]]:
    """Stratified, seeded split by groups of copies, so a photo never leaks.

    A group is one unit: it goes wholly to train or wholly to val, across classes too (with
    `--cross-class keep`). Every class with at least 2 images gets at least one in each
    split, unless its copies of one photo leave no way to do that.
    """
    group_of = {i: group[0] for group in groups for i in group}
    units: dict[int, dict[int, list[int]]] = {}  # label -> unit (first member) -> members
    for i, label_index in enumerate(images.labels):
        if i not in dropped:
            units.setdefault(label_index, {}).setdefault(group_of.get(i, i), []).append(i)
    rng = random.Random(seed)
    side_of_unit: dict[int, str] = {}
    split: dict[str, list[tuple[str, int]]] = {"train": [], "val": []}
    for label_index in sorted(units):
        members = units[label_index]
        order = sorted(members, key=lambda unit: images.paths[unit])
        rng.shuffle(order)
        want_val = _val_count(sum(len(m) for m in members.values()), val_ratio)
        in_val = 0
        for unit in order:
            side = side_of_unit.setdefault(
                unit, "val" if in_val + len(members[unit]) <= want_val else "train")
            in_val += len(members[unit]) if side == "val" else 0
            split[side].extend((images.paths[i], label_index) for i in members[unit])
    for pairs in split.values():
        pairs.sort(key=lambda pair: (pair[1], pair[0]))
    return split


def _val_count(n_images: int, val_ratio: float) -> int:
    if n_images < 2 or val_ratio == 0:
        return 0
    return min(n_images - 1, max(1, round(n_images * val_ratio)))


def _write_outputs(root: Path, out: Path, classes: list[ClassRecord],
                   split: dict[str, list[tuple[str, int]]], report: LabelReport) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for side in ("train", "val"):
        write_manifest(out / f"{side}.txt", split[side])
    report.train.update(label for _, label in split["train"])
    report.val.update(label for _, label in split["val"])
    write_labels(out, classes)
    write_root(out, root)
