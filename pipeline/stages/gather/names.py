"""Name resolution as a stage of its own: asynchronous, concurrent, ahead of the downloads.

On the real ImageNet list about a third of the domains no longer exist, and many of those
time out rather than fail fast. Resolving with `getaddrinfo` on a small thread pool (aiohttp's
ThreadedResolver) lets a few slow dead names hold every thread, so a live name, and under
uvloop even a connect to a numeric address (libuv passes it through the same pool), waits
seconds behind them, runs into the connect timeout, and the host is blamed for our queue.

So names are looked up with c-ares (`aiodns`), which keeps every lookup in flight on one
socket, never on a thread pool:

- the coordinator resolves each host's name once, ahead of its URLs (`NameService`, on a
  thread of its own), and hands the addresses to the workers with each URL, so a worker's
  connect never waits on a lookup and the connect timeout times the connect alone;
- successes are cached for the run; a name that does not exist (NXDOMAIN, no address,
  SERVFAIL) is `host_not_found` for all its URLs after that one lookup, and tried again by the
  next run;
- a lookup that times out is ambiguous (a dead name's servers, or a resolver we flooded), so it
  never ends a host at once: it is asked again later with fewer lookups in flight, and blames
  the name only once the resolver answered names asked after it while it stayed silent. While
  the resolver answers nothing at all, nothing is blamed (a stalled resolver is our problem,
  not the hosts'), and the log says so.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import queue
import random
import socket
import threading
import time
from collections import deque
from dataclasses import dataclass
from urllib.parse import urlsplit

import aiodns
import pycares
from aiohttp.abc import AbstractResolver, ResolveResult

from pipeline.core.errors import InputError

log = logging.getLogger(__name__)

# RFC 6761: resolvers must answer names under these at once, negatively, without asking DNS.
NEVER_RESOLVED = (".invalid", ".invalid.")
# c-ares answers that say the name has no address: final for the run.
NOT_FOUND_CODES = frozenset({pycares.errno.ARES_ENOTFOUND, pycares.errno.ARES_ENODATA,
                             pycares.errno.ARES_ESERVFAIL, pycares.errno.ARES_EBADNAME,
                             pycares.errno.ARES_EFORMERR})
DNS_CONCURRENCY = 256  # first lookups in flight at most (c-ares keeps them on one socket)
DNS_MIN_CONCURRENCY = 8  # what a silent resolver slows the first lookups down to
DNS_AGAIN_CONCURRENCY = 16  # names asked again after a timeout, in flight at most
TIMEOUT_TRIES = 2  # timeouts before a name is blamed (the second with a working resolver)
SILENT_TRIES = 4  # silent timeouts before a name is blamed when no name ever resolved
SILENT_PAUSE = 1.0  # seconds before a name that met a silent resolver is asked again
SILENCE_LIMIT = 120.0  # seconds of a resolver answering nothing before the run stops

Pin = tuple[str, int | None, str]  # (host, port or None for any, address)


def parse_resolve(value: str) -> Pin:
    """`HOST:PORT:ADDR` as curl takes it, or `HOST:ADDR` for any port; IPv6 as [::1]."""
    host, _, rest = value.partition(":")
    port_text, _, address = rest.partition(":")
    if not address or address.startswith(":") or not port_text.isdigit():
        port_text, address = "", rest
    address = address.strip("[]")
    if not is_ip(address):
        raise InputError(f"--resolve {value!r}: expected HOST:PORT:ADDR or HOST:ADDR with an "
                         "IP address, e.g. images.example:80:127.0.0.2")
    if not host:
        raise InputError(f"--resolve {value!r}: the host name is missing")
    return host.lower(), int(port_text) if port_text else None, address


def parse_dns_server(value: str) -> str:
    """`ADDR`, `ADDR:PORT` or `[IPV6]:PORT`, in the form c-ares takes (`ADDR:PORT`)."""
    text = value.strip()
    if text.startswith("["):
        address, _, port = text[1:].partition("]")
        port = port.removeprefix(":")
    elif text.count(":") == 1:
        address, _, port = text.partition(":")
    else:
        address, port = text, ""
    if not is_ip(address) or (port and not (port.isdigit() and 0 < int(port) < 65536)):
        raise InputError(f"--dns-server {value!r}: expected an IP address with an optional "
                         "port, e.g. 1.1.1.1, 127.0.0.1:5353 or [::1]:53")
    port = port or "53"
    return f"[{address}]:{port}" if ":" in address else f"{address}:{port}"


def is_ip(host: str) -> bool:
    if not host or not (host[0].isdigit() or host[0] == "[" or ":" in host):
        return False  # a name: no address starts with a letter (cheap, asked per URL)
    try:
        ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return False
    return True


def name_of(host: str) -> str:
    """The name to look up for a host key (`host:port` as the URL spells it)."""
    return (urlsplit(f"//{host}").hostname or "").rstrip(".")


@dataclass(frozen=True)
class Answer:
    """What a lookup gave: addresses, or why there are none.

    `silent`: the lookup timed out and may be asked again; its name is not to blame yet.
    """

    name: str
    addresses: tuple[str, ...] = ()
    error: str = ""
    silent: bool = False


class Lookups:
    """c-ares lookups with a hard deadline each, and the evidence needed to blame a timeout.

    A timeout blames its name only if the resolver was heard meanwhile: it answered a lookup
    asked after this one began, or, when none was, it answers a canary (a random label under a
    name that resolved earlier in the run: never cached, so the resolver itself must answer).
    Otherwise the answer is `silent`: the resolver, not the name, may be at fault.
    """

    def __init__(self, servers: tuple[str, ...], timeout: float) -> None:
        self.timeout = timeout
        # c-ares fits its own per-try timer to the server's speed (often far below ours), so
        # it gets tries to spare and our deadline decides.
        self._resolver = aiodns.DNSResolver(nameservers=list(servers) or None,
                                            timeout=timeout / 2, tries=4)
        self._latest_answered_start = float("-inf")
        self._known_good = ""

    async def lookup(self, name: str) -> Answer:
        started = time.monotonic()
        try:
            addresses = await self._ask(name)
        except TimeoutError:
            return await self._timed_out(name, started)
        except aiodns.error.DNSError as exc:
            code = exc.args[0] if exc.args else None
            if code not in NOT_FOUND_CODES:  # the resolver refused us, or is unreachable
                return await self._timed_out(name, started, exc.args[-1] if exc.args else "")
            self._heard(started)
            return Answer(name, error=f"host not found: {exc.args[-1]}")
        self._heard(started)
        if not addresses:
            return Answer(name, error="host not found: the name has no address")
        self._known_good = name
        return Answer(name, addresses)

    async def _ask(self, name: str) -> tuple[str, ...]:
        async with asyncio.timeout(self.timeout):
            while True:
                try:
                    result = await self._resolver.getaddrinfo(name, socket.AF_UNSPEC,
                                                              type=socket.SOCK_STREAM)
                except aiodns.error.DNSError as exc:
                    if exc.args and exc.args[0] == pycares.errno.ARES_ETIMEOUT:
                        continue  # c-ares gave up before our deadline: ask again
                    raise
                found = (node.addr[0] for node in result.nodes)
                return tuple(dict.fromkeys(a.decode() if isinstance(a, bytes) else a
                                           for a in found))

    def _heard(self, started: float) -> None:
        self._latest_answered_start = max(self._latest_answered_start, started)

    async def _timed_out(self, name: str, started: float, why: str = "") -> Answer:
        heard = self._latest_answered_start >= started or await self._canary_answered()
        error = (f"no DNS answer within {self.timeout:g} s (--dns-timeout)"
                 + (f": {why}" if why else ""))
        return Answer(name, error=error, silent=not heard)

    async def _canary_answered(self) -> bool:
        if not self._known_good:
            return False
        canary = f"pipeline-canary-{random.getrandbits(48):012x}.{self._known_good}"
        try:
            await self._ask(canary)
        except TimeoutError:
            return False
        except aiodns.error.DNSError as exc:
            return bool(exc.args) and exc.args[0] in NOT_FOUND_CODES
        return True

    async def close(self) -> None:
        await self._resolver.close()


class NameService:
    """The coordinator's resolver: lookups on a thread of its own, one per name, asked ahead.

    `request(name)` asks (once); `answer(name)` is its cached `Answer`, or None while it is
    pending. Answers arrive on `wakeup` (a socket the coordinator waits on beside its
    workers) and are taken in with `collect()`.
    """

    def __init__(self, servers: tuple[str, ...], timeout: float) -> None:
        self._servers, self._timeout = servers, timeout
        self._answers: dict[str, Answer] = {}
        self._asked: set[str] = set()
        self._timeouts: dict[str, int] = {}
        self._silent_tries: dict[str, int] = {}
        self._resolved_any = False
        self._done: queue.SimpleQueue[Answer] = queue.SimpleQueue()
        self.wakeup, self._waker = socket.socketpair()
        self.wakeup.setblocking(False)
        self._loop = asyncio.new_event_loop()
        self._started = threading.Event()
        self._thread = threading.Thread(target=self._run, name="pipeline-dns", daemon=True)
        self._thread.start()
        self._started.wait()
        self.lookups_made = 0
        self._silent_since: float | None = None

    def __enter__(self) -> NameService:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def answer(self, name: str) -> Answer | None:
        return self._answers.get(name)

    def request(self, name: str) -> None:
        """Look the name up unless it is known or already asked."""
        if name in self._answers or name in self._asked:
            return
        self._asked.add(name)
        self._submit(name, 0.0)

    def pending(self) -> int:
        return len(self._asked)

    def collect(self) -> list[Answer]:
        """Take in the answers that arrived; a silent timeout is asked again (not cached)."""
        with contextlib.suppress(BlockingIOError):
            while self.wakeup.recv(4096):
                pass
        final: list[Answer] = []
        while True:
            try:
                answer = self._done.get_nowait()
            except queue.Empty:
                return final
            self.lookups_made += 1
            self._note_silence(answer)
            if self._ask_again(answer):
                continue
            self._asked.discard(answer.name)
            self._answers[answer.name] = answer
            self._resolved_any |= bool(answer.addresses)
            final.append(answer)

    def _ask_again(self, answer: Answer) -> bool:
        """A timeout is final only at its TIMEOUT_TRIES-th, and only if the resolver was
        heard meanwhile; until then the name waits and is asked again."""
        if answer.addresses or not answer.error.startswith("no DNS answer"):
            return False
        if answer.silent:
            silent = self._silent_tries[answer.name] = self._silent_tries.get(answer.name, 0) + 1
            if silent < SILENT_TRIES or self._resolved_any:
                self._submit(answer.name, SILENT_PAUSE)
                return True
        tries = self._timeouts[answer.name] = self._timeouts.get(answer.name, 0) + 1
        if tries >= TIMEOUT_TRIES:
            del self._timeouts[answer.name]
            return False
        self._submit(answer.name, SILENT_PAUSE)
        return True

    def _note_silence(self, answer: Answer) -> None:
        """Say when the resolver falls silent and when it is back; stop the run when it has
        been silent too long for waiting to help."""
        now = time.monotonic()
        if not answer.silent:
            if self._silent_since is not None:
                log.warning("DNS: the resolver answers again after %.0f s of silence",
                            now - self._silent_since)
            self._silent_since = None
            return
        if self._silent_since is None:
            self._silent_since = now
            log.warning("DNS: lookups time out while the resolver answers nothing at all: the "
                        "trouble looks local (the resolver or the network), so no host is "
                        "given up for it; asking again")
        elif now - self._silent_since > SILENCE_LIMIT:
            raise InputError(
                f"the DNS resolver{' ' + ', '.join(self._servers) if self._servers else ''} "
                f"has answered nothing for {now - self._silent_since:.0f} s: check the "
                "network or name another resolver with --dns-server ADDR, then run the same "
                "command again to resume")

    def _submit(self, name: str, delay: float) -> None:
        self._loop.call_soon_threadsafe(self._queue.put_nowait, (name, delay))

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._queue: asyncio.Queue[tuple[str, float] | None] = asyncio.Queue()
        self._loop.run_until_complete(self._serve())

    async def _serve(self) -> None:
        lookups = Lookups(self._servers, self._timeout)
        first, again = _Limiter(DNS_CONCURRENCY), _Limiter(DNS_AGAIN_CONCURRENCY)
        self._started.set()
        tasks: set[asyncio.Task[None]] = set()
        while (item := await self._queue.get()) is not None:
            name, delay = item
            task = asyncio.create_task(
                self._lookup(lookups, again if delay else first, first, name, delay))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await lookups.close()

    async def _lookup(self, lookups: Lookups, limiter: _Limiter, first: _Limiter, name: str,
                      delay: float) -> None:
        """A name asked again (after a timeout) waits its pause and goes in a narrow lane of
        its own, so dead names asked twice never crowd out first lookups."""
        if delay:
            await asyncio.sleep(delay)
        async with limiter:
            answer = await lookups.lookup(name)
        first.update(answer)
        self._done.put(answer)
        with contextlib.suppress(OSError):
            self._waker.send(b"\0")

    def close(self) -> None:
        if self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._queue.put_nowait, None)
            self._thread.join(5.0)
        self._loop.close()
        self.wakeup.close()
        self._waker.close()


class _Limiter:
    """Lookups in flight; the first lookups' limit is halved when the resolver falls silent
    (a home router or a busy local resolver drops what it cannot answer) and grown back by
    answers. A timeout that blames its name (a dead name's servers) slows nothing."""

    def __init__(self, limit: int) -> None:
        self.limit = self.ceiling = limit
        self._in_flight = 0
        self._waiting: deque[asyncio.Future[None]] = deque()

    async def __aenter__(self) -> None:
        while self._in_flight >= self.limit:
            future = asyncio.get_running_loop().create_future()
            self._waiting.append(future)
            await future
        self._in_flight += 1

    async def __aexit__(self, *exc: object) -> None:
        self._in_flight -= 1
        self._wake()

    def update(self, answer: Answer) -> None:
        if answer.silent:
            self.limit = max(DNS_MIN_CONCURRENCY, self.limit // 2)
        elif self.limit < self.ceiling:
            self.limit += 1
        self._wake()

    def _wake(self) -> None:
        free = self.limit - self._in_flight
        while free > 0 and self._waiting:
            future = self._waiting.popleft()
            if not future.done():
                future.set_result(None)
                free -= 1


class Resolver(AbstractResolver):
    """A worker's resolver: `--resolve` pins, then the addresses the coordinator looked up
    for each URL's host (`pin`), then c-ares for the hosts a redirect leads to, failures
    remembered for the run (aiohttp caches only successes).
    """

    def __init__(self, pins: tuple[Pin, ...] = (), servers: tuple[str, ...] = (),
                 timeout: float = 5.0) -> None:
        self._pins = {(host, port): address for host, port, address in pins}
        self._known: dict[str, tuple[str, ...]] = {}
        self._servers, self._timeout = servers, timeout
        self._lookups: Lookups | None = None
        self._failed: dict[str, OSError] = {}

    def pin(self, name: str, addresses: tuple[str, ...]) -> None:
        if addresses:
            self._known[name.lower()] = addresses

    async def resolve(self, host: str, port: int = 0,
                      family: socket.AddressFamily = socket.AF_INET) -> list[ResolveResult]:
        name = host.lower().rstrip(".")
        pinned = self._pins.get((name, port)) or self._pins.get((name, None))
        if pinned is not None:
            return [_result(host, pinned, port)]
        if name in self._known:
            return [_result(host, address, port) for address in self._known[name]]
        if name.endswith(NEVER_RESOLVED) or name + "." in NEVER_RESOLVED:
            raise OSError(f"{host} is a reserved name that never resolves")
        if name in self._failed:
            raise self._failed[name]
        if self._lookups is None:
            self._lookups = Lookups(self._servers, self._timeout)
        answer = await self._lookups.lookup(name)
        if not answer.addresses:
            error = OSError(answer.error)
            if not answer.silent:
                self._failed[name] = error
            raise error
        self._known[name] = answer.addresses
        return [_result(host, address, port) for address in answer.addresses]

    async def addresses(self, host: str, port: int) -> list[str]:
        if is_ip(host):
            return [host.strip("[]")]
        return [result["host"] for result in await self.resolve(host, port)]

    async def close(self) -> None:
        if self._lookups is not None:
            await self._lookups.close()


def pinned_address(pins: tuple[Pin, ...], name: str, port: int | None) -> str | None:
    """The `--resolve` address for a name, if it has one (the coordinator skips its lookup)."""
    for host, pin_port, address in pins:
        if host == name and pin_port in (None, port):
            return address
    return None


def _result(hostname: str, address: str, port: int) -> ResolveResult:
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    return ResolveResult(hostname=hostname, host=address, port=port, family=family,
                         proto=0, flags=socket.AI_NUMERICHOST)
