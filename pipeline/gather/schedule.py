"""Which URL to fetch next: fair across classes, polite per host, exact under `--limit`.

Plain synchronous code driven by the coordinator's loop (no I/O, so it is unit-tested with a
fake clock). URLs are handed out round-robin across classes and, within a class, first to
hosts that have not answered yet (their probe, see hosts.HostBook: a dead host's one round of
timeouts then runs at the start, beside the others' work, instead of at the end), then to the
host with the most URLs left that may take one more (longest queue first): the biggest host
(Flickr in the real list) decides when a run can end, so it is kept at its connection limit
while the free slots go to the others. A class with
`limit - ok` URLs in flight (or waiting to be retried) gets no new one until one of them fails,
so `--limit N` yields exactly N images without over-fetching. URLs of a host that went down
are handed back through `dropped` without being requested.
"""

from __future__ import annotations

import heapq
import itertools
import sys
from collections import Counter, deque
from dataclasses import dataclass, field

from pipeline.gather.hosts import HostBook, host_key
from pipeline.urllist import UrlEntry


@dataclass
class Job:
    """One URL on its way through the run; `attempts` so far, `seconds` spent in them."""

    entry: UrlEntry
    host: str
    attempts: int = 0
    seconds: float = 0.0
    last_error: str = ""


@dataclass
class _ClassQueue:
    """A class's waiting jobs per host, and a heap of hosts: not yet answered first, then by
    queue length (longest first).

    Heap entries are corrected lazily: an entry is pushed ranked at least as high as its host
    really is (a new host, a retry coming back: at the very top), and one found stale at the
    top is pushed again with its true rank; so the first accurate entry popped is the best.
    """

    by_host: dict[str, deque[Job]] = field(default_factory=dict)
    heap: list[tuple[bool, int, str]] = field(default_factory=list)  # (answered, -length, host)

    def add(self, job: Job, *, front: bool = False) -> None:
        queue = self.by_host.get(job.host)
        if queue is None:
            queue = self.by_host[job.host] = deque()
        if front:
            queue.appendleft(job)
        else:
            queue.append(job)
        if front or len(queue) == 1:
            heapq.heappush(self.heap, (False, -sys.maxsize, job.host))

    def __bool__(self) -> bool:
        return bool(self.by_host)


class Scheduler:
    def __init__(self, entries: list[UrlEntry], ok_counts: Counter[str], limit: int | None,
                 hosts: HostBook) -> None:
        self._classes: dict[str, _ClassQueue] = {}
        for entry in entries:
            queue = self._classes.get(entry.klass)
            if queue is None:
                queue = self._classes[entry.klass] = _ClassQueue()
            queue.add(Job(entry, host_key(entry.url)))
        self._order = deque(self._classes)
        self._ok = ok_counts
        self._limit = limit
        self.hosts = hosts
        self._in_flight: Counter[str] = Counter()  # per class, retries waiting included
        self._delayed: list[tuple[float, int, Job]] = []
        self._sequence = itertools.count()
        self.dropped: list[Job] = []  # jobs of hosts that went down, to be journaled

    def next(self, now: float) -> Job | None:
        """A job that may start now, or None (nothing queued, or all waiting on limits)."""
        self._release_due(now)
        for _ in range(len(self._order)):
            klass = self._order[0]
            self._order.rotate(-1)
            queue = self._classes[klass]
            if queue and self._has_room(klass):
                job = self._pick_host(queue, now)
                if job is not None:
                    self._in_flight[klass] += 1
                    self.hosts.state(job.host).in_flight += 1
                    job.attempts += 1
                    return job
        return None

    def finished(self, job: Job) -> None:
        """The job's attempt is over and it is done with (journaled)."""
        self._in_flight[job.entry.klass] -= 1
        self.hosts.state(job.host).in_flight -= 1

    def retry(self, job: Job, at: float) -> None:
        """The attempt is over; try again at `at` (it keeps its place under the limit)."""
        self.hosts.state(job.host).in_flight -= 1
        heapq.heappush(self._delayed, (at, next(self._sequence), job))

    def next_due(self, now: float) -> float | None:
        """When a waiting retry or a paused host may next let work start."""
        times = [self._delayed[0][0]] if self._delayed else []
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
            self._classes[job.entry.klass].add(job, front=True)

    def _pick_host(self, queue: _ClassQueue, now: float) -> Job | None:
        busy: list[tuple[bool, int, str]] = []  # hosts at their limit or paused, for later
        job = None
        while queue.heap:
            entry = heapq.heappop(queue.heap)
            host = entry[2]
            jobs = queue.by_host.get(host)
            if not jobs:
                continue  # a leftover entry of a host that has run out
            rank = self._rank(host, jobs)
            if entry != rank:
                heapq.heappush(queue.heap, rank)
            elif self.hosts.is_down(host):
                self.dropped.extend(jobs)
                del queue.by_host[host]
            elif not self.hosts.available(host, now):
                busy.append(entry)
            else:
                job = jobs.popleft()
                if jobs:
                    heapq.heappush(queue.heap, self._rank(host, jobs))
                else:
                    del queue.by_host[host]
                break
        for entry in busy:
            heapq.heappush(queue.heap, entry)
        return job

    def _rank(self, host: str, jobs: deque[Job]) -> tuple[bool, int, str]:
        return (self.hosts.state(host).answers > 0, -len(jobs), host)

    def _has_room(self, klass: str) -> bool:
        return self._limit is None or self._ok[klass] + self._in_flight[klass] < self._limit

    def _may_need_more(self, klass: str) -> bool:
        return self._limit is None or self._ok[klass] < self._limit
