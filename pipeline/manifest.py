"""`pipeline label` and the project's one manifest reader.

A manifest is `path label` per line, the path relative to a dataset root that is recorded in
`root.txt` beside the manifests, so every consumer (mean, pack, the loader) resolves paths the
same way wherever it runs from.
"""

from __future__ import annotations

import hashlib
import logging
import os
import random
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pipeline.errors import InputError
from pipeline.fsutil import atomic_write_text
from pipeline.images import is_image_path
from pipeline.tables import format_table

log = logging.getLogger(__name__)

ROOT_FILE = "root.txt"
LABELS_FILE = "labels.txt"
DUPLICATES_FILE = "duplicates.txt"


@dataclass(frozen=True)
class Manifest:
    """Paths (relative to `root`) and integer labels, as numpy arrays.

    numpy arrays rather than lists of tuples: DataLoader workers fork the dataset, and
    touching millions of small Python objects would copy them into every worker.
    """

    root: Path
    paths: np.ndarray
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.paths)

    def absolute(self, index: int) -> Path:
        return self.root / str(self.paths[index])


@dataclass(frozen=True)
class LabelClass:
    index: int
    wnid: str
    name: str


def read_manifest(path: Path) -> Manifest:
    """Parse a manifest; a malformed line fails with `file:line` and what was expected."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise InputError(f"manifest {path} does not exist (run `pipeline label` first)") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"manifest {path} cannot be read: {exc}") from None
    paths, labels = [], []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        image_path, label = _split_line(line)
        if not image_path or not label.isdigit():
            raise InputError(f"{path}:{lineno}: expected '<path> <label index>', got {line!r}")
        paths.append(image_path)
        labels.append(int(label))
    return Manifest(manifest_root(path.parent), np.array(paths, dtype=np.str_),
                    np.array(labels, dtype=np.int64))


def _split_line(line: str) -> tuple[str, str]:
    """The path is everything before the last run of whitespace (paths may hold spaces)."""
    stripped = line.rstrip()
    cut = len(stripped.rstrip("0123456789"))
    label = stripped[cut:]
    image_path = stripped[:cut]
    if not image_path or not image_path[-1].isspace():
        return "", ""
    return image_path.rstrip(), label


def manifest_root(manifest_dir: Path) -> Path:
    """The dataset root recorded beside the manifests (relative to that folder if relative)."""
    record = manifest_dir / ROOT_FILE
    if not record.exists():
        return manifest_dir
    return (manifest_dir / record.read_text(encoding="utf-8").strip()).resolve()


def read_labels(manifest_dir: Path) -> list[LabelClass]:
    path = manifest_dir / LABELS_FILE
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise InputError(f"label map {path} does not exist (run `pipeline label` first)") from None
    classes = []
    for lineno, line in enumerate(lines, 1):
        parts = line.split(maxsplit=2)
        if len(parts) < 2 or not parts[0].isdigit() or int(parts[0]) != len(classes):
            raise InputError(f"{path}:{lineno}: expected '<index> <wnid> <name>' in order")
        classes.append(LabelClass(int(parts[0]), parts[1], parts[2] if len(parts) > 2 else ""))
    return classes


def write_manifest(path: Path, pairs: list[tuple[str, int]]) -> None:
    atomic_write_text(path, "".join(f"{image} {label}\n" for image, label in pairs))


@dataclass
class LabelReport:
    classes: list[LabelClass]
    train: Counter[int] = field(default_factory=Counter)
    val: Counter[int] = field(default_factory=Counter)
    ignored: int = 0
    duplicate_groups: int = 0
    duplicate_files: int = 0


def label(root: Path, out: Path, *, val_ratio: float = 0.1, seed: int = 0,
          words: dict[str, str] | None = None) -> LabelReport:
    """Write train/val manifests, the label map and root.txt for the class folders of `root`."""
    if not 0.0 <= val_ratio < 1.0:
        raise InputError(f"--val-ratio {val_ratio} must be in [0, 1)")
    class_dirs = _class_dirs(root)
    classes = [LabelClass(i, d.name, (words or {}).get(d.name, d.name))
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


def _write_outputs(root: Path, out: Path, classes: list[LabelClass],
                   split: dict[str, list[tuple[str, int]]], digests: dict[str, str],
                   report: LabelReport) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for side in ("train", "val"):
        write_manifest(out / f"{side}.txt", split[side])
    report.train.update(label for _, label in split["train"])
    report.val.update(label for _, label in split["val"])
    atomic_write_text(out / LABELS_FILE,
                      "".join(f"{c.index} {c.wnid} {c.name}\n" for c in classes))
    atomic_write_text(out / ROOT_FILE, os.path.relpath(root.resolve(), out.resolve()) + "\n")
    groups: dict[str, list[str]] = defaultdict(list)
    for path, digest in sorted(digests.items()):
        groups[digest].append(path)
    duplicates = [paths for paths in groups.values() if len(paths) > 1]
    report.duplicate_groups = len(duplicates)
    report.duplicate_files = sum(len(paths) for paths in duplicates)
    atomic_write_text(out / DUPLICATES_FILE,
                      "".join("\t".join(paths) + "\n" for paths in duplicates))


def format_label_summary(report: LabelReport) -> str:
    rows = [["index", "class", "train", "val", "name"]]
    rows += [[str(c.index), c.wnid, str(report.train[c.index]), str(report.val[c.index]),
              c.name.split(",")[0]] for c in report.classes]
    return (f"{format_table(rows)}\n"
            f"{sum(report.train.values())} train, {sum(report.val.values())} val; "
            f"{report.ignored} non-image file(s) ignored; {report.duplicate_groups} group(s) "
            f"of identical files ({report.duplicate_files} files) kept on one side")
