"""The gather journal: one JSON line per finished URL, append-only.

It is the resume record: a re-run skips every id whose last line is a final outcome and tries
the transient ones again. Lines are flushed one by one, so `kill -9` loses at most the line
being written; a torn last line is ignored on reading.
"""

from __future__ import annotations

import json
import logging
from array import array
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from pipeline.core.errors import InputError

log = logging.getLogger(__name__)

JOURNAL_NAME = "gather.jsonl"  # in the output root of `pipeline gather`
PLACEHOLDERS_NAME = "placeholders.txt"  # bodies found to be placeholders, beside the journal

# In the order the summary table shows them. Final: ok, dead, http_error (4xx), not_image,
# too_large, too_small, placeholder, duplicate, opted_out, blocked_redirect. Transient (tried
# again by the next run): timeout, unreachable (refused, TLS, no route), http_error (5xx, 429),
# host_down (not requested: its host failed too often), host_not_found (not requested: its
# name did not resolve), robots_unreachable (not requested: its host's robots.txt answered 5xx,
# which RFC 9309 reads as "disallow everything for now"), interrupted (Ctrl-C). New outcomes
# go at the end: a journal index codes an outcome by its place here.
OUTCOMES = ("ok", "dead", "http_error", "timeout", "unreachable", "host_down", "host_not_found",
            "interrupted", "not_image", "too_large", "too_small", "placeholder", "duplicate",
            "opted_out", "blocked_redirect", "robots_unreachable")
ALWAYS_TRANSIENT = frozenset({"timeout", "unreachable", "host_down", "host_not_found",
                              "interrupted", "robots_unreachable"})
RETRYABLE_STATUSES = frozenset({408, 425, 429, 500, 502, 503, 504})


def is_final(record: dict[str, Any]) -> bool:
    """A final outcome is not tried again on resume; a transient one is.

    Every record says which (`final`); the outcome decides only for records without it.
    """
    if record.get("final") is not None:
        return bool(record["final"])
    return record["outcome"] not in ALWAYS_TRANSIENT


def read_journal(path: Path) -> dict[str, dict[str, Any]]:
    """The last record of every id, as dicts: for small journals (tests, the report);
    `JournalIndex` is the compact form a gather run holds."""
    return {record["id"]: record for _, record in iter_journal(path)}


def iter_journal(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """(offset of the line, record) for every readable line, in order; unparsable lines (a
    torn tail after a kill) are skipped and counted in a warning."""
    if not path.exists():
        return
    skipped = offset = 0
    with open(path, "rb") as handle:
        for line in handle:
            record = _parse(line)
            if record is None:
                skipped += 1
            else:
                yield offset, record
            offset += len(line)
    if skipped:
        log.warning("journal %s: skipped %d unreadable line(s)", path, skipped)


def _parse(line: bytes) -> dict[str, Any] | None:
    try:
        record = json.loads(line.decode("utf-8", "replace"))
        record["id"], record["outcome"]  # noqa: B018 - every record has both
    except (ValueError, KeyError, TypeError):
        return None
    return record


READ_BATCH = 1 << 18  # journal lines sorted at once when indexing (~6 MB of arrays)
UNKNOWN = 0xFF  # JournalIndex code of an id the journal does not hold
_FINAL = 0x80  # the code's bit for a final outcome; the low bits index OUTCOMES
_INDEX = 0x7F
_CODES = {outcome: code for code, outcome in enumerate(OUTCOMES)}


class JournalIndex:
    """The last outcome of every id in a journal, in 17 bytes per id instead of a dict.

    A gather run over ImageNet-1k holds 1.4 million ids: as dicts their records take gigabytes,
    here a sorted array of the ids' hashes, an outcome code each (final bit | index in
    OUTCOMES) and the offset of the id's last line, to read the whole record back when needed
    (the journal on disk stays the one source of truth). Hashes are Python's own, salted per
    process: two ids of one journal share a hash with a chance of about 1 in 10^8 at 1.4 million
    ids, and then only for that run, as the next run draws another salt.
    """

    def __init__(self, keys: np.ndarray, codes: np.ndarray, offsets: np.ndarray) -> None:
        self.keys, self.codes, self.offsets = keys, codes, offsets

    @classmethod
    def read(cls, path: Path) -> JournalIndex:
        """Index the journal READ_BATCH lines at a time: the peak stays near the index's own
        size (a resume reads millions of lines; sorting them all at once took ~4x more)."""
        index = cls(np.empty(0, np.int64), np.empty(0, np.uint8), np.empty(0, np.int64))
        keys, codes, offsets = array("q"), bytearray(), array("q")
        for offset, record in iter_journal(path):
            keys.append(hash(record["id"]))
            codes.append(_code(record))
            offsets.append(offset)
            if len(keys) == READ_BATCH:
                index._merge(keys, codes, offsets)
                keys, codes, offsets = array("q"), bytearray(), array("q")
        index._merge(keys, codes, offsets)
        return index

    def _merge(self, keys: array, codes: bytearray, offsets: array) -> None:
        """Fold a batch of lines in, in journal order: the last line of an id wins."""
        if not keys:
            return
        batch_keys = np.frombuffer(keys, np.int64)
        order = np.argsort(batch_keys, kind="stable")
        last = np.ones(len(order), bool)
        last[:-1] = batch_keys[order[1:]] != batch_keys[order[:-1]]
        order = order[last]
        new_keys = batch_keys[order]
        new_codes = np.frombuffer(codes, np.uint8)[order]
        new_offsets = np.frombuffer(offsets, np.int64)[order]
        where = np.searchsorted(self.keys, new_keys)
        known = where < len(self.keys)
        known[known] = self.keys[where[known]] == new_keys[known]
        self.codes[where[known]] = new_codes[known]  # an id seen before: its later line wins
        self.offsets[where[known]] = new_offsets[known]
        fresh = ~known
        if fresh.any():
            where = where[fresh]
            self.keys = np.insert(self.keys, where, new_keys[fresh])
            self.codes = np.insert(self.codes, where, new_codes[fresh])
            self.offsets = np.insert(self.offsets, where, new_offsets[fresh])

    def __len__(self) -> int:
        return len(self.keys)

    def lookup(self, ids: Iterable[str]) -> np.ndarray:
        """The code of each id (UNKNOWN where the journal has none)."""
        wanted = np.fromiter((hash(image_id) for image_id in ids), np.int64)
        where = np.searchsorted(self.keys, wanted)
        found = where < len(self.keys)
        found[found] = self.keys[where[found]] == wanted[found]
        codes = np.full(len(wanted), UNKNOWN, np.uint8)
        codes[found] = self.codes[where[found]]
        return codes

    def outcome(self, image_id: str) -> str | None:
        return outcome_of(int(self.lookup([image_id])[0]))

    def holds(self, outcome: str) -> bool:
        """Whether any id's last outcome is `outcome`: one pass, so that a caller asking per
        id (a lookup each) can skip asking when none is."""
        return bool(np.any((self.codes & _INDEX) == _CODES[outcome]))

    def last_records(self, path: Path, outcomes: frozenset[str]
                     ) -> Iterator[tuple[int, dict[str, Any]]]:
        """(offset, last record) of every id whose last outcome is one of `outcomes`, read
        back from the journal in its order (one pass; only those lines are parsed)."""
        wanted = np.isin(self.codes & _INDEX, [_CODES[o] for o in outcomes])
        offsets = np.sort(self.offsets[wanted]).tolist()
        if offsets:  # an empty index may have no journal file behind it
            yield from read_records(path, offsets)


def read_records(path: Path, offsets: Iterable[int]) -> Iterator[tuple[int, dict[str, Any]]]:
    """(offset, record) of the lines that begin at `offsets`; an unreadable one is skipped.
    The journal stays the one source of truth: what a run holds in memory points into it."""
    with open(path, "rb") as handle:
        for offset in offsets:
            handle.seek(offset)
            record = _parse(handle.readline())
            if record is not None:
                yield offset, record


class KnownPlaceholder(NamedTuple):
    """A line of placeholders.txt: a body found to be a placeholder, and (when it was
    hashed) its perceptual fingerprint and the site that served it."""

    digest: str
    fingerprint: str = ""
    site: str = ""


_SHA256_DIGITS = 64


def read_placeholders(path: Path, fingerprint_digits: int | None = None
                      ) -> dict[str, KnownPlaceholder]:
    """The bodies a gather run found to be placeholders, by SHA-256: one
    `<sha256> [<fingerprint> <site>]` line each. A fingerprint of another length than
    `fingerprint_digits` (when given) is an error, as is any malformed line, except a last
    line cut short by a kill (no newline): that one is skipped, the body is found again."""
    if not path.exists():
        return {}
    text = path.read_text(encoding="utf-8", errors="replace")
    lines = text.splitlines()
    found: dict[str, KnownPlaceholder] = {}
    for number, line in enumerate(lines, 1):
        fields = line.split()
        if not fields:
            continue
        known = _placeholder_of(fields, fingerprint_digits)
        if known is not None:
            found[known.digest] = known
        elif number == len(lines) and not text.endswith("\n"):
            log.warning("%s: line %d was cut short by an interrupted run: skipped", path, number)
        else:
            raise InputError(
                f"{path}: line {number} is not '<sha256> [<fingerprint> <site>]' "
                f"({line[:40]!r}): delete that line (a placeholder that repeats is found again)")
    return found


def _placeholder_of(fields: list[str], fingerprint_digits: int | None) -> KnownPlaceholder | None:
    digest, *rest = fields
    if len(digest) != _SHA256_DIGITS or not _is_hex(digest) or len(rest) not in (0, 2):
        return None
    if rest and (not _is_hex(rest[0]) or fingerprint_digits not in (None, len(rest[0]))):
        return None
    fingerprint, site = rest or ("", "")
    return KnownPlaceholder(digest, fingerprint, "" if site == "-" else site)


def _is_hex(text: str) -> bool:
    return all(c in "0123456789abcdef" for c in text)


def placeholder_line(known: KnownPlaceholder) -> str:
    """One line of placeholders.txt (see read_placeholders)."""
    if known.fingerprint:
        return f"{known.digest} {known.fingerprint} {known.site or '-'}\n"
    return f"{known.digest}\n"


def _code(record: dict[str, Any]) -> int:
    return _CODES.get(record["outcome"], len(OUTCOMES)) | (_FINAL if is_final(record) else 0)


def outcome_of(code: int) -> str | None:
    """The outcome a JournalIndex code stands for; None for UNKNOWN."""
    if code == UNKNOWN:
        return None
    index = code & _INDEX
    return OUTCOMES[index] if index < len(OUTCOMES) else "unknown"


def final_codes(codes: np.ndarray) -> np.ndarray:
    """Which JournalIndex codes stand for a final outcome (UNKNOWN does not)."""
    return ((codes & _FINAL) != 0) & (codes != UNKNOWN)
