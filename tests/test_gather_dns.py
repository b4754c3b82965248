"""gather's name resolution against a real DNS server on loopback (pipeline.testing.fake_dns): dead
names slow or fast, a resolver that stalls, lookups that never hold up a connect."""

import asyncio
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web as aioweb

from pipeline.formats.journal import read_journal
from pipeline.stages.gather import GatherOptions, gather_synsets
from pipeline.stages.gather.http import fetch_once
from pipeline.stages.gather.names import NameService, Resolver, parse_dns_server
from pipeline.testing import serve_web
from pipeline.testing.fake_dns import FakeDns
from pipeline.testing.serve_web import make_host


def wait_for(names: NameService, wanted: set[str], seconds: float) -> dict[str, object]:
    """Collect answers until every wanted name has one (or the time is up)."""
    found = {}
    deadline = time.monotonic() + seconds
    while set(found) < wanted and time.monotonic() < deadline:
        names.wakeup.settimeout(0.05)
        names.wakeup.setblocking(False)
        for answer in names.collect():
            found[answer.name] = answer
        time.sleep(0.01)
    return found


def test_a_dead_name_costs_one_lookup_and_a_live_one_resolves():
    records = {"www.alive.example": "127.0.1.7", "gone.example": "nxdomain"}
    with FakeDns(records) as dns, NameService((dns.address,), 2.0) as names:
        for _ in range(3):  # many URLs of each host ask
            names.request("www.alive.example")
            names.request("gone.example")
        found = wait_for(names, set(records), 5.0)
        names.request("gone.example")  # known now: not asked again
        time.sleep(0.2)
        assert found["www.alive.example"].addresses == ("127.0.1.7",)
        assert not found["gone.example"].addresses and not found["gone.example"].silent
        assert found["gone.example"].error.startswith("host not found")
        assert dns.queries("gone.example", "A") == 1
        assert dns.queries("www.alive.example", "A") == 1
        assert names.answer("gone.example") is found["gone.example"]


def test_slow_dead_names_never_delay_a_live_one():
    """40 names that the resolver never answers are in flight; a live name asked after them
    is answered at once, not after their timeouts (a thread pool of getaddrinfo would hold
    it behind them)."""
    records = {f"slow{k}.example": "slow" for k in range(40)}
    records["www.alive.example"] = "127.0.1.8"
    with FakeDns(records) as dns, NameService((dns.address,), 5.0) as names:
        for k in range(40):
            names.request(f"slow{k}.example")
        time.sleep(0.2)  # all 40 in flight
        started = time.monotonic()
        names.request("www.alive.example")
        found = wait_for(names, {"www.alive.example"}, 5.0)
        assert found["www.alive.example"].addresses == ("127.0.1.8",)
        assert time.monotonic() - started < 0.5
        assert names.pending() == 40


def test_a_stalled_resolver_blames_no_name_and_a_silent_timeout_is_asked_again():
    records = {"www.alive.example": "127.0.1.9", "slow.example": "slow"}
    with FakeDns(records) as dns, NameService((dns.address,), 0.5) as names:
        dns.stall(1.6)
        names.request("www.alive.example")
        names.request("slow.example")
        found = wait_for(names, set(records), 8.0)
        # The live name was asked again after the stall and resolved.
        assert found["www.alive.example"].addresses == ("127.0.1.9",)
        assert dns.queries("www.alive.example", "A") >= 2
        # The dead name timed out twice while the resolver answered others: only then blamed.
        assert not found["slow.example"].addresses
        assert "--dns-timeout" in found["slow.example"].error


def serve(app: aioweb.Application) -> tuple[int, callable]:
    """An aiohttp server on 127.0.0.1 in a thread of its own; returns (port, stop)."""
    loop = asyncio.new_event_loop()
    runner = aioweb.AppRunner(app)
    loop.run_until_complete(runner.setup())
    site = aioweb.TCPSite(runner, "127.0.0.1", 0)
    loop.run_until_complete(site.start())
    port = site._server.sockets[0].getsockname()[1]
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()

    def stop() -> None:
        asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(5)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)

    return port, stop


def test_a_connect_to_a_numeric_address_never_waits_behind_lookups_under_uvloop(sample):
    """uvloop passes even a numeric address through getaddrinfo on libuv's 4-thread pool; if
    lookups ran on that pool, 40 slow ones would hold this connect for their whole timeout."""
    uvloop = pytest.importorskip("uvloop")
    picture = next((sample / "files").rglob("*.jpg")).read_bytes()
    async def handle(_: aioweb.Request) -> aioweb.Response:
        return aioweb.Response(body=picture, content_type="image/jpeg")

    app = aioweb.Application()
    app.router.add_get("/a.jpg", handle)
    port, stop = serve(app)
    records = {f"slow{k}.example": "slow" for k in range(40)}
    try:
        with FakeDns(records) as dns:
            async def main() -> tuple[str, float]:
                resolver = Resolver(servers=(dns.address,), timeout=5.0)
                lookups = [asyncio.ensure_future(resolver.resolve(f"slow{k}.example", 80))
                           for k in range(40)]
                await asyncio.sleep(0.2)
                options = GatherOptions(timeout=3.0)
                connector = aiohttp.TCPConnector(resolver=resolver)
                async with aiohttp.ClientSession(connector=connector) as session:
                    started = time.monotonic()
                    attempt = await fetch_once(session, f"http://127.0.0.1:{port}/a.jpg",
                                               options, resolver)
                    seconds = time.monotonic() - started
                for lookup in lookups:
                    lookup.cancel()
                await asyncio.gather(*lookups, return_exceptions=True)
                await resolver.close()
                return attempt.outcome, seconds

            outcome, seconds = uvloop.run(main())
    finally:
        stop()
    assert outcome == "ok"
    assert seconds < 0.5, seconds


def write_list(path: Path, lines: list[tuple[str, str]]) -> Path:
    path.write_text("".join(f"{image_id}\t{url}\n" for image_id, url in lines))
    return path


def url_list(sample: Path, web, dead: list[str], path: Path, per_host: int) -> tuple[Path, str]:
    wnid = sorted(p.name for p in (sample / "files").iterdir())[0]
    names = sorted(p.name for p in (sample / "files" / wnid).iterdir() if p.suffix == ".jpg")
    lines = []
    for index, host in enumerate(web.hosts):
        for k in range(per_host):
            n = index * per_host + k
            lines.append((f"{wnid}_{n}",
                          f"{web.base_url(host)}/uniq/{n}/{wnid}/{names[n % len(names)]}"))
    for index, name in enumerate(dead):
        for k in range(per_host):
            lines.append((f"{wnid}_{10_000 + index * per_host + k}",
                          f"http://{name}:{web.port}/img/{wnid}/x{k}.jpg"))
    return write_list(path, lines), wnid


@pytest.fixture(scope="module")
def alive_web(sample):
    hosts = [make_host(k, "alive") for k in range(1, 9)]
    with serve_web.serve_web(sample, hosts, max_seconds=300) as handle:
        yield handle


@pytest.mark.slow
def test_live_hosts_behind_slow_dead_names_are_never_given_up(sample, alive_web, tmp_path):
    """Eight live hosts among 60 dead names, a third of them never answered: every live URL
    is kept, each dead name is looked up once (a slow one twice) and all its URLs end
    host_not_found without a request."""
    web = alive_web
    dead = ([f"gone{k}.example" for k in range(20)] + [f"slow{k}.example" for k in range(20)]
            + [f"busy{k}.example" for k in range(20)])
    records = {host.name: host.address for host in web.hosts}
    records.update({f"gone{k}.example": "nxdomain" for k in range(20)})
    records.update({f"slow{k}.example": "slow" for k in range(20)})
    records.update({f"busy{k}.example": "congested" for k in range(20)})
    urls, wnid = url_list(sample, web, dead, tmp_path / "urls.txt", per_host=5)
    with FakeDns(records) as dns:
        options = GatherOptions(out=tmp_path / "raw", timeout=2.0, dns_timeout=1.0,
                                dns_servers=(dns.address,), retries=1, backoff=0.05)
        report = gather_synsets(urls, [wnid], options)
        journal = read_journal(tmp_path / "raw" / "gather.jsonl")
        assert Counter(r["outcome"] for r in journal.values()) == {
            "ok": 40, "host_not_found": 300}
        assert all(r["attempts"] == 0 for r in journal.values()
                   if r["outcome"] == "host_not_found")
        for k in range(20):
            assert dns.queries(f"gone{k}.example", "A") == 1
            assert 1 <= dns.queries(f"busy{k}.example", "A") <= 4
        assert report.hosts_down == 0 and report.hosts_not_found == 60


@pytest.mark.slow
def test_a_resolver_that_stalls_for_ten_seconds_gives_up_no_host(sample, alive_web, tmp_path):
    web = alive_web
    records = {host.name: host.address for host in web.hosts}
    urls, wnid = url_list(sample, web, [], tmp_path / "urls.txt", per_host=5)
    with FakeDns(records) as dns:
        dns.stall(10.0)
        options = GatherOptions(out=tmp_path / "raw", timeout=2.0, dns_timeout=2.0,
                                dns_servers=(dns.address,))
        report = gather_synsets(urls, [wnid], options)
    journal = read_journal(tmp_path / "raw" / "gather.jsonl")
    assert Counter(r["outcome"] for r in journal.values()) == {"ok": 40}
    assert report.hosts_not_found == 0 and report.hosts_down == 0
    assert report.seconds >= 9.0  # it waited the stall out


def test_a_host_that_comes_back_before_its_half_open_probe_is_kept(sample, tmp_path):
    """A host refuses its first connections (restarting); the breaker pauses it, and the
    probe after --host-down-after finds it back: every URL is kept, none host_down."""
    wnid = sorted(p.name for p in (sample / "files").iterdir())[0]
    pictures = sorted(p for p in (sample / "files" / wnid).iterdir() if p.suffix == ".jpg")[:12]
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    async def handle(request: aioweb.Request) -> aioweb.Response:
        path = sample / "files" / wnid / request.match_info["name"]
        if not path.is_file():
            raise aioweb.HTTPNotFound()
        return aioweb.Response(body=path.read_bytes(), content_type="image/jpeg")

    app = aioweb.Application()
    app.router.add_get("/{name}", handle)
    runner_box: dict[str, object] = {}

    journal = tmp_path / "raw" / "gather.jsonl"

    def start_later() -> None:
        """Once two URLs were refused (the breaker opens), the host comes back."""
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and (
                not journal.exists() or journal.read_text().count('"unreachable"') < 2):
            time.sleep(0.02)
        loop = asyncio.new_event_loop()
        runner = aioweb.AppRunner(app)
        loop.run_until_complete(runner.setup())
        loop.run_until_complete(aioweb.TCPSite(runner, "127.0.0.1", port).start())
        runner_box.update(loop=loop, runner=runner)
        loop.run_forever()

    thread = threading.Thread(target=start_later, daemon=True)
    thread.start()
    lines = [(f"{wnid}_{k}", f"http://127.0.0.1:{port}/{p.name}")
             for k, p in enumerate(pictures)]
    urls = write_list(tmp_path / "urls.txt", lines)
    try:
        options = GatherOptions(out=tmp_path / "raw", timeout=2.0, host_failures=2,
                                host_down_after=2.5, retries=0, per_host=2)
        report = gather_synsets(urls, [wnid], options)
    finally:
        loop = runner_box["loop"]
        asyncio.run_coroutine_threadsafe(runner_box["runner"].cleanup(), loop).result(5)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)
    journal = read_journal(tmp_path / "raw" / "gather.jsonl")
    outcomes = Counter(r["outcome"] for r in journal.values())
    assert outcomes["ok"] == 10 and outcomes["unreachable"] == 2, outcomes  # the 2 refused
    assert report.hosts_down == 0


def test_etc_hosts_still_answers_with_another_dns_server_named():
    """A name in /etc/hosts (here `localhost`, which every system has) resolves without asking
    the named server, which here does not even exist."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as unused:
        unused.bind(("127.0.0.1", 0))
        nobody = f"127.0.0.1:{unused.getsockname()[1]}"
    with NameService((nobody,), 1.0) as names:
        names.request("localhost")
        found = wait_for(names, {"localhost"}, 3.0)
    assert "127.0.0.1" in found["localhost"].addresses


def test_a_bad_dns_server_is_a_one_line_error(tmp_path):
    assert parse_dns_server("127.0.0.1") == "127.0.0.1:53"
    assert parse_dns_server("127.0.0.1:5353") == "127.0.0.1:5353"
    assert parse_dns_server("[::1]:53") == "[::1]:53"
    urls = tmp_path / "urls.txt"
    urls.write_text("n01234567_1\thttp://example.invalid/a.jpg\n")
    for bad in ("dns.example", "1.2.3.4:99999", "1.2.3:53"):
        result = subprocess.run(
            [sys.executable, "-m", "pipeline", "gather", "--wnid", "n01234567", "--urls",
             str(urls), "--out", str(tmp_path / "raw"), "--dns-server", bad],
            capture_output=True, text=True, timeout=60)
        assert result.returncode == 2, result.stderr
        assert result.stderr.count("\n") == 1 and "--dns-server" in result.stderr


def test_the_lag_meter_sees_a_blocked_event_loop():
    """A connect that times out while the worker's loop was this late is ours, not the host's
    (worker._fetch marks it so): the meter must see the loop blocked."""
    from pipeline.stages.gather.worker import _LagMeter

    async def main() -> tuple[float, float]:
        meter = _LagMeter()
        meter.start()
        await asyncio.sleep(0.2)
        quiet = meter.total
        time.sleep(0.6)  # the loop blocked, as by a long decode on it
        await asyncio.sleep(0.2)
        meter.stop()
        return quiet, meter.total

    quiet, blocked = asyncio.run(main())
    assert quiet < 0.1 and blocked - quiet >= 0.5
