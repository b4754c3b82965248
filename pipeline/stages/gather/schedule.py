"""Which URL to fetch next: fair across classes, polite per host, exact under `--limit`.

Plain synchronous code driven by the coordinator's loop (no I/O, so it is unit-tested with a
fake clock). URLs are handed out round-robin across classes and, within a class, first to
hosts that have not answered yet (their probe, see hosts.HostBook: a dead host's timeouts
then run at the start, beside the others' work, instead of at the end; such probes have
slots of their own, beside the downloads'), then to the host with the most URLs left that may
take one more (longest queue first): the biggest host (Flickr in the real list) decides when a
run can end, so it is kept at its connection limit while the free slots go to the others. A
class with `limit - ok` URLs in flight (or waiting to be retried) gets no new one until one of
them fails, so `--limit N` yields exactly N images without over-fetching. URLs of a host that
went down are handed back through `take_dropped` without being requested.

A host that may not take a URL now (at its connection limit, paused, its name not looked up
yet) is parked with its segments, out of the class heaps, until what it waits for happens:
one of its URLs finishes, its pause ends, or its name's answer comes. So handing out a URL
never walks past the busy hosts (the biggest hosts are busy most of a run and rank first).

Waiting URLs are held compactly (a run may queue 1.4 million): one array of their indices in
the selection, grouped by (class, host) into segments, 8 bytes per URL and a heap entry per
segment; a URL becomes a `Job` (its entry read back from the selection) only when it is handed
out or dropped.
"""

from __future__ import annotations

import heapq
import itertools
import sys
from array import array
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

import numpy as np

from pipeline.formats.urllist import UrlEntry
from pipeline.stages.gather.hosts import HostBook
from pipeline.stages.gather.names import name_of

_TOP = -sys.maxsize  # the rank a segment is pushed with when it (re)gains work: checked first
Rank = tuple[bool, bool, int, str, int]  # (answered, failed, -URLs left, host, segment)
_RECHECK = 0.2  # seconds: a parked host that nothing else will wake is looked at again then


@dataclass
class Job:
    """One URL on its way through the run; `attempts` so far, `seconds` spent in them."""

    entry: UrlEntry
    host: str
    segment: int  # its (class, host) queue in the scheduler
    attempts: int = 0
    seconds: float = 0.0
    last_error: str = ""
    cut_short: bool = False  # an attempt was cut at its host's own read timeout
    read_timeout: float | None = None  # the last attempt's (None: the full --timeout)
    probe: bool = False  # its attempt went to a host that had not answered yet


@dataclass
class _ClassQueue:
    """A class's heap of segments (its hosts): not yet answered first (those not failed yet
    before those that failed: a dead host's next probes wait for the untried hosts), then by
    URLs left (most first), then by host name; and how many URLs it has waiting in all.

    Heap entries are corrected lazily: an entry is pushed ranked at least as high as its
    segment really is (at the start, a retry coming back: at the very top), and one found stale
    at the top is pushed again with its true rank; so the first accurate entry popped is the
    best.
    """

    heap: list[Rank] = field(default_factory=list)
    waiting: int = 0

    def __bool__(self) -> bool:
        return self.waiting > 0


class Scheduler:
    """`work` is (selection index, class, host) per waiting URL, in list order; `load` reads
    an index's entry back. At most `probe_budget` attempts at once go to hosts that have not
    answered yet, and the caller says when the downloads' slots are full (`next`'s
    `may_download`), so the two never take each other's: a 2011 list has thousands of small
    dead hosts, whose probes (connect timeouts, trickles) would otherwise hold every slot while
    the big live hosts wait."""

    def __init__(self, work: Iterable[tuple[int, str, str]], load: Callable[[int], UrlEntry],
                 ok_counts: Counter[str], limit: int | None, hosts: HostBook,
                 probe_budget: int | None = None) -> None:
        self._load = load
        self._classes: dict[str, _ClassQueue] = {}
        self._build(work)
        self._order = deque(self._classes)
        self._ok = ok_counts
        self._limit = limit
        self.hosts = hosts
        self._in_flight: Counter[str] = Counter()  # per class, retries waiting included
        self._delayed: list[tuple[float, int, Job]] = []
        self._sequence = itertools.count()
        self._front: dict[int, deque[Job]] = {}  # segment -> retries due, before the rest
        self._parked: dict[str, deque[tuple[_ClassQueue, int]]] = {}  # host -> its segments
        self._parked_until: list[tuple[float, str]] = []  # (when, host) for paused hosts
        self._awaiting_name: dict[str, set[str]] = {}  # name -> hosts parked until it resolves
        self._probe_budget = probe_budget
        self._probing = 0  # attempts in flight to hosts that had not answered
        self._probe_wait: deque[tuple[_ClassQueue, int]] = deque()  # parked for the budget
        # Segments of hosts that went down, to be journaled: (segment, retries, start, end).
        self._dropped: deque[tuple[int, deque[Job], int, int]] = deque()

    def _build(self, work: Iterable[tuple[int, str, str]]) -> None:
        """Sort the waiting URLs by (class, host, list order) into segments: one int64 key
        per URL and a stable sort (list order holds within a segment), the inputs freed as
        soon as the key is made, as this is a resume's peak (tens of MB at 1.4 million)."""
        class_ids: dict[str, int] = {}
        host_ids: dict[str, int] = {}
        classes, hosts, indices = array("i"), array("i"), array("q")
        for index, klass, host in work:
            classes.append(class_ids.setdefault(klass, len(class_ids)))
            hosts.append(host_ids.setdefault(host, len(host_ids)))
            indices.append(index)
        self.total = len(indices)
        if not self.total:
            return
        key = np.frombuffer(classes, np.int32).astype(np.int64) << 32
        key |= np.frombuffer(hosts, np.int32)
        del classes, hosts
        order = np.argsort(key, kind="stable")
        self._indices = np.frombuffer(indices, np.int64)[order]
        del indices
        key = key[order]
        del order
        starts = np.flatnonzero(np.concatenate([[True], key[1:] != key[:-1]]))
        # Per segment, the position of its next URL in _indices and its end: arrays of
        # Python ints, read and written once per URL handed out (numpy scalars are slower).
        self._next = array("q", starts.astype(np.int64).tobytes())
        self._end = array("q", np.append(starts[1:], len(key)).astype(np.int64).tobytes())
        class_of, host_of = key[starts] >> 32, key[starts] & 0xFFFFFFFF
        del key
        names = list(host_ids)
        self._host = [names[h] for h in host_of.tolist()]
        queues = [_ClassQueue() for _ in class_ids]
        for segment, klass in enumerate(class_of.tolist()):
            queue = queues[klass]
            queue.heap.append((False, False, _TOP, self._host[segment], segment))
            queue.waiting += int(self._end[segment] - starts[segment])
        self._classes = dict(zip(class_ids, queues, strict=True))

    @property
    def probing(self) -> int:
        """Attempts in flight to hosts that had not answered when they began."""
        return self._probing

    def next(self, now: float, may_download: bool = True) -> Job | None:
        """A job that may start now, or None (nothing queued, or all waiting on limits).
        `may_download` False: only a first contact with a host that has not answered."""
        self._release_due(now)
        while self._parked_until and self._parked_until[0][0] <= now:
            self._unpark(heapq.heappop(self._parked_until)[1])
        self._release_probes()
        if (not may_download and self._probe_budget is not None
                and self._probing >= self._probe_budget):
            return None
        for _ in range(len(self._order)):
            klass = self._order[0]
            self._order.rotate(-1)
            queue = self._classes[klass]
            if queue and self._has_room(klass):
                job = self._pick_host(queue, now, may_download)
                if job is not None:
                    self._in_flight[klass] += 1
                    state = self.hosts.state(job.host)
                    state.in_flight += 1
                    job.attempts += 1
                    job.probe = not state.answers
                    self._probing += job.probe
                    return job
        return None

    def finished(self, job: Job) -> None:
        """The job's attempt is over and it is done with (journaled)."""
        self._in_flight[job.entry.klass] -= 1
        self._attempt_over(job)

    def retry(self, job: Job, at: float) -> None:
        """The attempt is over; try again at `at` (it keeps its place under the limit)."""
        heapq.heappush(self._delayed, (at, next(self._sequence), job))
        self._attempt_over(job)

    def _release_probes(self) -> None:
        """As many segments parked for the probe budget as it has room for go back to their
        heaps (one that cannot start after all is parked by its host, or dropped)."""
        if self._probe_budget is None:
            return
        for _ in range(min(len(self._probe_wait), self._probe_budget - self._probing)):
            queue, segment = self._probe_wait.popleft()
            heapq.heappush(queue.heap, self._rank(segment))

    def _attempt_over(self, job: Job) -> None:
        """A slot of the host is free: as many of its parked segments go back as it has room
        for (a big host has a segment in every class: all of them would be parked again at
        once), or all once nothing of it is in flight."""
        state = self.hosts.state(job.host)
        state.in_flight -= 1
        self._unpark(job.host, self.hosts.room(job.host) if state.in_flight else None)
        self._probing -= job.probe

    def names_answered(self, names: Iterable[str]) -> None:
        """Hosts parked until their names resolved may be tried (or dropped) now."""
        for name in names:
            for host in self._awaiting_name.pop(name, ()):
                self._unpark(host)

    def next_due(self, now: float) -> float | None:
        """When a waiting retry or a paused host may next let work start."""
        times = [self._delayed[0][0]] if self._delayed else []
        if self._parked_until:
            times.append(self._parked_until[0][0])
        pause_end = self.hosts.next_pause_end(now)
        if pause_end is not None:
            times.append(pause_end)
        return min(times, default=None)

    def busy(self) -> bool:
        """Work left: something in flight or waiting, or a class that may still need more."""
        return (any(self._in_flight.values())
                or any(queue and self._may_need_more(klass)
                       for klass, queue in self._classes.items()))

    def waiting(self) -> list[Job]:
        """Take the jobs waiting to be retried (the run is stopping)."""
        jobs = [job for _, _, job in self._delayed]
        self._delayed.clear()
        return jobs

    def _release_due(self, now: float) -> None:
        while self._delayed and self._delayed[0][0] <= now:
            _, _, job = heapq.heappop(self._delayed)
            self._in_flight[job.entry.klass] -= 1
            self._front.setdefault(job.segment, deque()).appendleft(job)
            queue = self._classes[job.entry.klass]
            queue.waiting += 1
            heapq.heappush(queue.heap, (False, False, _TOP, job.host, job.segment))

    def _pick_host(self, queue: _ClassQueue, now: float, may_download: bool) -> Job | None:
        while queue.heap:
            entry = heapq.heappop(queue.heap)
            host, segment = entry[3], entry[4]
            if not self._left(segment):
                continue  # a leftover entry of a segment that has run out
            rank = self._rank(segment)
            if entry != rank:
                heapq.heappush(queue.heap, rank)
            elif rank[0] and not may_download:  # the unanswered hosts rank first: none left
                heapq.heappush(queue.heap, rank)
                return None
            elif self.hosts.is_down(host):
                self._drop(queue, segment)
            elif (self._probe_budget is not None and self._probing >= self._probe_budget
                  and not self.hosts.state(host).answers):
                self._probe_wait.append((queue, segment))
            elif not self.hosts.available(host, now):
                if self.hosts.is_down(host):  # its name was just found not to exist
                    self._drop(queue, segment)
                else:
                    self._park(queue, segment, host, now)
            else:
                job = self._take(segment)
                queue.waiting -= 1
                if self._left(segment):
                    heapq.heappush(queue.heap, self._rank(segment))
                return job
        return None

    def _park(self, queue: _ClassQueue, segment: int, host: str, now: float) -> None:
        """Set the segment aside until its host may take a URL again (see the docstring)."""
        parked = self._parked.get(host)
        if parked is None:
            parked = self._parked[host] = deque()
            state = self.hosts.state(host)
            if state.addresses is None:
                self._awaiting_name.setdefault(name_of(host), set()).add(host)
            elif state.in_flight == 0 or self.hosts.ready_at(host) > now:
                heapq.heappush(self._parked_until,
                               (max(self.hosts.ready_at(host), now + _RECHECK), host))
        parked.append((queue, segment))

    def _unpark(self, host: str, count: int | None = None) -> None:
        """Back to their heaps: all the host's parked segments, or the first `count` (the
        rest wait at the front for the next slot, so the classes take turns)."""
        parked = self._parked.get(host)
        if parked is None:
            return
        if count is None or count >= len(parked):
            del self._parked[host]
            count = len(parked)
        for _ in range(count):
            queue, segment = parked.popleft()
            heapq.heappush(queue.heap, self._rank(segment))

    def _left(self, segment: int) -> int:
        front = self._front.get(segment)
        return self._end[segment] - self._next[segment] + (len(front) if front else 0)

    def _rank(self, segment: int) -> Rank:
        host = self._host[segment]
        state = self.hosts.state(host)
        return (state.answers > 0, state.failures > 0, -self._left(segment), host, segment)

    def _take(self, segment: int) -> Job:
        """The segment's next job: a retry due first, else its next URL in list order."""
        front = self._front.get(segment)
        if front:
            job = front.popleft()
            if not front:
                del self._front[segment]
            return job
        position = self._next[segment]
        self._next[segment] = position + 1
        return Job(self._load(int(self._indices[position])), self._host[segment], segment)

    def _drop(self, queue: _ClassQueue, segment: int) -> None:
        """Set aside every waiting URL of a segment whose host went down, as a range: one
        `next` may drop hundreds of thousands (every class's share of the dead hosts)."""
        front = self._front.pop(segment, deque())
        start, end = self._next[segment], self._end[segment]
        self._next[segment] = end
        queue.waiting -= len(front) + end - start
        self._dropped.append((segment, front, start, end))

    def take_dropped(self) -> Iterator[Job]:
        """The jobs of hosts that went down, read back one at a time (to be journaled)."""
        while self._dropped:
            segment, front, start, end = self._dropped.popleft()
            yield from front
            for position in range(start, end):
                yield Job(self._load(int(self._indices[position])), self._host[segment], segment)

    def _has_room(self, klass: str) -> bool:
        return self._limit is None or self._ok[klass] + self._in_flight[klass] < self._limit

    def _may_need_more(self, klass: str) -> bool:
        return self._limit is None or self._ok[klass] < self._limit
