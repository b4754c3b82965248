"""A fake DNS server on loopback that answers the way the real web's names get answered.

`serve_web.py`'s realistic world uses real-looking names (farm3.static.flickr.com,
www.<word>.com), so a client has to look them up; a third of the hosts behind a 2011 URL list
no longer resolve, and how a resolver fails them shapes a downloader's run: most come back
NXDOMAIN within milliseconds, but with many lookups in flight some get no answer at all and
cost the client its whole resolver timeout. This server answers every name from a table
(nothing in /etc/hosts, nothing forwarded anywhere), over UDP and TCP, on one loopback address
and port (`127.0.0.1:0` picks a free high port; port 53 needs root). A name maps to:

- an IPv4 address (loopback only, so a client told to use this server never leaves the
  machine): an A record (TTL `TTL`); any other query type, AAAA included, gets an empty
  NOERROR answer, as a v4-only name does;
- `nxdomain`: NXDOMAIN at once;
- `slow`: never answered (the query is dropped: the client's timeout runs out);
- `congested`, the realistic dead name: NXDOMAIN, except that a query is dropped with a
  probability that grows with the crowd, the queries (any name, any type) this server received
  in the last CONGESTION_WINDOW seconds, this one included. Alone (crowd 1) it is never
  dropped; from crowd 2 (a getaddrinfo's A and AAAA) to CROWDED the probability rises
  linearly from DROP_ALONE to DROP_CROWDED, and stays there above (`drop_probability`). The
  draw is a hash of (seed, name, type, how many times that name and type were asked before),
  so it is deterministic given the seed and each name's query order, and a retransmission is
  a fresh draw: a dropped name asked again is dropped again only with the same probability.

Unknown names get NXDOMAIN. `stall(seconds)` drops every query for that long (a resolver that
stopped answering); answers resume after it, so clients that retransmit recover. Counters:
queries per name and type, total, answered, dropped and malformed (`FakeDns.stats()`).

In a thread (tests), stopped on exit and after `max_seconds` in any case:

    with FakeDns({"www.example.com": "127.0.1.1", "gone.example": "congested"}) as dns:
        dns.address            # "127.0.0.1:PORT"; give it to the client (--dns-server)
        dns.queries("gone.example", "A")

As a command (prints `{"dns": "HOST:PORT"}` once listening, `{"stats": {...}}` when it stops
on SIGTERM/SIGINT or --max-seconds):

    python -m pipeline.testing.fake_dns [--address 127.0.0.1:0] [--seed 0] [--max-seconds 600]
                               [--map NAME=ADDRESS|KIND ...] [--records FILE.json]

Programs that use the system resolver (glibc's getaddrinfo, e.g. img2dataset) can only be
pointed at port 53, through resolv.conf. As root, serve on 127.0.0.53:53 and give the program
a resolv.conf of its own in a private mount namespace, which leaves the machine's untouched:

    printf 'nameserver 127.0.0.53\\noptions timeout:2 attempts:2\\n' > /tmp/resolv.conf
    unshare -m sh -c 'mount --bind /tmp/resolv.conf /etc/resolv.conf && exec PROGRAM ...'

(checked here: `python -c "import socket; print(socket.getaddrinfo(NAME, 80))"` run that way
gets the table's address, and the server counts its A and AAAA queries; `/etc/nsswitch.conf`
must have `dns` on its hosts line, as it does by default).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import errno
import hashlib
import ipaddress
import json
import signal
import socket
import struct
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any, cast

from dnslib import QTYPE, RCODE, RR, A, DNSError, DNSRecord

from pipeline.testing import threads

DNS_KINDS: tuple[str, ...] = ("nxdomain", "slow", "congested")
TTL = 300
# The congested rule (see the module docstring): the crowd is counted over this window.
CONGESTION_WINDOW = 0.1  # seconds
DROP_ALONE = 0.05  # drop probability at a crowd of 2
DROP_CROWDED = 0.25  # ... at a crowd of CROWDED or more
CROWDED = 40
BIND_ATTEMPTS = 20
UDP_BUFFER = 4 * 2**20
LOOPBACK = ipaddress.ip_network("127.0.0.0/8")


def drop_probability(crowd: int) -> float:
    """How likely a congested name's query is dropped among `crowd` recent queries."""
    if crowd <= 1:
        return 0.0
    rise = (min(crowd, CROWDED) - 2) / (CROWDED - 2)
    return DROP_ALONE + (DROP_CROWDED - DROP_ALONE) * rise


def draw(seed: int, name: str, qtype: int, asked_before: int) -> float:
    """The congested rule's uniform draw in [0, 1) for one query: a hash, not a generator, so
    it does not depend on the other names' queries."""
    digest = hashlib.sha256(f"{seed}\0{name}\0{qtype}\0{asked_before}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def normalise(name: str) -> str:
    """Names compare case-insensitively (resolvers may mix the case) and without the root dot."""
    return name.rstrip(".").lower()


def parse_address(text: str) -> tuple[str, int]:
    """`HOST:PORT` on loopback -> (host, port)."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or int(port) > 65535:
        raise ValueError(f"{text!r}: expected HOST:PORT, e.g. 127.0.0.1:0")
    if ipaddress.ip_address(host) not in LOOPBACK:
        raise ValueError(f"{text!r}: the fake DNS serves on 127.0.0.0/8 only")
    return host, int(port)


def _check_value(name: str, value: str) -> None:
    if value in DNS_KINDS:
        return
    try:
        address = ipaddress.IPv4Address(value)
    except ValueError:
        raise ValueError(f"{name}: {value!r} is neither an IPv4 address nor one of "
                         f"{', '.join(DNS_KINDS)}") from None
    if address not in LOOPBACK:
        raise ValueError(f"{name}: {value} is not a loopback address")


class Zone:
    """The table, the congested rule, the stall and the counters; no sockets, so it can be
    driven with a made-up clock. The server's loop thread answers while tests read the
    counters and stall it from theirs, hence the lock."""

    def __init__(self, records: Mapping[str, str], *, seed: int = 0,
                 window: float = CONGESTION_WINDOW) -> None:
        for name, value in records.items():
            _check_value(name, value)
        self.seed = seed
        self.window = window
        self._records = {normalise(name): value for name, value in records.items()}
        self._lock = threading.Lock()
        self._recent: collections.deque[float] = collections.deque()
        self._asked: Counter[tuple[str, int]] = Counter()
        self._stalled_until = float("-inf")
        self._answered = self._dropped = self._malformed = 0

    def stall(self, seconds: float, now: float) -> None:
        """Drop every query received from `now` for `seconds`."""
        with self._lock:
            self._stalled_until = now + seconds

    def answer(self, data: bytes, now: float) -> bytes | None:
        """The reply to one query packet received at `now`, or None to drop it."""
        try:
            request = DNSRecord.parse(data)
        except DNSError:
            request = None
        if request is None or not request.questions or request.header.qr:
            with self._lock:
                self._malformed += 1
            return None
        name, qtype = normalise(str(request.q.qname)), request.q.qtype
        if not self.admit(name, qtype, now):
            return None
        return self._reply(request, name, qtype).pack()

    def admit(self, name: str, qtype: int, now: float) -> bool:
        """Count a query for `name` (normalised) of type `qtype` received at `now`; whether it
        is answered (the stall, `slow` and the congested rule drop it otherwise)."""
        with self._lock:
            crowd = self._crowd(now)
            asked_before = self._asked[(name, qtype)]
            self._asked[(name, qtype)] += 1
            if now < self._stalled_until or self._drops(name, qtype, asked_before, crowd):
                self._dropped += 1
                return False
            self._answered += 1
            return True

    def _crowd(self, now: float) -> int:
        self._recent.append(now)
        while self._recent[0] <= now - self.window:
            self._recent.popleft()
        return len(self._recent)

    def _drops(self, name: str, qtype: int, asked_before: int, crowd: int) -> bool:
        kind = self._records.get(name)
        if kind == "slow":
            return True
        return (kind == "congested"
                and draw(self.seed, name, qtype, asked_before) < drop_probability(crowd))

    def _reply(self, request: DNSRecord, name: str, qtype: int) -> DNSRecord:
        reply = request.reply()
        value = self._records.get(name)
        if value is None or value in DNS_KINDS:
            reply.header.rcode = RCODE.NXDOMAIN
        elif qtype == QTYPE.A:
            reply.add_answer(RR(request.q.qname, QTYPE.A, rdata=A(value), ttl=TTL))
        return reply

    def queries(self, name: str, qtype: str | None = None) -> int:
        """Queries received for `name` (of type `qtype`, e.g. "A", when given)."""
        name = normalise(name)
        with self._lock:
            return sum(count for (asked, kind), count in self._asked.items()
                       if asked == name and (qtype is None or QTYPE[kind] == qtype))

    def stats(self) -> dict[str, Any]:
        """Totals and queries per name (all types together)."""
        with self._lock:
            by_name: Counter[str] = Counter()
            for (name, _), count in self._asked.items():
                by_name[name] += count
            return {"queries": self._answered + self._dropped, "answered": self._answered,
                    "dropped": self._dropped, "malformed": self._malformed,
                    "by_name": dict(by_name)}


# ---------------------------------------------------------------------------------- the server

class _Udp(asyncio.DatagramProtocol):
    def __init__(self, zone: Zone) -> None:
        self._zone = zone
        self._transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A DatagramTransport in all but its class (asyncio's selector one does not say so).
        self._transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        reply = self._zone.answer(data, time.monotonic())
        if reply is not None and self._transport is not None:
            self._transport.sendto(reply, addr)


async def _tcp_client(zone: Zone, reader: asyncio.StreamReader,
                      writer: asyncio.StreamWriter) -> None:
    """Length-prefixed queries (RFC 1035 4.2.2) until the client closes; a dropped query
    leaves the connection open and silent."""
    try:
        while True:
            (size,) = struct.unpack("!H", await reader.readexactly(2))
            reply = zone.answer(await reader.readexactly(size), time.monotonic())
            if reply is not None:
                writer.write(struct.pack("!H", len(reply)) + reply)
                await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError):
        pass
    finally:
        writer.close()


def _bind_pair(host: str, port: int) -> tuple[socket.socket, socket.socket]:
    """A UDP and a TCP socket on the same host:port; port 0 tries free ports until one is free
    for both."""
    for _ in range(BIND_ATTEMPTS if port == 0 else 1):
        udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            # Bursts of thousands of lookups must not be lost in the kernel: only the rules
            # here drop queries (Linux caps it at twice net.core.rmem_max).
            udp.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, UDP_BUFFER)
            udp.bind((host, port))
            tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            tcp.bind((host, udp.getsockname()[1]))
            tcp.listen(128)
            return udp, tcp
        except OSError as exc:
            udp.close()
            tcp.close()
            if port != 0 or exc.errno != errno.EADDRINUSE:
                raise
    raise OSError(errno.EADDRINUSE, f"no port on {host} free for both UDP and TCP")


class FakeDns:
    """The server in a daemon thread with its own event loop (see the module docstring)."""

    def __init__(self, records: Mapping[str, str], *, address: str = "127.0.0.1:0",
                 seed: int = 0, max_seconds: float = 600.0,
                 window: float = CONGESTION_WINDOW) -> None:
        self.host, self.port = parse_address(address)
        self.zone = Zone(records, seed=seed, window=window)
        self.max_seconds = max_seconds
        self._stop: asyncio.Event | None = None
        self._serving: contextlib.AbstractContextManager[FakeDns] | None = None

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def __enter__(self) -> FakeDns:
        self._serving = threads.serve_in_thread("fake_dns", self._serve, self._set_stop)
        return self._serving.__enter__()

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 trace: TracebackType | None) -> None:
        assert self._serving is not None
        self._serving.__exit__(kind, error, trace)

    def stall(self, seconds: float) -> None:
        """Drop every query for the next `seconds` (safe from any thread)."""
        self.zone.stall(seconds, time.monotonic())

    def queries(self, name: str, qtype: str | None = None) -> int:
        return self.zone.queries(name, qtype)

    def stats(self) -> dict[str, Any]:
        return self.zone.stats()

    def _set_stop(self) -> None:
        if self._stop is not None:
            self._stop.set()

    async def _serve(self, ready: Callable[[FakeDns], None]) -> None:
        udp, tcp = _bind_pair(self.host, self.port)
        self.port = udp.getsockname()[1]
        loop = asyncio.get_running_loop()
        transport, _ = await loop.create_datagram_endpoint(lambda: _Udp(self.zone), sock=udp)
        server = await asyncio.start_server(
            lambda reader, writer: _tcp_client(self.zone, reader, writer), sock=tcp)
        self._stop = asyncio.Event()
        ready(self)
        try:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._stop.wait(), self.max_seconds)
        finally:
            transport.close()
            server.close()  # open TCP clients are cancelled when asyncio.run ends


# ---------------------------------------------------------------------------- command line

def parse_map(text: str) -> tuple[str, str]:
    """`NAME=ADDRESS` or `NAME=KIND` -> (name, value)."""
    name, sep, value = text.partition("=")
    if not sep or not name:
        raise ValueError(f"{text!r}: expected NAME=ADDRESS or NAME=KIND")
    return name, value


def _emit(data: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(data) + "\n")
    sys.stdout.flush()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--address", default="127.0.0.1:0", help="HOST:PORT on loopback")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-seconds", type=float, default=600.0)
    parser.add_argument("--map", type=parse_map, action="append", default=[],
                        metavar="NAME=VALUE", help=f"an address or one of {', '.join(DNS_KINDS)}")
    parser.add_argument("--records", type=Path, help="a JSON object {name: value}")
    args = parser.parse_args(argv)
    try:
        records = json.loads(args.records.read_text(encoding="utf-8")) if args.records else {}
        records.update(dict(args.map))
        dns = FakeDns(records, address=args.address, seed=args.seed,
                      max_seconds=args.max_seconds)
    except (ValueError, OSError) as exc:
        print(f"fake_dns: {exc}", file=sys.stderr)
        return 2
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    with dns:
        _emit({"dns": dns.address})
        stop.wait(args.max_seconds)
    _emit({"stats": dns.stats()})
    return 0


if __name__ == "__main__":
    sys.exit(main())
