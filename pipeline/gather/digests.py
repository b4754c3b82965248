"""Which journal lines hold a kept or duplicate image of given bytes, in 16 bytes a line.

The collector checks every new image against the images already kept (a duplicate in its
class, a placeholder across classes). At ImageNet-1k scale that is 1.3 million images: as one
Python object each (digest string, id, URL, path) they took hundreds of megabytes. Here each is
a 60-bit prefix of its SHA-256 and the offset of its journal line, in sorted arrays; a digest's
lines are read back from the journal (the one source of truth) only when its prefix is already
there, i.e. for a duplicate or a placeholder, and the caller compares the full digests.
"""

from __future__ import annotations

import numpy as np

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
