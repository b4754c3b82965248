"""gather against the real web's host-level faults (pipeline.testing.serve_web): stalling servers,
dead and black-holed hosts, many hostnames via --resolve, Ctrl-C, byte-exact URLs."""

import asyncio
import contextlib
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web as aioweb

from pipeline.formats.journal import read_journal, read_placeholders
from pipeline.stages.gather import GatherOptions, gather_synsets
from pipeline.stages.gather.names import parse_resolve
from pipeline.testing import serve_web
from pipeline.testing.serve_web import make_host

pytestmark = pytest.mark.slow  # real servers on loopback, deadlines of seconds

TRICKLE_EVERY = 0.5
ENDLESS_RATE = 20_000


def images(sample: Path, wnid: str) -> list[str]:
    return sorted(p.name for p in (sample / "files" / wnid).iterdir() if p.suffix == ".jpg")


def write_list(path: Path, lines: list[tuple[str, str]]) -> Path:
    path.write_text("".join(f"{image_id}\t{url}\n" for image_id, url in lines))
    return path


def good_urls(web, host, sample: Path, wnid: str, count: int, start: int = 0) -> list[str]:
    """`count` good images on an alive host, pictures `start`.. of the synset (wrapping
    around): unique bytes, so no duplicates, but a picture served for too many URLs is a
    placeholder, as on the real web."""
    names = images(sample, wnid)
    return [f"{web.base_url(host)}/uniq/{start + k}/{wnid}/{names[(start + k) % len(names)]}"
            for k in range(count)]


def options(out: Path, web, **overrides) -> GatherOptions:
    values = {"out": out, "timeout": 1.0, "retries": 1, "backoff": 0.05,
              "resolve": tuple(parse_resolve(r) for r in web.resolve_args())}
    return GatherOptions(**{**values, **overrides})


def outcomes_by_host(journal: dict, web) -> dict[str, Counter]:
    found: dict[str, Counter] = {}
    for record in journal.values():
        host = record["url"].split("/")[2].split(":")[0]
        found.setdefault(host, Counter())[record["outcome"]] += 1
    return found


@pytest.fixture(scope="module")
def stalling_web(sample):
    hosts = [make_host(1, "alive"), make_host(2, "trickle"), make_host(3, "blackhole"),
             make_host(4, "endless")]
    with serve_web.serve_web(sample, hosts, max_seconds=300, trickle_every=TRICKLE_EVERY,
                             endless_rate=ENDLESS_RATE) as handle:
        yield handle


def test_stalling_servers_end_within_the_deadline_and_every_url_is_journaled(
        sample, stalling_web, tmp_path):
    web = stalling_web
    wnid = sorted(p.name for p in (sample / "files").iterdir())[0]
    alive, trickle, blackhole, endless = web.hosts
    lines = [(f"{wnid}_{k}", url)
             for k, url in enumerate(good_urls(web, alive, sample, wnid, 30))]
    name = images(sample, wnid)[0]
    for k, host in enumerate((trickle, trickle, blackhole, endless), start=100):
        lines.append((f"{wnid}_{k}", f"{web.base_url(host)}/img/{wnid}/{name}"))
    urls = write_list(tmp_path / "urls.txt", lines)
    deadline = 4.0
    started = time.monotonic()
    # The images' own stalls: the hosts' robots.txt and tdmrep.json stall too (next test).
    report = gather_synsets(urls, [wnid], options(tmp_path / "raw", web, url_deadline=deadline,
                                                  host_failures=10, retries=0,
                                                  honour_robots=False, honour_opt_out=False))
    elapsed = time.monotonic() - started
    # Each stalled URL is bounded by its deadline; they run side by side: one deadline plus
    # start-up, far below the trickle's 250 s or the endless stream's forever.
    assert elapsed < deadline + 6, elapsed
    journal = read_journal(tmp_path / "raw" / "gather.jsonl")
    assert set(journal) == {image_id for image_id, _ in lines}
    by_id = {image_id: journal[image_id] for image_id, _ in lines}
    assert sum(r["outcome"] == "ok" for r in by_id.values()) == 30
    for image_id in (f"{wnid}_100", f"{wnid}_101"):  # trickle: below --min-rate after 1 s
        assert by_id[image_id]["outcome"] == "timeout" and not by_id[image_id]["final"]
        assert "--min-rate" in by_id[image_id]["error"]
    assert by_id[f"{wnid}_102"]["outcome"] == "unreachable"  # black hole: no connection
    assert "no connection within" in by_id[f"{wnid}_102"]["error"]
    endless_record = by_id[f"{wnid}_103"]  # fast enough for --min-rate, never finishes
    assert endless_record["outcome"] == "timeout" and "--url-deadline" in endless_record["error"]
    assert report.overall[wnid]["ok"] == 30
    assert not list((tmp_path / "raw").rglob("*.part"))


def test_a_stalling_robots_txt_is_bounded_and_keeps_its_host_from_being_fetched(
        sample, stalling_web, tmp_path):
    """RFC 9309 2.3.1.4: a robots.txt that does not arrive means complete disallow; the
    trickle ends at --min-rate, the endless stream at the deadline, side by side."""
    web = stalling_web
    wnid = sorted(p.name for p in (sample / "files").iterdir())[0]
    _, trickle, blackhole, endless = web.hosts
    name = images(sample, wnid)[0]
    lines = [(f"{wnid}_{k}", f"{web.base_url(host)}/img/{wnid}/{name}?k={k}")
             for k, host in enumerate((trickle, trickle, blackhole, endless, endless))]
    urls = write_list(tmp_path / "urls.txt", lines)
    deadline = 4.0
    started = time.monotonic()
    report = gather_synsets(urls, [wnid], options(tmp_path / "raw", web, url_deadline=deadline,
                                                  host_failures=10, retries=0))
    assert time.monotonic() - started < deadline + 6
    journal = read_journal(tmp_path / "raw" / "gather.jsonl")
    for k in (0, 1, 3, 4):
        record = journal[f"{wnid}_{k}"]
        assert record["outcome"] == "robots_unreachable" and not record["final"], record
        assert record["error"].startswith("robots.txt unreachable")
    assert "--min-rate" in journal[f"{wnid}_0"]["error"]
    assert "--url-deadline" in journal[f"{wnid}_3"]["error"]
    assert journal[f"{wnid}_2"]["outcome"] == "unreachable"  # no connection: the breaker's
    assert report.hosts_robots_unreachable == 2


def test_a_trickle_without_min_rate_still_ends_at_the_deadline(sample, stalling_web, tmp_path):
    web = stalling_web
    wnid = sorted(p.name for p in (sample / "files").iterdir())[0]
    url = f"{web.base_url(web.hosts[1])}/img/{wnid}/{images(sample, wnid)[0]}"
    urls = write_list(tmp_path / "urls.txt", [(f"{wnid}_1", url)])
    started = time.monotonic()
    gather_synsets(urls, [wnid], options(tmp_path / "raw", web, url_deadline=2.0, min_rate=0,
                                         honour_robots=False, honour_opt_out=False))
    assert time.monotonic() - started < 2.0 + 5
    record = read_journal(tmp_path / "raw" / "gather.jsonl")[f"{wnid}_1"]
    assert record["outcome"] == "timeout" and "--url-deadline" in record["error"]


@pytest.fixture(scope="module")
def many_hosts_web(sample):
    """20 alive hostnames, 3 refusing, 1 black-holed, 1 whose name never resolves."""
    hosts = [make_host(i, "alive") for i in range(1, 21)]
    hosts += [make_host(21, "refusing"), make_host(22, "refusing"), make_host(23, "refusing"),
              make_host(24, "blackhole"), make_host(25, "dns_dead")]
    with serve_web.serve_web(sample, hosts, max_seconds=300, latency=0.1) as handle:
        yield handle


def test_many_hostnames_per_host_limit_and_dead_hosts_cost_a_few_attempts(
        sample, many_hosts_web, tmp_path):
    web = many_hosts_web
    wnids = sorted(p.name for p in (sample / "files").iterdir())[:2]
    lines = []
    for index, host in enumerate(web.hosts):
        wnid = wnids[index % 2]
        if host.behaviour == "alive":
            urls = good_urls(web, host, sample, wnid, 8, start=8 * (index // 2))
        else:
            urls = [f"{web.base_url(host)}/img/{wnid}/x{k}.jpg" for k in range(30)]
        lines += [(f"{wnid}_{index * 1000 + k}", url) for k, url in enumerate(urls)]
    urls = write_list(tmp_path / "urls.txt", lines)
    before = web.stats()
    per_host, failures = 2, 3
    gather_synsets(urls, wnids, options(tmp_path / "raw", web, per_host=per_host,
                                        concurrency=64, host_failures=failures,
                                        host_down_after=1.0))
    after = web.stats()
    journal = read_journal(tmp_path / "raw" / "gather.jsonl")
    assert set(journal) == {image_id for image_id, _ in lines}
    by_host = outcomes_by_host(journal, web)
    alive = [h for h in web.hosts if h.behaviour == "alive"]
    for host in alive:
        assert by_host[host.name] == {"ok": 8}
        assert after[host.name]["max_open"] <= per_host  # counted by the server
    assert max(after[h.name]["max_open"] for h in alive) == per_host  # the limit was reached
    # 160 photos, and once per host (not per worker process): robots.txt, tdmrep.json and a
    # made-up path (what it answers for a lost photo).
    requests = sum(after[h.name]["requests"] - before[h.name]["requests"] for h in alive)
    assert requests == 160 + 3 * len(alive)
    for host in web.hosts:
        if host.behaviour == "alive":
            continue
        counts = by_host[host.name]
        if host.behaviour == "dns_dead":  # one lookup, no request
            assert counts == {"host_not_found": 30}, (host, counts)
            continue
        # At most `failures` attempts and the half-open probe, plus those already in flight
        # when it went down.
        assert counts["unreachable"] <= failures + 1 + per_host - 1, (host, counts)
        assert counts["host_down"] >= 30 - failures - per_host, (host, counts)
        assert counts["unreachable"] + counts["host_down"] == 30
    down = [r for r in journal.values() if r["outcome"] == "host_down"]
    assert all(not r["final"] and r["error"].startswith("host down: ") for r in down)
    assert all(r["attempts"] == 0 for r in down)  # never requested
    not_found = [r for r in journal.values() if r["outcome"] == "host_not_found"]
    assert not_found and all(not r["final"] and r["attempts"] == 0 for r in not_found)

    # A re-run tries the dead hosts again (they may have come back); good images are kept.
    lines_before = (tmp_path / "raw" / "gather.jsonl").read_text().count("\n")
    report = gather_synsets(urls, wnids, options(tmp_path / "raw", web, per_host=per_host,
                                                 concurrency=64, host_failures=failures,
                                                 host_down_after=1.0))
    assert report.skipped == 160
    new = [json.loads(line) for line in
           (tmp_path / "raw" / "gather.jsonl").read_text().splitlines()[lines_before:]]
    second = outcomes_by_host({r["id"]: r for r in new}, web)
    for host in web.hosts:
        if host.behaviour == "dns_dead":
            assert second[host.name] == {"host_not_found": 30}
        elif host.behaviour != "alive":
            assert second[host.name]["unreachable"] >= 1
            assert sum(second[host.name].values()) == 30


def run_cli(args: list[str], **kwargs) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "pipeline", "gather", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            **kwargs)


def test_ctrl_c_journals_what_is_in_flight_prints_the_summary_and_resumes(
        sample, stalling_web, tmp_path):
    web = stalling_web
    wnid = sorted(p.name for p in (sample / "files").iterdir())[0]
    alive, trickle = web.hosts[0], web.hosts[1]
    lines = [(f"{wnid}_{k}", url)
             for k, url in enumerate(good_urls(web, alive, sample, wnid, 10))]
    name = images(sample, wnid)[0]
    lines += [(f"{wnid}_{k}", f"{web.base_url(trickle)}/img/{wnid}/{name}")
              for k in range(100, 103)]
    urls = write_list(tmp_path / "urls.txt", lines)
    out = tmp_path / "raw"
    args = ["--urls", str(urls), "--wnid", wnid, "--out", str(out), "--timeout", "1",
            "--url-deadline", "120", "--min-rate", "0", "--processes", "1",
            *(f"--resolve={r}" for r in web.resolve_args())]
    process = run_cli(args)
    journal = out / "gather.jsonl"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and (
            not journal.exists() or journal.read_text().count("\n") < 10):
        time.sleep(0.05)
    time.sleep(0.5)
    process.send_signal(signal.SIGINT)
    stdout, stderr = process.communicate(timeout=30)
    assert process.returncode == 130, stderr
    assert "interrupted by SIGINT" in stdout and "Traceback" not in stderr
    assert f"{wnid}" in stdout and "total" in stdout  # the summary table
    records = read_journal(journal)
    # Every URL handed out is journaled; the trickling host had one in flight (asking for its
    # robots.txt, which it trickles) and its other URLs were not tried yet (the re-run does).
    assert set(records) == {image_id for image_id, _ in lines} - {f"{wnid}_101", f"{wnid}_102"}
    for k in range(100, 101):
        record = records[f"{wnid}_{k}"]
        assert record["outcome"] == "interrupted" and not record["final"]

    # The re-run retries only the interrupted ones (now against a short deadline).
    process = run_cli([*args, "--url-deadline", "1"])
    stdout, stderr = process.communicate(timeout=60)
    assert process.returncode == 0, stderr
    assert "10 already final" in stdout


def test_progress_in_a_log_reports_in_flight_urls_while_nothing_finishes(
        sample, stalling_web, tmp_path):
    web = stalling_web
    wnid = sorted(p.name for p in (sample / "files").iterdir())[0]
    url = f"{web.base_url(web.hosts[1])}/img/{wnid}/{images(sample, wnid)[0]}"
    urls = write_list(tmp_path / "urls.txt", [(f"{wnid}_1", url)])
    log = tmp_path / "log.txt"
    with open(log, "w") as stderr:
        process = subprocess.run(
            [sys.executable, "-m", "pipeline", "gather", "--urls", str(urls), "--wnid", wnid,
             "--out", str(tmp_path / "raw"), "--url-deadline", "12", "--min-rate", "0",
             *(f"--resolve={r}" for r in web.resolve_args())],
            stdout=subprocess.PIPE, stderr=stderr, text=True, timeout=60,
            env={**os.environ, "PIPELINE_PROGRESS_EVERY": "2"})
    assert process.returncode == 0
    beats = [line for line in log.read_text().splitlines() if "in flight 1, oldest" in line]
    assert len(beats) >= 3, log.read_text()  # one every 2 s during the 12 s stall


def test_urls_go_out_byte_for_byte_as_the_list_holds_them(sample, tmp_path):
    """A raw Latin-1 byte, a space and a UTF-8 path reach the server percent-encoded."""
    seen: list[str] = []

    async def record(request: aioweb.Request) -> aioweb.Response:
        seen.append(request.raw_path)
        return aioweb.Response(status=404)

    app = aioweb.Application()
    app.router.add_get("/{tail:.*}", record)
    with serve_app(app) as base:
        raw = [b"n1_1\t" + base.encode() + b"/caf\xe9.jpg\n",
               b"n1_2\t" + base.encode() + b"/a b.jpg\textra\n",
               b"n1_3\t" + base.encode() + "/é%20x.jpg\r\n".encode()]
        urls = tmp_path / "urls.txt"
        urls.write_bytes(b"\xef\xbb\xbf" + b"".join(raw))
        gather_synsets(urls, ["n1"], GatherOptions(out=tmp_path / "raw", processes=1))
    assert sorted(seen) == ["/%C3%A9%20x.jpg", "/.well-known/tdmrep.json", "/a%20b.jpg",
                            "/caf%E9.jpg", "/robots.txt"]
    journal = read_journal(tmp_path / "raw" / "gather.jsonl")
    assert journal["n1_1"]["url"].endswith("/caf%E9.jpg")


@contextlib.contextmanager
def serve_app(app: aioweb.Application, seconds: float = 60) -> Iterator[str]:
    """A plain aiohttp app on 127.0.0.1 in a thread of its own, stopped on exit."""
    ready: queue.Queue[str] = queue.Queue()
    stop = threading.Event()

    async def main() -> None:
        runner = aioweb.AppRunner(app)
        await runner.setup()
        site = aioweb.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = runner.addresses[0][1]
        ready.put(f"http://127.0.0.1:{port}")
        deadline = time.monotonic() + seconds
        while not stop.is_set() and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        await runner.cleanup()

    thread = threading.Thread(target=asyncio.run, args=(main(),), daemon=True)
    thread.start()
    try:
        yield ready.get(timeout=30)
    finally:
        stop.set()
        thread.join(timeout=30)


def gather_photos_and_generic(web, sample: Path, tmp_path: Path, wnids: list[str],
                              generic_paths: range) -> tuple[Path, list, Any, set[str]]:
    """5 real photos per synset on the alive host, and the generic host's paths per synset;
    every generic URL must end as placeholder and no copy of its picture stay in a class.
    (urls.txt, lines, report, ids of the generic host's URLs)."""
    alive, generic = web.hosts
    lines = []
    for w, wnid in enumerate(wnids):
        lines += [(f"{wnid}_{k}", url) for k, url in
                  enumerate(good_urls(web, alive, sample, wnid, 5, start=50 * w))]
        lines += [(f"{wnid}_{k}", f"{web.base_url(generic)}/photos/{wnid}/{k}_w{k * 40}.jpg")
                  for k in generic_paths]
    urls = write_list(tmp_path / "urls.txt", lines)
    out = tmp_path / "raw"
    report = gather_synsets(urls, wnids, options(out, web))
    journal = read_journal(out / "gather.jsonl")
    generic_ids = {i for i, url in lines if generic.name in url}
    assert {journal[i]["outcome"] for i in generic_ids} == {"placeholder"}
    assert all(journal[i]["outcome"] == "ok" for i, _ in lines if i not in generic_ids)
    kept = [p for p in out.rglob("*.jpg") if ".placeholders" not in p.parts]
    assert len(kept) == 10  # the 10 real photos, no copy of the generic picture
    assert all(report.overall[w]["ok"] == 5 for w in wnids)
    return urls, lines, report, generic_ids


def test_a_body_repeated_across_urls_and_synsets_is_a_placeholder_and_no_copy_stays(
        sample, tmp_path):
    hosts = [make_host(1, "alive"), make_host(2, "placeholder")]
    wnids = sorted(p.name for p in (sample / "files").iterdir())[:2]
    with serve_web.serve_web(sample, hosts, max_seconds=120) as web:
        urls, lines, report, _ = gather_photos_and_generic(web, sample, tmp_path, wnids,
                                                           range(100, 110))
        out = tmp_path / "raw"
        digest = web.placeholder_digests().pop()
        assert list(read_placeholders(out / "placeholders.txt")) == [digest]
        assert report.placeholders_found == 1
        # It serves the picture for a made-up path too: known from its first image on, so
        # no copy was ever kept.
        errors = {read_journal(out / "gather.jsonl")[i]["error"] for i, url in lines
                  if web.hosts[1].name in url}
        assert errors == {f"the picture {web.hosts[1].name} serves for a path that does not "
                          "exist (listed in placeholders.txt)"}
        assert not (out / ".placeholders").exists()

        # A later run knows the digest: a new URL with those bytes is refused at once.
        lines.append((f"{wnids[0]}_999", f"{web.base_url(web.hosts[1])}/new.jpg"))
        write_list(urls, lines)
        gather_synsets(urls, wnids, options(out, web))
        record = read_journal(out / "gather.jsonl")[f"{wnids[0]}_999"]
        assert record["outcome"] == "placeholder" and "placeholders.txt" in record["error"]


def test_a_placeholder_resized_per_url_is_found_though_no_two_bodies_match(sample, tmp_path):
    """An image CDN answers every dead photo with its picture at the size the URL asks for:
    the bytes differ, the perceptual hash does not (much)."""
    hosts = [make_host(1, "alive"), make_host(2, "resizing_placeholder")]
    wnids = sorted(p.name for p in (sample / "files").iterdir())[:2]
    with serve_web.serve_web(sample, hosts, max_seconds=120) as web:
        # The CDN answers a made-up path with 404: only repetition gives its picture away.
        _, _, report, cdn_ids = gather_photos_and_generic(web, sample, tmp_path, wnids,
                                                          range(100, 108))
        out = tmp_path / "raw"
        journal = read_journal(out / "gather.jsonl")
        assert len({journal[i]["sha256"] for i in cdn_ids}) > 5  # other bytes, most of them
        assert report.placeholders_found >= 1
        set_aside = list((out / ".placeholders").iterdir())
        assert set_aside and all(p.stem in read_placeholders(out / "placeholders.txt")
                                 for p in set_aside)


def test_a_hung_url_on_a_fast_host_is_cut_short_then_fetched_patiently(
        sample, stalling_web, tmp_path):
    web = stalling_web
    wnid = sorted(p.name for p in (sample / "files").iterdir())[0]
    alive = web.hosts[0]
    lines = [(f"{wnid}_{k}", url)
             for k, url in enumerate(good_urls(web, alive, sample, wnid, 8))]
    name = images(sample, wnid)[1]
    lines.append((f"{wnid}_99", f"{web.base_url(alive)}/slow/3.5/{wnid}/{name}"))
    urls = write_list(tmp_path / "urls.txt", lines)
    settings = options(tmp_path / "raw", web, per_host=1, processes=1, timeout=6.0)
    started = time.monotonic()
    gather_synsets(urls, [wnid], replace(settings, retries=0))
    record = read_journal(tmp_path / "raw" / "gather.jsonl")[f"{wnid}_99"]
    assert record["outcome"] == "timeout" and "usually takes" in record["error"]
    assert record["seconds"] < 3.5  # the host answers in milliseconds: 1 s was enough to tell
    assert time.monotonic() - started < 3.5 + 5
    gather_synsets(urls, [wnid], settings)  # the next run waits the full --timeout
    assert read_journal(tmp_path / "raw" / "gather.jsonl")[f"{wnid}_99"]["outcome"] == "ok"

    # With a retry left, the cut URL is retried once in the run, with the host's timer doubled
    # (~2 s): a URL ~1.5 s late (a client slowed by load) is fetched, a 3.5 s stall waits for
    # the next run instead of costing the full --timeout now.
    again = tmp_path / "again"
    gather_synsets(urls, [wnid], replace(settings, out=again))
    stalled = read_journal(again / "gather.jsonl")[f"{wnid}_99"]
    assert (stalled["outcome"], stalled["attempts"]) == ("timeout", 2)
    assert stalled["seconds"] < 6.0  # ~1 s + ~2 s, not 1 s + the full 6 s
    # The retry's timer is twice the one it was cut at, though the host's own timer shrinks
    # back to ~1 s while the host answers the URLs after it (the retry waits ~0.25-0.75 s).
    late = f"{web.base_url(alive)}/slow/1.5/{wnid}/{images(sample, wnid)[2]}"
    after = [(f"{wnid}_{100 + k}", url)
             for k, url in enumerate(good_urls(web, alive, sample, wnid, 40, start=8))]
    urls = write_list(tmp_path / "late.txt", [*lines[:8], (f"{wnid}_98", late), *after])
    gather_synsets(urls, [wnid], replace(settings, out=tmp_path / "late", backoff=0.5))
    journal = read_journal(tmp_path / "late" / "gather.jsonl")
    assert (journal[f"{wnid}_98"]["outcome"], journal[f"{wnid}_98"]["attempts"]) == ("ok", 2)
    assert {journal[i]["outcome"] for i, _ in after} == {"ok"}
