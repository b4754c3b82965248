"""Hosts: name resolution (with `--resolve` and a negative cache), which addresses a redirect
may reach, and per-host health and politeness for the scheduler.

On the real ImageNet list 40-60% of the URLs are dead, much of it whole hosts (DNS gone,
connections refused or black-holed). A host that failed `host_failures` times in a row is not
asked again in this run, so a dead host costs a handful of attempts, not one per URL: until it
has answered once, a host gets exactly that many attempts (its probe, all at once: one round
of timeouts, not several), and no more while they fail.

A host that has answered a few times gets a read timeout fitted to it, as TCP fits its
retransmission timeout: the smoothed answer time plus four deviations, at least
ADAPTIVE_FLOOR seconds (RFC 6298's minimum retransmission timeout), at most --timeout. On a
host that answers in 50 ms, a request silent for seconds is hung, and waiting the full
--timeout for each such URL holds a connection that the host's other URLs need. Nothing is
lost to impatience: a URL cut short is retried once in the run under twice the timer it was cut
at (as a retry, within --retries) and, cut again, left for the next run, which gives it the
full --timeout; the cut never counts against the host's health, and it doubles the host's read
timeout (RFC 6298's back-off), so a client slowed by its own machine's load stops cutting
within a few answers.
"""

from __future__ import annotations

import heapq
import ipaddress
import socket
from dataclasses import dataclass
from urllib.parse import urlsplit

from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import ThreadedResolver

from pipeline.errors import InputError

# RFC 6761: resolvers must answer names under these at once, negatively, without asking DNS.
NEVER_RESOLVED = (".invalid", ".invalid.")

Pin = tuple[str, int | None, str]  # (host, port or None for any, address)


def parse_resolve(value: str) -> Pin:
    """`HOST:PORT:ADDR` as curl takes it, or `HOST:ADDR` for any port; IPv6 as [::1]."""
    host, _, rest = value.partition(":")
    port_text, _, address = rest.partition(":")
    if not address or address.startswith(":") or not port_text.isdigit():
        port_text, address = "", rest
    address = address.strip("[]")
    try:
        ipaddress.ip_address(address)
    except ValueError:
        raise InputError(f"--resolve {value!r}: expected HOST:PORT:ADDR or HOST:ADDR with an "
                         "IP address, e.g. images.example:80:127.0.0.2") from None
    if not host:
        raise InputError(f"--resolve {value!r}: the host name is missing")
    return host.lower(), int(port_text) if port_text else None, address


def host_key(url: str) -> str:
    """What politeness and health are counted per: host and port as the URL spells them."""
    netloc = urlsplit(url).netloc
    return netloc.rpartition("@")[2].lower()


# Second-level labels under which country domains register names (example.co.uk, a.com.au,
# b.ne.jp): without a public-suffix list, these make a site three labels long, not two.
_SECOND_LEVEL = frozenset({"ac", "co", "com", "edu", "go", "gov", "ne", "net", "or", "org"})


def site_of(url: str) -> str:
    """The registered domain a URL's host belongs to (farm3.static.flickr.com and
    farm4.static.flickr.com are flickr.com): what serves one "image not found" picture in
    its several sizes. An IP address or a one-label name is its own site."""
    try:
        host = (urlsplit(url).hostname or "").rstrip(".")
    except ValueError:  # no request could be made of it
        return ""
    labels = host.split(".")
    if len(labels) < 3 or _is_address(host):
        return host
    keep = 3 if len(labels[-1]) == 2 and labels[-2] in _SECOND_LEVEL else 2
    return ".".join(labels[-keep:])


def _is_address(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def is_public(address: str) -> bool:
    """False for loopback, private, link-local and other non-global addresses."""
    ip = ipaddress.ip_address(address.split("%")[0])
    if ip.version == 6 and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_global


class Resolver(AbstractResolver):
    """The system resolver behind `--resolve` pins, with failures remembered for the run.

    A DNS failure is final for this run: a host whose name is gone today is not asked again
    for each of its thousands of URLs (aiohttp caches only successes).
    """

    def __init__(self, pins: tuple[Pin, ...] = ()) -> None:
        self._pins = {(host, port): address for host, port, address in pins}
        self._system = ThreadedResolver()
        self._failed: dict[str, OSError] = {}

    async def resolve(self, host: str, port: int = 0,
                      family: socket.AddressFamily = socket.AF_INET) -> list[ResolveResult]:
        name = host.lower()
        pinned = self._pins.get((name, port)) or self._pins.get((name, None))
        if pinned is not None:
            return [_result(host, pinned, port)]
        if name.endswith(NEVER_RESOLVED):
            raise OSError(f"{host} is a reserved name that never resolves")
        if name in self._failed:
            raise self._failed[name]
        try:
            return await self._system.resolve(host, port, family)
        except OSError as exc:
            self._failed[name] = exc
            raise

    async def addresses(self, host: str, port: int) -> list[str]:
        if _is_ip(host):
            return [host]
        return [result["host"] for result in await self.resolve(host, port)]

    async def close(self) -> None:
        await self._system.close()


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return False
    return True


def _result(hostname: str, address: str, port: int) -> ResolveResult:
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    return ResolveResult(hostname=hostname, host=address, port=port, family=family,
                         proto=0, flags=socket.AI_NUMERICHOST)


ADAPTIVE_FLOOR = 1.0  # seconds: the shortest read timeout a host is given (RFC 6298's RTO)
ADAPTIVE_SAMPLES = 4  # answers seen before a host's own timeout applies
CUT_RETRY_LIMIT = 2 * ADAPTIVE_FLOOR  # the most a cut URL's retry doubles its timer to


@dataclass
class HostState:
    in_flight: int = 0
    failures: int = 0  # consecutive connection failures and timeouts
    down_because: str = ""  # set once the host is given up for this run
    not_before: float = 0.0  # a Retry-After pause, on the monotonic clock
    answered_at: float = float("-inf")  # when it last gave an HTTP answer
    answers: int = 0
    smoothed: float = 0.0  # answer time, smoothed (seconds)
    deviation: float = 0.0  # its mean deviation
    last_error: str = ""


class HostBook:
    """Per-host politeness (connections at once, Retry-After pauses) and health."""

    def __init__(self, per_host: int, max_failures: int) -> None:
        self.per_host = per_host
        self.max_failures = max_failures
        self.hosts: dict[str, HostState] = {}
        self._pauses: list[tuple[float, str]] = []

    def state(self, host: str) -> HostState:
        state = self.hosts.get(host)
        if state is None:
            state = self.hosts[host] = HostState()
        return state

    def available(self, host: str, now: float) -> bool:
        state = self.state(host)
        limit = (self.per_host if state.answers
                 else min(self.per_host, self.max_failures - state.failures))
        return state.in_flight < limit and now >= state.not_before

    def read_timeout(self, host: str, longest: float) -> float | None:
        """This host's own read timeout, or None while it has answered too rarely to tell."""
        state = self.state(host)
        if state.answers < ADAPTIVE_SAMPLES:
            return None
        fitted = max(ADAPTIVE_FLOOR, state.smoothed + 4 * state.deviation)
        return fitted if fitted < longest else None

    def is_down(self, host: str) -> bool:
        state = self.hosts.get(host)
        return state is not None and bool(state.down_because)

    def record(self, host: str, *, connection_failed: bool, started: float, now: float,
               error: str = "", cut_short: bool = False) -> None:
        """Any HTTP answer proves the host alive. A failure counts only if its attempt began
        after the host's last answer: attempts started together (a burst of hung URLs on a
        busy, healthy host) fail together, and that says nothing about the host."""
        state = self.state(host)
        if cut_short:
            self._back_off(state, now - started)
            return
        if not connection_failed:
            state.failures = 0
            state.answered_at = now
            self._time_answer(state, now - started)
            return
        if started < state.answered_at:
            return
        state.failures += 1
        state.last_error = error
        if state.failures >= self.max_failures and not state.down_because:
            state.down_because = (f"host down: {state.failures} connection failures in a row "
                                  f"(last: {error})")

    @staticmethod
    def _back_off(state: HostState, waited: float) -> None:
        """RFC 6298 5.5: a timer that fired doubles; here the wait it gave becomes the
        deviation's share, so the next read timeout is at least twice as long."""
        state.deviation = max(state.deviation, (2 * waited - state.smoothed) / 4)

    @staticmethod
    def _time_answer(state: HostState, seconds: float) -> None:
        """Jacobson's estimator (RFC 6298): smoothed time and mean deviation."""
        if state.answers == 0:
            state.smoothed, state.deviation = seconds, seconds / 2
        else:
            state.deviation = 0.75 * state.deviation + 0.25 * abs(state.smoothed - seconds)
            state.smoothed = 0.875 * state.smoothed + 0.125 * seconds
        state.answers += 1

    def pause(self, host: str, until: float) -> None:
        state = self.state(host)
        state.not_before = max(state.not_before, until)
        heapq.heappush(self._pauses, (until, host))

    def next_pause_end(self, now: float) -> float | None:
        while self._pauses and self._pauses[0][0] <= now:
            heapq.heappop(self._pauses)
        return self._pauses[0][0] if self._pauses else None

    def down_count(self) -> int:
        return sum(1 for state in self.hosts.values() if state.down_because)
