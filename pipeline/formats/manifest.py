"""The manifest format: the project's one reader and writer of manifests and the label map.

A manifest is `path label` per line, the path relative to a dataset root that is recorded in
`root.txt` beside the manifests, so every consumer (mean, pack, the loader) resolves paths the
same way wherever it runs from. `pipeline label` writes them (pipeline/stages/label.py).
"""

from __future__ import annotations

import csv
import io
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.core.errors import InputError
from pipeline.core.fsutil import atomic_write_text
from pipeline.core.quality import Quality

ROOT_FILE = "root.txt"
LABELS_FILE = "labels.txt"
DUPLICATES_FILE = "duplicates.txt"
CONFLICTS_FILE = "conflicts.txt"
CONFLICTS_HEADER = ("group", "how", "class", "path", "action")
QUALITY_FILE = "quality.csv"
QUALITY_HEADER = ("path", "class", "flags", "dropped", *Quality._fields)


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
class ClassRecord:
    """One class, as the label map, a pack and a checkpoint all describe it."""

    index: int
    wnid: str
    name: str

    @property
    def display_name(self) -> str:
        return display_name(self.name)


def display_name(name: str) -> str:
    """WordNet names are comma-separated synonyms ("tabby, tabby cat"); show the first."""
    return name.split(",")[0]


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


def read_labels(manifest_dir: Path) -> list[ClassRecord]:
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
        classes.append(ClassRecord(int(parts[0]), parts[1], parts[2] if len(parts) > 2 else ""))
    return classes


def has_labels(manifest_dir: Path) -> bool:
    return (manifest_dir / LABELS_FILE).exists()


def write_manifest(path: Path, pairs: list[tuple[str, int]]) -> None:
    atomic_write_text(path, "".join(f"{image} {label}\n" for image, label in pairs))


def write_labels(out: Path, classes: list[ClassRecord]) -> None:
    atomic_write_text(out / LABELS_FILE, "".join(f"{c.index} {c.wnid} {c.name}\n" for c in classes))


def write_root(out: Path, root: Path) -> None:
    atomic_write_text(out / ROOT_FILE, os.path.relpath(root.resolve(), out.resolve()) + "\n")


@dataclass(frozen=True)
class DuplicateGroup:
    """Copies of one image: `how` they were found (bytes: identical files; perceptual: close
    perceptual hashes, and maybe identical files too) and their paths, sorted."""

    how: str
    paths: tuple[str, ...]


def write_duplicates(out: Path, groups: list[DuplicateGroup]) -> None:
    """One group per line: `<how><TAB><path><TAB><path>...`."""
    atomic_write_text(out / DUPLICATES_FILE,
                      "".join("\t".join((g.how, *g.paths)) + "\n" for g in groups))


def read_duplicates(out: Path) -> list[DuplicateGroup]:
    path = out / DUPLICATES_FILE
    if not path.exists():
        return []
    groups = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        how, *paths = line.split("\t")
        if how not in ("bytes", "perceptual") or len(paths) < 2:
            raise InputError(f"{path}:{lineno}: expected '<bytes|perceptual><TAB><path>"
                             "<TAB><path>...' (rerun `pipeline label`)")
        groups.append(DuplicateGroup(how, tuple(paths)))
    return groups


def write_conflicts(out: Path, rows: list[tuple[int, str, str, str, str]]) -> None:
    """Cross-class copies, one file per line (see CONFLICTS_HEADER), tab-separated."""
    lines = ["\t".join(CONFLICTS_HEADER)] + ["\t".join(map(str, row)) for row in rows]
    atomic_write_text(out / CONFLICTS_FILE, "\n".join(lines) + "\n")


def read_conflicts(out: Path) -> list[dict[str, str]]:
    path = out / CONFLICTS_FILE
    if not path.exists():
        return []
    lines = path.read_text(encoding="utf-8").splitlines()
    if not lines or tuple(lines[0].split("\t")) != CONFLICTS_HEADER:
        raise InputError(f"{path}:1: expected the header {'<TAB>'.join(CONFLICTS_HEADER)} "
                         "(rerun `pipeline label`)")
    return [dict(zip(CONFLICTS_HEADER, line.split("\t"), strict=True)) for line in lines[1:]]


def write_quality_table(out: Path, rows: list[tuple[str, str, list[str], bool, Quality]]) -> None:
    """One row per image: its path, class, flags (space-separated), whether --drop-quality
    left it out, and the measured values the flags were decided on."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(QUALITY_HEADER)
    for path, klass, flags, dropped, quality in rows:
        writer.writerow([path, klass, " ".join(flags), "yes" if dropped else "no", *quality])
    atomic_write_text(out / QUALITY_FILE, buffer.getvalue())


def read_quality_table(out: Path) -> list[dict[str, str]]:
    """quality.csv's rows; [] when label wrote none (an older run)."""
    path = out / QUALITY_FILE
    if not path.exists():
        return []
    with open(path, newline="", encoding="utf-8") as handle:
        rows = list(csv.reader(handle))
    if not rows or tuple(rows[0]) != QUALITY_HEADER:
        raise InputError(f"{path}:1: expected the header {','.join(QUALITY_HEADER)} (run "
                         "`pipeline label` again)")
    return [dict(zip(QUALITY_HEADER, row, strict=True)) for row in rows[1:]]
