"""Reading ImageNet-style inputs: the URL list, words.txt and wordnet.is_a.txt.

The URL list (`fall11_urls.txt`) has 14 million lines, so it is streamed once in binary mode
and only the lines of the requested synsets are kept, and those on disk (`Selection`: a spool
file and 8 bytes per URL in memory), so an ImageNet-1k selection of 1.4 million URLs costs
~11 MB, not the ~420 MB its entries would as Python objects. The list was scraped from the
web: some URLs hold raw Latin-1 bytes, UTF-8 text, spaces or a stray third field, so a
selected line's bytes are turned into a fully encoded ASCII URL here (`encode_url`) rather
than decoded as text, which would lose the bytes the server expects.
"""

from __future__ import annotations

import os
import re
import tempfile
from array import array
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, NamedTuple

import idna  # yarl's own IDNA codec (UTS #46, as browsers), so it is installed with aiohttp
import numpy as np

from pipeline.core.errors import InputError
from pipeline.core.fsutil import atomic_write_text

SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_UNSAFE_CHARS = re.compile(r"[^A-Za-z0-9_.-]")
MAX_REPORTED_MALFORMED = 5
_BOM = b"\xef\xbb\xbf"
_URL = re.compile(
    rb"(https?)://"
    rb"(?:([^/?#]*)@)?"  # user info, up to the last @ of the authority
    rb"(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_.\x80-\xff-]+)"  # host, non-ASCII for IDNA
    rb"(?::([0-9]{0,5}))?"  # port
    rb"([/?][^#]*)?"  # path and query
    rb"(?:#.*)?",  # the fragment is dropped: it is never sent to the server
    re.IGNORECASE | re.DOTALL)
# Bytes a URL may not hold (RFC 3986): controls, space, DEL, non-ASCII, `"<>\^`{|}`, and a `%`
# that does not start an escape; existing `%XX` escapes are kept so nothing is encoded twice.
_TO_ESCAPE = re.compile(rb'%(?![0-9A-Fa-f]{2})|[^\x21-\x7e]|["<>\\^`{|}]')
# Most URLs need no escape at all; deleting these bytes finds them at C speed.
_PLAIN = bytes(byte for byte in range(0x21, 0x7f) if byte not in b'"%<>\\^`{|}')


@dataclass(frozen=True)
class UrlEntry:
    """One image to fetch. `klass` is the requested synset the image is filed under.

    `url` is ASCII and fully encoded, to be sent as is (`yarl.URL(url, encoded=True)`).
    """

    id: str
    wnid: str
    url: str
    klass: str


@dataclass
class Selection:
    """What a scan kept, and what it skipped or repaired, so the caller can report it.

    The kept entries wait on disk, in list order, in an unnamed temp file (gone when closed
    or killed), one `<id>TAB<wnid>TAB<class>TAB<url>` line each (ids, wnids and encoded URLs
    hold no tab); memory holds only where each line starts. Iterate it, or read entry `i`.

    Only selected lines are read past their key (to keep the scan fast), so `extra_fields`,
    `duplicate_ids` and malformed ids or URLs are counted among the selected lines only; a line
    without a `<wnid>_<num><TAB>` key is malformed wherever it is. Examples are
    `(line number, text)`, the text being the id for a duplicate.
    """

    spool: IO[bytes]
    spool_dir: Path | None = None
    offsets: np.ndarray = field(default_factory=lambda: np.zeros(1, np.int64))  # len + 1
    classes: set[str] = field(default_factory=set)  # the classes with at least one entry
    lines: int = 0
    malformed: int = 0
    malformed_examples: list[tuple[int, str]] = field(default_factory=list)
    extra_fields: int = 0
    extra_fields_examples: list[tuple[int, str]] = field(default_factory=list)
    duplicate_ids: int = 0
    duplicate_examples: list[tuple[int, str]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __iter__(self) -> Iterator[UrlEntry]:
        self.spool.seek(0)
        return (_spooled(line) for line in self.spool)

    def __enter__(self) -> Selection:
        return self

    def __exit__(self, *exc: object) -> None:
        self.spool.close()

    def entry(self, index: int) -> UrlEntry:
        start, end = self.offsets[index], self.offsets[index + 1]
        return _spooled(os.pread(self.spool.fileno(), int(end - start), int(start)))

    @property
    def entries(self) -> list[UrlEntry]:
        """All entries as objects: for small selections (tests, tools), never for a run."""
        return list(self)

    def keep_only(self, keep: Callable[[int, UrlEntry], bool]) -> None:
        """Drop the entries `keep(index, entry)` refuses: one pass, into a new spool."""
        kept = tempfile.TemporaryFile(dir=self.spool_dir)  # noqa: SIM115 - it owns it
        starts = array("q", [0])
        self.spool.seek(0)
        for index, line in enumerate(self.spool):
            if keep(index, _spooled(line)):
                kept.write(line)
                starts.append(starts[-1] + len(line))
        kept.flush()
        self.spool.close()
        self.spool, self.offsets = kept, np.asarray(starts, np.int64)
        self.classes = {entry.klass for entry in self}


def _spooled(line: bytes) -> UrlEntry:
    image_id, wnid, klass, url = line.decode("ascii").rstrip("\n").split("\t")
    return UrlEntry(image_id, wnid, url, klass)


class MalformedLine(ValueError):
    """A line whose id or URL cannot be used; the scan counts it and goes on."""


class UrlLine(NamedTuple):
    id: str
    url: str
    extra_fields: bool


def check_wnid(wnid: str) -> str:
    if not SAFE_NAME.match(wnid):
        raise InputError(
            f"wnid {wnid!r} is not a valid synset id (expected e.g. n02123045)")
    return wnid


def safe_file_stem(image_id: str) -> str:
    """A file name stem for an id from the list that can never leave its directory."""
    stem = _UNSAFE_CHARS.sub("_", image_id).lstrip(".")
    return stem[:200] or "unnamed"


def select_urls(path: Path, classes: dict[str, str], spool_dir: Path | None = None, *,
                check_found: bool = True) -> Selection:
    """Stream `path` and keep the entries whose wnid is a key of `classes` (wnid -> class),
    spooled to a temp file in `spool_dir` (the system's temp folder by default).

    Raises InputError for a missing/unreadable list, or (unless the caller checks that itself,
    `check_found=False`) when a class has no line.
    """
    wanted = {wnid.encode(): (wnid, klass) for wnid, klass in classes.items()}
    selection = Selection(tempfile.TemporaryFile(dir=spool_dir), spool_dir)  # noqa: SIM115
    try:
        with open(path, "rb") as handle:
            if handle.peek(len(_BOM)).startswith(_BOM):  # saved by an editor as "UTF-8 with BOM"
                handle.read(len(_BOM))
            _scan(handle, wanted, selection)
    except FileNotFoundError:
        selection.spool.close()
        raise InputError(f"URL list {path} does not exist (pass --urls fall11_urls.txt)") from None
    except IsADirectoryError:
        selection.spool.close()
        raise InputError(f"URL list {path} is a directory, not a file") from None
    except PermissionError:
        selection.spool.close()
        raise InputError(f"URL list {path} is not readable (check its permissions)") from None
    except BaseException:
        selection.spool.close()
        raise
    if check_found:
        check_all_found(path, set(classes.values()), selection)
    return selection


class _Spooler:
    """Writes selected entries to the spool and remembers, per entry, where its line starts,
    its id's hash and its line number (20 bytes), so repeated ids are found after the scan
    by sorting instead of by a set of every id (~100 bytes each)."""

    def __init__(self, selection: Selection) -> None:
        self.selection = selection
        self.starts = array("q", [0])
        self.hashes = array("q")
        self.linenos = array("q")
        self.buffer: list[bytes] = []

    def add(self, lineno: int, entry: UrlEntry) -> None:
        line = f"{entry.id}\t{entry.wnid}\t{entry.klass}\t{entry.url}\n".encode("ascii")
        self.buffer.append(line)
        if len(self.buffer) >= 4096:
            self.flush()
        self.starts.append(self.starts[-1] + len(line))
        self.hashes.append(hash(entry.id))
        self.linenos.append(lineno)
        self.selection.classes.add(entry.klass)

    def flush(self) -> None:
        self.selection.spool.write(b"".join(self.buffer))
        self.selection.spool.flush()
        self.buffer.clear()

    def finish(self) -> None:
        """Drop repeated ids (the first line wins, as a later one would overwrite its file)."""
        self.flush()
        selection = self.selection
        selection.offsets = np.asarray(self.starts, np.int64)
        repeated = _repeated_ids(np.asarray(self.hashes, np.int64), selection.entry)
        if not repeated.size:
            return
        linenos = np.asarray(self.linenos, np.int64)
        selection.duplicate_ids = int(repeated.size)
        for index in repeated[:MAX_REPORTED_MALFORMED]:
            _note(selection.duplicate_examples, int(linenos[index]),
                  selection.entry(int(index)).id)
        doomed = set(repeated.tolist())
        selection.keep_only(lambda index, _: index not in doomed)


def _repeated_ids(hashes: np.ndarray, entry: Callable[[int], UrlEntry]) -> np.ndarray:
    """Positions (ascending) of the entries whose id an earlier entry already has.

    Equal hashes are only candidates: their ids are read back and compared, so a collision
    of two different ids never drops one.
    """
    order = np.argsort(hashes, kind="stable")
    ordered = hashes[order]
    same = np.flatnonzero(ordered[1:] == ordered[:-1])
    if not same.size:
        return same
    candidates = np.unique(np.concatenate([order[same], order[same + 1]]))
    first_of: dict[str, int] = {}
    repeated = []
    for index in candidates.tolist():  # ascending: the first line of an id comes first
        image_id = entry(index).id
        if image_id in first_of:
            repeated.append(index)
        else:
            first_of[image_id] = index
    return np.asarray(repeated, np.int64)


def _scan(handle: Iterable[bytes], wanted: dict[bytes, tuple[str, str]],
          selection: Selection) -> None:
    """The hot loop: two partitions and a lookup per line; only selected lines go further."""
    spooler = _Spooler(selection)
    lineno = 0
    for lineno, line in enumerate(handle, 1):  # noqa: B007 - lineno is used after the loop
        key, tab, _ = line.partition(b"\t")
        wnid, underscore, _ = key.partition(b"_")
        if not tab or not underscore:
            if line.strip():
                selection.malformed += 1
                _note(selection.malformed_examples, lineno, _line_text(line))
            continue
        match = wanted.get(wnid)
        if match is not None:
            _select(selection, spooler, lineno, line, match)
    selection.lines = lineno
    spooler.finish()


def _select(selection: Selection, spooler: _Spooler, lineno: int, line: bytes,
            match: tuple[str, str]) -> None:
    try:
        parsed = parse_url_line(line)
    except MalformedLine:
        selection.malformed += 1
        _note(selection.malformed_examples, lineno, _line_text(line))
        return
    if parsed.extra_fields:
        selection.extra_fields += 1
        _note(selection.extra_fields_examples, lineno, _line_text(line))
    spooler.add(lineno, UrlEntry(id=parsed.id, wnid=match[0], url=parsed.url, klass=match[1]))


def _note(examples: list[tuple[int, str]], lineno: int, text: str) -> None:
    if len(examples) < MAX_REPORTED_MALFORMED:
        examples.append((lineno, text))


def _line_text(line: bytes) -> str:
    """Readable, not exact: the examples are for a log message."""
    return line.decode("utf-8", "replace").rstrip("\r\n")[:120]


def parse_url_line(line: bytes) -> UrlLine:
    """One `<wnid>_<num><TAB><url>` line of the list; fields after the second are ignored.

    The id must be ASCII (every id in the real list is) so that it can name a file and a
    journal record without any lossy decoding. Raises MalformedLine.
    """
    fields = line.rstrip(b"\r\n").split(b"\t")
    if len(fields) < 2:
        raise MalformedLine("expected <wnid>_<num><TAB><url>")
    try:
        image_id = fields[0].strip().decode("ascii")
    except UnicodeDecodeError:
        raise MalformedLine("the id is not ASCII") from None
    if "_" not in image_id:
        raise MalformedLine("the id is not <wnid>_<num>")
    return UrlLine(image_id, encode_url(fields[1].strip()), len(fields) > 2)


def encode_url(raw: bytes) -> str:
    """The URL a browser would request for `raw`, as ASCII to be sent byte for byte.

    The list's bytes are kept: a byte that may not appear in a URL is percent-encoded as it is,
    so Latin-1 `caf\\xe9` becomes `caf%E9` and UTF-8 `é` becomes `%C3%A9` (what a browser sends
    for an IRI). A non-ASCII host name is converted to IDNA (punycode), as DNS needs. The
    fragment is dropped, as it is never sent. Raises MalformedLine for a URL that is not
    http(s), or whose host or port is unusable.
    """
    url = _URL.fullmatch(raw)
    if url is None:
        raise MalformedLine("not an http:// or https:// URL with a usable host and port")
    scheme, userinfo, host, port, path_query = url.groups()
    if port and int(port) > 65535:
        raise MalformedLine("the port is out of range")
    try:  # IDNA's output is letters, digits, hyphens and dots only
        host_text = host.decode("ascii") if host.isascii() else idna.encode(
            host.decode("utf-8"), uts46=True).decode("ascii")
    except UnicodeError:  # not UTF-8, or not a valid internationalized name
        raise MalformedLine("the host name cannot be encoded") from None
    prefix = scheme.lower().decode("ascii") + "://"
    if userinfo is not None:
        prefix += _escape(userinfo).replace("@", "%40") + "@"
    suffix = "" if port is None else ":" + port.decode("ascii")
    return prefix + host_text + suffix + _escape(path_query or b"")


def _escape(raw: bytes) -> str:
    if raw.translate(None, _PLAIN):
        raw = _TO_ESCAPE.sub(lambda byte: b"%%%02X" % byte[0][0], raw)
    return raw.decode("ascii")


def check_all_found(path: Path, classes: set[str], selection: Selection) -> None:
    """Raise InputError (closing the selection) when one of `classes` has no entry."""
    missing = sorted(classes - selection.classes)
    if missing:
        selection.spool.close()
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


@dataclass
class Hyponyms:
    """Every synset under the requested classes, and the class it is filed under.

    `classes` maps a synset to the most specific requested class that contains it (a
    requested class to itself), whatever the order of the request; `conflicts` maps a synset
    under several unrelated requested classes (WordNet synsets may have several parents) to
    those classes, in request order: an image of it would carry two labels.
    """

    classes: dict[str, str] = field(default_factory=dict)
    conflicts: dict[str, list[str]] = field(default_factory=dict)


def resolve_hyponyms(wnids: list[str], is_a: dict[str, list[str]]) -> Hyponyms:
    """File every synset under the requested classes by the graph, not by argument order."""
    below = {klass: _descendants(klass, is_a) for klass in wnids}
    owners: dict[str, list[str]] = {}
    for klass in wnids:
        for wnid in sorted(below[klass]):
            owners.setdefault(wnid, []).append(klass)
    hyponyms = Hyponyms()
    for wnid, classes in owners.items():
        specific = [k for k in classes if not any(o != k and o in below[k] for o in classes)]
        if len(specific) == 1:
            hyponyms.classes[wnid] = specific[0]
        else:
            hyponyms.conflicts[wnid] = specific
    return hyponyms


def _descendants(wnid: str, is_a: dict[str, list[str]]) -> set[str]:
    """`wnid` and every synset below it (the graph is a DAG: a synset may be reached twice)."""
    found: set[str] = set()
    stack = [wnid]
    while stack:
        current = stack.pop()
        if current not in found:
            found.add(current)
            stack.extend(is_a.get(current, []))
    return found


HYPONYM_CONFLICTS_NAME = "hyponym_conflicts.txt"  # beside the gather journal
HYPONYM_CONFLICTS_HEADER = ("synset", "classes", "urls", "resolution")


def write_hyponym_conflicts(path: Path, rows: list[tuple[str, list[str], int, str]]) -> None:
    """One conflict per line: synset, its requested classes (comma-separated), its URLs in the
    list, and what was done (dropped, or the class it was filed under)."""
    lines = ["\t".join(HYPONYM_CONFLICTS_HEADER)] + [
        f"{wnid}\t{','.join(classes)}\t{urls}\t{resolution}"
        for wnid, classes, urls, resolution in rows]
    atomic_write_text(path, "\n".join(lines) + "\n")


def read_hyponym_conflicts(path: Path) -> list[dict[str, str]]:
    """The rows `write_hyponym_conflicts` wrote, as dicts keyed by the header."""
    lines = [(n, line) for n, line in _read_text_lines(path, "hyponym conflicts file")]
    if not lines or tuple(lines[0][1].split("\t")) != HYPONYM_CONFLICTS_HEADER:
        raise InputError(f"{path}:1: expected the header "
                         f"{'<TAB>'.join(HYPONYM_CONFLICTS_HEADER)} (rerun `pipeline gather`)")
    rows = []
    for lineno, line in lines[1:]:
        fields = line.split("\t")
        if len(fields) != len(HYPONYM_CONFLICTS_HEADER):
            raise InputError(f"{path}:{lineno}: expected {len(HYPONYM_CONFLICTS_HEADER)} "
                             "tab-separated fields (rerun `pipeline gather`)")
        rows.append(dict(zip(HYPONYM_CONFLICTS_HEADER, fields, strict=True)))
    return rows
