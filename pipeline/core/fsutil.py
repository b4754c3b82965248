"""Atomic file writes: a reader (or a crash) never sees half a file; and the one JSON Lines
appender, whose records survive a kill whole or not at all.

Every stage writes through these helpers: the data goes to a hidden temp file in the same
directory, then `os.replace` swaps it in, which is atomic on POSIX filesystems.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

TEMP_SUFFIX = ".part"


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# mkstemp creates files 0600; finished outputs get the usual 0666 & ~umask instead.
FILE_MODE = 0o666 & ~_current_umask()


@contextlib.contextmanager
def atomic_open(path: Path, mode: str = "wb", encoding: str | None = None) -> Iterator[IO]:
    """Open a temp file beside `path`; on success it replaces `path`, on error it vanishes."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TEMP_SUFFIX)
    try:
        os.fchmod(fd, FILE_MODE)
        with os.fdopen(fd, mode, encoding=encoding) as handle:
            yield handle
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_bytes(path: Path, data: bytes) -> None:
    with atomic_open(path, "wb") as handle:
        handle.write(data)


def atomic_write_text(path: Path, text: str) -> None:
    with atomic_open(path, "w", encoding="utf-8") as handle:
        handle.write(text)


def atomic_link(source: Path, path: Path) -> None:
    """Make `path` the same file as `source` (a hard link, swapped in atomically): a second
    name for a large file at no cost. Where links are not supported, a copy."""
    path = Path(path)
    temp = path.with_name(f".{path.name}.{os.getpid()}{TEMP_SUFFIX}")
    temp.unlink(missing_ok=True)
    try:
        os.link(source, temp)
    except OSError:
        with atomic_open(path) as handle, open(source, "rb") as original:
            shutil.copyfileobj(original, handle)
        return
    try:
        os.replace(temp, path)
    finally:
        temp.unlink(missing_ok=True)


def remove_stale_temp_files(directory: Path) -> int:
    """Delete temp files left by a killed run (ours only: hidden and ending in `.part`)."""
    removed = 0
    if not directory.is_dir():
        return removed
    for entry in directory.rglob(f".*{TEMP_SUFFIX}"):
        with contextlib.suppress(FileNotFoundError):
            entry.unlink()
            removed += 1
    return removed


class JsonLinesWriter:
    """Appends JSON Lines (the gather journal, the validate report): each record is one
    line, written whole and flushed before the next, so a kill loses at most that line."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._terminate_torn_tail(path)
        self._handle: IO[bytes] = open(path, "ab")  # noqa: SIM115
        self.offset = self._handle.tell()  # where the next line begins: records point here

    @staticmethod
    def _terminate_torn_tail(path: Path) -> None:
        """After a kill mid-line, start on a fresh line so the next record stays parsable."""
        if not path.exists() or path.stat().st_size == 0:
            return
        with open(path, "rb+") as handle:
            handle.seek(-1, 2)
            if handle.read(1) != b"\n":
                handle.write(b"\n")

    def write(self, record: dict[str, Any]) -> int:
        """Append one record; the offset of its line, to read it back later."""
        line = (json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8")
        offset = self.offset
        self._handle.write(line)
        self._handle.flush()
        self.offset += len(line)
        return offset

    def close(self) -> None:
        self._handle.close()

    def __enter__(self) -> JsonLinesWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
