#!/usr/bin/env python3
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
- `dns_dead`: no server and no address; named `hostN.invalid` (RFC 6761: never resolves) and
  left out of `resolve_args()`. Its URLs keep the name in IP-literal lists too.

    python scripts/serve_web.py --root data/sample [--hosts 50] [--mix alive=0.6,refusing=0.1]
        [--seed 0] [--port 0] [--latency 0] [--trickle-every 2] [--endless-rate 16384]
        [--max-seconds 600] [--control-stdin]

prints one JSON line once every host is up, `{"port": P, "hosts": [...], "resolve": [...]}`,
and one `{"stats": {...}}` line when it stops (SIGTERM/SIGINT or --max-seconds); with
--control-stdin, each `stats` line read from stdin is answered with a stats line as well.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import errno
import hashlib
import io
import ipaddress
import json
import os
import random
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
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiohttp import web
from aiohttp.typedefs import Handler
from PIL import Image, ImageDraw, ImageFont

import make_sample
from serve_sample import SHUTDOWN_GRACE, Mirror, html_page

BEHAVIOURS: tuple[str, ...] = ("alive", "refusing", "blackhole", "trickle", "endless",
                               "soft404", "placeholder", "resizing_placeholder", "dns_dead")
# What a correct client records for any URL on a host of that behaviour (alive: per path).
BEHAVIOUR_OUTCOMES: dict[str, str] = {
    "refusing": "unreachable", "dns_dead": "unreachable", "blackhole": "unreachable",
    "trickle": "timeout", "endless": "timeout", "soft404": "not_image",
    "placeholder": "placeholder", "resizing_placeholder": "placeholder",
}
# Shares of hosts (not of URLs: the URL list gives the few alive big hosts most URLs). Rough
# figures for a 2011 list today: a large part of the long tail is gone, DNS first.
DEFAULT_HOST_MIX: dict[str, float] = {
    "alive": 0.55, "dns_dead": 0.18, "refusing": 0.08, "blackhole": 0.05, "soft404": 0.06,
    "placeholder": 0.04, "trickle": 0.02, "endless": 0.02,
}
HOST_NETWORK = ipaddress.ip_network("127.0.0.0/8")
FIRST_ADDRESS = ipaddress.ip_address("127.0.1.0")  # host i -> 127.0.1.i for i <= 254
MAX_HOSTS = 60_000
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


# ---------------------------------------------------------------------------------- the hosts

@dataclass(frozen=True)
class HostSpec:
    """One simulated host: its name in URLs, what it does, and its loopback address
    (None only for `dns_dead`, which has no server and no address)."""

    name: str
    behaviour: str
    address: str | None

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
    mix = DEFAULT_HOST_MIX if mix is None else mix
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
    return [make_host(i, behaviour) for i, behaviour in enumerate(behaviours, 1)]


def placeholder_jpeg(name: str, scale: float = 1.0, quality: int = 85) -> bytes:
    """A host's generic "image not found" picture: a real JPEG, different for every host."""
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


def resized_placeholder(name: str, path: str) -> bytes:
    """What a `resizing_placeholder` host answers for `path`."""
    choice = int.from_bytes(hashlib.sha256(path.encode()).digest()[:4], "big")
    return placeholder_jpeg(name, *RESIZED_VARIANTS[choice % len(RESIZED_VARIANTS)])


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
                for h in self.hosts if h.behaviour == "placeholder"}

    def to_json(self) -> dict[str, Any]:
        return {"port": self.port, "resolve": self.resolve_args(),
                "hosts": [{"name": h.name, "behaviour": h.behaviour, "address": h.address}
                          for h in self.hosts]}

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

    def __init__(self, web_: _Web, counters: HostCounters, behaviour: str) -> None:
        self._web = web_
        self._counters = counters
        self._behaviour = behaviour
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
        if self._web.latency > 0:
            await asyncio.sleep(self._web.latency)
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
    """All hosts on one event loop: aiohttp for alive/soft404/placeholder (one Mirror app that
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
        self.mirror = Mirror(root, latency=latency, max_requests=max_requests)
        self.counters = {host.name: HostCounters() for host in self.hosts}
        self.streams: set[_Streamer] = set()
        self._by_address = {host.address: host for host in self.hosts if host.address}
        self._placeholders = {host.name: placeholder_jpeg(host.name) for host in self.hosts
                              if host.behaviour == "placeholder"}
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
                        lambda c=counters, b=host.behaviour: _Streamer(self, c, b), sock=sock))
                else:
                    self._servers.append(await loop.create_server(
                        lambda c=counters: _Counted(server(), c), sock=sock))
        except BaseException:
            for sock in sockets.values():
                sock.close()
            await self.close()
            raise
        return chosen

    @web.middleware
    async def _per_host(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """Count the request for its host (by local address); soft404 and placeholder hosts
        answer here, alive ones go on to the mirror."""
        transport = request.transport
        sockname = transport.get_extra_info("sockname") if transport is not None else None
        host = self._by_address.get(sockname[0]) if sockname else None
        if host is None:
            return await handler(request)
        self.counters[host.name].request()
        if host.behaviour == "alive":
            return await handler(request)
        if self.latency > 0:
            await asyncio.sleep(self.latency)
        if host.behaviour == "placeholder":
            return web.Response(body=self._placeholders[host.name], content_type="image/jpeg")
        if host.behaviour == "resizing_placeholder":
            return web.Response(body=resized_placeholder(host.name, request.path),
                                content_type="image/jpeg")
        return web.Response(text=html_page("Sorry, that page was not found"),
                            content_type="text/html")

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
    started = threading.Event()
    state: dict[str, Any] = {}

    async def main() -> None:
        try:
            state["port"] = await web_.start(port)
            state["loop"] = asyncio.get_running_loop()
        finally:
            started.set()
        try:
            await web_.run(max_seconds)
        finally:
            await web_.close()

    def run() -> None:
        try:
            asyncio.run(main())
        except Exception as exc:  # handed to the caller below
            state["error"] = exc
        finally:
            started.set()

    thread = threading.Thread(target=run, name="serve_web", daemon=True)
    thread.start()
    started.wait()
    if "loop" not in state:
        thread.join()
        raise RuntimeError("the simulated web did not start") from state.get("error")
    try:
        yield WebHandle(web_.hosts, state["port"], web_)
    finally:
        with contextlib.suppress(RuntimeError):  # the loop already ended (max_seconds)
            state["loop"].call_soon_threadsafe(web_.stop.set)
        thread.join(timeout=30)
        if thread.is_alive():
            raise RuntimeError("the simulated web did not stop within 30 s")


# --------------------------------------------------------------------- in a process (benchmark)

class WebProcess(WebLayout):
    """What `serve_web_process` yields: the layout of a serve_web.py process; `stats()` asks
    it over stdin; `final_stats` is filled in when it stops."""

    def __init__(self, layout: WebLayout, process: subprocess.Popen[bytes],
                 lines: _LineReader) -> None:
        super().__init__(layout.hosts, layout.port)
        self.process = process
        self.final_stats: dict[str, dict[str, Any]] | None = None
        self._lines = lines

    def stats(self, timeout: float = 10.0) -> dict[str, dict[str, Any]]:
        assert self.process.stdin is not None
        self.process.stdin.write(b"stats\n")
        self.process.stdin.flush()
        return json.loads(self._lines.next(timeout))["stats"]


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
    argv = [sys.executable, str(Path(__file__).resolve()), "--root", str(sample_root),
            "--hosts", str(n_hosts), "--seed", str(seed), "--port", str(port),
            "--latency", str(latency), "--max-seconds", str(max_seconds),
            "--trickle-every", str(trickle_every), "--endless-rate", str(endless_rate),
            "--control-stdin"]
    if mix is not None:
        argv += ["--mix", ",".join(f"{b}={share}" for b, share in mix.items())]
    process = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                               stderr=stderr)
    lines = _LineReader(process.stdout)
    handle: WebProcess | None = None
    try:
        handle = WebProcess(WebLayout.from_json(json.loads(lines.next(start_timeout))),
                            process, lines)
        yield handle
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)  # once: a second one could kill it mid-exit
        if handle is not None:
            with contextlib.suppress(TimeoutError, RuntimeError, ValueError, KeyError):
                handle.final_stats = json.loads(lines.next(15))["stats"]
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
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", type=Path, required=True, help="a make_sample.py directory")
    parser.add_argument("--hosts", type=int, default=50, help="number of simulated hosts")
    parser.add_argument("--mix", type=parse_mix, help="shares per behaviour, b=share,...")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--port", type=int, default=0, help="0 picks one free on every host")
    parser.add_argument("--latency", type=float, default=0.0, help="seconds added per request")
    parser.add_argument("--trickle-every", type=float, default=DEFAULT_TRICKLE_EVERY)
    parser.add_argument("--endless-rate", type=int, default=DEFAULT_ENDLESS_RATE)
    parser.add_argument("--max-seconds", type=float, default=600.0)
    parser.add_argument("--max-requests", type=int, default=10**8)
    parser.add_argument("--control-stdin", action="store_true",
                        help="answer each `stats` line on stdin with a stats line")
    args = parser.parse_args(argv)
    try:
        hosts = make_host_mix(args.hosts, args.mix, args.seed)
        web_ = _Web(args.root, hosts, latency=args.latency, trickle_every=args.trickle_every,
                    endless_rate=args.endless_rate, max_requests=args.max_requests)
    except (ValueError, FileNotFoundError) as exc:
        print(f"serve_web: {exc}", file=sys.stderr)
        return 2
    _raise_file_limit()
    asyncio.run(_serve_until_signalled(web_, args.port, args.max_seconds, args.control_stdin))
    return 0


def _raise_file_limit() -> None:
    """One listening socket per host plus every client connection: lift the soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def _emit(data: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(data) + "\n")
    sys.stdout.flush()


async def _serve_until_signalled(web_: _Web, port: int, max_seconds: float,
                                 control_stdin: bool) -> None:
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, web_.stop.set)
    try:
        chosen = await web_.start(port)
        if control_stdin:
            _watch_stdin(loop, web_)
        _emit(WebLayout(web_.hosts, chosen).to_json())
        await web_.run(max_seconds)
    finally:
        await web_.close()
        _emit({"stats": web_.stats()})


def _watch_stdin(loop: asyncio.AbstractEventLoop, web_: _Web) -> None:
    """`stats` lines get a stats line back; end of input is ignored (max-seconds still holds)."""
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
            if line.strip() == b"stats":
                _emit({"stats": web_.stats()})

    loop.add_reader(fd, readable)


if __name__ == "__main__":
    sys.exit(main())
