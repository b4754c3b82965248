"""Placeholders: the pictures hosts serve for photos they lost, told apart from photos.

An image that arrives for `placeholder_after` URLs (from at least two different URLs, across
hosts and synsets), with the same bytes or a near-identical perceptual hash (a host that
re-encodes or resizes its picture per request), is a host's generic "image not found"
picture, not a photo; so is the picture a host serves for a path that cannot exist
(`worker._MadeUpPaths`). Every kept copy is then taken back (the collector sets it aside under
OUT/.placeholders/ and corrects the journal), and the body is remembered in
OUT/placeholders.txt (digest, fingerprint, site) so resumes and later runs reject it, and
images near it from the same site, at once.

Near-identical (not byte-identical) images count together only when one site (registered
domain) served them: a placeholder is a host's picture, while different photos from different
sites can look alike to a hash (product shots on white), and a whole class of them must never
be taken back.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import numpy as np
from PIL import Image

from pipeline.core.perceptual import (
    DECODE_SIDE,
    VIEW_DIGITS,
    View,
    ViewSet,
    coarse_from_hex,
    colour_cells,
    fine_distance,
    hash_view,
    view_from_hex,
    view_to_hex,
)
from pipeline.formats.journal import KnownPlaceholder, placeholder_line, read_placeholders
from pipeline.stages.gather.digests import KeptImages
from pipeline.stages.gather.hosts import site_of
from pipeline.stages.gather.options import GatherOptions

PLACEHOLDER_DIR = ".placeholders"  # hidden: never taken for a class folder
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
        return cls(hash_view(rgb), colour_cells(rgb, COLOUR_CELLS))

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


Copies = list[tuple[int, dict[str, Any]]]  # (journal offset, record) of kept images


class Placeholders:
    """The known placeholders, and the decision that an image is one (coordinator side).

    `take_back(copies)` is the collector's: it sets the kept copies aside and journals them
    as placeholders found later."""

    def __init__(self, options: GatherOptions, kept: KeptImages,
                 take_back: Callable[[Copies], None]) -> None:
        self.options = options
        self.kept = kept
        self.take_back = take_back
        known = read_placeholders(options.placeholders_path, FINGERPRINT_DIGITS)
        self.digests = set(known)
        hashed = [entry for entry in known.values() if entry.fingerprint]
        marks = [Fingerprint.from_hex(entry.fingerprint) for entry in hashed]
        self.views = ViewSet(mark.view for mark in marks)
        self.marks = [(mark.colour, entry.site) for mark, entry in zip(marks, hashed,
                                                                       strict=True)]
        self.found = 0  # placeholders found in this run
        self._urls: dict[str, int] = {}  # digest -> URLs when found this run
        self._soft_404s: set[str] = set()  # digests a host served for a made-up path

    def finish_take_backs(self) -> None:
        """Take back the kept copies of known placeholders: those a run killed while it
        declared one had not journaled yet (their files may be set aside already)."""
        for digest in self.digests:
            copies = self.kept.copies_of(digest)
            if copies:
                self.take_back(copies)

    def reason(self, url: str, digest: str, phash: str, copies: Copies) -> str:
        """Why this image is a placeholder (known, near-identical to a known one, or the one
        too many of a repeated image, whose copies are then taken back); empty when not."""
        listed = self.options.placeholders_path.name
        mark = Fingerprint.from_hex(phash) if phash else None
        site = site_of(url)
        if digest not in self.digests:
            if mark is not None and self._near_known(mark, site):
                self._remember(digest)  # not as a reference: the known set must not drift
                # Kept before its family was known (a size far from the first ones declared):
                # this image's near copies from the site, and theirs, go back too.
                self._take_back_near(mark, site, copies)
                return f"near-identical to a placeholder from {site} listed in {listed}"
            alike = copies + (self._near_copies_of(mark, site, {offset for offset, _ in copies})
                              if mark is not None else [])
            if not self._repeated(digest, alike, url):
                return ""
            self._declare(digest, phash, site, alike)
        if digest in self._soft_404s:
            return (f"the picture {site} serves for a path that does not exist (listed in "
                    f"{listed})")
        return (f"repeated body: the same or a near-identical image came for "
                f"{self._urls.get(digest) or 'many'} URLs (listed in {listed})")

    def missing_picture(self, url: str, digest: str, phash: str) -> None:
        """A host served this picture for a path that cannot exist: it is what the host serves
        for a lost photo. Remembered like a placeholder found by count, and its kept copies
        from that site (same bytes, or near-identical) taken back."""
        if digest in self.digests:
            return
        site = site_of(url)
        self.found += 1
        self._soft_404s.add(digest)
        self._remember(digest, phash, site)
        self._take_back_near(Fingerprint.from_hex(phash), site, self.kept.copies_of(digest))

    def _take_back_near(self, mark: Fingerprint, site: str, copies: Copies) -> None:
        """Take back `copies`, the kept images from `site` near `mark`, and their family."""
        near = self._near_copies_of(mark, site, {offset for offset, _ in copies})
        family = self._with_family(copies + near, site)
        if family:
            self.take_back(family)

    def _near_known(self, mark: Fingerprint, site: str) -> bool:
        """Compared with the known placeholders from the same site: few enough to scan, with
        a wider coarse limit than the index of kept images finds (NearRows: at most 7)."""
        return any(self.marks[position][1] == site
                   and mark.same_colours(self.marks[position][0])
                   for position in self.views.near(
                       mark.view, PLACEHOLDER_KNOWN_COARSE, PLACEHOLDER_FINE))

    def _near_copies_of(self, mark: Fingerprint, site: str, exclude: set[int]) -> Copies:
        """(offset, record) of every kept or duplicate image from `site` with other bytes
        and a near-identical fingerprint (none is read back for a new-looking image)."""
        if not self.options.placeholder_after:
            return []
        return [(offset, record) for offset, record in self.kept.near_records(mark.view[0],
                                                                              exclude)
                if site_of(record["url"]) == site
                and (other := fingerprint_of(record)) is not None and mark.alike(other)]

    def _repeated(self, digest: str, copies: Copies, url: str) -> bool:
        """True when this image, with this URL, came for placeholder_after URLs, not all
        the same (a URL listed twice is one image)."""
        after, count = self.options.placeholder_after, len(copies) + 1
        if not after or count < after or all(copy["url"] == url for _, copy in copies):
            return False
        self._urls[digest] = count
        return True

    def _declare(self, digest: str, phash: str, site: str, copies: Copies) -> None:
        """Remember the body and its copies' (a resized copy can be nearer the next one),
        then take back every copy kept so far: those found, and the images from the same
        site near-identical to any of them, transitively (a size far from this one can be
        near another)."""
        self.found += 1
        self._remember(digest, phash, site)
        copies = self._with_family(copies, site)
        for _, copy in copies:  # all from `site`, but for copies of the very same bytes
            mark = fingerprint_of(copy)
            self._remember(copy["sha256"], mark.to_hex() if mark else "", site)
        self.take_back(copies)

    def _with_family(self, copies: Copies, site: str) -> Copies:
        """`copies` and every kept image from `site` near-identical to one of them from that
        site, and so on."""
        family = dict(copies)
        todo = [mark for _, record in copies
                if site_of(record["url"]) == site and (mark := fingerprint_of(record))]
        while todo:
            for offset, record in self._near_copies_of(todo.pop(), site, set(family)):
                family[offset] = record
                todo.extend(filter(None, [fingerprint_of(record)]))
        return list(family.items())

    def _remember(self, digest: str, phash: str = "", site: str = "") -> None:
        """A placeholder body, in placeholders.txt and in memory: rejected from now on, and
        so is every image from `site` near-identical to it when its fingerprint is given."""
        if digest in self.digests:
            return
        self.digests.add(digest)
        if phash:
            mark = Fingerprint.from_hex(phash)
            self.views.add(mark.view)
            self.marks.append((mark.colour, site))
        with open(self.options.placeholders_path, "a", encoding="utf-8") as handle:
            handle.write(placeholder_line(KnownPlaceholder(digest, phash, site)))


def fingerprint_of(record: dict[str, Any]) -> Fingerprint | None:
    """A journal record's fingerprint; None for an image never hashed, or a `phash` this
    version cannot read (an edited or foreign journal: the image is then just not compared)."""
    try:
        return Fingerprint.from_hex(record["phash"]) if record.get("phash") else None
    except ValueError:
        return None



def coarse_of(record: dict[str, Any]) -> int | None:
    """The coarse hash a kept image is indexed by, read alone: a resume indexes every kept
    image at start (1.3 million at ImageNet scale: parsing whole fingerprints cost ~4 s)."""
    phash = record.get("phash")
    if not phash or len(phash) != FINGERPRINT_DIGITS:
        return None
    try:
        return coarse_from_hex(phash)
    except ValueError:
        return None
