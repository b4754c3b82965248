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
from collections import Counter, defaultdict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.fsutil import FILE_MODE, TEMP_SUFFIX, JsonLinesWriter
from pipeline.gather.options import GatherOptions
from pipeline.images import ImageDecodeError, decode_image, sniff_extension
from pipeline.journal import JournalIndex, final_codes
from pipeline.urllist import Selection, UrlEntry, safe_file_stem

LOOKUP_BATCH = 4096  # entries looked up in the journal index at once (as objects: keep it small)

PLACEHOLDER_DIR = ".placeholders"  # hidden: never taken for a class folder


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


@dataclass
class _Kept:
    """An image kept for a class: enough to take it back if its bytes prove a placeholder."""

    id: str
    wnid: str
    url: str
    path: str  # relative to the output root


class Collector:
    """Keeps or drops staged images and journals every outcome (coordinator side).

    It also spots mass placeholders: bytes that arrive for `placeholder_after` URLs (from at
    least two different URLs, across hosts and synsets) are a host's generic "image not
    found" picture, not a photo. Every copy is then taken back (one kept under
    OUT/.placeholders/ for inspection, the journal corrected), and the digest is remembered
    in OUT/placeholders.txt so resumes and later runs reject it at once.
    """

    def __init__(self, options: GatherOptions, journal: JsonLinesWriter,
                 index: JournalIndex) -> None:
        self.options = options
        self.journal = journal
        self.index = index  # the journal as it was when the run began
        self.skipped = 0  # selected URLs already final in the journal
        self.this_run: dict[str, Counter[str]] = defaultdict(Counter)
        self.ok_counts: Counter[str] = Counter()
        self.kept: dict[str, dict[str, _Kept]] = defaultdict(dict)  # class -> sha -> image
        self.placeholders = read_placeholders(options.placeholders_path)
        self.placeholders_found = 0
        self._seen: dict[str, tuple[int, str, bool]] = {}  # sha -> (URLs, first URL, >1 URL)
        self._duplicates: dict[str, list[tuple[str, _Kept]]] = defaultdict(list)  # sha -> ...
        for record in index.last_records(options.journal_path,
                                         frozenset({"ok", "duplicate"})):
            self._count(record["sha256"], record["url"])
            if record["outcome"] == "duplicate":
                self._duplicates[record["sha256"]].append((record["class"], _Kept(
                    record["id"], record["wnid"], record["url"], "")))
            if record["outcome"] == "ok":
                klass = record.get("class", record.get("wnid", ""))
                self.ok_counts[klass] += 1
                self.kept[klass][record["sha256"]] = _Kept(
                    record["id"], record.get("wnid", klass), record["url"], record["path"])

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
        on_disk = _files_by_stem(self.options.out, classes)
        for index, entry in pending:
            path = on_disk.get(target_stem(self.options.out, entry))
            if path is None:
                yield index, entry
                continue
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
        self._write(entry.klass, record)
        return record["outcome"]

    def _write(self, klass: str, record: dict[str, Any]) -> None:
        self.journal.write(record)
        self.this_run[klass][record["outcome"]] += 1
        self.ok_counts[klass] += record["outcome"] == "ok"

    def _keep_or_drop(self, entry: UrlEntry, staged: Staged, record: dict[str, Any]) -> None:
        digest = staged.sha256
        if digest not in self.placeholders and self._count(digest, entry.url):
            self._declare_placeholder(digest, staged)
        if digest in self.placeholders:
            self._discard(staged)
            record.update(outcome="placeholder",
                          error=f"repeated body: the same bytes came for "
                                f"{self._seen.get(digest, (0,))[0] or 'many'} URLs "
                                f"(listed in {self.options.placeholders_path.name})")
            return
        first = self.kept[entry.klass].get(digest)
        if first is not None and first.id != entry.id:
            self._discard(staged)  # our own temp copy of bytes already kept
            record.update(outcome="duplicate", error=f"same bytes as {first.id}")
            self._duplicates[digest].append((entry.klass, _Kept(entry.id, entry.wnid,
                                                                entry.url, "")))
            return
        assert staged.path is not None
        if staged.temp:
            os.replace(staged.temp, staged.path)
        path = Path(staged.path).relative_to(self.options.out).as_posix()
        self.kept[entry.klass][digest] = _Kept(entry.id, entry.wnid, entry.url, path)
        record["path"] = path

    @staticmethod
    def _discard(staged: Staged) -> None:
        if staged.temp:
            os.unlink(staged.temp)

    def _count(self, digest: str, url: str) -> bool:
        """Count one more URL for these bytes; True when that makes them a placeholder."""
        count, first_url, several = self._seen.get(digest, (0, url, False))
        count, several = count + 1, several or url != first_url
        self._seen[digest] = (count, first_url, several)
        after = self.options.placeholder_after
        return bool(after) and count >= after and several

    def _declare_placeholder(self, digest: str, staged: Staged) -> None:
        """Remember the digest, then take back every copy kept so far."""
        self.placeholders.add(digest)
        self.placeholders_found += 1
        with open(self.options.placeholders_path, "a", encoding="utf-8") as handle:
            handle.write(f"{digest}\n")
        sample = self.options.out / PLACEHOLDER_DIR / f"{digest}{Path(staged.path or '').suffix}"
        taken_back = self._duplicates.pop(digest, [])
        for klass, kept in self.kept.items():
            image = kept.pop(digest, None)
            if image is None:
                continue
            path = self.options.out / image.path
            sample.parent.mkdir(exist_ok=True)
            if path.exists():
                os.replace(path, sample)  # identical bytes: one copy stays for inspection
            self.ok_counts[klass] -= 1
            taken_back.append((klass, image))
        for klass, image in taken_back:
            self._write(klass, {
                "id": image.id, "wnid": image.wnid, "class": klass, "url": image.url,
                "outcome": "placeholder", "final": True, "http_status": None,
                "bytes": staged.size, "sha256": digest, "path": None,
                "error": f"repeated body, found later (a copy is in {PLACEHOLDER_DIR}/)",
                "attempts": 0, "seconds": 0.0, "time": round(time.time(), 3)})


def read_placeholders(path: Path) -> set[str]:
    """The digests a run found to be placeholders (one per line)."""
    if not path.exists():
        return set()
    return {line.split()[0] for line in path.read_text(encoding="utf-8").splitlines()
            if line.strip()}


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
