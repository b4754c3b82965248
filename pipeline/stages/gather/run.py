"""The coordinator: selects the URLs, runs the loop that hands them to the workers, settles
their replies (retry, journal, host health), honours Ctrl-C and writes the summary."""

from __future__ import annotations

import itertools
import logging
import random
import signal
import threading
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

from pipeline.core.errors import InputError
from pipeline.core.fsutil import JsonLinesWriter, remove_stale_temp_files
from pipeline.core.progress import Progress
from pipeline.core.tables import format_table
from pipeline.formats.journal import OUTCOMES, JournalIndex, outcome_of
from pipeline.formats.manifest import display_name
from pipeline.formats.urllist import (
    HYPONYM_CONFLICTS_NAME,
    Selection,
    check_all_found,
    check_wnid,
    read_is_a,
    resolve_hyponyms,
    select_urls,
    write_hyponym_conflicts,
)
from pipeline.stages.gather.consent import SitePolicy
from pipeline.stages.gather.hosts import HostBook, host_key
from pipeline.stages.gather.http import Attempt
from pipeline.stages.gather.names import NameService
from pipeline.stages.gather.options import GatherOptions
from pipeline.stages.gather.schedule import Job, Scheduler
from pipeline.stages.gather.store import LOOKUP_BATCH, Collector, target_stem
from pipeline.stages.gather.worker import Reply, Request, WorkerPool, effective_per_host

log = logging.getLogger(__name__)

TICK_SECONDS = 0.2  # the coordinator wakes at least this often (signals, progress)
STATUS_EVERY = 1.0
TROUBLE_SHARE = 8  # while the trouble looks local, 1/8 of --concurrency is in flight
TROUBLE_MIN = 4


@dataclass
class GatherReport:
    skipped: int = 0
    this_run: dict[str, Counter[str]] = field(default_factory=lambda: defaultdict(Counter))
    overall: dict[str, Counter[str]] = field(default_factory=lambda: defaultdict(Counter))
    seconds: float = 0.0
    hosts_down: int = 0
    hosts_not_found: int = 0
    hosts_robots_unreachable: int = 0  # robots.txt answered 5xx: nothing fetched (RFC 9309)
    lookups: int = 0  # DNS lookups made (a name is asked once, a timeout twice)
    local_trouble: int = 0  # episodes when many hosts failed at once and the trouble looked ours
    placeholders_found: int = 0  # placeholder pictures: repeated, or served for a made-up path
    by_hyponym: dict[tuple[str, str], Counter[str]] = field(
        default_factory=lambda: defaultdict(Counter))  # (class, hyponym) -> outcomes
    hyponym_conflicts: list[tuple[str, list[str], int, str]] = field(default_factory=list)
    interrupted_by: int | None = None  # the signal that stopped the run early

    def summary(self, names: dict[str, str] | None = None) -> str:
        """A per-synset table of outcomes over the whole journal, this run included."""
        order = {outcome: index for index, outcome in enumerate(OUTCOMES)}
        outcomes = sorted({o for counts in self.overall.values() for o in counts},
                          key=lambda o: (order.get(o, len(order)), o))
        header = ["synset", "name", *outcomes, "total"]
        rows = [header]
        for klass in sorted(self.overall):
            counts = self.overall[klass]
            name = display_name((names or {}).get(klass, ""))
            rows.append([klass, name, *(str(counts[o]) for o in outcomes),
                         str(sum(counts.values()))])
        lines = [format_table(rows)]
        if self.by_hyponym:
            lines.append(self._hyponym_table(names or {}))
        fetched = sum(sum(c.values()) for c in self.this_run.values())
        line = (f"this run: {fetched} URL(s) finished in {self.seconds:.1f} s, "
                f"{self.skipped} already final in the journal")
        if self.hosts_down:
            line += f", {self.hosts_down} host(s) given up as down (tried again next run)"
        if self.hosts_not_found:
            line += (f", {self.hosts_not_found} host name(s) not found in {self.lookups} "
                     "lookup(s) (tried again next run)")
        if self.hosts_robots_unreachable:
            line += (f", {self.hosts_robots_unreachable} host(s) not fetched because their "
                     "robots.txt was unreachable (tried again next run)")
        if self.local_trouble:
            line += (f", {self.local_trouble} time(s) the trouble looked local and no host was "
                     "blamed (see the log)")
        if self.placeholders_found:
            line += (f", {self.placeholders_found} placeholder picture(s) recognised (repeated, "
                     "or served for a made-up path; every copy dropped)")
        if self.interrupted_by:
            line += (f"; interrupted by {signal.Signals(self.interrupted_by).name}: "
                     "run the same command again to resume")
        lines.append(line)
        if self.hyponym_conflicts:
            urls = sum(count for _, _, count, _ in self.hyponym_conflicts)
            lines.append(f"{len(self.hyponym_conflicts)} hyponym(s) under two requested classes "
                         f"({urls} URL(s)): see {HYPONYM_CONFLICTS_NAME}")
        return "\n".join(lines)

    def _hyponym_table(self, names: dict[str, str]) -> str:
        """Which hyponym each class's URLs came from: the synsets filed under another."""
        rows = [["class", "hyponym", "name", "ok", "total"]]
        for (klass, wnid), counts in sorted(self.by_hyponym.items()):
            rows.append([klass, wnid, display_name(names.get(wnid, "")), str(counts["ok"]),
                         str(sum(counts.values()))])
        return format_table(rows)


def gather_synsets(urls: Path, wnids: list[str], options: GatherOptions, *,
                   is_a: Path | None = None, with_hyponyms: bool = False) -> GatherReport:
    """Select the synsets' URLs from the list (hyponyms too, if asked) and fetch them."""
    if not wnids:
        raise InputError("no synset given (pass --wnid WNID or --wnids-file FILE)")
    wnids = [check_wnid(w) for w in dict.fromkeys(wnids)]
    if with_hyponyms and is_a is None:
        raise InputError("--with-hyponyms needs --is-a wordnet.is_a.txt")
    options.out.mkdir(parents=True, exist_ok=True)  # the selection waits there, on disk
    if not with_hyponyms:
        selection = select_urls(urls, {wnid: wnid for wnid in wnids}, options.out)
        conflicts: list[tuple[str, list[str], int, str]] = []
    else:
        selection, conflicts = _select_with_hyponyms(urls, wnids, read_is_a(is_a), options)
    with selection:
        _report_quirks(urls, selection)
        log.info("%s: %d lines read, %d URL(s) selected for %d synset(s)", urls,
                 selection.lines, len(selection), len(wnids))
        report = gather(selection, options)
    report.hyponym_conflicts = conflicts
    return report


def _select_with_hyponyms(urls: Path, wnids: list[str], is_a: dict[str, list[str]],
                          options: GatherOptions
                          ) -> tuple[Selection, list[tuple[str, list[str], int, str]]]:
    """Select the classes' and their hyponyms' URLs; a hyponym under two unrelated requested
    classes is counted, reported and resolved by --hyponym-conflicts (written to
    OUT/hyponym_conflicts.txt)."""
    hyponyms = resolve_hyponyms(wnids, is_a)
    classes = {**hyponyms.classes, **{w: ks[0] for w, ks in hyponyms.conflicts.items()}}
    selection = select_urls(urls, classes, options.out, check_found=False)
    counts = Counter(e.wnid for e in selection if e.wnid in hyponyms.conflicts)
    drop = options.hyponym_conflicts == "drop"
    if drop and counts:
        selection.keep_only(lambda _, entry: entry.wnid not in hyponyms.conflicts)
    rows = [(wnid, klasses, counts[wnid], "dropped" if drop else klasses[0])
            for wnid, klasses in sorted(hyponyms.conflicts.items())]
    for wnid, klasses, count, resolution in rows:
        log.warning("hyponym %s is under %s (%d URL(s)): %s", wnid, " and ".join(klasses), count,
                    "dropped (--hyponym-conflicts first files it under the first)" if drop
                    else f"filed under {resolution}")
    path = options.out / HYPONYM_CONFLICTS_NAME
    if rows or path.exists():  # an earlier run's list is replaced, even by an empty one
        write_hyponym_conflicts(path, rows)
    _check_every_class_kept(urls, wnids, selection, [row for row in rows if row[2]])
    return selection, rows


def _check_every_class_kept(urls: Path, wnids: list[str], selection: Selection,
                            conflicts: list[tuple[str, list[str], int, str]]) -> None:
    """A requested class whose only URLs are of hyponyms it shares with another class would
    silently vanish from the dataset: say so, and how to keep it."""
    for klass in wnids:
        if klass in selection.classes:
            continue
        shared = [(wnid, resolution) for wnid, klasses, _, resolution in conflicts
                  if klass in klasses]
        if shared:
            selection.spool.close()
            listed = ", ".join(
                f"{wnid} ({resolution if resolution == 'dropped' else 'filed under ' + resolution})"
                for wnid, resolution in shared)
            raise InputError(
                f"class {klass} has no URL of its own in {urls}: its only ones are of hyponyms "
                f"it shares with another requested class: {listed}; ask for the hyponym as a "
                "class of its own, or leave one of the classes out")
    check_all_found(urls, set(wnids), selection)


def _report_quirks(urls: Path, selection: Selection) -> None:
    for count, examples, what in (
            (selection.malformed, selection.malformed_examples, "malformed line(s) skipped"),
            (selection.extra_fields, selection.extra_fields_examples,
             "line(s) with more than two fields (the first two kept)"),
            (selection.duplicate_ids, selection.duplicate_examples,
             "line(s) repeating an earlier id (the first kept)")):
        if count:
            listed = "; ".join(f"line {n}: {text!r}" for n, text in examples)
            log.warning("%s: %d %s (%s)", urls, count, what, listed)


def gather(selection: Selection, options: GatherOptions) -> GatherReport:
    """Fetch the selected URLs, resuming from the journal.

    Memory stays flat however many URLs are selected: they wait on disk (the selection), the
    journal is held as a compact index, and the scheduler queues indices, not objects.
    """
    options.out.mkdir(parents=True, exist_ok=True)
    stale = remove_stale_temp_files(options.out)
    if stale:
        log.info("removed %d partial temp file(s) left by an interrupted run", stale)
    started = time.monotonic()
    report = GatherReport()
    with JsonLinesWriter(options.journal_path) as journal:
        _fetch(selection, options, journal, report)
    _fill_overall(report, selection, JournalIndex.read(options.journal_path))
    report.seconds = time.monotonic() - started
    return report


def _fetch(selection: Selection, options: GatherOptions, journal: JsonLinesWriter,
           report: GatherReport) -> None:
    """Fetch what the journal does not hold yet. Its own function so that the run's index,
    queues and collector are freed before the summary indexes the longer journal."""
    collector = Collector(options, journal, JournalIndex.read(options.journal_path))
    pending = collector.recover_unjournaled(collector.pending(selection), selection.classes)
    with NameService(options.dns_servers, options.dns_timeout) as names:
        hosts = HostBook(effective_per_host(options), options.host_failures,
                         options.host_down_after, names, options.resolve,
                         ask_policy=options.honour_robots or options.honour_opt_out)
        scheduler = Scheduler(((index, entry.klass, host_key(entry.url))
                               for index, entry in pending),
                              selection.entry, collector.ok_counts, options.limit, hosts,
                              options.probe_slots)
        report.skipped = collector.skipped
        if scheduler.total:
            _Run(scheduler, options, collector, report, names).drive()
        report.lookups = names.lookups_made
    report.this_run = collector.this_run
    report.placeholders_found = collector.placeholders.found


class _Run:
    """The coordinator loop: hand out jobs, settle replies, journal, honour Ctrl-C."""

    def __init__(self, scheduler: Scheduler, options: GatherOptions, collector: Collector,
                 report: GatherReport, names: NameService) -> None:
        self.options = options
        self.names = names
        self.collector = collector
        self.report = report
        self.scheduler = scheduler
        self.hosts = scheduler.hosts
        self.jobs: dict[int, tuple[Job, float]] = {}  # job id -> (job, attempt start)
        self.next_id = 0
        self.progress = Progress("gather", total=scheduler.total)
        self._status_at = 0.0

    def drive(self) -> None:
        with _StopSignals(self.options.grace) as stop, WorkerPool(self.options) as pool:
            try:
                while self._step(pool, stop):
                    pass
            finally:
                self._journal_unfinished(stop.signum)
                self.report.hosts_down = self.hosts.down_count("host_down")
                self.report.hosts_not_found = self.hosts.down_count("host_not_found")
                self.report.hosts_robots_unreachable = self.hosts.down_count("robots_unreachable")
                self.report.local_trouble = self.hosts.trouble.episodes
                self.progress.close()
        self.report.interrupted_by = stop.signum

    def _step(self, pool: WorkerPool, stop: _StopSignals) -> bool:
        now = time.monotonic()
        if stop.signum is None:
            self._start_jobs(pool, now)
            self._journal_dropped()
            if not self.scheduler.busy():
                return False
        elif not self.jobs or now >= stop.deadline:
            return False
        due = self.scheduler.next_due(now)
        timeout = TICK_SECONDS if due is None else min(TICK_SECONDS, max(0.0, due - now))
        for reply in pool.wait(timeout, also=self.names.wakeup):
            self._settle(reply, stopping=stop.signum is not None)
        self.scheduler.names_answered(answer.name for answer in self.names.collect())
        self._show_status()
        return True

    def _start_jobs(self, pool: WorkerPool, now: float) -> None:
        while (pool.has_room() and len(self.jobs) < self._in_flight_limit()
               and (job := self.scheduler.next(now, may_download=self._may_download()))
               is not None):
            state = self.hosts.state(job.host)
            policy = state.policy
            refusal = policy.refusal(job.entry.url) if policy and policy.restricts else None
            if refusal is not None:
                self._refuse(job, refusal)
                continue
            self.next_id += 1
            self.jobs[self.next_id] = (job, now)
            job.read_timeout = self._read_timeout(job)
            self.hosts.started(job.host, now)
            pool.submit(Request(self.next_id, job.entry.url, job.host,
                                target_stem(self.options.out, job.entry),
                                job.read_timeout, self.hosts.addresses(job.host),
                                ask_policy=self.hosts.needs_policy(job.host),
                                may_probe=not state.made_up_asked and (
                                    policy is None
                                    or policy.allows_made_up_path(job.entry.url))))
        pool.flush()

    def _refuse(self, job: Job, refusal: str) -> None:
        """The host's robots.txt or tdmrep.json refuses the URL: journaled, never requested."""
        job.attempts -= 1  # handed out, not tried
        self.scheduler.finished(job)
        self._journal(job, Attempt("opted_out", final=True, error=refusal))

    def _in_flight_limit(self) -> int:
        """Downloads and first contacts, or a fraction of --concurrency for both while the
        trouble looks local: fewer attempts wasted while it lasts, and the retries of hosts
        that answered before go first."""
        if not self.hosts.trouble.slow:
            return self.options.concurrency + self.options.probe_slots
        return max(TROUBLE_MIN, self.options.concurrency // TROUBLE_SHARE)

    def _may_download(self) -> bool:
        """Whether a URL of a host that has answered may start (first contacts have slots of
        their own: `GatherOptions.probe_slots`)."""
        return len(self.jobs) - self.scheduler.probing < self.options.concurrency

    def _read_timeout(self, job: Job) -> float | None:
        return self.hosts.read_timeout(
            job.host, self.options.timeout,
            timed_out_before=self.collector.timed_out_before(job.entry),
            cut_at=job.read_timeout if job.cut_short else None)

    def _settle(self, reply: Reply, *, stopping: bool) -> None:
        if reply.crash:
            raise RuntimeError(f"gather worker failed: {reply.crash}")
        job, started = self.jobs.pop(reply.job_id)
        attempt = reply.attempt
        job.seconds += reply.seconds
        job.last_error = attempt.error
        if reply.site_files is not None:
            self.hosts.set_policy(job.host, SitePolicy.parse(reply.site_files), time.monotonic())
        if reply.probed:
            self.hosts.state(job.host).made_up_asked = True
        self.hosts.record(job.host, connection_failed=attempt.connection_failed,
                          started=started, now=time.monotonic(), error=attempt.error,
                          cut_short=attempt.cut_short, ours=attempt.ours,
                          timed_out=attempt.timed_out)
        again = not (attempt.cut_short and job.cut_short)  # cut twice: the next run's
        job.cut_short |= attempt.cut_short
        blameless = attempt.connection_failed and self.hosts.trouble.slow
        if ((attempt.retry or blameless) and again
                and job.attempts <= self.options.retries and not stopping
                and not self.hosts.is_down(job.host)):
            self._retry_later(job, attempt)
            return
        if attempt.outcome == "robots_unreachable":
            self.hosts.give_up(job.host, attempt.outcome, attempt.error)
        self.scheduler.finished(job)
        if reply.missing_picture is not None:
            self.collector.missing_picture(job.entry.url, *reply.missing_picture)
        self._journal(job, attempt, reply)

    def _retry_later(self, job: Job, attempt: Attempt) -> None:
        now = time.monotonic()
        if attempt.retry_after is not None:
            delay = min(attempt.retry_after, self.options.max_retry_after)
            self.hosts.pause(job.host, now + delay)  # the host asked: slow it, not the others
        else:
            delay = self.options.backoff * 2 ** (job.attempts - 1) * random.uniform(0.5, 1.5)
            if attempt.outcome == "robots_unreachable":  # nothing of the host before its retry
                self.hosts.pause(job.host, now + delay)
        self.scheduler.retry(job, now + delay)

    def _journal(self, job: Job, attempt: Attempt, reply: Reply | None = None) -> None:
        outcome = self.collector.record(
            job.entry, outcome=attempt.outcome, final=attempt.final, error=attempt.error,
            http_status=attempt.http_status, attempts=job.attempts, seconds=job.seconds,
            staged=reply.staged if reply else None)
        self.progress.update(count="ok" if outcome == "ok" else "failed")

    def _journal_dropped(self) -> None:
        for job in self.scheduler.take_dropped():
            state = self.hosts.state(job.host)
            self._journal(job, Attempt(state.given_up_as, final=False, error=state.down_because))

    def _journal_unfinished(self, signum: int | None) -> None:
        """URLs still in flight when the run stops early: tried again by the next run."""
        self._journal_dropped()
        name = signal.Signals(signum).name if signum else "an error"
        for job, _ in self.jobs.values():
            error = f"interrupted by {name}" + (f" after: {job.last_error}"
                                                if job.last_error else "")
            self._journal(job, Attempt("interrupted", final=False, error=error))
        for job in self.scheduler.waiting():
            self._journal(job, Attempt("interrupted", final=False,
                                       error=f"interrupted by {name} while waiting to retry "
                                             f"after: {job.last_error}"))
        self.jobs.clear()

    def _show_status(self) -> None:
        now = time.monotonic()
        if now - self._status_at < STATUS_EVERY:
            return
        self._status_at = now
        oldest = min((started for _, started in self.jobs.values()), default=now)
        self.progress.status = (f"in flight {len(self.jobs)}, oldest {now - oldest:.0f}s, "
                                f"hosts down {self.hosts.down_count()}")
        self.progress.update(0)


class _StopSignals:
    """Ctrl-C / SIGTERM: stop handing out URLs, give those in flight `grace` seconds, then
    journal the rest as interrupted. A second signal stops at once."""

    def __init__(self, grace: float) -> None:
        self.grace = grace
        self.signum: int | None = None
        self.deadline = float("inf")
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> _StopSignals:
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        first = self.signum is None
        self.signum = signum
        self.deadline = time.monotonic() + self.grace if first else 0.0
        log.warning("%s: stopping; URLs in flight get %g s", signal.Signals(signum).name,
                    self.grace if first else 0)


def _fill_overall(report: GatherReport, selection: Selection, index: JournalIndex) -> None:
    numbered = iter(selection)
    while batch := list(itertools.islice(numbered, LOOKUP_BATCH)):
        codes = index.lookup(entry.id for entry in batch)
        for entry, code in zip(batch, codes.tolist(), strict=True):
            outcome = outcome_of(code) or "not_tried"
            report.overall[entry.klass][outcome] += 1
            if entry.wnid != entry.klass:
                report.by_hyponym[entry.klass, entry.wnid][outcome] += 1
