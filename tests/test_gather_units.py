"""gather's pieces that need no server: header parsing, --resolve, host health, the scheduler,
the redirect guard."""

import asyncio
import email.utils
import time
from collections import Counter

import pytest
from yarl import URL

from pipeline.core.errors import InputError
from pipeline.formats.urllist import UrlEntry
from pipeline.stages.gather.hosts import HostBook, host_key, is_public
from pipeline.stages.gather.http import (
    _refused_redirect,
    opted_out,
    parse_retry_after,
    tdm_reserved,
)
from pipeline.stages.gather.names import Answer, Resolver, parse_resolve
from pipeline.stages.gather.options import GatherOptions
from pipeline.stages.gather.schedule import Scheduler


def test_retry_after_takes_seconds_and_http_dates():
    assert parse_retry_after("120") == 120.0
    assert parse_retry_after(" 3 ") == 3.0
    when = email.utils.formatdate(time.time() + 30, usegmt=True)
    assert 25 <= parse_retry_after(when) <= 31
    past = email.utils.formatdate(time.time() - 300, usegmt=True)
    assert parse_retry_after(past) == 0.0
    assert parse_retry_after("soon") is None
    assert parse_retry_after(None) is None


def test_opt_out_directives_bare_or_addressed_to_us():
    assert opted_out(["noai"])
    assert opted_out(["noindex, noimageai"])
    assert opted_out(["pipeline: noai"])
    assert opted_out(["*: noai"])
    assert not opted_out(["otherbot: noai"])
    assert not opted_out(["noindex, nofollow"])
    assert not opted_out([])


def test_tdmrep_reservation_and_the_contact_in_the_user_agent():
    assert tdm_reserved("1") and tdm_reserved(" 1 ")
    assert not tdm_reserved("0") and not tdm_reserved(None) and not tdm_reserved("")
    plain = GatherOptions().agent
    assert plain.startswith("pipeline/") and "+" not in plain and "{" not in plain
    assert "(image dataset builder; +ops@example.org; honours" in GatherOptions(
        contact="ops@example.org").agent


def test_resolve_takes_curl_forms_and_rejects_garbage():
    assert parse_resolve("img.example:8080:127.0.0.2") == ("img.example", 8080, "127.0.0.2")
    assert parse_resolve("IMG.example:127.0.0.3") == ("img.example", None, "127.0.0.3")
    assert parse_resolve("v6.example:443:[::1]") == ("v6.example", 443, "::1")
    assert parse_resolve("v6.example:[::1]") == ("v6.example", None, "::1")
    for bad in ("img.example", "img.example:80:not-an-ip", ":80:127.0.0.1"):
        with pytest.raises(InputError, match="--resolve"):
            parse_resolve(bad)


def test_resolver_pins_names_and_never_resolves_reserved_ones():
    async def run():
        resolver = Resolver((("a.example", 80, "127.0.0.5"), ("b.example", None, "127.0.0.6")))
        assert (await resolver.resolve("a.example", 80))[0]["host"] == "127.0.0.5"
        assert (await resolver.resolve("B.EXAMPLE", 1234))[0]["host"] == "127.0.0.6"
        with pytest.raises(OSError, match="never resolves"):
            await resolver.resolve("dead.invalid", 80)
        await resolver.close()
    asyncio.run(run())


def test_host_key_and_public_addresses():
    assert host_key("http://Img.Example:8080/a.jpg") == "img.example:8080"
    assert host_key("https://user:pw@img.example/a") == "img.example"
    assert is_public("93.184.216.34")
    for private in ("127.0.0.1", "10.1.2.3", "192.168.0.1", "169.254.169.254", "::1",
                    "::ffff:127.0.0.1", "fe80::1"):
        assert not is_public(private)


def test_host_goes_down_after_failures_begun_after_its_last_answer():
    book = HostBook(per_host=4, max_failures=3, down_after=20.0)
    book.record("h", connection_failed=False, started=0.0, now=10.0)
    # Attempts begun before the answer at t=10 fail later: they say nothing about the host.
    for _ in range(5):
        book.record("h", connection_failed=True, started=5.0, now=11.0, error="timeout")
    assert book.state("h").failures == 0
    book.record("h", connection_failed=True, started=12.0, now=13.0, error="refused")
    book.record("h", connection_failed=True, started=12.0, now=13.0, error="refused")
    book.record("h", connection_failed=False, started=12.5, now=13.5)  # answers again
    assert book.state("h").failures == 0
    for _ in range(3):
        book.record("h", connection_failed=True, started=14.0, now=15.0, error="refused")
    assert book.state("h").failures == 3 and not book.is_down("h")


def test_failures_open_the_breaker_and_only_a_failed_half_open_probe_gives_a_host_up():
    """Down needs failures spread over `down_after` seconds: N failures at once pause the
    host; one URL tries again after the pause, and only its failure gives the host up."""
    book = HostBook(per_host=16, max_failures=3, down_after=20.0)
    for _ in range(3):
        book.record("h", connection_failed=True, started=0.0, now=5.0, error="refused")
    state = book.state("h")
    assert not book.is_down("h") and state.probe_at == 25.0  # 20 s after the first failure
    assert not book.available("h", 24.9)
    assert book.available("h", 25.0)
    state.in_flight = 1  # the probe: one URL at a time
    assert not book.available("h", 26.0)
    # A late failure of an attempt begun before the pause decides nothing.
    book.record("h", connection_failed=True, started=4.0, now=26.0, error="refused")
    assert not book.is_down("h")
    book.record("h", connection_failed=True, started=25.0, now=25.5, error="refused")
    assert book.is_down("h") and state.given_up_as == "host_down"
    assert "4 connection failures in a row over 20 s" in state.down_because
    assert book.down_count("host_down") == 1


def test_a_host_that_answers_its_probe_is_used_again():
    book = HostBook(per_host=4, max_failures=2, down_after=10.0)
    for _ in range(2):
        book.record("h", connection_failed=True, started=0.0, now=1.0, error="timeout")
    book.record("h", connection_failed=False, started=10.0, now=10.2)
    state = book.state("h")
    assert state.probe_at is None and state.failures == 0 and not book.is_down("h")
    state.in_flight = 0
    assert book.available("h", 10.3)


def test_failures_of_our_own_making_never_count():
    book = HostBook(per_host=4, max_failures=1, down_after=0.0)
    for k in range(5):
        book.record("h", connection_failed=True, started=k, now=k + 5.0, error="timeout",
                    timed_out=True, ours="our event loop ran 2.0 s late meanwhile")
    assert book.state("h").failures == 0 and not book.is_down("h")
    book.record("h", connection_failed=True, started=9.0, now=9.5, error="no descriptors",
                ours="local error: Too many open files")
    assert book.trouble.slow  # a local error says the trouble is ours at once


def test_many_sites_timing_out_while_nobody_answers_is_local_trouble():
    book = HostBook(per_host=4, max_failures=1, down_after=0.0)
    book.record("www.alive.example", connection_failed=False, started=0.0, now=0.1)
    # Refusals are the hosts' own answers: they count, however many at once.
    for k in range(12):
        book.record(f"refusing{k}.example", connection_failed=True, started=10.0, now=10.1,
                    error="refused")
    assert not book.trouble.slow and book.state("refusing0.example").failures == 1
    # Connect timeouts from twelve never-answered sites while none answers: the end of a run
    # where only dead hosts are left, not local trouble.
    for k in range(12):
        book.record(f"www.dead{k}.example", connection_failed=True, started=10.0,
                    now=15.0 + k * 0.1, error="no connection", timed_out=True)
    assert not book.trouble.slow
    # With a site that had answered among them: ours.
    book.record("www.alive.example", connection_failed=True, started=15.0, now=16.2,
                timed_out=True)
    for k in range(12):
        book.record(f"www.site{k}.example", connection_failed=True, started=15.0,
                    now=16.3 + k * 0.1, error="no connection", timed_out=True)
    assert book.trouble.slow and book.trouble.episodes == 1
    blamed = [k for k in range(12) if book.state(f"www.site{k}.example").failures]
    assert len(blamed) == 0  # the window already held ten failing sites
    # An answer to an attempt begun after the trouble began ends it.
    book.record("www.alive.example", connection_failed=False, started=15.0, now=18.0)
    assert book.trouble.slow
    book.record("www.alive.example", connection_failed=False, started=18.5, now=18.6)
    assert not book.trouble.slow


def test_several_sites_that_answered_before_failing_at_once_is_local_trouble():
    book = HostBook(per_host=4, max_failures=1, down_after=0.0)
    for site in ("a.example", "b.example", "c.example"):
        book.record(site, connection_failed=False, started=0.0, now=0.1)
    for site in ("a.example", "b.example", "c.example"):
        book.record(site, connection_failed=True, started=1.0, now=6.0, timed_out=True)
    assert book.trouble.slow and not book.state("c.example").failures


def entries(klass: str, hosts: list[str], per_host: int) -> list[UrlEntry]:
    return [UrlEntry(f"{klass}_{h}_{k}", klass, f"http://{h}/{klass}/{k}.jpg", klass)
            for h in hosts for k in range(per_host)]


def scheduler_of(work: list[UrlEntry], ok: Counter, limit: int | None,
                 book: HostBook, probe_budget: int | None = None) -> Scheduler:
    """A scheduler over entries held in a list (a run reads them back from its selection)."""
    return Scheduler(((i, e.klass, host_key(e.url)) for i, e in enumerate(work)),
                     work.__getitem__, ok, limit, book, probe_budget)


def test_scheduler_alternates_classes_and_hosts_and_respects_the_per_host_limit():
    book = HostBook(per_host=2, max_failures=5)
    work = entries("a", ["big", "small"], 5) + entries("b", ["other"], 5)
    scheduler = scheduler_of(work, Counter(), None, book)
    started = [scheduler.next(0.0) for _ in range(6)]
    assert None not in started
    assert [j.entry.klass for j in started] == ["a", "b", "a", "b", "a", "a"]
    assert Counter(j.host for j in started) == {"big": 2, "small": 2, "other": 2}
    assert scheduler.next(0.0) is None  # every host at its limit
    scheduler.finished(started[0])
    assert scheduler.next(0.0).host == started[0].host


def test_scheduler_limit_is_exact_and_retries_keep_their_place():
    book = HostBook(per_host=10, max_failures=5)
    book.record("h", connection_failed=False, started=0.0, now=0.0)  # answered: 10 at once
    ok: Counter = Counter()
    scheduler = scheduler_of(entries("a", ["h"], 10), ok, 3, book)
    jobs = [scheduler.next(0.0) for _ in range(3)]
    assert scheduler.next(0.0) is None  # 3 in flight for a limit of 3
    scheduler.retry(jobs[0], at=5.0)
    assert scheduler.next(1.0) is None  # a retry waiting still holds its place
    assert scheduler.next_due(1.0) == 5.0
    again = scheduler.next(5.0)
    assert again is jobs[0] and again.attempts == 2
    for job in (again, jobs[1], jobs[2]):
        scheduler.finished(job)
        ok["a"] += 1
    assert scheduler.next(6.0) is None and not scheduler.busy()  # limit reached


def test_scheduler_drops_the_queue_of_a_down_host_and_pauses_only_the_throttled_one():
    book = HostBook(per_host=1, max_failures=1)
    scheduler = scheduler_of(entries("a", ["dead", "slow", "fine"], 3), Counter(), None, book)
    first = [scheduler.next(0.0) for _ in range(3)]
    dead = next(j for j in first if j.host == "dead")
    book.record("dead", connection_failed=True, started=0.0, now=1.0, error="refused")
    book.record("dead", connection_failed=True, started=2.0, now=2.0, error="refused")  # probe
    scheduler.finished(dead)
    slow = next(j for j in first if j.host == "slow")
    book.pause("slow", until=30.0)  # Retry-After: 29 s
    scheduler.finished(slow)
    for job in first:
        if job.host == "fine":
            scheduler.finished(job)
    started = []
    while (job := scheduler.next(2.0)) is not None:
        started.append(job.host)
        scheduler.finished(job)
    assert started == ["fine", "fine"]
    assert sorted(j.entry.id for j in scheduler.take_dropped()) == ["a_dead_1", "a_dead_2"]
    assert scheduler.next_due(2.0) == 30.0
    assert scheduler.next(30.0).host == "slow"


def test_a_public_url_may_not_redirect_to_a_private_address():
    """Resolution only (pinned names): nothing is connected to."""
    pins = (("public.example", None, "93.184.216.34"), ("inside.example", None, "10.0.0.7"),
            ("mirror.example", None, "127.0.0.1"))

    async def check(source: str, target: str, **options) -> str | None:
        resolver = Resolver(pins)
        try:
            refused = await _refused_redirect(URL(source), URL(target),
                                              GatherOptions(**options), resolver)
        finally:
            await resolver.close()
        return refused.outcome if refused else None

    run = asyncio.run
    assert run(check("http://public.example/a.jpg", "http://127.0.0.1/admin")) \
        == "blocked_redirect"
    assert run(check("http://public.example/a.jpg", "http://inside.example/x")) \
        == "blocked_redirect"
    assert run(check("http://public.example/a.jpg", "http://169.254.169.254/meta")) \
        == "blocked_redirect"
    assert run(check("http://public.example/a.jpg", "http://127.0.0.1/x",
                     allow_private_redirects=True)) is None
    assert run(check("http://mirror.example/a.jpg", "http://127.0.0.1/b.jpg")) is None
    assert run(check("http://public.example/a.jpg", "ftp://public.example/a.jpg")) \
        == "blocked_redirect"
    assert run(check("http://public.example/a.jpg",
                     "http://public.example/photo_unavailable.png")) == "placeholder"


def test_unanswered_hosts_first_then_the_host_with_the_most_urls_left():
    book = HostBook(per_host=3, max_failures=2)
    for host in ("big", "small"):
        book.record(host, connection_failed=False, started=0.0, now=0.1)  # answered
    work = (entries("a", ["small"], 4) + entries("a", ["big"], 9)
            + entries("a", ["new"], 5))
    scheduler = scheduler_of(work, Counter(), None, book)
    started = [scheduler.next(1.0).host for _ in range(7)]
    # The new host's probe (2 attempts) first; then big to its limit, then small.
    assert started == ["new", "new", "big", "big", "big", "small", "small"]


def test_a_host_that_never_answered_gets_two_attempts_at_once_until_its_breaker_opens():
    book = HostBook(per_host=16, max_failures=3, down_after=10.0)
    work = entries("a", ["dead"], 10) + entries("a", ["new"], 20)
    scheduler = scheduler_of(work, Counter(), None, book)
    probes = [scheduler.next(0.0) for _ in range(5)]
    assert [j.host if j else None for j in probes] == ["new"] * 2 + ["dead"] * 2 + [None]
    for job in probes[2:4]:
        book.record("dead", connection_failed=True, started=0.0, now=1.0, error="refused")
        scheduler.finished(job)
    third = scheduler.next(1.0)
    assert third.host == "dead" and scheduler.next(1.0) is None  # one failure to go
    book.record("dead", connection_failed=True, started=1.0, now=1.5, error="refused")
    scheduler.finished(third)
    assert scheduler.next(2.0) is None  # the breaker is open until its half-open probe
    book.record("new", connection_failed=False, started=0.0, now=0.2)
    scheduler.finished(probes[0])  # it answered: up to 16 at once, 1 still in flight
    assert sum(scheduler.next(2.0) is not None for _ in range(20)) == 15
    assert scheduler.next(11.0).host == "dead"  # the half-open probe, 10 s after


def test_probes_of_unanswered_hosts_take_at_most_their_budget_of_slots():
    book = HostBook(per_host=4, max_failures=5)
    book.record("big", connection_failed=False, started=0.0, now=0.0)
    work = entries("a", [f"small{k}" for k in range(6)], 1) + entries("a", ["big"], 20)
    scheduler = scheduler_of(work, Counter(), None, book, probe_budget=2)
    jobs = [scheduler.next(0.0) for _ in range(6)]
    hosts = [job.host for job in jobs]
    assert sum(h.startswith("small") for h in hosts) == 2 and hosts.count("big") == 4
    assert scheduler.next(0.0) is None  # big at its limit, the probe budget spent
    scheduler.finished(next(job for job in jobs if job.host.startswith("small")))
    assert scheduler.next(0.1).host.startswith("small")  # a probe ended: the next one
    assert scheduler.next(0.1) is None


def test_first_contacts_start_while_the_downloads_slots_are_full():
    """Black-holed hosts hold a first contact for --timeout each: those must not wait for the
    downloads' slots, nor take them (the caller says when they are full: may_download)."""
    book = HostBook(per_host=4, max_failures=5)
    book.record("big", connection_failed=False, started=0.0, now=0.0)
    work = entries("a", ["big"], 20) + entries("a", [f"small{k}" for k in range(6)], 1)
    scheduler = scheduler_of(work, Counter(), None, book, probe_budget=3)
    probes = [scheduler.next(0.0, may_download=False) for _ in range(3)]
    assert [job.host for job in probes] == ["small0", "small1", "small2"]
    assert scheduler.probing == 3
    assert scheduler.next(0.0, may_download=False) is None  # the first contacts' budget spent
    assert scheduler.next(0.0).host == "big"  # downloads may still start
    scheduler.finished(probes[0])
    assert scheduler.probing == 2
    assert scheduler.next(0.0, may_download=False).host == "small3"
    assert scheduler.next(0.0, may_download=False) is None
    assert [scheduler.next(0.0).host for _ in range(3)] == ["big"] * 3  # per_host 4 in all
    assert scheduler.next(0.0) is None


def test_read_timeout_fits_the_host_after_a_few_answers():
    book = HostBook(per_host=4, max_failures=5)
    for k in range(3):
        book.record("fast", connection_failed=False, started=k, now=k + 0.05)
    assert book.read_timeout("fast", longest=10.0) is None  # too few answers to tell
    book.record("fast", connection_failed=False, started=5.0, now=5.05)
    assert book.read_timeout("fast", longest=10.0) == 1.0  # the floor, far above 50 ms
    for k in range(6):
        book.record("slow", connection_failed=False, started=k, now=k + 3.0 + k % 2)
    assert 4.0 < book.read_timeout("slow", longest=10.0) < 10.0
    assert book.read_timeout("slow", longest=4.0) is None  # never beyond --timeout


def test_a_read_timeout_that_fires_doubles_and_never_marks_the_host_down():
    """A loaded client cuts healthy hosts short: that must correct itself, not kill the host."""
    book = HostBook(per_host=4, max_failures=2)
    for k in range(4):
        book.record("fast", connection_failed=False, started=k, now=k + 0.05)
    waited = book.read_timeout("fast", longest=60.0)
    for k in range(5):
        book.record("fast", connection_failed=False, started=10.0 + k, now=10.0 + k + waited,
                    cut_short=True)
        longer = book.read_timeout("fast", longest=60.0)
        assert longer is not None and longer >= 2 * waited
        waited = longer
    assert not book.is_down("fast")
    assert book.read_timeout("fast", longest=waited) is None  # capped by --timeout


def test_scheduler_holds_indices_and_reads_an_entry_back_only_when_it_is_handed_out():
    work = entries("a", ["h1", "h2"], 50) + entries("b", ["h1"], 50)
    loaded = []

    def load(index: int) -> UrlEntry:
        loaded.append(index)
        return work[index]

    book = HostBook(per_host=2, max_failures=5)
    scheduler = Scheduler(((i, e.klass, host_key(e.url)) for i, e in enumerate(work)), load,
                          Counter(), None, book)
    assert scheduler.total == 150 and not loaded
    assert scheduler._indices.nbytes == 8 * 150 and len(scheduler._host) == 3  # 3 segments
    jobs = [scheduler.next(0.0) for _ in range(4)]
    assert len(loaded) == 4 and [j.entry.id for j in jobs[:2]] == ["a_h1_0", "b_h1_0"]
    book.record("h2", connection_failed=True, started=0.0, now=1.0, error="refused")
    book.state("h2").down_because = "down"
    for job in jobs:
        scheduler.finished(job)
    while scheduler.next(2.0) is not None:
        pass
    taken = sum(j.host == "h2" for j in jobs)
    before = len(loaded)  # the dropped URLs are not read back until taken
    assert sum(host_key(work[i].url) == "h2" for i in loaded) == taken
    dropped = list(scheduler.take_dropped())
    assert [j.entry.id for j in dropped] == [f"a_h2_{k}" for k in range(taken, 50)]
    assert len(loaded) == before + len(dropped) and not list(scheduler.take_dropped())


class CountingBook(HostBook):
    """A host book that counts how often the scheduler asks whether a host may take a URL."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.asked = 0

    def available(self, host: str, now: float) -> bool:
        self.asked += 1
        return super().available(host, now)


def test_busy_hosts_are_parked_and_not_looked_at_until_one_of_their_urls_ends():
    book = CountingBook(per_host=1, max_failures=5)
    scheduler = scheduler_of(entries("a", [f"h{k}" for k in range(50)], 2), Counter(), None,
                             book)
    jobs = [scheduler.next(0.0) for _ in range(50)]
    assert None not in jobs and scheduler.next(0.0) is None  # every host at its limit
    book.asked = 0
    assert all(scheduler.next(0.1) is None for _ in range(10))
    assert book.asked == 0  # nothing walked past the 50 busy hosts
    scheduler.finished(jobs[7])
    job = scheduler.next(0.2)
    assert job.host == jobs[7].host and book.asked == 1


def test_a_paused_host_is_parked_until_its_pause_ends():
    book = CountingBook(per_host=2, max_failures=5)
    scheduler = scheduler_of(entries("a", ["slow"], 3), Counter(), None, book)
    job = scheduler.next(0.0)
    book.pause("slow", until=5.0)
    scheduler.retry(job, at=0.5)
    assert scheduler.next(1.0) is None
    book.asked = 0
    assert scheduler.next(2.0) is None and book.asked == 0
    assert scheduler.next_due(2.0) == 5.0
    assert scheduler.next(5.0).host == "slow"


class Names:
    """A resolver stand-in: answers given by the test."""

    def __init__(self) -> None:
        self.answers: dict[str, Answer] = {}
        self.asked: list[str] = []

    def request(self, name: str) -> None:
        self.asked.append(name)

    def answer(self, name: str) -> Answer | None:
        return self.answers.get(name)


def test_a_host_waits_parked_for_its_name_and_a_name_not_found_drops_its_urls():
    names = Names()
    book = HostBook(per_host=4, max_failures=3, names=names)
    scheduler = scheduler_of(entries("a", ["gone.example", "www.ok.example:8080"], 3),
                             Counter(), None, book)
    assert scheduler.next(0.0) is None
    assert sorted(names.asked) == ["gone.example", "www.ok.example"]
    names.answers["gone.example"] = Answer("gone.example", error="host not found: NXDOMAIN")
    names.answers["www.ok.example"] = Answer("www.ok.example", ("127.0.3.1",))
    scheduler.names_answered(["gone.example", "www.ok.example"])
    jobs = [scheduler.next(0.1) for _ in range(4)]
    assert [j.host if j else None for j in jobs] == ["www.ok.example:8080"] * 2 + [None] * 2
    assert book.addresses("www.ok.example:8080") == ("127.0.3.1",)
    dropped = list(scheduler.take_dropped())
    assert len(dropped) == 3 and book.state("gone.example").given_up_as == "host_not_found"
    assert len(names.asked) == 2  # each name asked once


def test_a_made_up_url_sits_beside_the_photo_and_names_no_real_file():
    from pipeline.stages.gather.http import made_up_url

    first = made_up_url("http://img.example:8080/photos/n01/12_w480.JPG?size=2")
    assert first.startswith("http://img.example:8080/photos/n01/pipeline-absent-")
    assert first.endswith(".JPG") and "?" not in first
    assert made_up_url("http://img.example/photo") .endswith(".jpg")
    assert first != made_up_url("http://img.example:8080/photos/n01/12_w480.JPG?size=2")


def test_a_worker_raises_its_open_files_limit_to_what_its_slots_may_hold():
    """Many systems start processes at a soft limit of 1,024 open files, below what a worker's
    share of --concurrency and the first contacts may hold (sockets, idle keep-alive ones,
    temp files). Checked in a child process started at a soft limit of 256."""
    import subprocess
    import sys

    code = (
        "import resource\n"
        "from pipeline.stages.gather.options import GatherOptions\n"
        "from pipeline.stages.gather.worker import FILES_PER_SLOT, FILES_SPARE, "
        "_allow_open_files, worker_capacity\n"
        "soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)\n"
        "resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))\n"
        "options = GatherOptions(concurrency=512, processes=2)\n"
        "wanted = FILES_PER_SLOT * worker_capacity(options) + FILES_SPARE\n"
        "_allow_open_files(wanted)\n"
        "now = resource.getrlimit(resource.RLIMIT_NOFILE)[0]\n"
        "limit = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)\n"
        "print(worker_capacity(options), now, limit)\n"
    )
    shown = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                           check=True, timeout=60).stdout.split()
    capacity, now, limit = map(int, shown)
    assert capacity == 384  # (512 downloads + 256 first contacts) / 2 workers
    assert now == limit > 256


def test_a_connect_timeout_is_ours_only_when_our_loop_lost_half_of_the_wait():
    """A machine busy enough to run each worker's loop a quarter behind must not make every
    black-holed host's timeout ours: such a timeout is retried (10 s each, in a first-contact
    slot) and never counted, and the small live hosts wait behind it."""
    from pipeline.stages.gather.http import Attempt
    from pipeline.stages.gather.worker import blame_our_lag

    def timeout() -> Attempt:
        return Attempt("unreachable", final=False, error="no connection within 10 s",
                       connection_failed=True, timed_out=True)

    busy = timeout()
    blame_our_lag(busy, lagged=3.0, timeout=10.0)  # the host still had 7 s to answer
    assert not busy.ours and not busy.retry
    stalled = timeout()
    blame_our_lag(stalled, lagged=6.0, timeout=10.0)
    assert stalled.ours == "our event loop ran 6.0 s late meanwhile" and stalled.retry
    refused = Attempt("unreachable", final=False, error="refused", connection_failed=True)
    blame_our_lag(refused, lagged=9.0, timeout=10.0)  # a refusal is the host's answer
    assert not refused.ours
