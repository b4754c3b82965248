"""Reading ImageNet-style inputs: the URL list, words.txt and wordnet.is_a.txt.

The URL list (`fall11_urls.txt`) has 14 million lines, so it is streamed once in binary mode
and only the lines of the requested synsets are kept: memory grows with the selection, never
with the list.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.errors import InputError

SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_UNSAFE_CHARS = re.compile(r"[^A-Za-z0-9_.-]")
MAX_REPORTED_MALFORMED = 5


@dataclass(frozen=True)
class UrlEntry:
    """One image to fetch. `klass` is the requested synset the image is filed under."""

    id: str
    wnid: str
    url: str
    klass: str


@dataclass
class Selection:
    entries: list[UrlEntry] = field(default_factory=list)
    lines: int = 0
    malformed: int = 0
    malformed_examples: list[tuple[int, str]] = field(default_factory=list)


def check_wnid(wnid: str) -> str:
    if not SAFE_NAME.match(wnid):
        raise InputError(
            f"wnid {wnid!r} is not a valid synset id (expected e.g. n02123045)")
    return wnid


def safe_file_stem(image_id: str) -> str:
    """A file name stem for an id from the list that can never leave its directory."""
    stem = _UNSAFE_CHARS.sub("_", image_id).lstrip(".")
    return stem[:200] or "unnamed"


def select_urls(path: Path, classes: dict[str, str]) -> Selection:
    """Stream `path` and keep the entries whose wnid is a key of `classes` (wnid -> class).

    Raises InputError for a missing/unreadable list, or when a requested wnid has no line.
    """
    wanted = {wnid.encode(): (wnid, klass) for wnid, klass in classes.items()}
    selection = Selection()
    try:
        with open(path, "rb") as handle:
            _scan(handle, wanted, selection)
    except FileNotFoundError:
        raise InputError(f"URL list {path} does not exist (pass --urls fall11_urls.txt)") from None
    except IsADirectoryError:
        raise InputError(f"URL list {path} is a directory, not a file") from None
    except PermissionError:
        raise InputError(f"URL list {path} is not readable (check its permissions)") from None
    _check_all_found(path, classes, selection)
    return selection


def _scan(handle: Iterable[bytes], wanted: dict[bytes, tuple[str, str]],
          selection: Selection) -> None:
    """The hot loop: one partition per line; only selected lines are decoded."""
    lineno = 0
    for lineno, line in enumerate(handle, 1):  # noqa: B007 - lineno is used after the loop
        key, tab, url = line.partition(b"\t")
        wnid, underscore, _ = key.partition(b"_")
        if not tab or not underscore:
            if line.strip():
                _note_malformed(selection, lineno, line)
            continue
        match = wanted.get(wnid)
        if match is None:
            continue
        url = url.strip()
        if not url.startswith((b"http://", b"https://")):
            _note_malformed(selection, lineno, line)
            continue
        selection.entries.append(UrlEntry(
            id=key.decode("utf-8", "replace").strip(), wnid=match[0],
            url=url.decode("utf-8", "replace"), klass=match[1]))
    selection.lines = lineno


def _note_malformed(selection: Selection, lineno: int, line: bytes) -> None:
    selection.malformed += 1
    if len(selection.malformed_examples) < MAX_REPORTED_MALFORMED:
        text = line.decode("utf-8", "replace").rstrip("\r\n")
        selection.malformed_examples.append((lineno, text[:120]))


def _check_all_found(path: Path, classes: dict[str, str], selection: Selection) -> None:
    found = {entry.klass for entry in selection.entries}
    missing = sorted(set(classes.values()) - found)
    if missing:
        raise InputError(
            f"wnid {', '.join(missing)} has no URL in {path} "
            "(check the id, or pass the URL list that contains it)")


def read_words(path: Path) -> dict[str, str]:
    """words.txt: `<wnid>\\t<names>` per line; the first name is the human-readable label."""
    words: dict[str, str] = {}
    for lineno, line in _read_text_lines(path, "words file"):
        wnid, tab, names = line.partition("\t")
        if not tab:
            raise InputError(f"{path}:{lineno}: expected '<wnid><TAB><names>', got {line[:60]!r}")
        words[wnid.strip()] = names.strip()
    return words


def read_is_a(path: Path) -> dict[str, list[str]]:
    """wordnet.is_a.txt: `<parent> <child>` per line -> parent -> children."""
    children: dict[str, list[str]] = defaultdict(list)
    for lineno, line in _read_text_lines(path, "is-a file"):
        parts = line.split()
        if len(parts) != 2:
            raise InputError(f"{path}:{lineno}: expected '<parent> <child>', got {line[:60]!r}")
        children[parts[0]].append(parts[1])
    return dict(children)


def read_wnids_file(path: Path) -> list[str]:
    """One wnid per line (the first word of the line; '#' comments and blanks are skipped)."""
    return [line.split()[0] for _, line in _read_text_lines(path, "wnids file")]


def _read_text_lines(path: Path, what: str) -> list[tuple[int, str]]:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise InputError(f"{what} {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"{what} {path} cannot be read: {exc}") from None
    return [(n, line) for n, line in enumerate(text.splitlines(), 1)
            if line.strip() and not line.startswith("#")]


def expand_hyponyms(wnids: list[str], is_a: dict[str, list[str]]) -> dict[str, str]:
    """Map every wnid under each requested one (itself included) to the requested class."""
    classes: dict[str, str] = {}
    for klass in wnids:
        stack = [klass]
        while stack:
            wnid = stack.pop()
            if wnid in classes:
                continue
            classes[wnid] = klass
            stack.extend(is_a.get(wnid, []))
    return classes
