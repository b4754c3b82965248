"""Checking, de-duplicating, writing and journaling what was fetched.

The work is split at the one decision that needs the whole run's view: a worker process
checks a body (magic bytes, a real decode, size, known placeholders), hashes it and writes it
to a hidden temp file beside its final name (`stage_body`); the coordinating process then
either renames it into place or drops it as a duplicate of an image already kept for that
class, and journals the outcome (`Collector`). A kill at any moment leaves at most a temp
file, removed by the next run.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.fsutil import FILE_MODE, TEMP_SUFFIX
from pipeline.gather.options import GatherOptions
from pipeline.images import ImageDecodeError, decode_image, sniff_extension
from pipeline.journal import Journal, is_final
from pipeline.urllist import UrlEntry, safe_file_stem


@dataclass
class Staged:
    """A checked body: where it waits (`temp`), where it goes (`path`), its digest."""

    outcome: str  # ok, or why the body was rejected
    error: str
    size: int
    sha256: str
    temp: str | None = None
    path: str | None = None


def target_stem(out: Path, entry: UrlEntry) -> Path:
    """OUT/<class>/<id> or, for a hyponym, OUT/<class>/<hyponym>/<id>; the extension follows
    the bytes."""
    folder = out / entry.klass
    if entry.wnid != entry.klass:
        folder = folder / entry.wnid
    return folder / safe_file_stem(entry.id)


def stage_body(body: bytes, stem: str, options: GatherOptions) -> Staged:
    """Check an image and write it to its temp file (worker side; runs in a thread)."""
    digest = hashlib.sha256(body).hexdigest()
    if digest in options.placeholder_digests:
        return Staged("placeholder", "known placeholder image", len(body), digest)
    problem = image_problem(body, options.min_size)
    if problem is not None:
        outcome = "too_small" if problem.reason == "too_small" else "not_image"
        return Staged(outcome, str(problem), len(body), digest)
    path = f"{stem}.{sniff_extension(body[:16]) or 'img'}"
    head, name = os.path.split(path)
    temp = os.path.join(head, f".{name}{TEMP_SUFFIX}")
    os.makedirs(head, exist_ok=True)
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, FILE_MODE)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(body)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp)
        raise
    return Staged("ok", "", len(body), digest, temp, path)


def image_problem(body: bytes, min_size: int) -> ImageDecodeError | None:
    """Decode at reduced scale: enough to catch truncation, HTML and thumbnails, fast."""
    try:
        decode_image(body, min_side=max(min_size, 1), min_size=min_size)
    except ImageDecodeError as problem:
        return problem
    return None


class Collector:
    """Keeps or drops staged images and journals every outcome (coordinator side)."""

    def __init__(self, options: GatherOptions, journal: Journal,
                 history: dict[str, dict[str, Any]]) -> None:
        self.options = options
        self.journal = journal
        self.history = history
        self.this_run: dict[str, Counter[str]] = defaultdict(Counter)
        self.ok_counts: Counter[str] = Counter()
        self.digests: dict[str, dict[str, str]] = defaultdict(dict)  # class -> sha -> id
        for record in history.values():
            if record["outcome"] == "ok":
                klass = record.get("class", record.get("wnid", ""))
                self.ok_counts[klass] += 1
                self.digests[klass][record.get("sha256", "")] = record["id"]

    def pending(self, entries: list[UrlEntry]) -> list[UrlEntry]:
        return [e for e in entries if e.id not in self.history or not is_final(self.history[e.id])]

    def recover_unjournaled(self, pending: list[UrlEntry]) -> list[UrlEntry]:
        """Journal images that a killed run renamed into place but never journaled."""
        on_disk = _files_by_stem(self.options.out, {e.klass for e in pending})
        still_pending = []
        for entry in pending:
            path = on_disk.get(target_stem(self.options.out, entry))
            if path is None:
                still_pending.append(entry)
                continue
            body = path.read_bytes()
            digest = hashlib.sha256(body).hexdigest()
            staged = Staged("ok", "found on disk", len(body), digest, path=str(path))
            problem = image_problem(body, self.options.min_size)
            if problem is not None:  # cannot happen unless the file changed since
                staged = Staged("not_image", str(problem), len(body), digest)
            self.record(entry, outcome=staged.outcome, final=True, error=staged.error,
                        staged=staged)
        return still_pending

    def record(self, entry: UrlEntry, *, outcome: str, final: bool, error: str = "",
               http_status: int | None = None, attempts: int = 1, seconds: float = 0.0,
               staged: Staged | None = None) -> str:
        """Journal one finished URL; a staged image is kept or dropped first. The outcome."""
        record: dict[str, Any] = {
            "id": entry.id, "wnid": entry.wnid, "class": entry.klass, "url": entry.url,
            "outcome": outcome, "final": final, "http_status": http_status, "bytes": None,
            "sha256": None, "path": None, "error": error, "attempts": attempts,
            "seconds": round(seconds, 3),
        }
        if staged is not None:
            record.update(outcome=staged.outcome, error=staged.error or error,
                          bytes=staged.size, sha256=staged.sha256)
            if staged.outcome == "ok":
                self._keep_or_drop(entry, staged, record)
        self.journal.write(record)
        self.this_run[entry.klass][record["outcome"]] += 1
        self.ok_counts[entry.klass] += record["outcome"] == "ok"
        return record["outcome"]

    def _keep_or_drop(self, entry: UrlEntry, staged: Staged, record: dict[str, Any]) -> None:
        first = self.digests[entry.klass].get(staged.sha256)
        if first is not None and first != entry.id:
            if staged.temp:
                os.unlink(staged.temp)  # our own temp copy of bytes already kept
            record.update(outcome="duplicate", error=f"same bytes as {first}")
            return
        assert staged.path is not None
        if staged.temp:
            os.replace(staged.temp, staged.path)
        self.digests[entry.klass][staged.sha256] = entry.id
        record["path"] = Path(staged.path).relative_to(self.options.out).as_posix()


def _files_by_stem(out: Path, classes: set[str]) -> dict[Path, Path]:
    """Stem path (see target_stem) -> file, for every image already in the class folders."""
    found: dict[Path, Path] = {}
    for klass in classes:
        folder = out / klass
        if not folder.is_dir():
            continue
        for path in folder.rglob("*"):
            if path.is_file() and not path.name.startswith("."):
                found[path.with_suffix("")] = path
    return found
