"""Simulate the real image web's mix of hosts on loopback: one address per host, one port.

On the real ImageNet list most failures are whole hosts, not single URLs: names that no longer
resolve, machines that refuse or silently drop connections, servers that answer every path
with a "not found" page or one generic picture, and a few that trickle or never stop sending.
`serve_sample.py` fakes per-URL faults on one address; this adds the per-host layer, so a
client's host health, per-host connection limit and deadlines meet what they are built for.

Every host gets its own address in 127.0.0.0/8 (Linux routes all of it to `lo`) and all share
one port, so URLs read `http://host17.example:PORT/...` and a client maps names with curl-style
`--resolve host17.example:PORT:127.0.1.17`; the IP-literal form `http://127.0.1.17:PORT/...`
reaches the same host. Linux only (other systems route only 127.0.0.1; the blackhole relies
on Linux's accept-queue behaviour). Nothing listens outside 127.0.0.0/8, and every server
stops by itself after `max_seconds`. Behaviours (one per host):

- `alive`: the `serve_sample.Mirror` application, with all its per-path faults.
- `refusing`: the address:port is bound but nothing listens: connect fails with ECONNREFUSED
  at once. (Binding keeps anybody else from listening there; connection attempts cannot be
  counted without raw sockets, so its counters are None.)
- `blackhole`: a listening socket with backlog 0 that is never accepted from, whose one queue
  slot is taken by a connection of our own at start. Linux then drops every SYN (the accept
  queue is full), so a client's connect hangs until its own timeout (the kernel would retry
  SYNs for about two minutes), exactly like a firewall that drops packets. Without that filler
  the first client would complete its handshake and then wait for a reply forever, and only
  the later ones would hang in connect. The listener counts dropped packets (`syn_drops`,
  SYN retransmissions included), so > 0 proves that somebody tried.
- `trickle`: `200 OK`, `image/jpeg`, a Content-Length of TRICKLE_LENGTH bytes (a plausible
  photo, under any sane size limit), then one byte every `trickle_every` seconds: a client
  that only bounds each read never finishes; it needs a deadline or a minimum rate.
- `endless`: `200 OK`, `image/jpeg`, no Content-Length and no chunking (the body would end at
  close, which never comes), then a JPEG header and `endless_rate` bytes per second forever,
  like a webcam's stream. Its expected outcome is `timeout` as long as the client's deadline
  times `endless_rate` stays under its size limit (`too_large` otherwise).
- `soft404`: every path answers `200 OK` with an HTML "not found" page, honestly labelled
  `text/html` (the mirror's `mislabeled` route already covers HTML served as `image/jpeg`).
- `placeholder`: every path answers `200 OK` with the same "image not found" JPEG, 320x240 and
  distinct per host (`placeholder_jpeg(name)`; `WebLayout.placeholder_digests()`).
- `resizing_placeholder`: the same picture, but resized and re-encoded per path (one of
  RESIZED_VARIANTS, chosen by the path's hash), as image CDNs do: other bytes, the same image.
  Such a CDN knows which ids it issued: a file name not shaped like one (CDN_PHOTO_ID, e.g.
  `12_w480.jpg`) gets 404, so only the repetition across URLs gives its placeholder away.
- `dns_dead`: no server and no address; named `hostN.invalid` (RFC 6761: never resolves) and
  left out of `resolve_args()`. Its URLs keep the name in IP-literal lists too. In the real
  world below it has a real-looking name that `fake_dns.py` answers as `congested`.
- `soft404_redirect`: every path but NOTFOUND_PATH is a 302 to NOTFOUND_PATH on the same host,
  which is the soft404 page.
- `placeholder_redirect`: every path but PLACEHOLDER_PATH is a 302 to PLACEHOLDER_PATH on the
  same host, which serves the host's placeholder picture.
- `flickr`: a Flickr farm. Its paths read `/<8 digits>/<num>_<10 hex>.jpg` (`flickr_path`)
  and serve the sample's `n<8 digits>/n<8 digits>_<num>.jpg`, except that a hash of the path
  sends FLICKR_UNAVAILABLE of them (`flickr_unavailable`) with a 302 to Flickr's "photo
  unavailable" picture on the `photo_unavailable` host, PHOTO_UNAVAILABLE_PATH (a URL a client
  can tell by its `photo_unavailable`; others, like img2dataset, follow it and keep the image).
- `photo_unavailable`: s.yimg.com: the sample's placeholder.png (Flickr's grey "This photo is
  no longer available") on every path.

Every host has a fixed latency, added before each answer: `HostSpec.latency`, or the server's
`latency` for hosts without one.

The real world (`build_real_world`): what the real web makes of a fall11_urls.txt today, at
the rates of the table below (REAL WEB), with real-looking names answered by a `fake_dns.py`
server (nothing in /etc/hosts: the client is told `--dns-server HOST:PORT`). Per 20,000 URLs
~5,500 hosts; 64% of the URLs on farm1..farm9.static.flickr.com (alive, 40% of their photos
gone to the placeholder); the other URLs spread Zipf-like over the other hosts (every host has
one, a few have most), of which 35% no longer resolve (`dns_dead`: NXDOMAIN, or no answer at
all under load), 15% refuse, 5% blackhole, 3% trickle, 10% soft-404 (half by a redirect), 5%
answer with one placeholder picture (half by a redirect), the rest are alive; each host takes
30-80 ms per request; a few URLs are https, to port 443 where nothing listens. Every URL that
should give an image serves a distinct sample picture (a client rightly drops a picture that
comes back for many URLs), so the sample needs about half as many pictures as URLs (9,632
for 20,000 at seed 0; an error says how many). `serve_world` runs it in threads (tests),
`serve_world_process` in a process of its own (benchmarks).

    python -m pipeline.testing.serve_web --root data/sample [--hosts 50] [--mix alive=0.6,...]
        [--seed 0] [--port 0] [--latency 0] [--trickle-every 2] [--endless-rate 16384]
        [--max-seconds 600] [--control-stdin]

prints one JSON line once every host is up, `{"port": P, "hosts": [...], "resolve": [...]}`,
and one `{"stats": {...}}` line when it stops (SIGTERM/SIGINT or --max-seconds); with
--control-stdin, each `stats` line read from stdin is answered with a stats line as well.

    python -m pipeline.testing.serve_web --root SAMPLE --world --out DIR [--urls 20000] [--hosts N]
        [--seed 0] [--dns 127.0.0.1:0] [--port 0] [--trickle-every 2] [--max-seconds 600]

serves the real world of `--urls` URLs and its DNS (`--dns 127.0.0.53:53` as root, for
programs that only use the system resolver: see fake_dns.py), writes DIR/urls.txt and
DIR/expected.tsv, and prints the same first line plus `dns` (HOST:PORT), `urls`, `expected`
(the two paths), `summary` (counts: outcomes, good URLs, hosts and URLs per behaviour) and
`placeholder_digests`; its stats lines add `"dns": {...}`, and a `stall SECONDS` line on stdin
stalls the DNS (answered `{"stalled": SECONDS}`).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import errno
import functools
import hashlib
import io
import ipaddress
import json
import os
import random
import re
import resource
import selectors
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

from aiohttp import web
from aiohttp.typedefs import Handler
from PIL import Image, ImageDraw, ImageFont

from pipeline.testing import make_sample, threads
from pipeline.testing.fake_dns import FakeDns
from pipeline.testing.serve_sample import SHUTDOWN_GRACE, Mirror, html_page

BEHAVIOURS: tuple[str, ...] = ("alive", "refusing", "blackhole", "trickle", "endless",
                               "soft404", "placeholder", "resizing_placeholder", "dns_dead",
                               "soft404_redirect", "placeholder_redirect", "flickr",
                               "photo_unavailable")
# What a correct client records for any URL on a host of that behaviour (alive and flickr:
# per path).
BEHAVIOUR_OUTCOMES: dict[str, str] = {
    "refusing": "unreachable", "dns_dead": "host_not_found", "blackhole": "unreachable",
    "trickle": "timeout", "endless": "timeout", "soft404": "not_image",
    "soft404_redirect": "not_image", "placeholder": "placeholder",
    "placeholder_redirect": "placeholder", "resizing_placeholder": "placeholder",
    "photo_unavailable": "placeholder",
}
PLACEHOLDER_BEHAVIOURS = ("placeholder", "placeholder_redirect")  # one fixed picture per host
# Shares of hosts (not of URLs: the URL list gives the few alive big hosts most URLs). Rough
# figures for a 2011 list today: a large part of the long tail is gone, DNS first.
DEFAULT_HOST_MIX: dict[str, float] = {
    "alive": 0.55, "dns_dead": 0.18, "refusing": 0.08, "blackhole": 0.05, "soft404": 0.06,
    "placeholder": 0.04, "trickle": 0.02, "endless": 0.02,
}
HOST_NETWORK = ipaddress.ip_network("127.0.0.0/8")
FIRST_ADDRESS = ipaddress.ip_address("127.0.1.0")  # host i -> 127.0.1.i for i <= 254
MAX_HOSTS = 60_000
DEFAULT_HOSTS = 50
TRICKLE_LENGTH = 500_000
DEFAULT_TRICKLE_EVERY = 2.0
DEFAULT_ENDLESS_RATE = 16 * 1024  # bytes/s: 960 KiB in a 60 s deadline, under 2 MiB limits
ENDLESS_TICK = 0.05
MAX_REQUEST_HEAD = 64 * 1024
LISTEN_BACKLOG = 1024
BIND_ATTEMPTS = 20
SO_MEMINFO = getattr(socket, "SO_MEMINFO", 55)  # Linux; index 8 of its u32 array: drops
TCP_INFO_UNACKED = 24  # offset of tcpi_unacked: a listener's accept-queue length
# SOI and a JFIF APP0 segment: what the first bytes of a real JPEG look like.
JPEG_HEAD = (b"\xff\xd8\xff\xe0\x00\x10JFIF\x00\x01\x01\x00\x00\x01\x00\x01\x00\x00"
             b"\xff\xdb\x00\x43\x00")
PLACEHOLDER_SIZE = (320, 240)
RESIZED_VARIANTS = tuple((scale, quality) for scale in (0.75, 1.0, 1.5, 2.0)
                         for quality in (70, 80, 92))  # (scale, JPEG quality)
SENTINEL_BASE = "http://sentinel.invalid:1"
NOTFOUND_PATH = "/notfound"
PLACEHOLDER_PATH = "/image_not_found.jpg"
REDIRECTS = {"soft404_redirect": NOTFOUND_PATH, "placeholder_redirect": PLACEHOLDER_PATH}
PHOTO_UNAVAILABLE_HOST = "s.yimg.com"
PHOTO_UNAVAILABLE_PATH = "/pw/images/en-us/photo_unavailable.png"
FLICKR_PATH = re.compile(r"/(\d{8})/(\d+)_([0-9a-f]{10})\.jpg")

# -------------------------------------------------------------------- REAL WEB: the rates table
# What the real web makes of ImageNet's fall11_urls.txt today; the one source of these figures.
WORLD_HOSTS_PER_URL = 5_500 / 20_000
WORLD_SYNSETS = 200
FLICKR_FARMS = 9  # farm1 .. farm9.static.flickr.com
FLICKR_URL_SHARE = 0.64  # of the URLs
FLICKR_UNAVAILABLE = 0.40  # of Flickr's paths: a 302 to the "photo unavailable" picture
HTTPS_URL_SHARE = 0.005  # of the URLs: https, to port 443 where nothing listens
HOST_LATENCY = (0.030, 0.080)  # seconds per request, fixed per host by the seed
# Shares of the hosts other than Flickr's (largest remainders, as in make_host_mix).
OTHER_HOST_MIX: dict[str, float] = {
    "dns_dead": 0.35, "refusing": 0.15, "blackhole": 0.05, "trickle": 0.03, "soft404": 0.05,
    "soft404_redirect": 0.05, "placeholder": 0.025, "placeholder_redirect": 0.025,
    "alive": 0.27,
}


# ---------------------------------------------------------------------------------- the hosts

@dataclasses.dataclass(frozen=True)
class HostSpec:
    """One simulated host: its name in URLs, what it does, its loopback address (None only
    for `dns_dead`, which has no server and no address) and its latency per request (None:
    the server's)."""

    name: str
    behaviour: str
    address: str | None
    latency: float | None = None

    def __post_init__(self) -> None:
        if self.behaviour not in BEHAVIOURS:
            raise ValueError(f"unknown behaviour {self.behaviour!r}; known: {BEHAVIOURS}")
        if (self.address is None) != (self.behaviour == "dns_dead"):
            raise ValueError(f"{self.name}: only dns_dead hosts have no address")
        if self.address is not None and ipaddress.ip_address(self.address) not in HOST_NETWORK:
            raise ValueError(f"{self.name}: {self.address} is not a loopback address")


def host_address(index: int) -> str:
    """127.0.1.1 .. 127.0.1.254 for hosts 1..254, then 127.0.2.1 and on: last octets 0 and 255
    are skipped so no address looks like a network or broadcast address."""
    if not 1 <= index <= MAX_HOSTS:
        raise ValueError(f"host index must be 1..{MAX_HOSTS}")
    block, offset = divmod(index - 1, 254)
    return str(FIRST_ADDRESS + block * 256 + offset + 1)


def make_host(index: int, behaviour: str) -> HostSpec:
    """`host<i>.example` at `host_address(i)`, or `host<i>.invalid` for dns_dead."""
    if behaviour == "dns_dead":
        return HostSpec(f"host{index}.invalid", behaviour, None)
    return HostSpec(f"host{index}.example", behaviour, host_address(index))


def make_host_mix(n_hosts: int, mix: dict[str, float] | None = None,
                  seed: int = 0) -> list[HostSpec]:
    """`n_hosts` hosts whose behaviours follow `mix` (shares, normalised) exactly, as far as
    rounding allows (largest remainders), shuffled by `seed`.

    The list order is the size rank `build_web_url_list` gives hosts (host1 gets the most
    URLs), and host1 is always alive when any host is: the real list's Flickr is up.
    """
    behaviours = behaviour_list(n_hosts, DEFAULT_HOST_MIX if mix is None else mix, seed)
    return [make_host(i, behaviour) for i, behaviour in enumerate(behaviours, 1)]


def behaviour_list(n_hosts: int, mix: dict[str, float], seed: int) -> list[str]:
    """`make_host_mix`'s behaviours in rank order: exact shares, shuffled, alive first."""
    unknown = sorted(set(mix) - set(BEHAVIOURS))
    if unknown:
        raise ValueError(f"unknown behaviours {unknown}; known: {', '.join(BEHAVIOURS)}")
    total = sum(mix.values())
    if n_hosts < 1 or total <= 0 or any(share < 0 for share in mix.values()):
        raise ValueError("need n_hosts >= 1 and non-negative shares with a positive sum")
    exact = {behaviour: n_hosts * share / total for behaviour, share in mix.items()}
    counts = {behaviour: int(value) for behaviour, value in exact.items()}
    by_remainder = sorted(exact, key=lambda b: (counts[b] - exact[b], BEHAVIOURS.index(b)))
    for behaviour in by_remainder[: n_hosts - sum(counts.values())]:
        counts[behaviour] += 1
    behaviours = [b for b in BEHAVIOURS for _ in range(counts.get(b, 0))]
    random.Random(seed).shuffle(behaviours)
    if "alive" in behaviours:
        first = behaviours.index("alive")
        behaviours[0], behaviours[first] = behaviours[first], behaviours[0]
    return behaviours


@functools.lru_cache(maxsize=4096)
def placeholder_jpeg(name: str, scale: float = 1.0, quality: int = 85) -> bytes:
    """A host's generic "image not found" picture: a real JPEG, different for every host
    (cached: the server and the world's digests both want the same few hundred)."""
    digest = hashlib.sha256(name.encode()).digest()
    image = Image.new("RGB", PLACEHOLDER_SIZE, (150 + digest[0] % 100, 150 + digest[1] % 100,
                                                150 + digest[2] % 100))
    draw = ImageDraw.Draw(image)
    draw.rectangle((20, 20, 299, 219), outline=(90, 90, 90), width=3)
    font = ImageFont.load_default(size=20)
    draw.text((160, 100), "image not found", fill=(60, 60, 60), font=font, anchor="mm")
    draw.text((160, 140), name, fill=(60, 60, 60), font=font, anchor="mm")
    if scale != 1.0:
        size = (round(PLACEHOLDER_SIZE[0] * scale), round(PLACEHOLDER_SIZE[1] * scale))
        image = image.resize(size, Image.LANCZOS)
    out = io.BytesIO()
    image.save(out, "JPEG", quality=quality)
    return out.getvalue()


# The file names a `resizing_placeholder` CDN takes for its photo ids (`12_w480.jpg`): it
# answers a lost photo with its placeholder, a name it never issued with 404.
CDN_PHOTO_ID = re.compile(r"\d+(_w\d+)?\.(jpg|jpeg|png)")


def resized_placeholder(name: str, path: str) -> bytes:
    """What a `resizing_placeholder` host answers for `path`."""
    choice = int.from_bytes(hashlib.sha256(path.encode()).digest()[:4], "big")
    return placeholder_jpeg(name, *RESIZED_VARIANTS[choice % len(RESIZED_VARIANTS)])


def flickr_path(wnid: str, num: int, secret: str) -> str:
    """The path of a Flickr farm's photo that serves the sample's `<wnid>_<num>.jpg`, shaped
    like Flickr's own (`/<server>/<photo id>_<secret>.jpg`)."""
    return f"/{wnid[1:]}/{num}_{secret}.jpg"


def flickr_unavailable(path: str) -> bool:
    """Whether a Flickr farm redirects this path to the placeholder: FLICKR_UNAVAILABLE of
    all paths, by a hash, so the world's builder knows it too."""
    digest = hashlib.sha256(f"flickr {path}".encode()).digest()
    return int.from_bytes(digest[:8], "big") < FLICKR_UNAVAILABLE * 2**64


class WebLayout:
    """Hosts and their shared port: everything a client needs to build URLs and --resolve."""

    def __init__(self, hosts: Sequence[HostSpec], port: int) -> None:
        self.hosts = tuple(hosts)
        self.port = port
        self._by_name = {host.name: host for host in self.hosts}

    def host(self, name: str) -> HostSpec:
        return self._by_name[name]

    def resolve_args(self) -> list[str]:
        """`HOST:PORT:ADDR` for every host with an address (dns_dead excluded)."""
        return [f"{h.name}:{self.port}:{h.address}" for h in self.hosts if h.address]

    def base_url(self, host: HostSpec | str, ip_literal: bool = False) -> str:
        """`http://NAME:PORT`, or `http://ADDR:PORT` with `ip_literal` (dns_dead keeps its
        name: there is no address to write)."""
        spec = self._by_name[host] if isinstance(host, str) else host
        netloc = spec.address if ip_literal and spec.address else spec.name
        return f"http://{netloc}:{self.port}"

    def placeholder_digests(self) -> set[str]:
        """sha256 hex of every placeholder host's picture (for a client's placeholder list)."""
        return {hashlib.sha256(placeholder_jpeg(h.name)).hexdigest()
                for h in self.hosts if h.behaviour in PLACEHOLDER_BEHAVIOURS}

    def to_json(self) -> dict[str, Any]:
        return {"port": self.port, "resolve": self.resolve_args(),
                "hosts": [dataclasses.asdict(host) for host in self.hosts]}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> WebLayout:
        return cls([HostSpec(**host) for host in data["hosts"]], int(data["port"]))


# --------------------------------------------------------------------------- per-host counters

class HostCounters:
    """Connections and requests of one host, read from other threads by tests, hence the lock."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.connections = 0
        self.requests = 0
        self.open = 0
        self.max_open = 0

    def opened(self) -> None:
        with self._lock:
            self.connections += 1
            self.open += 1
            self.max_open = max(self.max_open, self.open)

    def closed(self) -> None:
        with self._lock:
            self.open -= 1

    def request(self) -> None:
        with self._lock:
            self.requests += 1

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return {"connections": self.connections, "requests": self.requests,
                    "open": self.open, "max_open": self.max_open}


class _Blackhole:
    """The never-accepting listener and its queue filler; its drop counter is read by other
    threads while the loop thread may close it, hence the lock and the last value kept."""

    def __init__(self, listener: socket.socket) -> None:
        self._lock = threading.Lock()
        self._listener = listener
        self._drops = 0
        address = listener.getsockname()
        self._filler = socket.create_connection(address, timeout=5)
        deadline = time.monotonic() + 5
        while _accept_queue(listener) < 1:  # the handshake completes in the kernel, at once
            if time.monotonic() > deadline:
                raise RuntimeError(f"blackhole {address}: the filler connection never queued")
            time.sleep(0.001)

    def drops(self) -> int:
        with self._lock:
            if self._listener.fileno() >= 0:
                self._drops = _socket_drops(self._listener)
            return self._drops

    def close(self) -> None:
        self.drops()
        with self._lock:
            self._filler.close()
            self._listener.close()


def _socket_drops(sock: socket.socket) -> int:
    """Packets the kernel dropped for this socket (SO_MEMINFO's SK_MEMINFO_DROPS)."""
    try:
        return struct.unpack("9I", sock.getsockopt(socket.SOL_SOCKET, SO_MEMINFO, 36))[8]
    except OSError:
        return 0


def _accept_queue(sock: socket.socket) -> int:
    info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 104)
    return struct.unpack_from("I", info, TCP_INFO_UNACKED)[0]


# ---------------------------------------------------------------------------- the protocols

class _Counted(asyncio.Protocol):
    """aiohttp's protocol for one connection, wrapped to count the host's open connections."""

    def __init__(self, inner: asyncio.Protocol, counters: HostCounters) -> None:
        self._inner = inner
        self._counters = counters

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._counters.opened()
        self._inner.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        self._inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self._inner.eof_received()

    def pause_writing(self) -> None:
        self._inner.pause_writing()

    def resume_writing(self) -> None:
        self._inner.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        self._counters.closed()
        self._inner.connection_lost(exc)


class _Streamer(asyncio.Protocol):
    """trickle and endless: read the request head, then write from a task until the client
    goes or the server stops."""

    def __init__(self, web_: _Web, counters: HostCounters, behaviour: str,
                 latency: float) -> None:
        self._web = web_
        self._counters = counters
        self._behaviour = behaviour
        self._latency = latency
        self._head = bytearray()
        self._task: asyncio.Task[None] | None = None
        self.transport: asyncio.Transport | None = None
        self.writable = asyncio.Event()
        self.writable.set()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self._counters.opened()
        self._web.streams.add(self)

    def data_received(self, data: bytes) -> None:
        if self._task is not None:
            return  # a body or a pipelined request: never answered
        self._head += data
        if b"\r\n\r\n" in self._head:
            self._counters.request()
            self._task = asyncio.get_running_loop().create_task(self._stream())
        elif len(self._head) > MAX_REQUEST_HEAD:
            self.abort()

    def eof_received(self) -> bool:
        return self._task is not None  # a half-closed client still gets the stream

    def pause_writing(self) -> None:
        self.writable.clear()

    def resume_writing(self) -> None:
        self.writable.set()

    def connection_lost(self, exc: Exception | None) -> None:
        self._counters.closed()
        self._web.streams.discard(self)
        if self._task is not None:
            self._task.cancel()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    async def _stream(self) -> None:
        assert self.transport is not None
        if self._latency > 0:
            await asyncio.sleep(self._latency)
        if self._behaviour == "trickle":
            await self._trickle(self.transport)
        else:
            await self._endless(self.transport)

    async def _trickle(self, transport: asyncio.Transport) -> None:
        transport.write(b"HTTP/1.1 200 OK\r\nContent-Type: image/jpeg\r\n"
                        b"Content-Length: %d\r\n\r\n" % TRICKLE_LENGTH)
        body = JPEG_HEAD.ljust(TRICKLE_LENGTH, b"\0")
        for i in range(TRICKLE_LENGTH):  # 11 days at 2 s a byte: the server stops first
            await self.writable.wait()
            transport.write(body[i:i + 1])
            await asyncio.sleep(self._web.trickle_every)
        transport.close()

    async def _endless(self, transport: asyncio.Transport) -> None:
        transport.write(b"HTTP/1.1 200 OK\r\nContent-Type: image/jpeg\r\n"
                        b"Connection: close\r\n\r\n" + JPEG_HEAD)
        size = max(1, int(self._web.endless_rate * ENDLESS_TICK))
        chunk = (bytes(range(256)) * (size // 256 + 1))[:size]
        loop = asyncio.get_running_loop()
        next_tick = loop.time()
        while True:
            await self.writable.wait()
            transport.write(chunk)
            next_tick += ENDLESS_TICK
            await asyncio.sleep(max(0.0, next_tick - loop.time()))


# ------------------------------------------------------------------------------- the server

class _Web:
    """All hosts on one event loop: aiohttp for the hosts that answer HTTP (one Mirror app that
    tells hosts apart by the local address), raw protocols for trickle/endless, bare sockets
    for refusing/blackhole."""

    def __init__(self, root: Path, hosts: Sequence[HostSpec], *, latency: float = 0.0,
                 trickle_every: float = DEFAULT_TRICKLE_EVERY,
                 endless_rate: int = DEFAULT_ENDLESS_RATE,
                 max_requests: int = 1_000_000) -> None:
        names = [host.name for host in hosts]
        addresses = [host.address for host in hosts if host.address]
        if len(set(names)) != len(names) or len(set(addresses)) != len(addresses):
            raise ValueError("host names and addresses must be unique")
        if trickle_every <= 0 or endless_rate <= 0:
            raise ValueError("trickle_every and endless_rate must be positive")
        self.hosts = tuple(hosts)
        self.latency = latency
        self.trickle_every = trickle_every
        self.endless_rate = endless_rate
        self.mirror = Mirror(root, max_requests=max_requests)  # latencies: in _per_host
        self.counters = {host.name: HostCounters() for host in self.hosts}
        self.streams: set[_Streamer] = set()
        self._by_address = {host.address: host for host in self.hosts if host.address}
        self._placeholders = {host.name: placeholder_jpeg(host.name) for host in self.hosts
                              if host.behaviour in PLACEHOLDER_BEHAVIOURS}
        self._photo_unavailable = next((host.name for host in self.hosts
                                        if host.behaviour == "photo_unavailable"),
                                       PHOTO_UNAVAILABLE_HOST)
        self._blackholes: dict[str, _Blackhole] = {}
        self._reserved: list[socket.socket] = []
        self._servers: list[asyncio.Server] = []
        self._runner: web.AppRunner | None = None

    @property
    def stop(self) -> asyncio.Event:
        return self.mirror.stop

    async def start(self, port: int) -> int:
        """Bind every host on one port (retrying free ports when `port` is 0); return it."""
        chosen, sockets = _bind_all(self.hosts, port)
        loop = asyncio.get_running_loop()
        app = self.mirror.app()
        app.middlewares.insert(0, self._per_host)  # outermost: before the mirror's counting
        self._runner = web.AppRunner(app, handler_cancellation=True,
                                     shutdown_timeout=SHUTDOWN_GRACE, access_log=None)
        try:
            await self._runner.setup()
            server = self._runner.server
            assert server is not None
            for host in self.hosts:
                sock = sockets.pop(host.name, None)
                if sock is None:
                    continue
                counters = self.counters[host.name]
                if host.behaviour == "refusing":
                    self._reserved.append(sock)
                elif host.behaviour == "blackhole":
                    self._blackholes[host.name] = _Blackhole(sock)
                elif host.behaviour in ("trickle", "endless"):
                    self._servers.append(await loop.create_server(
                        lambda c=counters, h=host: _Streamer(self, c, h.behaviour,
                                                             self.latency_of(h)), sock=sock))
                else:
                    self._servers.append(await loop.create_server(
                        lambda c=counters: _Counted(server(), c), sock=sock))
        except BaseException:
            for sock in sockets.values():
                sock.close()
            await self.close()
            raise
        return chosen

    def latency_of(self, host: HostSpec) -> float:
        """Seconds `host` waits before each answer: its own, or the server's default."""
        return self.latency if host.latency is None else host.latency

    @web.middleware
    async def _per_host(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """Count the request for its host (by local address) and wait the host's latency;
        alive hosts go on to the mirror, the others answer here."""
        transport = request.transport
        sockname = transport.get_extra_info("sockname") if transport is not None else None
        host = self._by_address.get(sockname[0]) if sockname else None
        if host is None:
            return await handler(request)
        self.counters[host.name].request()
        latency = self.latency_of(host)
        if latency > 0:
            await asyncio.sleep(latency)
        if host.behaviour == "alive":
            return await handler(request)
        return self._answer(host, request, sockname[1])

    def _answer(self, host: HostSpec, request: web.Request, port: int) -> web.Response:
        """What a host that is not a mirror answers (redirects are raised)."""
        behaviour, path = host.behaviour, request.path
        if behaviour == "flickr":
            return self._flickr(path, port)
        if behaviour == "photo_unavailable":
            return web.Response(body=self.mirror.placeholder_bytes(), content_type="image/png")
        if behaviour in REDIRECTS and path != REDIRECTS[behaviour]:
            raise web.HTTPFound(REDIRECTS[behaviour])
        if behaviour in PLACEHOLDER_BEHAVIOURS:
            return web.Response(body=self._placeholders[host.name], content_type="image/jpeg")
        if behaviour == "resizing_placeholder":
            if CDN_PHOTO_ID.fullmatch(path.rpartition("/")[2]) is None:
                raise web.HTTPNotFound(text=html_page("404 Not Found"), content_type="text/html")
            return web.Response(body=resized_placeholder(host.name, path),
                                content_type="image/jpeg")
        return web.Response(text=html_page("Sorry, that page was not found"),
                            content_type="text/html")

    def _flickr(self, path: str, port: int) -> web.Response:
        if flickr_unavailable(path):
            raise web.HTTPFound(f"http://{self._photo_unavailable}:{port}"
                                f"{PHOTO_UNAVAILABLE_PATH}")
        match = FLICKR_PATH.fullmatch(path)
        if match is None:
            raise web.HTTPNotFound(text=html_page("404 Not Found"), content_type="text/html")
        wnid = f"n{match[1]}"
        return web.Response(body=self.mirror.file_bytes(wnid, f"{wnid}_{match[2]}.jpg"),
                            content_type="image/jpeg")

    async def run(self, max_seconds: float) -> None:
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self.stop.wait(), max_seconds)

    async def close(self) -> None:
        """Stop listening, cut the streams, let aiohttp finish (SHUTDOWN_GRACE), close all."""
        self.stop.set()
        for server in self._servers:
            server.close()
        for stream in list(self.streams):
            stream.abort()
        if self._runner is not None:
            await self._runner.cleanup()
        for server in self._servers:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(server.wait_closed(), SHUTDOWN_GRACE)
        for blackhole in self._blackholes.values():
            blackhole.close()
        for sock in self._reserved:
            sock.close()

    def stats(self) -> dict[str, dict[str, Any]]:
        """Per host: behaviour, connections (accepted), requests, open, max_open (the most
        connections open at once); None where a behaviour makes them unobservable; blackholes
        add syn_drops (packets dropped by the full listener, retransmissions included)."""
        stats: dict[str, dict[str, Any]] = {}
        for host in self.hosts:
            entry: dict[str, Any] = {"behaviour": host.behaviour, "address": host.address}
            if host.behaviour in ("refusing", "dns_dead"):
                entry.update(connections=None, requests=None, open=None, max_open=None)
            else:
                entry.update(self.counters[host.name].snapshot())
            blackhole = self._blackholes.get(host.name)
            if blackhole is not None:
                entry["syn_drops"] = blackhole.drops()
            stats[host.name] = entry
        return stats


def _bind_all(hosts: Sequence[HostSpec], port: int) -> tuple[int, dict[str, socket.socket]]:
    """One socket per host with an address, all on one port; a port taken on any of the
    addresses (or on the wildcard address) makes it try another when `port` is 0."""
    for _ in range(BIND_ATTEMPTS if port == 0 else 1):
        sockets: dict[str, socket.socket] = {}
        chosen = port
        try:
            for host in hosts:
                if host.address is None:
                    continue
                sock = _bind(host, chosen)
                sockets[host.name] = sock
                chosen = chosen or sock.getsockname()[1]
            return chosen, sockets
        except OSError as exc:
            for sock in sockets.values():
                sock.close()
            if port != 0 or exc.errno != errno.EADDRINUSE:
                raise
    raise OSError(errno.EADDRINUSE, f"no port free on all {len(hosts)} host addresses")


def _bind(host: HostSpec, port: int) -> socket.socket:
    assert host.address is not None
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        if host.behaviour != "refusing":
            # Not for refusing: without SO_REUSEADDR on our socket, nobody else can bind the
            # wildcard address on this port and answer in its place.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host.address, port))
        if host.behaviour == "blackhole":
            sock.listen(0)
        elif host.behaviour != "refusing":
            sock.listen(LISTEN_BACKLOG)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


# ------------------------------------------------------------------------ in a thread (tests)

class WebHandle(WebLayout):
    """What `serve_web` yields: the layout, plus live counters of the running hosts."""

    def __init__(self, hosts: Sequence[HostSpec], port: int, web_: _Web) -> None:
        super().__init__(hosts, port)
        self._web = web_

    @property
    def mirror(self) -> Mirror:
        return self._web.mirror

    def stats(self) -> dict[str, dict[str, Any]]:
        """Per-host counters (see `_Web.stats`), safe to call from any thread."""
        return self._web.stats()


@contextlib.contextmanager
def serve_web(sample_root: Path, hosts: Sequence[HostSpec], *, port: int = 0,
              latency: float = 0.0, max_seconds: float = 120,
              trickle_every: float = DEFAULT_TRICKLE_EVERY,
              endless_rate: int = DEFAULT_ENDLESS_RATE,
              max_requests: int = 1_000_000) -> Iterator[WebHandle]:
    """Run the hosts in a daemon thread with its own event loop, for tests.

    Stops by itself after `max_seconds`; on exit (exceptions included) it is stopped and the
    thread joined.
    """
    web_ = _Web(sample_root, hosts, latency=latency, trickle_every=trickle_every,
                endless_rate=endless_rate, max_requests=max_requests)

    async def run(ready: Callable[[int], None]) -> None:
        try:
            ready(await web_.start(port))
            await web_.run(max_seconds)
        finally:
            await web_.close()

    with threads.serve_in_thread("serve_web", run, web_.stop.set) as bound:
        yield WebHandle(web_.hosts, bound, web_)


# --------------------------------------------------------------------- in a process (benchmark)

class WebProcess(WebLayout):
    """What `serve_web_process` yields: the layout of a serve_web.py process, from its first
    line; `stats()` asks it over stdin; `final` (its last line) is filled in when it stops."""

    def __init__(self, ready: dict[str, Any], process: subprocess.Popen[bytes],
                 lines: _LineReader) -> None:
        layout = WebLayout.from_json(ready)
        super().__init__(layout.hosts, layout.port)
        self.process = process
        self.final: dict[str, Any] | None = None
        self._lines = lines

    @property
    def final_stats(self) -> dict[str, dict[str, Any]] | None:
        """The per-host counters it reported when it stopped."""
        return None if self.final is None else self.final["stats"]

    def ask(self, command: str, timeout: float = 10.0) -> dict[str, Any]:
        """Send one control line (`stats`, `stall SECONDS`); return the line it answers."""
        assert self.process.stdin is not None
        self.process.stdin.write(command.encode() + b"\n")
        self.process.stdin.flush()
        return json.loads(self._lines.next(timeout))

    def stats(self, timeout: float = 10.0) -> dict[str, dict[str, Any]]:
        return self.ask("stats", timeout)["stats"]


class _LineReader:
    """stdout lines of a child with a timeout (selectors; the pipe is read only here)."""

    def __init__(self, stream: Any) -> None:
        self._stream = stream

    def next(self, timeout: float) -> bytes:
        with selectors.DefaultSelector() as selector:
            selector.register(self._stream, selectors.EVENT_READ)
            if not selector.select(timeout):
                raise TimeoutError(f"serve_web.py wrote no line within {timeout:g} s")
        line = self._stream.readline()
        if not line:
            raise RuntimeError("serve_web.py exited")
        return line


@contextlib.contextmanager
def serve_web_process(sample_root: Path, n_hosts: int, *, mix: dict[str, float] | None = None,
                      seed: int = 0, port: int = 0, latency: float = 0.0,
                      max_seconds: float = 600, trickle_every: float = DEFAULT_TRICKLE_EVERY,
                      endless_rate: int = DEFAULT_ENDLESS_RATE, start_timeout: float = 60,
                      stderr: Any = None) -> Iterator[WebProcess]:
    """`make_host_mix(n_hosts, mix, seed)` served by serve_web.py in a process of its own (no
    GIL shared with the client); SIGTERM (then kill) on exit. `stderr` as for Popen."""
    argv = ["--root", str(sample_root), "--hosts", str(n_hosts), "--seed", str(seed),
            "--port", str(port), "--latency", str(latency), "--max-seconds", str(max_seconds),
            "--trickle-every", str(trickle_every), "--endless-rate", str(endless_rate)]
    if mix is not None:
        argv += ["--mix", ",".join(f"{b}={share}" for b, share in mix.items())]
    with _child(argv, WebProcess, start_timeout, stderr) as handle:
        yield handle


Handle = TypeVar("Handle", bound=WebProcess)


@contextlib.contextmanager
def _child(argv: list[str], handle_type: type[Handle], start_timeout: float,
           stderr: Any) -> Iterator[Handle]:
    """serve_web.py with `argv` and --control-stdin; its first line makes the handle."""
    process = subprocess.Popen(
        [sys.executable, "-m", "pipeline.testing.serve_web", *argv, "--control-stdin"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=stderr)
    lines = _LineReader(process.stdout)
    handle: Handle | None = None
    try:
        handle = handle_type(json.loads(lines.next(start_timeout)), process, lines)
        yield handle
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)  # once: a second one could kill it mid-exit
        if handle is not None:
            with contextlib.suppress(TimeoutError, RuntimeError, ValueError):
                handle.final = json.loads(lines.next(15))
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        for stream in (process.stdin, process.stdout):
            if stream is not None:
                stream.close()


# ------------------------------------------------------------------------------ the URL list

def build_web_url_list(sample_root: Path, web_: WebLayout, path: Path, *,
                       wnids: list[str] | None = None, per_synset: int | None = None,
                       per_path_mix: dict[str, float] | None = None, seed: int = 0,
                       ip_literal: bool = False, skew: float = 1.0,
                       malformed: int = 3) -> dict[str, str]:
    """Write a `fall11_urls.txt`-style list over the hosts of `web_`; return id -> outcome.

    The ids and per-path faults are `make_sample.build_url_list`'s (same arguments, same
    seed); each URL then goes to a host: first one URL per host (every host of a real list
    has at least one), the rest by Zipf weights 1/rank**skew in `web_.hosts` order, so a few
    big hosts get most URLs and the long tail a handful. An image and its duplicates stay on
    one host. Alive hosts keep the per-path outcome; other hosts impose BEHAVIOUR_OUTCOMES.
    Malformed lines point at the first host.
    """
    path = Path(path)
    with tempfile.TemporaryDirectory(dir=path.parent) as scratch:
        draft = Path(scratch) / "draft.txt"
        expected = make_sample.build_url_list(
            sample_root, SENTINEL_BASE, draft, wnids=wnids, per_synset=per_synset,
            mix=per_path_mix, seed=seed, malformed=malformed)
        lines = draft.read_text(encoding="utf-8").splitlines()
    groups: dict[str, list[str]] = {}  # URL of an original -> ids of it and its duplicates
    for line in lines:
        image_id, tab, url = line.partition("\t")
        if tab and image_id in expected:
            groups.setdefault(url.split("?copy=")[0], []).append(image_id)
    host_of = _spread(list(groups.values()), web_.hosts, random.Random(f"web {seed}"), skew)
    out = []
    first_base = web_.base_url(web_.hosts[0], ip_literal)
    for line in lines:
        image_id, tab, url = line.partition("\t")
        host = host_of.get(image_id) if tab else None
        if host is None:
            out.append(line.replace(SENTINEL_BASE, first_base))
            continue
        out.append(f"{image_id}\t{web_.base_url(host, ip_literal)}{url[len(SENTINEL_BASE):]}")
        if host.behaviour != "alive":
            expected[image_id] = BEHAVIOUR_OUTCOMES[host.behaviour]
    text = "".join(line + "\n" for line in out)
    if not (path.exists() and path.read_text(encoding="utf-8") == text):
        path.write_text(text, encoding="utf-8")  # unchanged: mtime kept for make chains
    return expected


def _spread(groups: list[list[str]], hosts: Sequence[HostSpec], rng: random.Random,
            skew: float) -> dict[str, HostSpec]:
    order = list(range(len(groups)))
    rng.shuffle(order)
    weights = [1 / rank ** skew for rank in range(1, len(hosts) + 1)]
    picks = list(hosts[: len(order)])
    picks += rng.choices(hosts, weights, k=len(order) - len(picks))
    return {image_id: host for index, host in zip(order, picks, strict=True)
            for image_id in groups[index]}


# ------------------------------------------------------------------------------- the real world

NAME_WORDS = (
    "pets", "garden", "photo", "travel", "bird", "auto", "art", "music", "home", "food",
    "nature", "sport", "ocean", "mountain", "city", "forest", "flower", "animal", "image",
    "pixel", "daily", "world", "sun", "moon", "star", "river", "lake", "stone", "wood", "paper",
    "shop", "market", "news", "blog", "club", "zone", "hub", "craft", "web", "digital",
    "studio", "gallery", "museum", "school", "college", "library", "science", "tech", "data",
    "cloud", "fish", "horse", "dog", "cat", "tree", "leaf", "rock", "sand", "snow", "rain",
    "wind", "fire", "gold", "silver", "red", "blue", "green", "happy", "best", "free", "top",
    "big", "little", "old", "new", "wild", "royal", "urban", "coastal", "alpine",
)
NAME_PATTERNS = ("www.{a}{b}.com", "{a}{b}.com", "images.{a}{b}.org", "www.{a}-{b}.net",
                 "img.{a}{b}.de", "www.{a}{b}.co.uk", "static.{a}{b}.com", "{a}.{b}.edu",
                 "www.{a}{b}.jp", "{a}{b}.blogspot.com")
WORLD_WNID_BASE = 1_000_000  # world synsets are n01000000, n01000001, ...


@dataclasses.dataclass(frozen=True)
class WorldUrl:
    """One line of the world's URL list, and what a correct client records for it."""

    id: str
    host: str
    path: str
    outcome: str
    https: bool = False

    def url(self, port: int) -> str:
        """https URLs name no port: 443, where nothing listens, as on a dead https site."""
        if self.https:
            return f"https://{self.host}{self.path}"
        return f"http://{self.host}:{port}{self.path}"


@dataclasses.dataclass(frozen=True)
class World:
    """The real world's hosts (in rank order: Flickr's farms, the placeholder host, then the
    others from the biggest) and its URLs. It serves nothing itself: see `serve_world`."""

    root: Path
    seed: int
    hosts: tuple[HostSpec, ...]
    urls: tuple[WorldUrl, ...]

    def dns_records(self) -> dict[str, str]:
        """fake_dns.py's table: every host's address; dead names are `congested`."""
        return {host.name: host.address or "congested" for host in self.hosts}

    def expected(self) -> dict[str, str]:
        return {url.id: url.outcome for url in self.urls}

    def placeholder_digests(self) -> set[str]:
        """sha256 hex of every placeholder picture served: the hosts' and Flickr's."""
        flickr = hashlib.sha256((self.root / "placeholder.png").read_bytes()).hexdigest()
        return WebLayout(self.hosts, 0).placeholder_digests() | {flickr}

    def write(self, folder: Path, port: int) -> tuple[Path, Path]:
        """folder/urls.txt (`<id>\\t<url>`, fall11_urls.txt's form) and folder/expected.tsv."""
        urls, expected = Path(folder) / "urls.txt", Path(folder) / "expected.tsv"
        urls.write_text("".join(f"{url.id}\t{url.url(port)}\n" for url in self.urls),
                        encoding="utf-8")
        make_sample.write_expected(expected, self.expected())
        return urls, expected

    def summary(self) -> dict[str, Any]:
        """The counts a benchmark reports: outcomes (`good` is `ok`), hosts and URLs per
        behaviour, https URLs."""
        behaviour_of = {host.name: host.behaviour for host in self.hosts}
        outcomes = Counter(url.outcome for url in self.urls)
        return {"urls": len(self.urls), "hosts": len(self.hosts), "good": outcomes["ok"],
                "outcomes": dict(outcomes),
                "hosts_by_behaviour": dict(Counter(behaviour_of.values())),
                "urls_by_behaviour": dict(Counter(behaviour_of[url.host] for url in self.urls)),
                "https_urls": sum(url.https for url in self.urls)}


def build_real_world(sample_root: Path, n_urls: int = 20_000, *, seed: int = 0,
                     n_hosts: int | None = None, synsets: int = WORLD_SYNSETS) -> World:
    """The real web's answer to an ImageNet URL list of `n_urls` lines over `synsets`
    synsets, at the rates of the REAL WEB table; `n_hosts` defaults to WORLD_HOSTS_PER_URL.

    FLICKR_URL_SHARE of the URLs go to Flickr's farms at random; every other host gets one of
    the rest, then the rest go Zipf-like by rank (`_spread`); HTTPS_URL_SHARE of the URLs, on
    alive hosts, become https. Deterministic for a sample, arguments and seed.
    """
    root = Path(sample_root)
    rng = random.Random(f"world {seed}")
    n_flickr = round(n_urls * FLICKR_URL_SHARE)
    n_other = (round(n_urls * WORLD_HOSTS_PER_URL) if n_hosts is None else n_hosts) \
        - FLICKR_FARMS - 1
    if not 1 <= n_other <= n_urls - n_flickr:
        raise ValueError(f"{n_urls} URLs need more than {FLICKR_FARMS + 1} hosts and at "
                         f"most {n_urls - n_flickr + FLICKR_FARMS + 1}")
    hosts = _world_hosts(n_other, rng)
    ids = _world_ids(n_urls, synsets)
    order = rng.sample(ids, len(ids))
    host_of = {image_id: rng.choice(hosts[:FLICKR_FARMS]) for image_id in order[:n_flickr]}
    host_of.update(_spread([[image_id] for image_id in order[n_flickr:]],
                           hosts[FLICKR_FARMS + 1:], rng, skew=1.0))
    alive = [image_id for image_id in order[n_flickr:] if host_of[image_id].behaviour == "alive"]
    https = set(alive[:round(n_urls * HTTPS_URL_SHARE)])  # `order` is already shuffled
    pictures = _Pictures(root)
    urls = tuple(_world_url(image_id, host_of[image_id], image_id in https, pictures, seed)
                 for image_id in ids)
    pictures.check()
    return World(root, seed, tuple(hosts), urls)


def world_wnid(index: int) -> str:
    """Synthetic synset ids shaped like WordNet's, apart from the sample's own."""
    return f"n{WORLD_WNID_BASE + index:08d}"


def _world_ids(n_urls: int, synsets: int) -> list[str]:
    """`<wnid>_<n>` ids, synset by synset, as many for each synset as can be."""
    if n_urls < 1 or synsets < 1:
        raise ValueError("need at least one URL and one synset")
    per, extra = divmod(n_urls, synsets)
    return [f"{world_wnid(s)}_{k}" for s in range(synsets)
            for k in range(1, per + (s < extra) + 1)]


def _world_hosts(n_other: int, rng: random.Random) -> list[HostSpec]:
    """Flickr's farms, the placeholder host, then `n_other` hosts with real-looking names and
    OTHER_HOST_MIX's behaviours (alive first, as the biggest); latencies from HOST_LATENCY."""
    named = [(f"farm{farm}.static.flickr.com", "flickr") for farm in range(1, FLICKR_FARMS + 1)]
    named.append((PHOTO_UNAVAILABLE_HOST, "photo_unavailable"))
    named += zip(_host_names(n_other, rng),
                 behaviour_list(n_other, OTHER_HOST_MIX, rng.randrange(2**32)), strict=True)
    return [HostSpec(name, behaviour,
                     None if behaviour == "dns_dead" else host_address(index),
                     round(rng.uniform(*HOST_LATENCY), 4))
            for index, (name, behaviour) in enumerate(named, 1)]


def _host_names(count: int, rng: random.Random) -> list[str]:
    """`count` distinct names like www.gardenbird.com (NAME_PATTERNS over pairs of
    NAME_WORDS: more than MAX_HOSTS of them)."""
    names: dict[str, None] = {}
    while len(names) < count:
        first, second = rng.sample(NAME_WORDS, 2)
        names.setdefault(rng.choice(NAME_PATTERNS).format(a=first, b=second))
    return list(names)


class _Pictures:
    """The sample's pictures, each handed out once: a picture served for several URLs is
    rightly taken for a placeholder (or a duplicate) by a client. Flickr's farms take JPEGs,
    the other alive hosts the next picture of any format. Past the end it hands out a
    stand-in and counts, so `check` can say how many the world needs."""

    STAND_IN = ("n00000000", "n00000000_0.jpg")

    def __init__(self, root: Path) -> None:
        self.root = root
        self._files = sorted((path.parent.name, path.name)
                             for path in (root / "files").glob("*/*"))
        self._used: set[int] = set()
        self._cursor = {True: 0, False: 0}  # by "JPEG only": the first maybe unused file
        self._taken = Counter[bool]()
        self._missing = 0

    def peek(self, jpeg: bool) -> tuple[str, str]:
        """The picture `take` would hand out next: (wnid, file name)."""
        index = self._next(jpeg)
        return self._files[index] if index < len(self._files) else self.STAND_IN

    def take(self, jpeg: bool) -> tuple[str, str]:
        picture, index = self.peek(jpeg), self._next(jpeg)
        self._taken[jpeg] += 1
        if index < len(self._files):
            self._used.add(index)
        else:
            self._missing += 1
        return picture

    def _next(self, jpeg: bool) -> int:
        index = self._cursor[jpeg]
        while index < len(self._files) and (
                index in self._used or (jpeg and not self._files[index][1].endswith(".jpg"))):
            index += 1
        self._cursor[jpeg] = index
        return index

    def check(self) -> None:
        if not self._missing:
            return
        jpegs = sum(name.endswith(".jpg") for _, name in self._files)
        raise ValueError(
            f"{self.root} has {len(self._files)} pictures ({jpegs} JPEGs); this world serves "
            f"{sum(self._taken.values())} distinct ones, {self._taken[True]} of them JPEGs for "
            "Flickr: make a bigger sample (make_sample.py --per-class)")


def _world_url(image_id: str, host: HostSpec, https: bool, pictures: _Pictures,
               seed: int) -> WorldUrl:
    """The URL of `image_id` on `host`: hosts that serve photos get a picture of their own,
    the others (and https URLs) a path they never look at."""
    if https or host.behaviour not in ("flickr", "alive"):
        outcome = "unreachable" if https else BEHAVIOUR_OUTCOMES[host.behaviour]
        return WorldUrl(image_id, host.name, f"/images/{image_id}.jpg", outcome, https)
    if host.behaviour == "alive":
        wnid, name = pictures.take(jpeg=False)
        return WorldUrl(image_id, host.name, f"/img/{wnid}/{name}", "ok")
    wnid, name = pictures.peek(jpeg=True)
    secret = hashlib.sha256(f"{seed} {image_id}".encode()).hexdigest()[:10]
    path = flickr_path(wnid, int(name[len(wnid) + 1:-len(".jpg")]), secret)
    if flickr_unavailable(path):
        return WorldUrl(image_id, host.name, path, "placeholder")  # the picture stays unused
    pictures.take(jpeg=True)
    return WorldUrl(image_id, host.name, path, "ok")


# --------------------------------------------------------------------- serving the real world

@dataclasses.dataclass(frozen=True)
class WorldHandle:
    """What `serve_world` yields: the world, its running hosts (counters) and its DNS."""

    world: World
    web: WebHandle
    dns: FakeDns

    @property
    def port(self) -> int:
        return self.web.port

    def write(self, folder: Path) -> tuple[Path, Path]:
        """urls.txt and expected.tsv in `folder` (see `World.write`)."""
        return self.world.write(folder, self.port)


@contextlib.contextmanager
def serve_world(world: World, *, dns: str = "127.0.0.1:0", port: int = 0,
                max_seconds: float = 120, trickle_every: float = DEFAULT_TRICKLE_EVERY
                ) -> Iterator[WorldHandle]:
    """The world's hosts (`serve_web`) and DNS (`FakeDns` on `dns`), each in a thread, for
    tests; both stop on exit and after `max_seconds`."""
    with FakeDns(world.dns_records(), address=dns, seed=world.seed,
                 max_seconds=max_seconds) as dns_server, \
            serve_web(world.root, world.hosts, port=port, max_seconds=max_seconds,
                      trickle_every=trickle_every) as web_:
        yield WorldHandle(world, web_, dns_server)


class WorldProcess(WebProcess):
    """What `serve_world_process` yields: a WebProcess, plus the world's DNS address, files,
    summary and placeholder digests (all from the process's first line)."""

    def __init__(self, ready: dict[str, Any], process: subprocess.Popen[bytes],
                 lines: _LineReader) -> None:
        super().__init__(ready, process, lines)
        self.dns: str = ready["dns"]
        self.urls = Path(ready["urls"])
        self.expected_path = Path(ready["expected"])
        self.summary: dict[str, Any] = ready["summary"]
        self._digests = set(ready["placeholder_digests"])

    def placeholder_digests(self) -> set[str]:
        """The hosts' placeholder pictures and Flickr's."""
        return set(self._digests)

    def expected(self) -> dict[str, str]:
        """id -> what a correct client records (expected.tsv)."""
        return make_sample.read_expected(self.expected_path)

    def dns_stats(self, timeout: float = 10.0) -> dict[str, Any]:
        return self.ask("stats", timeout)["dns"]

    def stall_dns(self, seconds: float) -> None:
        """Make the DNS drop every query for `seconds` from now."""
        self.ask(f"stall {seconds}")


@contextlib.contextmanager
def serve_world_process(sample_root: Path, out: Path, *, n_urls: int = 20_000, seed: int = 0,
                        n_hosts: int | None = None, dns: str = "127.0.0.1:0", port: int = 0,
                        max_seconds: float = 600, trickle_every: float = DEFAULT_TRICKLE_EVERY,
                        start_timeout: float = 120, stderr: Any = None
                        ) -> Iterator[WorldProcess]:
    """`build_real_world(sample_root, n_urls, seed=seed, n_hosts=n_hosts)` served with its
    DNS by serve_web.py in a process of its own, which writes out/urls.txt and
    out/expected.tsv; SIGTERM (then kill) on exit. `stderr` as for Popen."""
    argv = ["--root", str(sample_root), "--world", "--out", str(out), "--urls", str(n_urls),
            "--seed", str(seed), "--dns", dns, "--port", str(port),
            "--max-seconds", str(max_seconds), "--trickle-every", str(trickle_every)]
    if n_hosts is not None:
        argv += ["--hosts", str(n_hosts)]
    with _child(argv, WorldProcess, start_timeout, stderr) as handle:
        yield handle


# ------------------------------------------------------------------------------------- main

def parse_mix(text: str) -> dict[str, float]:
    """`alive=0.6,refusing=0.1` -> {"alive": 0.6, "refusing": 0.1}."""
    mix: dict[str, float] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        behaviour, _, share = part.partition("=")
        if behaviour not in BEHAVIOURS:
            raise ValueError(f"unknown behaviour {behaviour!r}; known: {', '.join(BEHAVIOURS)}")
        mix[behaviour] = float(share)
    return mix


def main(argv: list[str] | None = None) -> int:
    parser = _arguments()
    args = parser.parse_args(argv)
    if args.world and (args.out is None or args.mix is not None):
        parser.error("--world needs --out and has its own mix (no --mix)")
    with contextlib.ExitStack() as stack:
        try:
            session = _session(args, stack)
        except (ValueError, OSError) as exc:
            print(f"serve_web: {exc}", file=sys.stderr)
            return 2
        _raise_file_limit()
        asyncio.run(_serve_until_signalled(session, args.port, args.max_seconds,
                                           args.control_stdin))
    return 0


def _arguments() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", type=Path, required=True, help="a make_sample.py directory")
    parser.add_argument("--hosts", type=int,
                        help=f"number of simulated hosts ({DEFAULT_HOSTS}; --world: from --urls)")
    parser.add_argument("--mix", type=parse_mix, help="shares per behaviour, b=share,...")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--port", type=int, default=0, help="0 picks one free on every host")
    parser.add_argument("--latency", type=float, default=0.0,
                        help="seconds added per request (--world: each host has its own)")
    parser.add_argument("--trickle-every", type=float, default=DEFAULT_TRICKLE_EVERY)
    parser.add_argument("--endless-rate", type=int, default=DEFAULT_ENDLESS_RATE)
    parser.add_argument("--max-seconds", type=float, default=600.0)
    parser.add_argument("--max-requests", type=int, default=10**8)
    parser.add_argument("--control-stdin", action="store_true",
                        help="answer each `stats` line on stdin with a stats line")
    parser.add_argument("--world", action="store_true", help="serve build_real_world's world")
    parser.add_argument("--urls", type=int, default=20_000, help="--world: URLs in its list")
    parser.add_argument("--out", type=Path, help="--world: where urls.txt and expected.tsv go")
    parser.add_argument("--dns", default="127.0.0.1:0",
                        help="--world: the DNS's HOST:PORT (127.0.0.53:53 as root)")
    return parser


def _session(args: argparse.Namespace, stack: contextlib.ExitStack) -> _Session:
    """The hosts to serve, and for --world its DNS, started (its port is in the first line)."""
    world = build_real_world(args.root, args.urls, seed=args.seed, n_hosts=args.hosts) \
        if args.world else None
    hosts = world.hosts if world else make_host_mix(args.hosts or DEFAULT_HOSTS, args.mix,
                                                    args.seed)
    web_ = _Web(args.root, hosts, latency=args.latency, trickle_every=args.trickle_every,
                endless_rate=args.endless_rate, max_requests=args.max_requests)
    if world is None:
        return _Session(web_)
    args.out.mkdir(parents=True, exist_ok=True)
    dns = stack.enter_context(FakeDns(world.dns_records(), address=args.dns, seed=args.seed,
                                      max_seconds=args.max_seconds))
    return _WorldSession(web_, world, dns, args.out)


class _Session:
    """What the command serves and says: the hosts' layout and counters."""

    def __init__(self, web_: _Web) -> None:
        self.web = web_

    def ready(self, port: int) -> dict[str, Any]:
        """The first line, once every host is up."""
        return WebLayout(self.web.hosts, port).to_json()

    def stats(self) -> dict[str, Any]:
        return {"stats": self.web.stats()}

    def command(self, line: str) -> dict[str, Any] | None:
        """The answer to a control line from stdin; None (no answer) for unknown lines."""
        return self.stats() if line == "stats" else None


class _WorldSession(_Session):
    """The real world adds its DNS (stats, `stall SECONDS`) and its files."""

    def __init__(self, web_: _Web, world: World, dns: FakeDns, out: Path) -> None:
        super().__init__(web_)
        self.world = world
        self.dns = dns
        self.out = out

    def ready(self, port: int) -> dict[str, Any]:
        urls, expected = self.world.write(self.out, port)
        return {**super().ready(port), "dns": self.dns.address, "urls": str(urls),
                "expected": str(expected), "summary": self.world.summary(),
                "placeholder_digests": sorted(self.world.placeholder_digests())}

    def stats(self) -> dict[str, Any]:
        return {**super().stats(), "dns": self.dns.stats()}

    def command(self, line: str) -> dict[str, Any] | None:
        verb, _, seconds = line.partition(" ")
        if verb != "stall":
            return super().command(line)
        try:
            self.dns.stall(float(seconds))
        except ValueError:
            return {"error": f"stall {seconds!r}: expected a number of seconds"}
        return {"stalled": float(seconds)}


def _raise_file_limit() -> None:
    """One listening socket per host plus every client connection: lift the soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def _emit(data: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(data) + "\n")
    sys.stdout.flush()


async def _serve_until_signalled(session: _Session, port: int, max_seconds: float,
                                 control_stdin: bool) -> None:
    web_ = session.web
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, web_.stop.set)
    try:
        chosen = await web_.start(port)
        if control_stdin:
            _watch_stdin(loop, session)
        _emit(session.ready(chosen))
        await web_.run(max_seconds)
    finally:
        await web_.close()
        _emit(session.stats())


def _watch_stdin(loop: asyncio.AbstractEventLoop, session: _Session) -> None:
    """Control lines get an answer line back; end of input is ignored (max-seconds still
    holds)."""
    fd = sys.stdin.fileno()
    os.set_blocking(fd, False)
    pending = bytearray()

    def readable() -> None:
        try:
            data = os.read(fd, 4096)
        except BlockingIOError:
            return
        if not data:
            loop.remove_reader(fd)
            return
        pending.extend(data)
        while b"\n" in pending:
            line, _, rest = bytes(pending).partition(b"\n")
            pending[:] = rest
            answer = session.command(line.decode(errors="replace").strip())
            if answer is not None:
                _emit(answer)

    loop.add_reader(fd, readable)


if __name__ == "__main__":
    sys.exit(main())
