"""Hosts: which addresses a redirect may reach, and per-host health and politeness for the
scheduler.

On the real ImageNet list 40-60% of the URLs are dead, much of it whole hosts (DNS gone,
connections refused or black-holed). A breaker per host keeps a dead host from costing one
attempt per URL, and blames a host only for the host's own failures:

- What counts: a refused connection, a connect timeout, a TLS failure, after the host's name
  resolved (names are looked up on their own, see `names`). What never counts: a failure of an
  attempt begun before the host's last answer (a burst of URLs started together fails
  together), one the worker marks as ours (its event loop lagged, or the error is local: no
  file descriptors, no local port, no route), and any failure while the trouble looks local
  (`LocalTrouble`: many unrelated sites failing at once while nobody answers).
- A host's policy files (robots.txt, tdmrep.json: `consent`) are asked for by its first URL,
  alone in flight; its other URLs wait for the answer (`needs_policy`, `set_policy`). Once
  that first try failed to connect, the next ones (each asking too) go PROBE_AT_ONCE at a
  time, so a dead host is given up as soon as before.
- Until it has answered once, a host gets PROBE_AT_ONCE attempts at once (its probe). After
  `host_failures` failures in a row the breaker opens: the host's URLs wait, and `down_after`
  seconds after the first of those failures one URL is tried again (half-open). Only if that
  one fails too is the host down for this run: its URLs are journaled `host_down` without
  being requested, and tried again by the next run. A host is thus given up only after
  failures spread over at least `down_after` seconds.

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
import logging
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol
from urllib.parse import urlsplit

from pipeline.stages.gather.names import Answer, Pin, is_ip, name_of, pinned_address

if TYPE_CHECKING:
    from pipeline.stages.gather.consent import SitePolicy

log = logging.getLogger(__name__)


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
    if len(labels) < 3 or is_ip(host):
        return host
    keep = 3 if len(labels[-1]) == 2 and labels[-2] in _SECOND_LEVEL else 2
    return ".".join(labels[-keep:])


def is_public(address: str) -> bool:
    """False for loopback, private, link-local and other non-global addresses."""
    ip = ipaddress.ip_address(address.split("%")[0])
    if ip.version == 6 and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_global


ADAPTIVE_FLOOR = 1.0  # seconds: the shortest read timeout a host is given (RFC 6298's RTO)
ADAPTIVE_SAMPLES = 4  # answers seen before a host's own timeout applies
CUT_RETRY_LIMIT = 2 * ADAPTIVE_FLOOR  # the most a cut URL's retry doubles its timer to


PROBE_AT_LEAST = 1.0  # seconds between the breaker opening and its half-open probe
PROBE_AT_ONCE = 2  # attempts in flight to a host that has not answered yet
TROUBLE_WINDOW = 5.0  # seconds within which many failing sites suggest the trouble is ours
TROUBLE_SITES = 10  # sites failing to connect in the window while nobody answers
TROUBLE_RELAPSED = 3  # sites that had answered before, failing to connect in the window


class NameSource(Protocol):
    """What the host book needs of a resolver (`names.NameService`)."""

    def request(self, name: str) -> None: ...

    def answer(self, name: str) -> Answer | None: ...


@dataclass
class HostState:
    in_flight: int = 0
    failures: int = 0  # consecutive connection failures that counted
    first_failed_at: float = 0.0  # when the first of them came
    probe_at: float | None = None  # the breaker is open: one URL may try again from then
    down_because: str = ""  # set once the host is given up for this run
    given_up_as: str = ""  # the journal outcome of its remaining URLs
    not_before: float = 0.0  # a Retry-After pause, on the monotonic clock
    answered_at: float = float("-inf")  # when it last gave an HTTP answer
    answers: int = 0
    smoothed: float = 0.0  # answer time, smoothed (seconds)
    deviation: float = 0.0  # its mean deviation
    last_error: str = ""
    addresses: tuple[str, ...] | None = None  # None: not resolved yet; (): the worker resolves
    policy: SitePolicy | None = None  # robots.txt and TDMRep, once asked
    crawl_delay: float = 0.0  # seconds between requests, as its robots.txt asked
    made_up_asked: bool = False  # a worker asked it for a made-up path (worker._MadeUpPaths)


class HostBook:
    """Per-host politeness (connections at once, Retry-After pauses), names and health."""

    def __init__(self, per_host: int, max_failures: int, down_after: float = 0.0,
                 names: NameSource | None = None, pins: tuple[Pin, ...] = (),
                 ask_policy: bool = False) -> None:
        self.per_host = per_host
        self.ask_policy = ask_policy
        self.max_failures = max_failures
        self.down_after = down_after
        self.names = names
        self.pins = pins
        self.hosts: dict[str, HostState] = {}
        self.trouble = LocalTrouble()
        self._pauses: list[tuple[float, str]] = []

    def state(self, host: str) -> HostState:
        state = self.hosts.get(host)
        if state is None:
            state = self.hosts[host] = HostState()
        return state

    def available(self, host: str, now: float) -> bool:
        """Whether one more URL of the host may start now. Asks for its name the first time,
        so names are looked up as their hosts come near the front of the schedule."""
        state = self.state(host)
        if state.addresses is None and not self._resolved(host, state):
            return False
        if now < state.not_before:
            return False
        if state.probe_at is not None:  # open: one half-open probe, once it is due
            return now >= state.probe_at and state.in_flight == 0
        return state.in_flight < self._limit(state)

    def room(self, host: str) -> int:
        """How many more URLs of the host may be in flight (pauses aside)."""
        state = self.state(host)
        return max(0, (1 if state.probe_at is not None else self._limit(state))
                   - state.in_flight)

    def _limit(self, state: HostState) -> int:
        if state.crawl_delay or (self.ask_policy and state.policy is None
                                 and not state.failures):
            return 1  # its first URL asks for its policy alone (or, a crawl delay: always)
        if state.answers:
            return self.per_host
        # Not answered yet (its policy included, once its first try failed: a dead host's
        # failures then come in pairs, as before policies were asked).
        return min(self.per_host, PROBE_AT_ONCE, self.max_failures - state.failures)

    def _resolved(self, host: str, state: HostState) -> bool:
        name = name_of(host)
        port = int(host.rpartition(":")[2]) if host.rpartition(":")[2].isdigit() else None
        if is_ip(name):
            state.addresses = (name.strip("[]"),)
        elif (pinned := pinned_address(self.pins, name.lower(), port)) is not None:
            state.addresses = (pinned,)
        elif self.names is None:
            state.addresses = ()
        elif (answer := self.names.answer(name)) is None:
            self.names.request(name)
            return False
        elif not answer.addresses:
            self._give_up(state, "host_not_found", answer.error)
            return False
        else:
            state.addresses = answer.addresses
        return True

    def needs_policy(self, host: str) -> bool:
        """Whether the host's next URL must first ask for its robots.txt and tdmrep.json."""
        return self.ask_policy and self.state(host).policy is None

    def set_policy(self, host: str, policy: SitePolicy, now: float) -> None:
        """The host's policy arrived with its first URL's answer (`now`)."""
        state = self.state(host)
        state.policy = policy
        if policy.crawl_delay:
            state.crawl_delay = policy.crawl_delay
            self.pause(host, now + policy.crawl_delay)
            log.info("%s: robots.txt asks for %g s between requests: one at a time", host,
                     policy.crawl_delay)

    def started(self, host: str, now: float) -> None:
        """A URL of the host was requested: a crawl delay holds its next one back."""
        delay = self.state(host).crawl_delay
        if delay:
            self.pause(host, now + delay)

    def give_up(self, host: str, outcome: str, reason: str) -> None:
        """The host's remaining URLs are journaled `outcome` without being requested."""
        self._give_up(self.state(host), outcome, reason)

    def ready_at(self, host: str) -> float:
        """When a paused host (Retry-After, or its breaker open) may take a URL again."""
        state = self.state(host)
        return max(state.not_before, state.probe_at or 0.0)

    def addresses(self, host: str) -> tuple[str, ...]:
        """What the host's name resolved to (empty: the worker resolves it itself)."""
        return self.state(host).addresses or ()

    def read_timeout(self, host: str, longest: float, *, timed_out_before: bool = False,
                     cut_at: float | None = None) -> float | None:
        """The read timeout of a URL on this host: its own timer, or None for the full
        `longest` (--timeout) while the host has answered too rarely to tell.

        A URL that timed out in an earlier run (`timed_out_before`) gets the full --timeout,
        so a slow image is not cut off run after run. A URL cut at its host's timer (`cut_at`)
        is retried once in the run, under twice that timer (RFC 6298 5.5), but no more than
        CUT_RETRY_LIMIT unless the host's own timer grew longer since: a client slowed by load
        recovers its answers (they come a little late), while a URL the server let hang (4% of
        a real list's URLs on live hosts do) costs ~3 s, not the full --timeout on top, and
        waits for the next run. With --timeout 10, waiting it out in the run tripled a
        300-host run's time; doubling timers that earlier cuts had already doubled made it 1.5
        times as long.
        """
        if timed_out_before:
            return None
        state = self.state(host)
        if state.answers < ADAPTIVE_SAMPLES:
            return None
        fitted = max(ADAPTIVE_FLOOR, state.smoothed + 4 * state.deviation)
        if cut_at is not None:
            fitted = max(fitted, min(2 * cut_at, CUT_RETRY_LIMIT))
        return fitted if fitted < longest else None

    def is_down(self, host: str) -> bool:
        state = self.hosts.get(host)
        return state is not None and bool(state.down_because)

    def record(self, host: str, *, connection_failed: bool, started: float, now: float,
               error: str = "", cut_short: bool = False, ours: str = "",
               timed_out: bool = False) -> None:
        """Any HTTP answer proves the host alive; a failure counts only if the host is to
        blame (see the module's docstring). `ours`: the worker found the failure to be of
        our own making; `timed_out`: no connection within --timeout (a refusal or a TLS
        failure is the host's own answer, a timeout may be our network's)."""
        state = self.state(host)
        if cut_short:
            self._back_off(state, now - started)
            return
        if not connection_failed:
            self._answered(host, state, started, now)
            return
        if ours:
            self.trouble.local(ours, now)
            return
        if started < state.answered_at:
            return
        if timed_out and self.trouble.failed(host, now, answered_before=state.answers > 0):
            return
        if state.probe_at is not None and started < state.probe_at:
            return  # begun before the breaker opened: the probe decides
        self._count_failure(host, state, now, error)

    def _answered(self, host: str, state: HostState, started: float, now: float) -> None:
        if state.probe_at is not None:
            log.info("%s answered its half-open probe: trying its URLs again", host)
        state.failures = 0
        state.probe_at = None
        state.answered_at = now
        self.trouble.answered(started, now)
        self._time_answer(state, now - started)

    def _count_failure(self, host: str, state: HostState, now: float, error: str) -> None:
        if not state.failures:
            state.first_failed_at = now
        state.failures += 1
        state.last_error = error
        if state.probe_at is not None:  # the half-open probe failed too
            self._give_up(state, "host_down",
                          f"host down: {state.failures} connection failures in a row over "
                          f"{now - state.first_failed_at:.0f} s, the last one a retry after "
                          f"a pause (last: {error})")
        elif state.failures >= self.max_failures:
            state.probe_at = max(state.first_failed_at + self.down_after, now + PROBE_AT_LEAST)
            heapq.heappush(self._pauses, (state.probe_at, host))  # the scheduler wakes then

    @staticmethod
    def _give_up(state: HostState, outcome: str, reason: str) -> None:
        if not state.down_because:
            state.given_up_as, state.down_because = outcome, reason

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

    def down_count(self, outcome: str = "host_down") -> int:
        return sum(1 for state in self.hosts.values() if state.given_up_as == outcome)


class LocalTrouble:
    """Many unrelated sites failing to connect within a few seconds while nobody answers, one
    that had answered before among them, or several that had answered before: the network,
    the resolver or our connection table is the likelier culprit. (Without a site that had
    answered, it is the end of a run where only dead hosts are left.) While it lasts no
    failure counts against a host, the coordinator slows down (`slow`), and an answer to an
    attempt begun after it started ends it."""

    def __init__(self) -> None:
        self._failures: deque[tuple[float, str, bool]] = deque()  # (time, site, answered)
        self._last_answer = float("-inf")
        self.since: float | None = None
        self.episodes = 0

    @property
    def slow(self) -> bool:
        return self.since is not None

    def answered(self, started: float, now: float) -> None:
        self._last_answer = max(self._last_answer, now)
        if self.since is not None and started >= self.since:
            log.warning("the trouble that looked local is over (a host answered): full speed")
            self.since = None

    def failed(self, host: str, now: float, *, answered_before: bool) -> bool:
        """Note a host's failure; whether the trouble looks local (then it does not count)."""
        if self.since is not None:
            return True
        self._failures.append((now, site_of(f"//{host}"), answered_before))
        while self._failures[0][0] < now - TROUBLE_WINDOW:
            self._failures.popleft()
        sites = {site for _, site, _ in self._failures}
        relapsed = {site for _, site, before in self._failures if before}
        if len(relapsed) >= TROUBLE_RELAPSED:
            self._begin(now, f"{len(relapsed)} sites that had answered failed to connect within "
                             f"{TROUBLE_WINDOW:g} s")
        elif (len(sites) >= TROUBLE_SITES and relapsed
              and self._last_answer < now - TROUBLE_WINDOW):
            self._begin(now, f"{len(sites)} sites failed to connect within {TROUBLE_WINDOW:g} s, "
                             "one that had answered among them, and none answered")
        return self.since is not None

    def local(self, why: str, now: float) -> None:
        """A failure the worker knows is ours (no file descriptor, no port, no route)."""
        if why.startswith("local error") and self.since is None:
            self._begin(now, why)

    def _begin(self, now: float, why: str) -> None:
        self.since = now
        self.episodes += 1
        self._failures.clear()
        log.warning("%s: the trouble looks local (network, resolver, connection table), not "
                    "the hosts'; slowing down and giving up no host for it until one answers",
                    why)
