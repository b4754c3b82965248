"""Checking, de-duplicating, writing and journaling what was fetched.

The work is split at the one decision that needs the whole run's view: a worker process
checks a body (magic bytes, a real decode, size, known placeholders), hashes it (SHA-256, and
a perceptual hash from the same decode) and writes it
to a hidden temp file beside its final name (`stage_body`); the coordinating process then
either renames it into place or drops it as a duplicate of an image already kept for that
class, or as a placeholder (placeholders.py), and journals the outcome (`Collector`). A kill
at any moment leaves at most a temp file, removed by the next run.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import os
import time
from array import array
from collections import Counter, defaultdict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.core.fsutil import FILE_MODE, TEMP_SUFFIX, JsonLinesWriter
from pipeline.core.images import ImageDecodeError, decode_image, sniff_extension
from pipeline.core.perceptual import DECODE_SIDE
from pipeline.formats.journal import JournalIndex, final_codes
from pipeline.formats.urllist import Selection, UrlEntry, safe_file_stem
from pipeline.stages.gather.digests import KeptImages
from pipeline.stages.gather.options import GatherOptions
from pipeline.stages.gather.placeholders import (
    PLACEHOLDER_COARSE,
    PLACEHOLDER_DIR,
    Fingerprint,
    Placeholders,
    coarse_of,
)

LOOKUP_BATCH = 4096  # entries looked up in the journal index at once (as objects: keep it small)

_COPIES = frozenset({"ok", "duplicate"})  # outcomes whose bytes later images are checked against


@dataclass
class Staged:
    """A checked body: where it waits (`temp`), where it goes (`path`), its digest."""

    outcome: str  # ok, or why the body was rejected
    error: str
    size: int
    sha256: str
    temp: str | None = None
    path: str | None = None
    phash: str = ""  # the Fingerprint of a decodable image, as text


def target_stem(out: Path, entry: UrlEntry) -> str:
    """OUT/<class>/<id> or, for a hyponym, OUT/<class>/<hyponym>/<id>; the extension follows
    the bytes. A string: made once per URL handed out, where pathlib's parsing showed."""
    if entry.wnid != entry.klass:
        return os.path.join(out, entry.klass, entry.wnid, safe_file_stem(entry.id))
    return os.path.join(out, entry.klass, safe_file_stem(entry.id))


def stage_body(body: bytes, stem: str, options: GatherOptions) -> Staged:
    """Check an image and write it to its temp file (worker side; runs in a thread)."""
    digest = hashlib.sha256(body).hexdigest()
    if digest in options.placeholder_digests:
        return Staged("placeholder", "known placeholder image", len(body), digest)
    problem, phash = inspect_image(body, options.min_size)
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
    return Staged("ok", "", len(body), digest, temp, path, phash)


def inspect_body(body: bytes, min_size: int) -> tuple[str, str] | None:
    """(sha256, fingerprint) of a usable image; None for anything else."""
    problem, phash = inspect_image(body, min_size)
    return None if problem is not None else (hashlib.sha256(body).hexdigest(), phash)


def inspect_image(body: bytes, min_size: int) -> tuple[ImageDecodeError | None, str]:
    """(what is wrong, None when nothing; the perceptual hash) from one decode at reduced
    scale: enough to catch truncation, HTML and thumbnails, and to hash, fast."""
    try:
        image = decode_image(body, min_side=max(min_size, DECODE_SIDE), min_size=min_size)
    except ImageDecodeError as problem:
        return problem, ""
    return None, Fingerprint.of(image).to_hex()


class Collector:
    """Keeps or drops staged images and journals every outcome (coordinator side): a
    duplicate of an image kept for its class is dropped, a placeholder (`Placeholders`)
    rejected and its kept copies taken back."""

    def __init__(self, options: GatherOptions, journal: JsonLinesWriter,
                 index: JournalIndex) -> None:
        self.options = options
        self.journal = journal
        self.index = index  # the journal as it was when the run began
        self._timeouts_before = index.holds("timeout")
        self.skipped = 0  # selected URLs already final in the journal
        self.this_run: dict[str, Counter[str]] = defaultdict(Counter)
        self.ok_counts: Counter[str] = Counter()
        self.kept = KeptImages(options.journal_path, PLACEHOLDER_COARSE)
        self.placeholders = Placeholders(options, self.kept, self._take_back)
        for offset, record in index.last_records(options.journal_path, _COPIES):
            self._hold(record, offset)
            self.ok_counts[_class_of(record)] += record["outcome"] == "ok"
        self.placeholders.finish_take_backs()

    def pending(self, selection: Selection) -> Iterator[tuple[int, UrlEntry]]:
        """(index, entry) of every selected URL not final in the journal, in list order;
        the others are counted in `skipped`."""
        numbered = enumerate(selection)
        while batch := list(itertools.islice(numbered, LOOKUP_BATCH)):
            final = final_codes(self.index.lookup(entry.id for _, entry in batch))
            self.skipped += int(final.sum())
            yield from itertools.compress(batch, (~final).tolist())

    def timed_out_before(self, entry: UrlEntry) -> bool:
        """Whether the URL's last attempt in an earlier run timed out (it gets --timeout in
        full, not its host's shorter one)."""
        return self._timeouts_before and self.index.outcome(entry.id) == "timeout"

    def recover_unjournaled(self, pending: Iterable[tuple[int, UrlEntry]], classes: set[str]
                            ) -> Iterator[tuple[int, UrlEntry]]:
        """Journal images that a killed run renamed into place but never journaled; the
        rest of `pending` goes on."""
        on_disk = StemIndex.scan(self.options.out, classes)
        numbered = iter(pending)
        while batch := list(itertools.islice(numbered, LOOKUP_BATCH)):
            stems = [target_stem(self.options.out, entry) for _, entry in batch]
            for (index, entry), stem, found in zip(batch, stems, on_disk.contains(stems),
                                                    strict=True):
                path = _file_of(stem) if found else None
                if path is None:
                    yield index, entry
                else:
                    self._recover(entry, path)

    def _recover(self, entry: UrlEntry, path: Path) -> None:
        body = path.read_bytes()
        digest = hashlib.sha256(body).hexdigest()
        problem, phash = inspect_image(body, self.options.min_size)
        staged = Staged("ok", "found on disk", len(body), digest, path=str(path), phash=phash)
        if problem is not None:  # cannot happen unless the file changed since
            staged = Staged("not_image", str(problem), len(body), digest)
        self.record(entry, outcome=staged.outcome, final=True, error=staged.error,
                    staged=staged)

    def record(self, entry: UrlEntry, *, outcome: str, final: bool, error: str = "",
               http_status: int | None = None, attempts: int = 1, seconds: float = 0.0,
               staged: Staged | None = None) -> str:
        """Journal one finished URL; a staged image is kept or dropped first. The outcome."""
        record: dict[str, Any] = {
            "id": entry.id, "wnid": entry.wnid, "class": entry.klass, "url": entry.url,
            "outcome": outcome, "final": final, "http_status": http_status, "bytes": None,
            "sha256": None, "phash": None, "path": None, "error": error, "attempts": attempts,
            "seconds": round(seconds, 3), "time": round(time.time(), 3),
        }
        if staged is not None:
            record.update(outcome=staged.outcome, error=staged.error or error,
                          bytes=staged.size, sha256=staged.sha256, phash=staged.phash or None)
            if staged.outcome == "ok":
                self._keep_or_drop(entry, staged, record)
        offset = self._write(entry.klass, record)
        if record["outcome"] in _COPIES:
            self._hold(record, offset)
        return record["outcome"]

    def missing_picture(self, url: str, digest: str, phash: str) -> None:
        """A host served this picture for a made-up path (`worker._MadeUpPaths`)."""
        self.placeholders.missing_picture(url, digest, phash)

    def _hold(self, record: dict[str, Any], offset: int) -> None:
        """Index a kept or duplicate image's journal line by its digest and hash."""
        self.kept.hold(record.get("sha256"), coarse_of(record), offset)

    def _forget(self, record: dict[str, Any], offset: int) -> None:
        """The inverse of _hold: an image taken back."""
        self.kept.forget(record.get("sha256"), coarse_of(record), offset)

    def _write(self, klass: str, record: dict[str, Any]) -> int:
        offset = self.journal.write(record)
        self.this_run[klass][record["outcome"]] += 1
        self.ok_counts[klass] += record["outcome"] == "ok"
        return offset

    def _keep_or_drop(self, entry: UrlEntry, staged: Staged, record: dict[str, Any]) -> None:
        copies = self.kept.copies_of(staged.sha256)
        why = self.placeholders.reason(entry.url, staged.sha256, staged.phash, copies)
        if why:
            self._discard(staged)
            record.update(outcome="placeholder", error=why)
            return
        first = next(((offset, copy) for offset, copy in copies if copy["outcome"] == "ok"
                      and _class_of(copy) == entry.klass), None)
        if first is not None and first[1]["id"] != entry.id:
            self._discard(staged)  # our own temp copy of bytes already kept
            record.update(outcome="duplicate", error=f"same bytes as {first[1]['id']}")
            return
        if first is not None:  # the same id kept again: its new line replaces the old
            self._forget(*reversed(first))
        assert staged.path is not None
        if staged.temp:
            os.replace(staged.temp, staged.path)
        record["path"] = self._relative(staged.path)

    def _relative(self, path: str) -> str:
        """A path under OUT as the journal holds it (relative, with /)."""
        prefix = os.path.join(self.options.out, "")
        if path.startswith(prefix):
            return path[len(prefix):].replace(os.sep, "/")
        return Path(path).relative_to(self.options.out).as_posix()

    @staticmethod
    def _discard(staged: Staged) -> None:
        if staged.temp:
            os.unlink(staged.temp)

    def _take_back(self, copies: list[tuple[int, dict[str, Any]]]) -> None:
        """Set the kept copies of a placeholder aside in .placeholders/ and journal every
        copy as a placeholder found later."""
        for offset, copy in copies:
            self._forget(copy, offset)
            if copy["outcome"] == "ok":
                self._set_aside(self.options.out / copy["path"], copy["sha256"])
                self.ok_counts[_class_of(copy)] -= 1
        for _, copy in copies:
            klass = _class_of(copy)
            self._write(klass, {
                "id": copy["id"], "wnid": copy.get("wnid", klass), "class": klass,
                "url": copy["url"], "outcome": "placeholder", "final": True,
                "http_status": None, "bytes": copy.get("bytes"), "sha256": copy["sha256"],
                "phash": copy.get("phash"), "path": None,
                "error": f"repeated body, found later (set aside in {PLACEHOLDER_DIR}/)",
                "attempts": 0, "seconds": 0.0, "time": round(time.time(), 3)})

    def _set_aside(self, path: Path, digest: str) -> None:
        """Into .placeholders/, named by its digest: copies with the same bytes share one
        file, near-identical ones each keep theirs."""
        folder = self.options.out / PLACEHOLDER_DIR
        folder.mkdir(exist_ok=True)
        if path.exists():
            os.replace(path, folder / f"{digest}{path.suffix}")


def _class_of(record: dict[str, Any]) -> str:
    """A record's class; records written before hyponyms had only their wnid."""
    return record.get("class", record.get("wnid", ""))


class StemIndex:
    """The files already in the class folders, as hashes of their stems (see target_stem):
    8 bytes a file, listed folder by folder, to spot the few a killed run never journaled."""

    def __init__(self, hashes: np.ndarray) -> None:
        self.hashes = hashes

    @classmethod
    def scan(cls, out: Path, classes: Iterable[str]) -> StemIndex:
        hashes = array("q")
        for klass in classes:
            hashes.extend(hash(stem) for stem in _stems(str(out / klass)))
        return cls(np.sort(np.frombuffer(hashes, np.int64)) if hashes
                   else np.empty(0, np.int64))

    def contains(self, stems: list[str]) -> list[bool]:
        """Whether a file may have each stem (a hash shared by chance costs a look)."""
        if not len(self.hashes):
            return [False] * len(stems)
        wanted = np.fromiter((hash(stem) for stem in stems), np.int64, len(stems))
        where = np.searchsorted(self.hashes, wanted).clip(max=len(self.hashes) - 1)
        return (self.hashes[where] == wanted).tolist()


def _stems(folder: str) -> Iterator[str]:
    """The stem path of every visible file under `folder`, streamed (os.scandir)."""
    try:
        entries = list(os.scandir(folder))
    except (FileNotFoundError, NotADirectoryError):
        return
    for entry in entries:
        if entry.is_dir(follow_symlinks=False):
            yield from _stems(entry.path)
        elif entry.is_file() and not entry.name.startswith("."):
            yield os.path.splitext(entry.path)[0]


def _file_of(stem: str) -> Path | None:
    """The file with this stem (any extension), or None when only its hash matched."""
    folder, name = os.path.split(stem)
    with os.scandir(folder) as entries:
        for entry in entries:
            if (entry.is_file() and not entry.name.startswith(".")
                    and os.path.splitext(entry.name)[0] == name):
                return Path(entry.path)
    return None
