"""`pipeline label`: train/val manifests and the label map from a folder of class folders.

The split is stratified and seeded, and byte-identical files always land on the same side, so
validation accuracy is not inflated by the same photo under several URLs. The files it writes
are the manifest format (pipeline/manifest.py).
"""

from __future__ import annotations

import hashlib
import os
import random
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.errors import InputError
from pipeline.images import is_image_path
from pipeline.manifest import (
    ClassRecord,
    write_duplicates,
    write_labels,
    write_manifest,
    write_root,
)
from pipeline.stage_options import LABEL
from pipeline.tables import format_table


@dataclass
class LabelReport:
    classes: list[ClassRecord]
    train: Counter[int] = field(default_factory=Counter)
    val: Counter[int] = field(default_factory=Counter)
    ignored: int = 0
    duplicate_groups: int = 0
    duplicate_files: int = 0

    def summary(self) -> str:
        rows = [["index", "class", "train", "val", "name"]]
        rows += [[str(c.index), c.wnid, str(self.train[c.index]), str(self.val[c.index]),
                  c.display_name] for c in self.classes]
        return (f"{format_table(rows)}\n"
                f"{sum(self.train.values())} train, {sum(self.val.values())} val; "
                f"{self.ignored} non-image file(s) ignored; {self.duplicate_groups} group(s) "
                f"of identical files ({self.duplicate_files} files) kept on one side")


def label(root: Path, out: Path, *, val_ratio: float = LABEL.val_ratio, seed: int = LABEL.seed,
          words: dict[str, str] | None = None) -> LabelReport:
    """Write train/val manifests, the label map and root.txt for the class folders of `root`."""
    if not 0.0 <= val_ratio < 1.0:
        raise InputError(f"--val-ratio {val_ratio} must be in [0, 1)")
    class_dirs = _class_dirs(root)
    classes = [ClassRecord(i, d.name, (words or {}).get(d.name, d.name))
               for i, d in enumerate(class_dirs)]
    report = LabelReport(classes)
    images: dict[int, list[str]] = {}
    for klass, folder in zip(classes, class_dirs, strict=True):
        images[klass.index], ignored = _list_images(root, folder)
        report.ignored += ignored
    if not any(images.values()):
        raise InputError(f"no images under {root} (expected {root}/<class>/<image files>)")
    digests = _digests(root, images)
    split = _split(images, digests, val_ratio, seed)
    _write_outputs(root, out, classes, split, digests, report)
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


def _digests(root: Path, images: dict[int, list[str]]) -> dict[str, str]:
    digests = {}
    for paths in images.values():
        for path in paths:
            with open(root / path, "rb") as handle:
                digests[path] = hashlib.file_digest(handle, "sha256").hexdigest()
    return digests


def _split(images: dict[int, list[str]], digests: dict[str, str], val_ratio: float,
           seed: int) -> dict[str, list[tuple[str, int]]]:
    """Stratified, seeded split by groups of identical files, so a photo never leaks.

    Every class with at least 2 images gets at least one in each split, unless its copies
    of one photo leave no way to do that.
    """
    rng = random.Random(seed)
    side_of_digest: dict[str, str] = {}
    split: dict[str, list[tuple[str, int]]] = {"train": [], "val": []}
    for label_index in sorted(images):
        groups: dict[str, list[str]] = defaultdict(list)
        for path in images[label_index]:
            groups[digests[path]].append(path)
        order = sorted(groups)
        rng.shuffle(order)
        want_val = _val_count(len(images[label_index]), val_ratio)
        in_val = 0
        for digest in order:
            side = side_of_digest.setdefault(
                digest, "val" if in_val + len(groups[digest]) <= want_val else "train")
            in_val += len(groups[digest]) if side == "val" else 0
            split[side].extend((path, label_index) for path in groups[digest])
    for pairs in split.values():
        pairs.sort(key=lambda pair: (pair[1], pair[0]))
    return split


def _val_count(n_images: int, val_ratio: float) -> int:
    if n_images < 2 or val_ratio == 0:
        return 0
    return min(n_images - 1, max(1, round(n_images * val_ratio)))


def _write_outputs(root: Path, out: Path, classes: list[ClassRecord],
                   split: dict[str, list[tuple[str, int]]], digests: dict[str, str],
                   report: LabelReport) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for side in ("train", "val"):
        write_manifest(out / f"{side}.txt", split[side])
    report.train.update(label for _, label in split["train"])
    report.val.update(label for _, label in split["val"])
    write_labels(out, classes)
    write_root(out, root)
    groups: dict[str, list[str]] = defaultdict(list)
    for path, digest in sorted(digests.items()):
        groups[digest].append(path)
    duplicates = [paths for paths in groups.values() if len(paths) > 1]
    report.duplicate_groups = len(duplicates)
    report.duplicate_files = sum(len(paths) for paths in duplicates)
    write_duplicates(out, duplicates)
