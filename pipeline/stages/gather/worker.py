"""Fetching on every core: worker processes, each with its own event loop and HTTP session.

One event loop saturates one core (HTTP parsing, the decode check, hashing, writing) long
before the network does, so the coordinator hands URLs to `processes` workers over pipes and
gets back, per URL, what the attempt gave and where its image waits (`store.stage_body`).
Messages are batched per loop iteration in both directions. Workers ignore Ctrl-C: the
coordinator decides when they stop.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import multiprocessing
import os
import resource
import signal
import socket
import time
import zlib
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait

import aiohttp

from pipeline.stages.gather.consent import SiteFiles, SitePolicy, fetch_site_files
from pipeline.stages.gather.http import Attempt, fetch_once, made_up_url
from pipeline.stages.gather.names import Resolver, name_of
from pipeline.stages.gather.options import GatherOptions
from pipeline.stages.gather.store import Staged, inspect_body, stage_body

DECODE_THREADS = 2  # PIL releases the GIL while decoding: the loop keeps serving meanwhile
LAG_TICK = 0.05  # seconds between the lag meter's wake-ups
# A connect timeout is ours when the loop lagged this share of --timeout meanwhile: the host
# then had less than the rest of it to answer. At a quarter, a machine busy enough to run each
# loop a quarter behind (the world benchmark, at times) made every black-holed host's timeout
# ours: retried up to --retries times, 10 s each in a first-contact slot, never counted, so
# the small live hosts waited behind them and the run's last images came 5-10 s later.
LAG_SHARE = 0.5
STOP_SECONDS = 5.0
MAX_RESPAWNS_PER_WORKER = 3
FILES_PER_SLOT = 3  # a socket in flight, an idle keep-alive one, a temp file being written
FILES_SPARE = 256  # the pipe, the resolver, the loop, libraries


@dataclass
class Request:
    job_id: int
    url: str
    host: str  # hosts.host_key(url)
    stem: str  # final path without extension (store.target_stem)
    read_timeout: float | None = None  # the host's own, when shorter than --timeout
    addresses: tuple[str, ...] = ()  # what the host's name resolved to (empty: resolve here)
    ask_policy: bool = False  # ask the host's robots.txt and tdmrep.json first (`consent`)
    may_probe: bool = True  # the host's policy lets us ask for a made-up path


@dataclass
class Reply:
    job_id: int
    attempt: Attempt
    staged: Staged | None
    seconds: float
    crash: str = ""  # an error of ours (disk full...): the run must stop
    missing_picture: tuple[str, str] | None = None  # (sha256, fingerprint): see _MadeUpPaths
    probed: bool = False  # the host was asked for a made-up path (missing_picture: its answer)
    site_files: SiteFiles | None = None  # the host's policy files, when the request asked


def worker_main(conn: Connection, options: GatherOptions, per_host: int) -> None:
    """Entry point of a worker process; `per_host`: its share of the connections per host."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _allow_open_files(FILES_PER_SLOT * worker_capacity(options) + FILES_SPARE)
    try:
        import uvloop  # libuv's loop: less CPU per URL than asyncio's own
    except ImportError:
        asyncio.run(_serve(conn, options, per_host))
    else:
        uvloop.run(_serve(conn, options, per_host))


def _allow_open_files(wanted: int) -> None:
    """Raise this process's soft limit on open files towards `wanted` (within the hard limit):
    many systems start processes at 1,024, below what one worker's share of --concurrency
    and the first contacts may hold; running out would fail attempts as ours, not the hosts'."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))


async def _serve(conn: Connection, options: GatherOptions, per_host: int) -> None:
    loop = asyncio.get_running_loop()
    resolver = Resolver(options.resolve, options.dns_servers, options.dns_timeout)
    made_up = _MadeUpPaths()
    lag = _LagMeter()
    lag.start()
    # Idle keep-alive connections are reused before a new one is opened, so a host never
    # sees more than `per_host` connections from this process, idle ones included.
    connector = aiohttp.TCPConnector(limit=0, limit_per_host=per_host, resolver=resolver,
                                     use_dns_cache=True, ttl_dns_cache=600)
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=options.timeout,
                                    sock_read=options.timeout)
    outbox = _Outbox(conn, loop)
    closed: asyncio.Future[None] = loop.create_future()
    tasks: set[asyncio.Task[None]] = set()
    with ThreadPoolExecutor(DECODE_THREADS) as pool:
        async with aiohttp.ClientSession(connector=connector, timeout=timeout,
                                         headers={"User-Agent": options.agent}) as session:
            async def handle(request: Request) -> None:
                outbox.put(await _fetch(session, resolver, pool, request, options, lag,
                                        made_up))

            def on_readable() -> None:
                try:
                    while conn.poll():
                        batch = conn.recv()
                        if batch is None:
                            break
                        for request in batch:
                            task = loop.create_task(handle(request))
                            tasks.add(task)
                            task.add_done_callback(tasks.discard)
                    else:
                        return
                except (EOFError, OSError):
                    pass
                if not closed.done():
                    closed.set_result(None)

            loop.add_reader(conn.fileno(), on_readable)
            # uvloop makes a watched fd non-blocking: a batch still arriving would then end the
            # worker (BlockingIOError is an OSError) and a reply batch could be lost. Blocking
            # is safe: a batch in either direction is bounded by the worker's capacity, far
            # below the socket's buffer, so a send or recv only waits for the rest of a message.
            os.set_blocking(conn.fileno(), True)
            await closed
            loop.remove_reader(conn.fileno())
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
    lag.stop()


class _LagMeter:
    """How late this process's event loop has run, summed: a connect that timed out while
    the loop was seconds behind (decoding, a burst of replies) timed out on our side."""

    def __init__(self) -> None:
        self.total = 0.0
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._measure())

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()

    async def _measure(self) -> None:
        while True:
            before = time.monotonic()
            await asyncio.sleep(LAG_TICK)
            self.total += max(0.0, time.monotonic() - before - LAG_TICK)


class _MadeUpPaths:
    """Per host, the picture it serves for a path that cannot exist, asked when the host
    first gives an image. Most dead sites in a 2011 list have one or two URLs, so a picture
    they serve for every lost photo never repeats enough to be spotted as a placeholder by
    count; asked for a made-up path, such a host shows it at once (a soft 404) and the
    collector drops it, and anything near-identical from that site. Asked once per host: the
    coordinator stops allowing it once a reply says it was asked (`Reply.probed`), and the
    host's URLs in flight in this worker meanwhile share the answer."""

    def __init__(self) -> None:
        self._answers: dict[str, asyncio.Future[tuple[str, str] | None]] = {}

    async def picture(self, session: aiohttp.ClientSession, resolver: Resolver,
                      pool: ThreadPoolExecutor, request: Request,
                      options: GatherOptions) -> tuple[str, str] | None:
        """(sha256, fingerprint) of the host's picture for a made-up path, or None."""
        answer = self._answers.get(request.host)
        if answer is None:
            answer = self._answers[request.host] = asyncio.ensure_future(
                self._ask(session, resolver, pool, request, options))
        return await asyncio.shield(answer)

    @staticmethod
    async def _ask(session: aiohttp.ClientSession, resolver: Resolver,
                   pool: ThreadPoolExecutor, request: Request,
                   options: GatherOptions) -> tuple[str, str] | None:
        attempt = await fetch_once(session, made_up_url(request.url), options, resolver,
                                   request.read_timeout)
        if attempt.body is None:
            return None
        return await asyncio.get_running_loop().run_in_executor(
            pool, inspect_body, attempt.body, options.min_size)


async def _fetch(session: aiohttp.ClientSession, resolver: Resolver, pool: ThreadPoolExecutor,
                 request: Request, options: GatherOptions, lag: _LagMeter,
                 made_up: _MadeUpPaths) -> Reply:
    started = time.monotonic()
    lagged = lag.total
    resolver.pin(name_of(request.host), request.addresses)
    files = attempt = None
    try:
        if request.ask_policy:
            files, attempt = await _ask_policy(session, resolver, request, options)
        if attempt is None:
            attempt = await fetch_once(session, request.url, options, resolver,
                                       request.read_timeout)
        blame_our_lag(attempt, lag.total - lagged, options.timeout)
        staged = missing = asked = None
        if attempt.body is not None:
            asked = (asyncio.ensure_future(made_up.picture(session, resolver, pool, request,
                                                           options))
                     if options.placeholder_after and request.may_probe else None)
            staged = await asyncio.get_running_loop().run_in_executor(
                pool, stage_body, attempt.body, request.stem, options)
            attempt.body = None
            missing = await asked if asked is not None else None
    except Exception as exc:  # noqa: BLE001 - reported to the coordinator, which stops the run
        return Reply(request.job_id, Attempt("interrupted", final=False), None, 0.0,
                     crash=f"{type(exc).__name__}: {exc}")
    return Reply(request.job_id, attempt, staged, time.monotonic() - started,
                 missing_picture=missing, site_files=files, probed=asked is not None)


def blame_our_lag(attempt: Attempt, lagged: float, timeout: float) -> None:
    """A connect timeout is ours (retried, never held against the host) when this process's
    event loop ran `lagged` seconds late meanwhile, LAG_SHARE of --timeout or more."""
    if attempt.timed_out and lagged >= LAG_SHARE * timeout:
        attempt.ours = f"our event loop ran {lagged:.1f} s late meanwhile"
        attempt.retry = True


async def _ask_policy(session: aiohttp.ClientSession, resolver: Resolver, request: Request,
                      options: GatherOptions) -> tuple[SiteFiles | None, Attempt | None]:
    """The host's policy files, and the Attempt that ends the URL here (None: fetch it): the
    host failed to answer, or its files refuse the URL. Also decides whether the files let us
    ask for a made-up path (`request.may_probe`)."""
    fetched = await fetch_site_files(session, request.url, options, resolver)
    if isinstance(fetched, Attempt):
        return None, fetched
    policy = SitePolicy.parse(fetched)
    refusal = policy.refusal(request.url)
    if refusal is not None:
        return fetched, Attempt("opted_out", final=True, error=refusal)
    request.may_probe = policy.allows_made_up_path(request.url)
    return fetched, None


class _Outbox:
    """Replies finished in one loop iteration travel as one message."""

    def __init__(self, conn: Connection, loop: asyncio.AbstractEventLoop) -> None:
        self._conn, self._loop = conn, loop
        self._pending: list[Reply] = []

    def put(self, reply: Reply) -> None:
        if not self._pending:
            self._loop.call_soon(self._flush)
        self._pending.append(reply)

    def _flush(self) -> None:
        batch, self._pending = self._pending, []
        with contextlib.suppress(OSError):  # the coordinator is gone: nothing to tell
            self._conn.send(batch)


def host_share(options: GatherOptions) -> tuple[bool, int]:
    """(whether a host sticks to one worker, the connections per host each worker may open)."""
    count = options.worker_processes
    sticky = options.per_host < count
    return sticky, options.per_host if sticky else options.per_host // count


def worker_capacity(options: GatherOptions) -> int:
    """URLs one worker may have in flight: its share of the downloads and first contacts."""
    return math.ceil((options.concurrency + options.probe_slots) / options.worker_processes)


def effective_per_host(options: GatherOptions) -> int:
    """What the scheduler may have in flight per host, over all workers."""
    sticky, share = host_share(options)
    return share if sticky else share * options.worker_processes


class WorkerPool:
    """The coordinator's side: start workers, spread requests, collect replies.

    A host's connections are split evenly over the workers (each keeps its own keep-alive
    pool), so the host never sees more than `per_host` of them in all; when `per_host` is
    smaller than the number of workers, all of a host's URLs go to one worker instead.
    A worker that dies (a crash in a decoder, the OOM killer) has its URLs answered as
    `interrupted` (tried again by the next run) and is replaced, a few times at most.
    """

    def __init__(self, options: GatherOptions) -> None:
        self._options = options
        self._context = multiprocessing.get_context("spawn")
        count = options.worker_processes
        self.capacity = worker_capacity(options)
        self._sticky, self._host_share = host_share(options)
        self._workers = [self._start() for _ in range(count)]
        self._respawns = 0

    def __enter__(self) -> WorkerPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def has_room(self) -> bool:
        return any(len(w.in_flight) < self.capacity for w in self._workers)

    def submit(self, request: Request) -> None:
        if self._sticky:
            worker = self._workers[zlib.crc32(request.host.encode()) % len(self._workers)]
        else:  # the scheduler's per-host limit leaves one with room for this host
            worker = min(self._workers, key=lambda w: (w.hosts[request.host] >= self._host_share,
                                                       len(w.in_flight)))
        worker.outgoing.append(request)
        worker.in_flight[request.job_id] = request.host
        worker.hosts[request.host] += 1

    def flush(self) -> None:
        for worker in self._workers:
            worker.flush()

    def wait(self, timeout: float, also: socket.socket | None = None) -> list[Reply]:
        """The replies that arrived within `timeout`; returns early when `also` (another
        source of news: name lookups) becomes readable."""
        replies: list[Reply] = []
        ready = wait([w.conn for w in self._workers] + ([also] if also else []), timeout)
        for index, worker in enumerate(self._workers):
            if worker.conn not in ready:
                continue
            try:
                batch: list[Reply] = worker.conn.recv()
            except (EOFError, OSError):
                replies.extend(self._replace(index))
                continue
            for reply in batch:
                worker.done(reply.job_id)
            replies.extend(batch)
        return replies

    def _start(self) -> _Worker:
        return _Worker.start(self._context, self._options, self._host_share)

    def _replace(self, index: int) -> list[Reply]:
        dead = self._workers[index]
        dead.process.join(STOP_SECONDS)
        error = f"a gather worker process died (exit code {dead.process.exitcode})"
        self._respawns += 1
        if self._respawns > MAX_RESPAWNS_PER_WORKER * len(self._workers):
            raise RuntimeError(f"{error}, too often; see the log for the URLs involved")
        self._workers[index] = self._start()
        return [Reply(job_id, Attempt("interrupted", final=False, error=error), None, 0.0)
                for job_id in dead.in_flight]

    def close(self) -> None:
        for worker in self._workers:
            worker.stop()


@dataclass
class _Worker:
    process: multiprocessing.process.BaseProcess
    conn: Connection
    in_flight: dict[int, str] = field(default_factory=dict)  # job id -> host
    hosts: Counter[str] = field(default_factory=Counter)  # host -> jobs in flight
    outgoing: list[Request] = field(default_factory=list)

    @classmethod
    def start(cls, context: multiprocessing.context.BaseContext, options: GatherOptions,
              per_host: int) -> _Worker:
        ours, theirs = context.Pipe(duplex=True)
        process = context.Process(target=worker_main, args=(theirs, options, per_host),
                                  name="pipeline-gather-worker", daemon=True)
        process.start()
        theirs.close()
        return cls(process, ours)

    def done(self, job_id: int) -> None:
        host = self.in_flight.pop(job_id, None)
        if host is not None:
            self.hosts[host] -= 1
            if not self.hosts[host]:
                del self.hosts[host]

    def flush(self) -> None:
        if self.outgoing:
            with contextlib.suppress(OSError):  # a dead worker: its URLs come back in wait()
                self.conn.send(self.outgoing)
            self.outgoing = []

    def stop(self) -> None:
        with contextlib.suppress(OSError):
            self.conn.send(None)
        self.process.join(STOP_SECONDS)
        if self.process.is_alive():
            self.process.kill()
            self.process.join()
        self.conn.close()
