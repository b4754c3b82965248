"""The simulated web (pipeline/testing/serve_web.py) really does what each host behaviour promises.

gather's host-level tests and benchmark rely on these behaviours, so each is checked with a
raw socket or a plain aiohttp client, every wait bounded by a timeout.
"""

import asyncio
import hashlib
import io
import ipaddress
import json
import resource
import socket
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from urllib.parse import urlsplit

import aiohttp
import pytest
import yarl
from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import AsyncResolver
from dnslib import DNSRecord
from PIL import Image

from pipeline.testing import make_sample, serve_web
from pipeline.testing.serve_web import HostSpec, make_host, make_host_mix, serve_web_process

pytestmark = pytest.mark.slow  # real servers on loopback, timing-based behaviours

TRICKLE_EVERY = 0.2
ENDLESS_RATE = 40_000
# One host of each behaviour, plus a second placeholder and an alive host kept for the
# connection-limit test (its max_open must not see other tests' connections).
HOSTS = [make_host(1, "alive"), make_host(2, "refusing"), make_host(3, "blackhole"),
         make_host(4, "trickle"), make_host(5, "endless"), make_host(6, "soft404"),
         make_host(7, "placeholder"), make_host(8, "dns_dead"), make_host(9, "placeholder"),
         make_host(10, "alive")]


@pytest.fixture(scope="module")
def web(sample):
    with serve_web.serve_web(sample, HOSTS, max_seconds=300, trickle_every=TRICKLE_EVERY,
                             endless_rate=ENDLESS_RATE) as handle:
        yield handle


def image_tail(sample: Path) -> str:
    wnid = sorted(p.name for p in (sample / "files").iterdir())[0]
    name = next(p.name for p in sorted((sample / "files" / wnid).iterdir())
                if p.suffix == ".jpg")
    return f"{wnid}/{name}"


def connect(address: str, port: int, timeout: float = 2.0) -> socket.socket:
    return socket.create_connection((address, port), timeout=timeout)


def send_get(sock: socket.socket, host: str, path: str = "/img/x/y.jpg") -> None:
    sock.sendall(f"GET {path} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())


def read_head(sock: socket.socket) -> tuple[bytes, bytes]:
    """Response head and whatever body bytes came with it."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(4096)
        assert chunk, "connection closed before the response head"
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    return head, rest


class PinnedResolver(AbstractResolver):
    """What `--resolve` does for a client: names from the layout, nothing from DNS."""

    def __init__(self, resolve_args: list[str]) -> None:
        self._pins = {}
        for arg in resolve_args:
            name, port, address = arg.split(":")
            self._pins[(name, int(port))] = address

    async def resolve(self, host: str, port: int = 0,
                      family: socket.AddressFamily = socket.AF_INET) -> list[ResolveResult]:
        if (host, port) not in self._pins:
            raise OSError(f"{host} is not pinned")
        return [{"hostname": host, "host": self._pins[(host, port)], "port": port,
                 "family": socket.AF_INET, "proto": 0, "flags": socket.AI_NUMERICHOST}]

    async def close(self) -> None:
        pass


async def fetch_all(urls: list[str], resolve_args: list[str], *, limit_per_host: int = 0,
                    timeout: float = 5.0) -> list[tuple[int, str, bytes]]:
    connector = aiohttp.TCPConnector(resolver=PinnedResolver(resolve_args),
                                     limit_per_host=limit_per_host)
    async with aiohttp.ClientSession(connector=connector,
                                     timeout=aiohttp.ClientTimeout(total=timeout)) as session:
        async def one(url: str) -> tuple[int, str, bytes]:
            async with session.get(url) as response:
                return response.status, response.content_type, await response.read()
        return await asyncio.gather(*(one(url) for url in urls))


def fetch(urls: list[str], resolve_args: list[str], **kwargs) -> list[tuple[int, str, bytes]]:
    return asyncio.run(fetch_all(urls, resolve_args, **kwargs))


# ------------------------------------------------------------------------------------ layout

def test_host_mix_is_exact_deterministic_and_on_loopback_only():
    mix = {"alive": 0.5, "refusing": 0.2, "dns_dead": 0.2, "trickle": 0.1}
    hosts = make_host_mix(20, mix, seed=3)
    assert hosts == make_host_mix(20, mix, seed=3)
    assert Counter(h.behaviour for h in hosts) == {"alive": 10, "refusing": 4, "dns_dead": 4,
                                                    "trickle": 2}
    assert hosts[0].behaviour == "alive"  # the biggest host is up, like Flickr
    assert [h.name.split(".")[0] for h in hosts] == [f"host{i}" for i in range(1, 21)]
    addresses = [h.address for h in hosts if h.address]
    assert len(set(addresses)) == len(addresses)
    assert all(ipaddress.ip_address(a) in ipaddress.ip_network("127.0.0.0/8")
               for a in addresses)
    for host in hosts:
        assert (host.behaviour == "dns_dead") == host.name.endswith(".invalid")
        assert (host.address is None) == (host.behaviour == "dns_dead")
    assert make_host(17, "alive").address == "127.0.1.17"
    assert make_host(255, "alive").address == "127.0.2.1"
    with pytest.raises(ValueError):
        HostSpec("evil.example", "alive", "10.0.0.1")
    assert Counter(h.behaviour for h in make_host_mix(7, {"alive": 1, "soft404": 1})) == {
        "alive": 4, "soft404": 3}


def test_resolve_args_and_base_urls(web):
    port = web.port
    assert web.resolve_args() == [f"{h.name}:{port}:{h.address}" for h in HOSTS if h.address]
    assert not any(".invalid" in arg for arg in web.resolve_args())
    assert web.base_url("host1.example") == f"http://host1.example:{port}"
    assert web.base_url(HOSTS[0], ip_literal=True) == f"http://127.0.1.1:{port}"
    assert web.base_url("host8.invalid", ip_literal=True) == f"http://host8.invalid:{port}"


# --------------------------------------------------------------------------------- behaviours

def test_alive_host_serves_the_mirror_with_its_per_path_faults(web, sample):
    tail = image_tail(sample)
    by_name, by_ip = web.base_url(HOSTS[0]), web.base_url(HOSTS[0], ip_literal=True)
    before = web.stats()["host1.example"]["requests"]
    results = fetch([f"{by_name}/img/{tail}", f"{by_ip}/img/{tail}",
                     f"{by_name}/status/404/{tail}", f"{by_name}/unavailable/{tail}"],
                    web.resolve_args())
    original = (sample / "files" / tail).read_bytes()
    assert results[0] == (200, "image/jpeg", original)
    assert results[1] == (200, "image/jpeg", original)
    assert results[2][0] == 404
    assert results[3] == (200, "image/png", (sample / "placeholder.png").read_bytes())
    assert web.stats()["host1.example"]["requests"] == before + 5  # the redirect is two


def test_refusing_host_refuses_at_once(web):
    start = time.monotonic()
    with pytest.raises(ConnectionRefusedError):
        connect(web.host("host2.example").address, web.port)
    assert time.monotonic() - start < 0.5
    assert web.stats()["host2.example"]["connections"] is None  # not observable


def test_blackhole_never_answers_and_counts_dropped_syns(web):
    address = web.host("host3.example").address
    drops_before = web.stats()["host3.example"]["syn_drops"]
    for _ in range(2):  # not only the first: the queue slot is taken by the server's filler
        start = time.monotonic()
        with pytest.raises(TimeoutError):
            connect(address, web.port, timeout=1.0)
        assert time.monotonic() - start >= 0.95
    stats = web.stats()["host3.example"]
    assert stats["syn_drops"] > drops_before
    assert stats["connections"] == 0 and stats["requests"] == 0


def test_trickle_sends_one_byte_per_interval(web):
    with connect(web.host("host4.example").address, web.port) as sock:
        send_get(sock, "host4.example")
        head, body = read_head(sock)
        assert head.startswith(b"HTTP/1.1 200 OK")
        assert b"Content-Type: image/jpeg" in head
        length = int(head.split(b"Content-Length: ")[1].split(b"\r\n")[0])
        assert length >= 100_000
        arrivals = []
        sock.settimeout(3 * TRICKLE_EVERY)
        start = time.monotonic()
        while time.monotonic() - start < 6 * TRICKLE_EVERY:
            chunk = sock.recv(100)
            assert chunk
            body += chunk
            arrivals.append(time.monotonic())
    assert body.startswith(b"\xff\xd8")
    assert 4 <= len(body) <= 9  # ~1 byte per 0.2 s over 1.2 s, plus the first
    gaps = [b - a for a, b in zip(arrivals, arrivals[1:], strict=False)]
    assert all(gap > TRICKLE_EVERY * 0.6 for gap in gaps), gaps


def test_endless_keeps_sending_without_a_length(web):
    with connect(web.host("host5.example").address, web.port) as sock:
        send_get(sock, "host5.example")
        head, body = read_head(sock)
        assert b"Content-Type: image/jpeg" in head
        assert b"content-length" not in head.lower() and b"chunked" not in head.lower()
        sock.settimeout(1.0)
        start = time.monotonic()
        while time.monotonic() - start < 1.0:
            chunk = sock.recv(65536)
            assert chunk, "endless closed its stream"
            body += chunk
    assert body.startswith(b"\xff\xd8\xff")
    assert ENDLESS_RATE * 0.6 < len(body) < ENDLESS_RATE * 1.6  # about one second's worth


def test_soft404_and_placeholder_answer_every_path_with_200(web, sample):
    tail = image_tail(sample)
    urls = [f"{web.base_url(name)}{path}" for name in ("host6.example", "host7.example",
                                                       "host9.example")
            for path in (f"/img/{tail}", "/anything/else.jpg")]
    results = fetch(urls, web.resolve_args())
    assert all(status == 200 for status, _, _ in results)
    assert results[0][1] == results[1][1] == "text/html"
    assert b"not found" in results[0][2]
    first, second = results[2][2], results[4][2]
    assert results[2] == results[3] and results[4] == results[5]  # one picture per host
    assert first != second and results[2][1] == "image/jpeg"
    for data in (first, second):
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            assert min(image.size) >= 100
    assert {hashlib.sha256(d).hexdigest() for d in (first, second)} == web.placeholder_digests()


def test_max_open_counts_concurrent_connections(web, sample):
    name = "host10.example"
    sockets = [connect(web.host(name).address, web.port) for _ in range(5)]
    try:
        deadline = time.monotonic() + 5
        while web.stats()[name]["open"] < 5 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert web.stats()[name]["open"] == 5
    finally:
        for sock in sockets:
            sock.close()
    deadline = time.monotonic() + 5
    while web.stats()[name]["open"] and time.monotonic() < deadline:
        time.sleep(0.01)
    stats = web.stats()[name]
    assert stats["open"] == 0 and stats["max_open"] == 5 and stats["connections"] == 5
    # A client limited to 3 connections per host never has more open there.
    tail = image_tail(sample)
    urls = [f"{web.base_url(name)}/slow/0.1/{tail}?v={i}" for i in range(12)]
    assert all(r[0] == 200 for r in fetch(urls, web.resolve_args(), limit_per_host=3))
    assert web.stats()[name]["max_open"] == 5  # still the raw sockets' 5, not more
    assert web.stats()[name]["connections"] <= 5 + 3


def test_server_stops_by_itself_after_max_seconds(sample):
    hosts = [make_host(41, "alive"), make_host(42, "blackhole"), make_host(43, "trickle")]
    with serve_web.serve_web(sample, hosts, max_seconds=0.5) as handle:
        with connect(hosts[0].address, handle.port):
            pass
        time.sleep(1.0)
        for host in hosts:
            with pytest.raises(ConnectionRefusedError):
                connect(host.address, handle.port, timeout=1.0)


# --------------------------------------------------------------------------------- URL lists

def test_url_list_spreads_over_hosts_with_host_outcomes(web, sample, tmp_path):
    hosts = make_host_mix(12, seed=1)
    layout = serve_web.WebLayout(hosts, 8000)
    wnids = sorted(p.name for p in (sample / "files").iterdir())
    mix = {"404": 0.1, "duplicate": 0.1}
    expected = serve_web.build_web_url_list(sample, layout, tmp_path / "web.txt", wnids=wnids,
                                            per_path_mix=mix, seed=2)
    plain = make_sample.build_url_list(sample, "http://x", tmp_path / "plain.txt",
                                       wnids=wnids, mix=mix, seed=2)
    assert set(expected) == set(plain)
    lines = (tmp_path / "web.txt").read_text().splitlines()
    assert len(lines) == len(expected) + 3  # and three malformed lines
    per_host: Counter[str] = Counter()
    for line in lines:
        image_id, tab, url = line.partition("\t")
        if not (tab and image_id in expected):
            continue
        parts = urlsplit(url)
        host = layout.host(parts.hostname)
        assert parts.port == 8000
        per_host[host.name] += 1
        want = plain[image_id] if host.behaviour == "alive" else \
            serve_web.BEHAVIOUR_OUTCOMES[host.behaviour]
        assert expected[image_id] == want, (line, want)
    assert set(per_host) == {h.name for h in hosts}  # every host has URLs
    assert per_host.most_common(1)[0][0] == hosts[0].name  # host1 is the big one
    literal = serve_web.build_web_url_list(sample, layout, tmp_path / "ip.txt", wnids=wnids,
                                           per_path_mix=mix, seed=2, ip_literal=True)
    assert literal == expected
    assert "127.0.1." in (tmp_path / "ip.txt").read_text()


def test_url_list_urls_work_against_the_running_web(web, sample, tmp_path):
    wnids = sorted(p.name for p in (sample / "files").iterdir())[:1]
    expected = serve_web.build_web_url_list(sample, web, tmp_path / "urls.txt", wnids=wnids,
                                            per_path_mix={}, seed=0, malformed=0)
    urls = {}
    for line in (tmp_path / "urls.txt").read_text().splitlines():
        image_id, _, url = line.partition("\t")
        if expected[image_id] in ("ok", "not_image", "placeholder"):
            urls[image_id] = url
    results = fetch(list(urls.values()), web.resolve_args())
    for image_id, (status, content_type, _) in zip(urls, results, strict=True):
        assert status == 200
        assert (content_type == "text/html") == (expected[image_id] == "not_image")


# --------------------------------------------------------------------------------- subprocess

def test_subprocess_prints_layout_serves_and_reports_stats(sample):
    with serve_web_process(sample, 6, mix={"alive": 1, "refusing": 1}, max_seconds=60,
                           start_timeout=60) as child:
        assert len(child.hosts) == 6 and len(child.resolve_args()) == 6
        alive = child.hosts[0]
        url = f"{child.base_url(alive, ip_literal=True)}/img/{image_tail(sample)}"
        assert fetch([url], [])[0][0] == 200
        assert child.stats()[alive.name]["requests"] == 1
    assert child.final_stats is not None
    assert child.final_stats[alive.name]["connections"] == 1
    assert child.process.returncode == 0


def test_command_line_prints_one_json_line_and_stops_by_itself(sample):
    argv = [sys.executable, str(Path(serve_web.__file__)), "--root", str(sample),
            "--hosts", "3", "--max-seconds", "1"]
    result = subprocess.run(argv, capture_output=True, timeout=60, check=True)
    first, last = result.stdout.decode().splitlines()
    layout = serve_web.WebLayout.from_json(json.loads(first))
    assert layout.port > 0 and len(layout.hosts) == 3
    assert set(json.loads(last)["stats"]) == {h.name for h in layout.hosts}


# --------------------------------------------------------------------------- the real world

WORLD_URLS = 150  # all of OTHER_HOST_MIX's behaviours, from the 3 x 60 sample's pictures


@pytest.fixture(scope="module")
def world(sample):
    built = serve_web.build_real_world(sample, WORLD_URLS, seed=0)
    with serve_web.serve_world(built, max_seconds=300) as handle:
        yield handle


def world_urls(handle, outcome: str, behaviour: str) -> list[str]:
    kinds = {h.name: h.behaviour for h in handle.world.hosts}
    return [url.url(handle.port) for url in handle.world.urls
            if url.outcome == outcome and kinds[url.host] == behaviour and not url.https]


def dns_session(dns_address: str, timeout: float = 1.0) -> aiohttp.ClientSession:
    """A client that looks names up only in the fake DNS (c-ares, one try)."""
    resolver = AsyncResolver(nameservers=[dns_address], timeout=timeout, tries=1)
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(resolver=resolver, use_dns_cache=False),
        timeout=aiohttp.ClientTimeout(sock_connect=timeout, sock_read=timeout))


async def chain(session: aiohttp.ClientSession, url: str) -> list[tuple[int, str, str, bytes]]:
    """(status, Location or content type, URL, body) of every hop, redirects followed."""
    hops = []
    for _ in range(3):
        async with session.get(url, allow_redirects=False) as response:
            location = response.headers.get("Location", "")
            hops.append((response.status, location or response.content_type, url,
                         await response.read()))
        if response.status != 302:
            break
        url = str(response.url.join(yarl.URL(location)))
    return hops


def fetch_chains(dns_address: str, urls: list[str]) -> list[list[tuple[int, str, str, bytes]]]:
    """`chain` of each URL, one after the other, names looked up in the fake DNS."""
    async def fetch() -> list[list[tuple[int, str, str, bytes]]]:
        async with dns_session(dns_address) as session:
            return [await chain(session, url) for url in urls]
    return asyncio.run(fetch())


async def outcome_of(session: aiohttp.ClientSession, url: str, digests: set[str]) -> str:
    """What a correct client records for `url` (gather's outcome names)."""
    try:
        hops = await chain(session, url)
    except aiohttp.ClientConnectorDNSError:  # NXDOMAIN, or dropped by the fake DNS
        return "host_not_found"
    except (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError):  # refused, blackhole
        return "unreachable"
    except aiohttp.SocketTimeoutError:  # trickle
        return "timeout"
    if any("photo_unavailable" in hop[1] for hop in hops):
        return "placeholder"
    _, content_type, _, body = hops[-1]
    if not content_type.startswith("image/"):
        return "not_image"
    return "placeholder" if hashlib.sha256(body).hexdigest() in digests else "ok"


def test_world_urls_give_what_a_correct_client_records(world):
    async def crawl() -> dict[str, str]:
        digests = world.world.placeholder_digests()
        async with dns_session(world.dns.address) as session:
            found = await asyncio.gather(*(outcome_of(session, url.url(world.port), digests)
                                           for url in world.world.urls))
        return {url.id: outcome for url, outcome in zip(world.world.urls, found, strict=True)}

    expected, found = world.world.expected(), asyncio.run(crawl())
    assert [(i, found[i], outcome) for i, outcome in expected.items()
            if found[i] != outcome] == []
    assert set(Counter(expected.values())) == {"ok", "placeholder", "unreachable", "not_image",
                                               "timeout", "host_not_found"}
    for host in world.world.hosts:  # every name of the list was looked up in the fake DNS
        if host.name != serve_web.PHOTO_UNAVAILABLE_HOST:
            assert world.dns.queries(host.name) >= 1, host.name


def test_a_gone_flickr_photo_redirects_to_a_placeholder_that_is_really_served(world, sample):
    gone = world_urls(world, "placeholder", "flickr")[0]
    kept = world_urls(world, "ok", "flickr")[0]
    redirected, served = fetch_chains(world.dns.address, [gone, kept])
    assert [hop[0] for hop in redirected] == [302, 200]
    assert redirected[0][1] == (f"http://s.yimg.com:{world.port}"
                                "/pw/images/en-us/photo_unavailable.png")
    placeholder = (sample / "placeholder.png").read_bytes()
    assert redirected[1][1:] == ("image/png", redirected[0][1], placeholder)
    assert hashlib.sha256(placeholder).hexdigest() in world.world.placeholder_digests()
    match = serve_web.FLICKR_PATH.fullmatch(urlsplit(kept).path)
    picture = sample / "files" / f"n{match[1]}" / f"n{match[1]}_{match[2]}.jpg"
    assert [hop[:2] for hop in served] == [(200, "image/jpeg")]
    assert served[0][3] == picture.read_bytes()


def test_redirecting_soft404_and_placeholder_hosts_stay_on_their_host(world):
    soft404 = world_urls(world, "not_image", "soft404_redirect")[0]
    placeholder = world_urls(world, "placeholder", "placeholder_redirect")[0]
    page, picture = fetch_chains(world.dns.address, [soft404, placeholder])
    assert [hop[:2] for hop in page] == [(302, serve_web.NOTFOUND_PATH), (200, "text/html")]
    assert urlsplit(page[1][2]).hostname == urlsplit(soft404).hostname
    assert b"not found" in page[1][3]
    assert [hop[:2] for hop in picture] == [(302, serve_web.PLACEHOLDER_PATH),
                                            (200, "image/jpeg")]
    assert urlsplit(picture[1][2]).hostname == urlsplit(placeholder).hostname
    assert hashlib.sha256(picture[1][3]).hexdigest() in world.world.placeholder_digests()


def test_each_host_answers_after_its_own_latency(world):
    """Requests on an open connection (no connect, no DNS): the time to the response head is
    the host's latency, different per host."""
    served = [h for h in world.world.hosts if h.behaviour in ("alive", "soft404", "flickr")]
    slowest = max(served, key=lambda h: h.latency)
    fastest = min(served, key=lambda h: h.latency)
    assert slowest.latency - fastest.latency > 0.02
    for host in (fastest, slowest):
        with connect(host.address, world.port) as sock:
            times = []
            for _ in range(3):
                start = time.monotonic()
                send_get(sock, host.name, "/images/none.jpg")
                head, _ = read_head(sock)
                times.append(time.monotonic() - start)
                length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
                while len(_) < length:
                    _ += sock.recv(65536)
        assert host.latency * 0.95 <= sorted(times)[1] < host.latency + 0.25, (host, times)


def test_world_process_serves_its_web_and_dns_and_writes_its_files(sample, tmp_path):
    built = serve_web.build_real_world(sample, WORLD_URLS, seed=0)
    with serve_web.serve_world_process(sample, tmp_path, n_urls=WORLD_URLS,
                                       max_seconds=60) as child:
        assert child.expected() == built.expected()  # the same world, rebuilt in the child
        assert child.summary == built.summary()
        assert child.placeholder_digests() == built.placeholder_digests()
        lines = child.urls.read_text().splitlines()
        assert lines == [f"{url.id}\t{url.url(child.port)}" for url in built.urls]
        host, port = child.dns.split(":")
        farm = child.host("farm1.static.flickr.com")
        reply = DNSRecord.parse(DNSRecord.question(farm.name).send(host, int(port), timeout=2))
        assert [str(rr.rdata) for rr in reply.rr] == [farm.address]
        kept = next(url for url in built.urls if url.outcome == "ok")
        assert fetch_chains(child.dns, [kept.url(child.port)])[0][-1][0] == 200
        child.stall_dns(1.0)
        with pytest.raises(TimeoutError):
            DNSRecord.question(farm.name).send(host, int(port), timeout=0.3)
        assert child.dns_stats()["dropped"] == 1
        assert child.stats()[urlsplit(kept.url(child.port)).hostname]["requests"] == 1
    assert child.process.returncode == 0
    assert child.final is not None and child.final["dns"]["queries"] >= 3


def test_5500_hosts_start_within_seconds(picture_names, tmp_path):
    """The full-size world: one bound socket per host (RLIMIT_NOFILE raised to its hard
    limit) and its DNS, up in well under 20 s."""
    if resource.getrlimit(resource.RLIMIT_NOFILE)[1] < 8192:
        pytest.skip("the hard limit on open files is below 8192")
    start = time.monotonic()
    with serve_web.serve_world_process(picture_names, tmp_path, n_urls=20_000,
                                       max_seconds=60) as child:
        elapsed = time.monotonic() - start
        assert len(child.hosts) == 5_500 and elapsed < 20
        last_alive = [h for h in child.hosts if h.behaviour == "alive"][-1]
        with connect(last_alive.address, child.port):
            pass
        refusing = [h for h in child.hosts if h.behaviour == "refusing"][-1]
        with pytest.raises(ConnectionRefusedError):
            connect(refusing.address, child.port)
        host, port = child.dns.split(":")
        reply = DNSRecord.parse(DNSRecord.question(last_alive.name).send(host, int(port),
                                                                         timeout=2))
        assert [str(rr.rdata) for rr in reply.rr] == [last_alive.address]
