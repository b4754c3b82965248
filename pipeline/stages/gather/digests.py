"""Which journal lines hold a kept or duplicate image of given bytes (16 bytes a line), or of
nearly the same perceptual hash (32 bytes a line).

The collector checks every new image against the images already kept (a duplicate in its
class, a placeholder across classes). At ImageNet-1k scale that is 1.3 million images: as one
Python object each (digest string, id, URL, path) they took hundreds of megabytes. Here each is
a 60-bit prefix of its SHA-256 and the offset of its journal line, in sorted arrays; a digest's
lines are read back from the journal (the one source of truth) only when its prefix is already
there, i.e. for a duplicate or a placeholder, and the caller compares the full digests.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from pipeline.core.perceptual import BlockIndex, block_keys
from pipeline.formats.journal import read_records

MERGE_AT = 1 << 14  # rows added since the last merge, held in a dict until then (~3 MB)
REMOVED = -1  # the offset of a row taken back (a placeholder's copy)


def digest_key(digest: str) -> int:
    """The first 60 bits of a hex SHA-256: fits an int64, and two of 1.3 million digests
    share it with a chance of about 1 in a million (then both are read back and compared)."""
    return int(digest[:15], 16)


class DigestRows:
    """A multimap from image digest to journal offsets: sorted arrays plus a small dict of
    the latest rows, merged into the arrays every MERGE_AT rows (an insert per row would copy
    the arrays each time; a dict of everything would cost ~150 bytes a row)."""

    def __init__(self) -> None:
        self.keys = np.empty(0, np.int64)
        self.offsets = np.empty(0, np.int64)
        self._recent: dict[int, list[int]] = {}
        self._recent_rows = 0

    def __len__(self) -> int:
        """Rows held, taken-back ones included until the next merge."""
        return len(self.keys) + self._recent_rows

    def add(self, digest: str, offset: int) -> None:
        self._recent.setdefault(digest_key(digest), []).append(offset)
        self._recent_rows += 1
        if self._recent_rows >= MERGE_AT:
            self._merge()

    def offsets_of(self, digest: str) -> list[int]:
        """The journal offsets held for this digest's prefix, oldest first."""
        key = digest_key(digest)
        start, stop = np.searchsorted(self.keys, [key, key + 1])
        held = [offset for offset in self.offsets[start:stop].tolist() if offset != REMOVED]
        return held + self._recent.get(key, [])

    def remove(self, digest: str, offset: int) -> None:
        """Forget one row (an image taken back); a no-op when it is not held."""
        key = digest_key(digest)
        recent = self._recent.get(key, [])
        if offset in recent:
            recent.remove(offset)
            self._recent_rows -= 1
            return
        start, stop = np.searchsorted(self.keys, [key, key + 1])
        rows = self.offsets[start:stop]  # a view: the tombstone lands in the array
        rows[rows == offset] = REMOVED

    def _merge(self) -> None:
        """Fold the recent rows into the sorted arrays, dropping taken-back ones."""
        pairs = sorted((key, offset) for key, offsets in self._recent.items()
                       for offset in offsets)
        keys = np.fromiter((key for key, _ in pairs), np.int64, len(pairs))
        offsets = np.fromiter((offset for _, offset in pairs), np.int64, len(pairs))
        alive = self.offsets != REMOVED
        if not alive.all():
            self.keys, self.offsets = self.keys[alive], self.offsets[alive]
        where = np.searchsorted(self.keys, keys, side="right")  # after older rows of a key
        self.keys = np.insert(self.keys, where, keys)
        self.offsets = np.insert(self.offsets, where, offsets)
        self._recent.clear()
        self._recent_rows = 0


class NearRows:
    """Which journal lines hold a kept image whose 64-bit perceptual hash is within
    `max_distance` bits of a given one: a host's placeholder re-encoded or resized per URL
    has other bytes but nearly the same hash.

    The merged rows are a `BlockIndex` (multi-index hashing; at distance 7, 68 probes) plus
    their journal offsets: 32 bytes a row and 1 MB of tables. Recent rows wait in a small
    buffer, compared one by one, and are folded in every MERGE_AT rows.
    """

    def __init__(self, max_distance: int) -> None:
        self.max_distance = max_distance
        self.index = BlockIndex(np.empty(0, np.uint64))
        self.offsets = np.empty(0, np.int64)
        self._recent_hashes = np.empty(MERGE_AT, np.uint64)
        self._recent_offsets = np.empty(MERGE_AT, np.int64)
        self._recent_rows = 0

    def __len__(self) -> int:
        """Rows held, taken-back ones included until the next merge."""
        return len(self.index) + self._recent_rows

    def add(self, coarse: int, offset: int) -> None:
        self._recent_hashes[self._recent_rows] = coarse
        self._recent_offsets[self._recent_rows] = offset
        self._recent_rows += 1
        if self._recent_rows == MERGE_AT:
            self._merge()

    def offsets_near(self, coarse: int) -> list[int]:
        """The journal offsets of rows within max_distance bits, oldest first."""
        rows = self.index.near(coarse, self.max_distance)
        recent = self._recent_hashes[:self._recent_rows]
        fresh = np.flatnonzero(np.bitwise_count(recent ^ np.uint64(coarse)) <= self.max_distance)
        found = np.concatenate([self.offsets[rows], self._recent_offsets[fresh]])
        return sorted(offset for offset in found.tolist() if offset != REMOVED)

    def remove(self, coarse: int, offset: int) -> None:
        """Forget one row (an image taken back); a no-op when it is not held."""
        value = np.uint64(coarse)
        recent = slice(0, self._recent_rows)
        self._recent_offsets[recent][(self._recent_offsets[recent] == offset)
                                     & (self._recent_hashes[recent] == value)] = REMOVED
        _, rows = self.index.rows_with(0, block_keys(np.array([value]), 0))
        rows = rows[(self.offsets[rows] == offset) & (self.index.hashes[rows] == value)]
        self.offsets[rows] = REMOVED

    def _merge(self) -> None:
        """Fold the recent rows in, drop taken-back ones and rebuild the index."""
        hashes = np.concatenate([self.index.hashes, self._recent_hashes[:self._recent_rows]])
        offsets = np.concatenate([self.offsets, self._recent_offsets[:self._recent_rows]])
        alive = offsets != REMOVED
        self.index, self.offsets = BlockIndex(hashes[alive]), offsets[alive]
        self._recent_rows = 0


class KeptImages:
    """The journal lines of the images kept so far and their duplicates, by digest and by
    coarse perceptual hash: hash keys pointing into the journal, not objects (1.3 million
    images stay ~50 MB). A line is read back only for a match: a duplicate or a placeholder.
    """

    def __init__(self, journal_path: Path, max_distance: int) -> None:
        self.journal_path = journal_path
        self.copies = DigestRows()
        self.near = NearRows(max_distance)

    def hold(self, digest: str | None, coarse: int | None, offset: int) -> None:
        if digest:
            self.copies.add(digest, offset)
        if coarse is not None:
            self.near.add(coarse, offset)

    def forget(self, digest: str | None, coarse: int | None, offset: int) -> None:
        if digest:
            self.copies.remove(digest, offset)
        if coarse is not None:
            self.near.remove(coarse, offset)

    def copies_of(self, digest: str) -> list[tuple[int, dict[str, Any]]]:
        """(offset, record) of every kept or duplicate image with these bytes (none is read
        for bytes never seen before: the usual case)."""
        offsets = self.copies.offsets_of(digest)
        if not offsets:
            return []
        return [(offset, record) for offset, record in read_records(self.journal_path, offsets)
                if record.get("sha256") == digest]

    def near_records(self, coarse: int, exclude: set[int]) -> list[tuple[int, dict[str, Any]]]:
        """(offset, record) of every kept or duplicate image whose coarse hash is within the
        index's distance of `coarse`, but those at `exclude`."""
        offsets = [offset for offset in self.near.offsets_near(coarse) if offset not in exclude]
        return list(read_records(self.journal_path, offsets)) if offsets else []
