"""Checking, de-duplicating, writing and journaling what was fetched.

The work is split at the one decision that needs the whole run's view: a worker process
checks a body (magic bytes, a real decode, size, known placeholders), hashes it (SHA-256, and
a perceptual hash from the same decode) and writes it
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
from typing import Any, NamedTuple

import numpy as np
from PIL import Image

from pipeline.core.fsutil import FILE_MODE, TEMP_SUFFIX, JsonLinesWriter
from pipeline.core.images import ImageDecodeError, decode_image, sniff_extension
from pipeline.core.perceptual import (
    DECODE_SIDE,
    VIEW_DIGITS,
    View,
    ViewSet,
    coarse_from_hex,
    fine_distance,
    hash_view,
    view_from_hex,
    view_to_hex,
)
from pipeline.formats.journal import (
    JournalIndex,
    KnownPlaceholder,
    final_codes,
    placeholder_line,
    read_placeholders,
    read_records,
)
from pipeline.formats.urllist import Selection, UrlEntry, safe_file_stem
from pipeline.stages.gather.digests import DigestRows, NearRows
from pipeline.stages.gather.hosts import site_of
from pipeline.stages.gather.options import GatherOptions

LOOKUP_BATCH = 4096  # entries looked up in the journal index at once (as objects: keep it small)

PLACEHOLDER_DIR = ".placeholders"  # hidden: never taken for a class folder
_COPIES = frozenset({"ok", "duplicate"})  # outcomes whose bytes later images are checked against
# Near-identical, for placeholders: a host's picture resized and re-encoded per request. Measured
# on five "image not found" pictures in 13 sizes/qualities each (0.5x-2x, JPEG q60-q92): 95% of
# variant pairs are within both distances of the kept images' index (and a found placeholder's
# variants all join the known set, so one close variant suffices), every pair within coarse 12
# and fine 36; 2,400 different pictures of the synthetic sample (similar figures: a hard
# negative set) have no pair within (7, 40). The coarse hash of such a flat picture is the less
# stable of the two, the fine one decides.
PLACEHOLDER_COARSE = 7  # of 64 bits (NearRows finds at most 7)
PLACEHOLDER_FINE = 32  # of 256 bits
PLACEHOLDER_KNOWN_COARSE = 16  # against the few known placeholders, scanned, not indexed
# The hashes see brightness only, and a small object on a plain background (a product shot)
# barely moves them: 200 such shots (a disc or square of random colour and size on white) had
# 182 pairs within both distances whose mean colours in 2 x 2 cells were within 12 levels, 5
# in 4 x 4 cells within 6 levels; the sizes and qualities of a placeholder stay within 2.
COLOUR_CELLS = 4
PLACEHOLDER_COLOUR = 6  # levels (of 255) any cell's channel may differ by
FINGERPRINT_DIGITS = VIEW_DIGITS + 2 * 3 * COLOUR_CELLS * COLOUR_CELLS


class Fingerprint(NamedTuple):
    """What tells a re-encoded or resized copy of an image: its perceptual hashes and its
    colour in COLOUR_CELLS x COLOUR_CELLS cells. As text (the journal's `phash`):
    FINGERPRINT_DIGITS hex digits, the view's, then the colours'."""

    view: View
    colour: bytes

    @classmethod
    def of(cls, image: Image.Image) -> Fingerprint:
        """From an image decoded at (about) DECODE_SIDE; a larger one (a PNG or GIF decodes
        whole) is shrunk once, so no full-size copy is made."""
        factor = min(image.size) // DECODE_SIDE
        small = image.reduce(factor) if factor > 1 else image
        rgb = small if small.mode == "RGB" else small.convert("RGB")
        cells = rgb.resize((COLOUR_CELLS, COLOUR_CELLS), Image.BOX)
        return cls(hash_view(rgb), cells.tobytes())

    @classmethod
    def from_hex(cls, text: str) -> Fingerprint:
        """The inverse of to_hex; ValueError for anything else."""
        if len(text) != FINGERPRINT_DIGITS:
            raise ValueError(f"a fingerprint has {FINGERPRINT_DIGITS} hex digits")
        return cls(view_from_hex(text[:VIEW_DIGITS]), bytes.fromhex(text[VIEW_DIGITS:]))

    def to_hex(self) -> str:
        return view_to_hex(self.view) + self.colour.hex()

    def alike(self, other: Fingerprint) -> bool:
        """Near-identical: the fine hashes and every cell's colours close."""
        return (fine_distance(self.view, other.view) <= PLACEHOLDER_FINE
                and self.same_colours(other.colour))

    def same_colours(self, other: bytes) -> bool:
        """Within PLACEHOLDER_COLOUR in every cell and channel."""
        difference = np.abs(np.frombuffer(self.colour, np.uint8).astype(np.int16)
                            - np.frombuffer(other, np.uint8))
        return bool(difference.max() <= PLACEHOLDER_COLOUR)


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
    """Keeps or drops staged images and journals every outcome (coordinator side).

    It also spots mass placeholders: an image that arrives for `placeholder_after` URLs (from
    at least two different URLs, across hosts and synsets), with the same bytes or a
    near-identical perceptual hash (a host that re-encodes or resizes its picture per
    request), is a host's generic "image not found" picture, not a photo. Every copy is then
    taken back (set aside under OUT/.placeholders/ for inspection, the journal corrected), and
    the body is remembered in OUT/placeholders.txt (digest, fingerprint, site) so resumes and
    later runs reject it, and images near it from the same site, at once.

    Near-identical (not byte-identical) images count together only when one site (registered
    domain) served them: a placeholder is a host's picture, while different photos from
    different sites can look alike to a hash (product shots on white), and a whole class of
    them must never be taken back.

    The images kept so far (and their duplicates) are held as `DigestRows` and `NearRows`,
    hash keys pointing at journal lines, not as objects: 1.3 million of them stay ~50 MB.
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
        self.near = NearRows(PLACEHOLDER_COARSE)  # the same lines, by perceptual hash
        known = read_placeholders(options.placeholders_path, FINGERPRINT_DIGITS)
        self.placeholders = set(known)
        hashed = [entry for entry in known.values() if entry.fingerprint]
        marks = [Fingerprint.from_hex(entry.fingerprint) for entry in hashed]
        self.placeholder_views = ViewSet(mark.view for mark in marks)
        self.placeholder_marks = [(mark.colour, entry.site) for mark, entry in zip(
            marks, hashed, strict=True)]
        self.placeholders_found = 0
        self._placeholder_urls: dict[str, int] = {}  # digest -> URLs when found this run
        self._soft_404s: set[str] = set()  # digests a host served for a made-up path
        for offset, record in index.last_records(options.journal_path, _COPIES):
            self._hold(record, offset)
            self.ok_counts[_class_of(record)] += record["outcome"] == "ok"
        self._finish_take_backs()

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

    def _hold(self, record: dict[str, Any], offset: int) -> None:
        """Index a kept or duplicate image's journal line by its digest and hash."""
        if record.get("sha256"):
            self.copies.add(record["sha256"], offset)
        if (coarse := _coarse_of(record)) is not None:
            self.near.add(coarse, offset)

    def _forget(self, record: dict[str, Any], offset: int) -> None:
        """The inverse of _hold: an image taken back."""
        if record.get("sha256"):
            self.copies.remove(record["sha256"], offset)
        if (coarse := _coarse_of(record)) is not None:
            self.near.remove(coarse, offset)

    def _write(self, klass: str, record: dict[str, Any]) -> int:
        offset = self.journal.write(record)
        self.this_run[klass][record["outcome"]] += 1
        self.ok_counts[klass] += record["outcome"] == "ok"
        return offset

    def _keep_or_drop(self, entry: UrlEntry, staged: Staged, record: dict[str, Any]) -> None:
        digest = staged.sha256
        copies = self._copies_of(digest)
        why = self._placeholder_reason(entry, staged, copies)
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
        record["path"] = Path(staged.path).relative_to(self.options.out).as_posix()

    def _placeholder_reason(self, entry: UrlEntry, staged: Staged,
                            copies: list[tuple[int, dict[str, Any]]]) -> str:
        """Why this image is a placeholder (known, near-identical to a known one, or the one
        too many of a repeated image, whose copies are then taken back); empty when not."""
        digest, listed = staged.sha256, self.options.placeholders_path.name
        mark = Fingerprint.from_hex(staged.phash) if staged.phash else None
        site = site_of(entry.url)
        if digest not in self.placeholders:
            if mark is not None and self._near_known_placeholder(mark, site):
                self._remember(digest)  # not as a reference: the known set must not drift
                return f"near-identical to a placeholder from {site} listed in {listed}"
            alike = copies + (self._near_copies_of(mark, site, {offset for offset, _ in copies})
                              if mark is not None else [])
            if not self._makes_placeholder(digest, alike, entry.url):
                return ""
            self._declare_placeholder(digest, staged, site, alike)
        if digest in self._soft_404s:
            return (f"the picture {site} serves for a path that does not exist (listed in "
                    f"{listed})")
        return (f"repeated body: the same or a near-identical image came for "
                f"{self._placeholder_urls.get(digest) or 'many'} URLs (listed in {listed})")

    def missing_picture(self, url: str, digest: str, phash: str) -> None:
        """A host served this picture for a path that cannot exist (`worker._MadeUpPaths`): it
        is what the host serves for a lost photo. Remembered like a placeholder found by
        count, and its kept copies from that site (same bytes, or near-identical) taken back."""
        if digest in self.placeholders:
            return
        site = site_of(url)
        self.placeholders_found += 1
        self._soft_404s.add(digest)
        self._remember(digest, phash, site)
        mark = Fingerprint.from_hex(phash)
        copies = self._copies_of(digest)
        copies += self._near_copies_of(mark, site, {offset for offset, _ in copies})
        self._take_back(self._with_family(copies, site))

    def _near_known_placeholder(self, mark: Fingerprint, site: str) -> bool:
        """Compared with the known placeholders from the same site: few enough to scan, with
        a wider coarse limit than the index of kept images finds (NearRows: at most 7)."""
        return any(self.placeholder_marks[position][1] == site
                   and mark.same_colours(self.placeholder_marks[position][0])
                   for position in self.placeholder_views.near(
                       mark.view, PLACEHOLDER_KNOWN_COARSE, PLACEHOLDER_FINE))

    def _near_copies_of(self, mark: Fingerprint, site: str, exclude: set[int]
                        ) -> list[tuple[int, dict[str, Any]]]:
        """(offset, record) of every kept or duplicate image from `site` with other bytes
        and a near-identical fingerprint (none is read back for a new-looking image)."""
        if not self.options.placeholder_after:
            return []
        offsets = [offset for offset in self.near.offsets_near(mark.view[0])
                   if offset not in exclude]
        return [(offset, record) for offset, record
                in read_records(self.options.journal_path, offsets)
                if site_of(record["url"]) == site
                and (other := _fingerprint_of(record)) is not None and mark.alike(other)]

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
        """True when this image, with this URL, came for placeholder_after URLs, not all
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

    def _declare_placeholder(self, digest: str, staged: Staged, site: str,
                             copies: list[tuple[int, dict[str, Any]]]) -> None:
        """Remember the body and its copies' (a resized copy can be nearer the next one),
        then take back every copy kept so far: those found, and the images from the same
        site near-identical to any of them, transitively (a size far from this one can be
        near another)."""
        self.placeholders_found += 1
        self._remember(digest, staged.phash, site)
        copies = self._with_family(copies, site)
        for _, copy in copies:  # all from `site`, but for copies of the very same bytes
            mark = _fingerprint_of(copy)
            self._remember(copy["sha256"], mark.to_hex() if mark else "", site)
        self._take_back(copies)

    def _finish_take_backs(self) -> None:
        """Take back the kept copies of known placeholders: those a run killed while it
        declared one had not journaled yet (their files may be set aside already)."""
        for digest in self.placeholders:
            copies = self._copies_of(digest)
            if copies:
                self._take_back(copies)

    def _take_back(self, copies: list[tuple[int, dict[str, Any]]]) -> None:
        """Set the kept copies aside in .placeholders/ and journal every copy as a
        placeholder found later."""
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

    def _with_family(self, copies: list[tuple[int, dict[str, Any]]], site: str
                     ) -> list[tuple[int, dict[str, Any]]]:
        """`copies` and every kept image from `site` near-identical to one of them from that
        site, and so on."""
        family = dict(copies)
        todo = [mark for _, record in copies
                if site_of(record["url"]) == site and (mark := _fingerprint_of(record))]
        while todo:
            for offset, record in self._near_copies_of(todo.pop(), site, set(family)):
                family[offset] = record
                todo.extend(filter(None, [_fingerprint_of(record)]))
        return list(family.items())

    def _remember(self, digest: str, phash: str = "", site: str = "") -> None:
        """A placeholder body, in placeholders.txt and in memory: rejected from now on, and
        so is every image from `site` near-identical to it when its fingerprint is given."""
        if digest in self.placeholders:
            return
        self.placeholders.add(digest)
        if phash:
            mark = Fingerprint.from_hex(phash)
            self.placeholder_views.add(mark.view)
            self.placeholder_marks.append((mark.colour, site))
        with open(self.options.placeholders_path, "a", encoding="utf-8") as handle:
            handle.write(placeholder_line(KnownPlaceholder(digest, phash, site)))

    def _set_aside(self, path: Path, digest: str) -> None:
        """Into .placeholders/, named by its digest: copies with the same bytes share one
        file, near-identical ones each keep theirs."""
        folder = self.options.out / PLACEHOLDER_DIR
        folder.mkdir(exist_ok=True)
        if path.exists():
            os.replace(path, folder / f"{digest}{path.suffix}")


def _fingerprint_of(record: dict[str, Any]) -> Fingerprint | None:
    """A journal record's fingerprint; None for an image never hashed, or a `phash` this
    version cannot read (an edited or foreign journal: the image is then just not compared)."""
    try:
        return Fingerprint.from_hex(record["phash"]) if record.get("phash") else None
    except ValueError:
        return None


def _coarse_of(record: dict[str, Any]) -> int | None:
    """The coarse hash a kept image is indexed by, read alone: a resume indexes every kept
    image at start (1.3 million at ImageNet scale: parsing whole fingerprints cost ~4 s)."""
    phash = record.get("phash")
    if not phash or len(phash) != FINGERPRINT_DIGITS:
        return None
    try:
        return coarse_from_hex(phash)
    except ValueError:
        return None


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
