"""Atomic file writes: a reader (or a crash) never sees half a file.

Every stage writes through these helpers: the data goes to a hidden temp file in the same
directory, then `os.replace` swaps it in, which is atomic on POSIX filesystems.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO

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
