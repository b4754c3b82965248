"""`pipeline gather`: download the images of some synsets, keeping only real, new images.

Shaped like img2dataset's reader / downloader / writer / logger split:
reader = `urllist.select_urls`, downloader = `_fetch` (one URL, retries included),
writer = `_Collector.store` (checks, de-duplicates, writes atomically), logger = `Journal`.
A bounded pool of worker coroutines pulls URLs one at a time, so a slow URL only ever holds
up its own worker, never a whole batch.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import hashlib
import logging
import random
import time
from collections import Counter, defaultdict, deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from pipeline import __version__
from pipeline.errors import InputError
from pipeline.fsutil import atomic_write_bytes, remove_stale_temp_files
from pipeline.images import ImageDecodeError, decode_image, sniff_extension
from pipeline.journal import RETRYABLE_STATUSES, Journal, is_final, read_journal
from pipeline.progress import Progress
from pipeline.tables import format_table
from pipeline.urllist import (
    UrlEntry,
    check_wnid,
    expand_hyponyms,
    read_is_a,
    safe_file_stem,
    select_urls,
)

log = logging.getLogger(__name__)

JOURNAL_NAME = "gather.jsonl"
# Where Flickr (and Yahoo's image hosts) send a deleted photo: a 200 "photo unavailable" PNG.
PLACEHOLDER_URL_MARKERS = ("photo_unavailable", "photo-unavailable")
OPT_OUT_DIRECTIVES = frozenset({"noai", "noimageai"})
DEFAULT_USER_AGENT = f"pipeline/{__version__} (image dataset builder; honours X-Robots-Tag noai)"
READ_CHUNK = 64 * 1024
SNIFF_BYTES = 16  # enough for every magic number sniff_extension knows


@dataclass(frozen=True)
class GatherOptions:
    out: Path = Path("data/raw")
    concurrency: int = 64
    per_host: int = 16
    timeout: float = 10.0
    retries: int = 3
    max_bytes: int = 20 * 2**20
    min_size: int = 32
    limit: int | None = None
    honour_opt_out: bool = True
    placeholder_digests: frozenset[str] = frozenset()
    backoff: float = 0.5
    max_retry_after: float = 60.0
    user_agent: str = DEFAULT_USER_AGENT

    @property
    def journal_path(self) -> Path:
        return self.out / JOURNAL_NAME


@dataclass
class GatherReport:
    skipped: int = 0
    this_run: dict[str, Counter[str]] = field(default_factory=lambda: defaultdict(Counter))
    overall: dict[str, Counter[str]] = field(default_factory=lambda: defaultdict(Counter))
    seconds: float = 0.0


@dataclass
class _Fetched:
    """What one URL gave: `body` is set only when there is something left to check."""

    outcome: str
    final: bool
    http_status: int | None = None
    body: bytes | None = None
    error: str = ""
    attempts: int = 1


class _Transient(Exception):
    """A failure worth another attempt (timeout, reset, 5xx, 429)."""

    def __init__(self, outcome: str, error: str, status: int | None = None,
                 retry_after: float | None = None) -> None:
        super().__init__(error)
        self.outcome, self.error, self.status, self.retry_after = (
            outcome, error, status, retry_after)


def gather_synsets(urls: Path, wnids: list[str], options: GatherOptions, *,
                   is_a: Path | None = None, with_hyponyms: bool = False) -> GatherReport:
    """Select the synsets' URLs from the list (hyponyms too, if asked) and fetch them."""
    if not wnids:
        raise InputError("no synset given (pass --wnid WNID or --wnids-file FILE)")
    wnids = [check_wnid(w) for w in dict.fromkeys(wnids)]
    if with_hyponyms and is_a is None:
        raise InputError("--with-hyponyms needs --is-a wordnet.is_a.txt")
    classes = (expand_hyponyms(wnids, read_is_a(is_a)) if with_hyponyms
               else {wnid: wnid for wnid in wnids})
    selection = select_urls(urls, classes)
    if selection.malformed:
        examples = "; ".join(f"line {n}: {text!r}" for n, text in selection.malformed_examples)
        log.warning("%s: %d malformed line(s) skipped (%s)", urls, selection.malformed, examples)
    log.info("%s: %d lines read, %d URL(s) selected for %d synset(s)", urls, selection.lines,
             len(selection.entries), len(wnids))
    return gather(selection.entries, options)


def gather(entries: list[UrlEntry], options: GatherOptions) -> GatherReport:
    """Fetch `entries` (already selected from the URL list), resuming from the journal."""
    options.out.mkdir(parents=True, exist_ok=True)
    stale = remove_stale_temp_files(options.out)
    if stale:
        log.info("removed %d partial temp file(s) left by an interrupted run", stale)
    return asyncio.run(_gather(entries, options))


async def _gather(entries: list[UrlEntry], options: GatherOptions) -> GatherReport:
    started = time.monotonic()
    history = read_journal(options.journal_path)
    report = GatherReport()
    with Journal(options.journal_path) as journal, ThreadPoolExecutor() as pool:
        collector = _Collector(options, journal, pool, history, report)
        pending = collector.pending(_unique_by_id(entries))
        report.skipped = len(entries) - len(pending)
        pending = await collector.recover_unjournaled(pending)
        scheduler = _Scheduler(pending, collector.ok_counts, options.limit)
        progress = Progress("gather", total=len(pending))
        collector.progress = progress
        connector = aiohttp.TCPConnector(limit=options.concurrency,
                                         limit_per_host=options.per_host,
                                         use_dns_cache=True, ttl_dns_cache=600)
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=options.timeout,
                                        sock_read=options.timeout)
        async with aiohttp.ClientSession(connector=connector, timeout=timeout,
                                         headers={"User-Agent": options.user_agent}) as session:
            workers = [asyncio.create_task(_worker(session, scheduler, collector, options))
                       for _ in range(max(1, min(options.concurrency, len(pending))))]
            try:
                await asyncio.gather(*workers)
            finally:
                for worker in workers:
                    worker.cancel()
        progress.close()
    _fill_overall(report, entries, read_journal(options.journal_path))
    report.seconds = time.monotonic() - started
    return report


def _unique_by_id(entries: list[UrlEntry]) -> list[UrlEntry]:
    seen: set[str] = set()
    unique = []
    for entry in entries:
        if entry.id not in seen:
            seen.add(entry.id)
            unique.append(entry)
    return unique


def _fill_overall(report: GatherReport, entries: list[UrlEntry],
                  history: dict[str, dict[str, Any]]) -> None:
    for entry in entries:
        record = history.get(entry.id)
        report.overall[entry.klass][record["outcome"] if record else "not_tried"] += 1


async def _worker(session: aiohttp.ClientSession, scheduler: _Scheduler,
                  collector: _Collector, options: GatherOptions) -> None:
    while (entry := await scheduler.next()) is not None:
        started = time.monotonic()
        try:
            fetched = await _fetch(session, entry.url, options)
            await collector.store(entry, fetched, time.monotonic() - started)
        finally:
            scheduler.finished(entry)


class _Scheduler:
    """Hands out URLs round-robin across classes, never more than `limit` good ones per class.

    With a limit, a class with `limit - ok` downloads in flight gets no new URL until one of
    them fails, so `--limit N` yields exactly N images without over-fetching.
    """

    def __init__(self, entries: list[UrlEntry], ok_counts: Counter[str],
                 limit: int | None) -> None:
        self._queues: dict[str, deque[UrlEntry]] = defaultdict(deque)
        for entry in entries:
            self._queues[entry.klass].append(entry)
        self._order = deque(self._queues)
        self._ok = ok_counts
        self._limit = limit
        self._in_flight: Counter[str] = Counter()
        self._changed = asyncio.Condition()

    async def next(self) -> UrlEntry | None:
        async with self._changed:
            while True:
                entry = self._pick()
                if entry is not None:
                    return entry
                if not self._may_need_more():
                    return None
                await self._changed.wait()

    def finished(self, entry: UrlEntry) -> None:
        self._in_flight[entry.klass] -= 1
        asyncio.get_running_loop().create_task(self._notify())

    async def _notify(self) -> None:
        async with self._changed:
            self._changed.notify_all()

    def _pick(self) -> UrlEntry | None:
        for _ in range(len(self._order)):
            klass = self._order[0]
            self._order.rotate(-1)
            if self._queues[klass] and self._has_room(klass):
                self._in_flight[klass] += 1
                return self._queues[klass].popleft()
        return None

    def _has_room(self, klass: str) -> bool:
        return self._limit is None or self._ok[klass] + self._in_flight[klass] < self._limit

    def _may_need_more(self) -> bool:
        """True while some class still has URLs and could still fall short of its limit."""
        return any(queue and (self._limit is None or self._ok[klass] < self._limit)
                   for klass, queue in self._queues.items())


async def _fetch(session: aiohttp.ClientSession, url: str, options: GatherOptions) -> _Fetched:
    """One URL with retries and exponential backoff (plus jitter) for transient failures."""
    attempt = 0
    while True:
        attempt += 1
        try:
            fetched = await _fetch_once(session, url, options)
            fetched.attempts = attempt
            return fetched
        except _Transient as failure:
            if attempt > options.retries:
                return _Fetched(failure.outcome, final=False, http_status=failure.status,
                                error=failure.error, attempts=attempt)
            await asyncio.sleep(_retry_delay(failure, attempt, options))


def _retry_delay(failure: _Transient, attempt: int, options: GatherOptions) -> float:
    if failure.retry_after is not None:
        return min(failure.retry_after, options.max_retry_after)
    return options.backoff * 2 ** (attempt - 1) * random.uniform(0.5, 1.5)


async def _fetch_once(session: aiohttp.ClientSession, url: str,
                      options: GatherOptions) -> _Fetched:
    try:
        async with session.get(url, allow_redirects=True, max_redirects=5) as response:
            return await _read_response(response, options)
    except TimeoutError:
        raise _Transient("timeout", f"no answer within {options.timeout:g} s") from None
    except aiohttp.TooManyRedirects:
        return _Fetched("dead", final=True, error="too many redirects")
    except (aiohttp.InvalidURL, ValueError) as exc:
        return _Fetched("dead", final=True, error=f"invalid URL: {exc}")
    except aiohttp.ClientConnectorDNSError as exc:
        return _Fetched("dead", final=True, error=f"host not found: {exc}")
    except (aiohttp.ClientError, OSError) as exc:
        raise _Transient("dead", f"{type(exc).__name__}: {exc}") from None


async def _read_response(response: aiohttp.ClientResponse, options: GatherOptions) -> _Fetched:
    status = response.status
    if status in (404, 410):
        return _Fetched("dead", final=True, http_status=status, error=f"HTTP {status}")
    if status in RETRYABLE_STATUSES:
        raise _Transient("http_error", f"HTTP {status}", status,
                         _parse_retry_after(response.headers.get("Retry-After")))
    if status >= 400:
        return _Fetched("http_error", final=True, http_status=status, error=f"HTTP {status}")
    if _is_placeholder_url(str(response.url)):
        return _Fetched("placeholder", final=True, http_status=status,
                        error=f"redirected to {response.url}")
    if options.honour_opt_out and _opted_out(response.headers.getall("X-Robots-Tag", [])):
        return _Fetched("opted_out", final=True, http_status=status,
                        error="X-Robots-Tag: " + ", ".join(response.headers.getall("X-Robots-Tag")))
    declared = response.content_length
    if declared is not None and declared > options.max_bytes:
        return _Fetched("too_large", final=True, http_status=status,
                        error=f"Content-Length {declared} > {options.max_bytes}")
    return await _read_body(response, options)


async def _read_body(response: aiohttp.ClientResponse, options: GatherOptions) -> _Fetched:
    """Stream the body, giving up as soon as it is clearly not an image or too large."""
    chunks: list[bytes] = []
    size = 0
    sniffed = False
    async for chunk in response.content.iter_chunked(READ_CHUNK):
        chunks.append(chunk)
        size += len(chunk)
        if size > options.max_bytes:
            return _Fetched("too_large", final=True, http_status=response.status,
                            error=f"body exceeds {options.max_bytes} bytes")
        if not sniffed and size >= SNIFF_BYTES:
            sniffed = True
            if sniff_extension(b"".join(chunks)[:SNIFF_BYTES]) is None:
                return _not_image(response)
    body = b"".join(chunks)
    if not sniffed and sniff_extension(body) is None:
        return _not_image(response)
    return _Fetched("ok", final=True, http_status=response.status, body=body)


def _not_image(response: aiohttp.ClientResponse) -> _Fetched:
    return _Fetched("not_image", final=True, http_status=response.status,
                    error=f"body is not an image ({response.content_type})")


def _parse_retry_after(value: str | None) -> float | None:
    """Retry-After is either delta-seconds or an HTTP date."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    with contextlib.suppress(TypeError, ValueError):
        when = email.utils.parsedate_to_datetime(value)
        return max(0.0, when.timestamp() - time.time())
    return None


def _is_placeholder_url(url: str) -> bool:
    lowered = url.lower()
    return any(marker in lowered for marker in PLACEHOLDER_URL_MARKERS)


def _opted_out(values: list[str]) -> bool:
    """X-Robots-Tag directives, either bare or addressed to us (`pipeline: noai`)."""
    for value in values:
        for part in value.split(","):
            agent, colon, directive = part.strip().lower().rpartition(":")
            if colon and agent.strip() not in ("pipeline", "*"):
                continue
            if directive.strip() in OPT_OUT_DIRECTIVES:
                return True
    return False


class _Collector:
    """Checks fetched bodies, drops duplicates, writes files and journals every outcome."""

    def __init__(self, options: GatherOptions, journal: Journal, pool: ThreadPoolExecutor,
                 history: dict[str, dict[str, Any]], report: GatherReport) -> None:
        self.options = options
        self.journal = journal
        self.pool = pool
        self.history = history
        self.report = report
        self.progress: Progress | None = None
        self.ok_counts: Counter[str] = Counter()
        self.digests: dict[str, dict[str, str]] = defaultdict(dict)  # class -> sha -> id
        for record in history.values():
            if record["outcome"] == "ok":
                klass = record.get("class", record.get("wnid", ""))
                self.ok_counts[klass] += 1
                self.digests[klass][record.get("sha256", "")] = record["id"]

    def pending(self, entries: list[UrlEntry]) -> list[UrlEntry]:
        return [e for e in entries if e.id not in self.history or not is_final(self.history[e.id])]

    def target_path(self, entry: UrlEntry, extension: str) -> Path:
        folder = self.options.out / entry.klass
        if entry.wnid != entry.klass:
            folder = folder / entry.wnid
        return folder / f"{safe_file_stem(entry.id)}.{extension}"

    async def recover_unjournaled(self, pending: list[UrlEntry]) -> list[UrlEntry]:
        """Journal files that a killed run renamed into place but never journaled."""
        on_disk = _files_by_stem(self.options.out, {e.klass for e in pending})
        still_pending = []
        for entry in pending:
            path = on_disk.get((entry.klass, entry.wnid, safe_file_stem(entry.id)))
            if path is None:
                still_pending.append(entry)
                continue
            fetched = _Fetched("ok", final=True, body=path.read_bytes(), error="found on disk")
            await self.store(entry, fetched, 0.0, existing=path)
        return still_pending

    async def store(self, entry: UrlEntry, fetched: _Fetched, seconds: float,
                    existing: Path | None = None) -> None:
        """Journal the outcome; a good new image is also written (or adopted if `existing`)."""
        record: dict[str, Any] = {
            "id": entry.id, "wnid": entry.wnid, "class": entry.klass, "url": entry.url,
            "outcome": fetched.outcome, "final": fetched.final,
            "http_status": fetched.http_status, "bytes": None, "sha256": None, "path": None,
            "error": fetched.error, "attempts": fetched.attempts, "seconds": round(seconds, 3),
        }
        if fetched.body is not None:
            await self._check_and_write(entry, fetched.body, record, existing)
        self.journal.write(record)
        self.report.this_run[entry.klass][record["outcome"]] += 1
        kept = record["outcome"] == "ok"
        self.ok_counts[entry.klass] += kept
        if self.progress:
            self.progress.update(count="ok" if kept else "failed")

    async def _check_and_write(self, entry: UrlEntry, body: bytes, record: dict[str, Any],
                               existing: Path | None) -> None:
        loop = asyncio.get_running_loop()
        digest = hashlib.sha256(body).hexdigest()
        record.update(bytes=len(body), sha256=digest)
        if digest in self.options.placeholder_digests:
            record.update(outcome="placeholder", error="known placeholder image")
            return
        problem = await loop.run_in_executor(self.pool, _image_problem, body,
                                             self.options.min_size)
        if problem is not None:
            record.update(outcome=problem.reason if problem.reason == "too_small"
                          else "not_image", error=str(problem))
            return
        first = self.digests[entry.klass].get(digest)
        if first is not None and first != entry.id:
            record.update(outcome="duplicate", error=f"same bytes as {first}")
            return
        self.digests[entry.klass][digest] = entry.id
        path = existing or self.target_path(entry, sniff_extension(body[:16]) or "img")
        if existing is None:
            try:
                await loop.run_in_executor(self.pool, atomic_write_bytes, path, body)
            except BaseException:
                del self.digests[entry.klass][digest]
                raise
        record["path"] = path.relative_to(self.options.out).as_posix()


def _image_problem(body: bytes, min_size: int) -> ImageDecodeError | None:
    """Decode at reduced scale: enough to catch truncation, HTML and thumbnails, fast."""
    try:
        decode_image(body, min_side=max(min_size, 1), min_size=min_size)
    except ImageDecodeError as problem:
        return problem
    return None


def _files_by_stem(out: Path, classes: set[str]) -> dict[tuple[str, str, str], Path]:
    """(class, wnid, stem) of every image already in the class folders."""
    found: dict[tuple[str, str, str], Path] = {}
    for klass in classes:
        folder = out / klass
        if not folder.is_dir():
            continue
        for path in folder.rglob("*"):
            if path.is_file() and not path.name.startswith("."):
                wnid = klass if path.parent == folder else path.parent.name
                found[(klass, wnid, path.stem)] = path
    return found


def format_summary(report: GatherReport, names: dict[str, str] | None = None) -> str:
    """A per-synset table of outcomes over the whole journal, this run included."""
    outcomes = sorted({o for counts in report.overall.values() for o in counts},
                      key=lambda o: (o != "ok", o))
    header = ["synset", "name", *outcomes, "total"]
    rows = [header]
    for klass in sorted(report.overall):
        counts = report.overall[klass]
        name = (names or {}).get(klass, "").split(",")[0]
        rows.append([klass, name, *(str(counts[o]) for o in outcomes),
                     str(sum(counts.values()))])
    lines = [format_table(rows)]
    fetched = sum(sum(c.values()) for c in report.this_run.values())
    lines.append(f"this run: {fetched} URL(s) finished in {report.seconds:.1f} s, "
                 f"{report.skipped} already final in the journal")
    return "\n".join(lines)
