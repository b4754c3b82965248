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

from pipeline.fsutil import FILE_MODE, TEMP_SUFFIX, JsonLinesWriter
from pipeline.gather.digests import DigestRows
from pipeline.gather.options import GatherOptions
from pipeline.images import ImageDecodeError, decode_image, sniff_extension
from pipeline.journal import JournalIndex, final_codes, read_records
from pipeline.urllist import Selection, UrlEntry, safe_file_stem

LOOKUP_BATCH = 4096  # entries looked up in the journal index at once (as objects: keep it small)

PLACEHOLDER_DIR = ".placeholders"  # hidden: never taken for a class folder
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
    """Keeps or drops staged images and journals every outcome (coordinator side).

    It also spots mass placeholders: bytes that arrive for `placeholder_after` URLs (from at
    least two different URLs, across hosts and synsets) are a host's generic "image not
    found" picture, not a photo. Every copy is then taken back (one kept under
    OUT/.placeholders/ for inspection, the journal corrected), and the digest is remembered
    in OUT/placeholders.txt so resumes and later runs reject it at once.

    The images kept so far (and their duplicates) are held as `DigestRows`, digest prefixes
    pointing at journal lines, not as objects: 1.3 million of them stay a few tens of MB.
    """

    def __init__(self, options: GatherOptions, journal: JsonLinesWriter,
                 index: JournalIndex) -> None:
        self.options = options
        self.journal = journal
        self.index = index  # the journal as it was when the run began
        self.skipped = 0  # selected URLs already final in the journal
        self.this_run: dict[str, Counter[str]] = defaultdict(Counter)
        self.ok_counts: Counter[str] = Counter()
        self.copies = DigestRows()  # the journal lines of kept and duplicate images
        self.placeholders = read_placeholders(options.placeholders_path)
        self.placeholders_found = 0
        self._placeholder_urls: dict[str, int] = {}  # digest -> URLs when found this run
        for offset, record in index.last_records(options.journal_path, _COPIES):
            if record.get("sha256"):
                self.copies.add(record["sha256"], offset)
            self.ok_counts[_class_of(record)] += record["outcome"] == "ok"

    def pending(self, selection: Selection) -> Iterator[tuple[int, UrlEntry]]:
        """(index, entry) of every selected URL not final in the journal, in list order;
        the others are counted in `skipped`."""
        numbered = enumerate(selection)
        while batch := list(itertools.islice(numbered, LOOKUP_BATCH)):
            final = final_codes(self.index.lookup(entry.id for _, entry in batch))
            self.skipped += int(final.sum())
            yield from itertools.compress(batch, (~final).tolist())

    def recover_unjournaled(self, pending: Iterable[tuple[int, UrlEntry]], classes: set[str]
                            ) -> Iterator[tuple[int, UrlEntry]]:
        """Journal images that a killed run renamed into place but never journaled; the
        rest of `pending` goes on."""
        on_disk = StemIndex.scan(self.options.out, classes)
        numbered = iter(pending)
        while batch := list(itertools.islice(numbered, LOOKUP_BATCH)):
            stems = [str(target_stem(self.options.out, entry)) for _, entry in batch]
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
        staged = Staged("ok", "found on disk", len(body), digest, path=str(path))
        problem = image_problem(body, self.options.min_size)
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
            "sha256": None, "path": None, "error": error, "attempts": attempts,
            "seconds": round(seconds, 3), "time": round(time.time(), 3),
        }
        if staged is not None:
            record.update(outcome=staged.outcome, error=staged.error or error,
                          bytes=staged.size, sha256=staged.sha256)
            if staged.outcome == "ok":
                self._keep_or_drop(entry, staged, record)
        offset = self._write(entry.klass, record)
        if record["outcome"] in _COPIES and record["sha256"]:
            self.copies.add(record["sha256"], offset)
        return record["outcome"]

    def _write(self, klass: str, record: dict[str, Any]) -> int:
        offset = self.journal.write(record)
        self.this_run[klass][record["outcome"]] += 1
        self.ok_counts[klass] += record["outcome"] == "ok"
        return offset

    def _keep_or_drop(self, entry: UrlEntry, staged: Staged, record: dict[str, Any]) -> None:
        digest = staged.sha256
        copies = [] if digest in self.placeholders else self._copies_of(digest)
        if self._makes_placeholder(digest, copies, entry.url):
            self._declare_placeholder(digest, staged, copies)
        if digest in self.placeholders:
            self._discard(staged)
            record.update(outcome="placeholder",
                          error=f"repeated body: the same bytes came for "
                                f"{self._placeholder_urls.get(digest) or 'many'} URLs "
                                f"(listed in {self.options.placeholders_path.name})")
            return
        first = next(((offset, copy) for offset, copy in copies if copy["outcome"] == "ok"
                      and _class_of(copy) == entry.klass), None)
        if first is not None and first[1]["id"] != entry.id:
            self._discard(staged)  # our own temp copy of bytes already kept
            record.update(outcome="duplicate", error=f"same bytes as {first[1]['id']}")
            return
        if first is not None:  # the same id kept again: its new line replaces the old
            self.copies.remove(digest, first[0])
        assert staged.path is not None
        if staged.temp:
            os.replace(staged.temp, staged.path)
        record["path"] = Path(staged.path).relative_to(self.options.out).as_posix()

    def _copies_of(self, digest: str) -> list[tuple[int, dict[str, Any]]]:
        """(offset, record) of every kept or duplicate image with these bytes, read back from
        the journal (none is read for bytes never seen before: the usual case)."""
        offsets = self.copies.offsets_of(digest)
        if not offsets:
            return []
        return [(offset, record) for offset, record
                in read_records(self.options.journal_path, offsets)
                if record.get("sha256") == digest]

    def _makes_placeholder(self, digest: str, copies: list[tuple[int, dict[str, Any]]],
                           url: str) -> bool:
        """True when these bytes, with this URL, came for placeholder_after URLs, not all
        the same (a URL listed twice is one image)."""
        after, count = self.options.placeholder_after, len(copies) + 1
        if not after or count < after or all(copy["url"] == url for _, copy in copies):
            return False
        self._placeholder_urls[digest] = count
        return True

    @staticmethod
    def _discard(staged: Staged) -> None:
        if staged.temp:
            os.unlink(staged.temp)

    def _declare_placeholder(self, digest: str, staged: Staged,
                             copies: list[tuple[int, dict[str, Any]]]) -> None:
        """Remember the digest, then take back every copy kept so far."""
        self.placeholders.add(digest)
        self.placeholders_found += 1
        with open(self.options.placeholders_path, "a", encoding="utf-8") as handle:
            handle.write(f"{digest}\n")
        sample = self.options.out / PLACEHOLDER_DIR / f"{digest}{Path(staged.path or '').suffix}"
        for offset, copy in copies:
            self.copies.remove(digest, offset)
            klass = _class_of(copy)
            if copy["outcome"] == "ok":
                self._set_aside(self.options.out / copy["path"], sample)
                self.ok_counts[klass] -= 1
        for _, copy in copies:
            klass = _class_of(copy)
            self._write(klass, {
                "id": copy["id"], "wnid": copy.get("wnid", klass), "class": klass,
                "url": copy["url"], "outcome": "placeholder", "final": True,
                "http_status": None, "bytes": staged.size, "sha256": digest, "path": None,
                "error": f"repeated body, found later (a copy is in {PLACEHOLDER_DIR}/)",
                "attempts": 0, "seconds": 0.0, "time": round(time.time(), 3)})

    @staticmethod
    def _set_aside(path: Path, sample: Path) -> None:
        """Identical bytes: one copy stays under .placeholders/ for inspection."""
        sample.parent.mkdir(exist_ok=True)
        if path.exists():
            os.replace(path, sample)


def _class_of(record: dict[str, Any]) -> str:
    """A record's class; records written before hyponyms had only their wnid."""
    return record.get("class", record.get("wnid", ""))


def read_placeholders(path: Path) -> set[str]:
    """The digests a run found to be placeholders (one per line)."""
    if not path.exists():
        return set()
    return {line.split()[0] for line in path.read_text(encoding="utf-8").splitlines()
            if line.strip()}


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
