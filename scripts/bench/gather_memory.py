#!/usr/bin/env python3
"""Peak memory of `pipeline gather` at ImageNet-1k scale: 1.4 million selected URLs, about half
of them giving an image that is kept, resume included (issue 13: at most 300 MB).

Builds a synthetic `fall11_urls.txt`-style list of `--synsets` x `--per-synset` lines (10,000 x
1,400 = 14 million, ~0.7 GB, streamed to a temp folder), selects every 10th synset (1,000 wnids,
1.4 million URLs) and runs `pipeline gather` with its default options (`--processes 2`) on it.

A `--kept-share` of the selected URLs (default 0.5: about half of the real list's URLs still
give an image) point at a local HTTP server (a process of its own, not part of what is
measured) listening on `--live-hosts` loopback addresses (127.2.x.y), which answers every path
of the list at once with a small valid JPEG of its own: 64 x 64 px, 8 x 8 cells of random
colours drawn from a SHAKE-128 of the path (~1.1 KB, ~40 us to make), so every URL's picture
is distinct in bytes, perceptual hash and colour cells, and gather keeps it (no duplicate, no
placeholder) and writes it to the output folder. Any other path (gather's probe of a made-up
name beside a photo) gets a 404, as from a live photo host. What the coordinator remembers per
kept image (digest prefix, perceptual hash, block tables, journal offsets) is then measured end
to end.

The other URLs point at a closed port on one of `--hosts` loopback addresses (127.1.x.y), so
each connection is refused at once and nothing is downloaded. Host health gives each such host
its probe (--host-failures attempts, refused) and journals the rest of its URLs `host_down`, as
on the real web's dead hosts, so the scheduler still walks every URL. Live and dead URLs alike
are shaped like the real list's: 60% on four "Flickr farm" hosts, the rest spread log-uniformly
over the other hosts (a few big, many small): ~240 hosts per synset with nothing kept, ~140
dead and ~60 live ones at the default share. Then the same command again: the resume, which
reads the 1.4-million-line journal, indexes every kept image and tries every (transient) URL
again; kept images are final and not fetched again.

Memory is sampled every 0.1 s over gather's process tree (the coordinator and its workers; the
image server is not in it): "tree RSS" sums their resident sets (shared library pages counted
once per process: the strictest figure), "tree PSS" splits shared pages; "coordinator HWM" is
the kernel's own peak RSS of the coordinating process (VmHWM); "the rest of the tree" is the
workers' summed RSS at their peak. To show that the image server is not the bottleneck, its
capacity alone (requests/s from one client over 64 keep-alive connections) is measured before
the runs, and its requests and CPU time during each run.

Both runs use a copy of the working tree's `pipeline` package taken at the start (printed:
commit, changed files, a digest of the sources), so edits made meanwhile do not mix in;
`--code DIR` measures the package in DIR instead (to compare two versions, or two
`--kept-share`s on one version).

    python scripts/bench/gather_memory.py [--synsets 10000] [--per-synset 1400] [--every 10]
                                          [--hosts 4096] [--kept-share 0.5] [--live-hosts 256]
                                          [--workdir /tmp] [--target-mb 300]
                                          [--run-timeout 5400] [--code DIR]

Needs ~2 GB of disk in the work folder (list, journal after two runs) plus ~4.5 KB per kept
image (a ~1.1 KB file in a 4 KB block, its journal line): ~5 GB at the defaults. Checked
before it starts; all of it is removed at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import io
import json
import os
import selectors
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

REPO = Path(__file__).resolve().parents[2]

from benchlib import cpu_seconds_of, process_tree, pss_kb  # noqa: E402

SAMPLE_SECONDS = 0.1
FARMS = 4  # the "Flickr" hosts: 127.1.0.1..4 (dead URLs), 127.2.0.1..4 (live ones)
FARM_SHARE = 0.6
RUN_TIMEOUT = 5400.0
PICTURE_SIDE = 64  # px: at least --min-size (32); 8-px cells line up with JPEG's blocks
PICTURE_CELLS = 8  # cells a side, each one random colour
PICTURE_QUALITY = 75
SERVER_START_SECONDS = 30.0
BASE_DISK = 2 * 2**30  # list and journal lines of every URL over two runs
DISK_PER_KEPT = 4608  # bytes: its file (one 4 KB block) and its longer journal line


def wnid(index: int) -> str:
    return f"n{10_000_000 + index:08d}"


def host_number(key: int, hosts: int) -> int:
    """Deterministic, Flickr-heavy and long-tailed: 60% on hosts 1..FARMS, the rest
    log-uniform over FARMS+1..hosts."""
    mixed = (key * 2654435761) & 0xFFFFFFFF
    if mixed < FARM_SHARE * 2**32:
        return 1 + mixed % FARMS
    share = ((key * 40503) & 0xFFFF) / 0x10000
    return FARMS + int((hosts - FARMS) ** share)


def host(key: int, hosts: int) -> str:
    """A dead host's address (nothing listens on its port)."""
    number = host_number(key, hosts)
    return f"127.1.{number >> 8}.{number & 0xFF}"


def live_address(number: int) -> str:
    """Live host `number` (1-based): 127.2.0.1..127.2.0.254, then 127.2.1.1 and on (no last
    octet 0 or 255)."""
    block, offset = divmod(number - 1, 254)
    return f"127.2.{block}.{offset + 1}"


def live_addresses(live_hosts: int) -> list[str]:
    return [live_address(number) for number in range(1, live_hosts + 1)]


def is_live(key: int, kept_share: float) -> bool:
    """Whether this URL gives an image: a multiplicative hash of its own, independent of the
    host's (so the live URLs are as Flickr-heavy as the dead ones)."""
    return ((key * 2246822519 + 3266489917) & 0xFFFFFFFF) < kept_share * 2**32


def write_list(path: Path, synsets: int, per_synset: int, every: int, hosts: int,
               port: int, kept_share: float = 0.0, live_hosts: int = 1,
               live_port: int = 0) -> tuple[list[str], int]:
    """The list, streamed; the wnids to select (every `every`th synset) and how many of their
    URLs are live. Only selected synsets get varied hosts: the others are never read past
    their key. A live URL's path is unique in the list (the server draws its picture from it)."""
    selected, live = [], 0
    with open(path, "w", encoding="ascii") as handle:
        for index in range(synsets):
            name = wnid(index)
            if index % every:
                handle.write("".join(f"{name}_{num}\thttp://127.0.0.9:{port}/{num}.jpg\n"
                                     for num in range(per_synset)))
                continue
            selected.append(name)
            base = index * per_synset
            lines = []
            for num in range(per_synset):
                key = base + num
                if kept_share and is_live(key, kept_share):
                    live += 1
                    address = live_address(host_number(key, live_hosts))
                    lines.append(f"{name}_{num}\thttp://{address}:{live_port}/{index}/{num}.jpg\n")
                else:
                    lines.append(f"{name}_{num}\thttp://{host(key, hosts)}:{port}/{num}.jpg\n")
            handle.write("".join(lines))
    return selected, live


def closed_port() -> int:
    """A port nothing listens on (bound, then released): connections to it are refused."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


# --------------------------------------------------------------------------- the image server

def picture(path: bytes) -> bytes:
    """A distinct 64 x 64 JPEG per path: 8 x 8 cells of colours from a SHAKE-128 of the path.
    Random cells give every picture its own perceptual hash (coarse hashes of 3,000 such
    pictures: 31.5 of 64 bits apart on average, never within 12) and colour cells, so gather
    takes none for a host's placeholder."""
    cells = Image.frombytes("RGB", (PICTURE_CELLS, PICTURE_CELLS),
                            hashlib.shake_128(path).digest(PICTURE_CELLS * PICTURE_CELLS * 3))
    buffer = io.BytesIO()
    cells.resize((PICTURE_SIDE, PICTURE_SIDE), Image.NEAREST).save(
        buffer, "JPEG", quality=PICTURE_QUALITY)
    return buffer.getvalue()


def is_photo_path(path: bytes) -> bool:
    """The shape of a live URL's path in the list, /<synset index>/<number>.jpg."""
    parts = path.split(b"/")
    return (len(parts) == 3 and not parts[0] and parts[1].isdigit()
            and parts[2].endswith(b".jpg") and parts[2][:-4].isdigit())


class ServerStats:
    def __init__(self) -> None:
        self.requests = 0
        self.not_found = 0  # paths not of the list's shape (gather's made-up-path probes)
        self.bytes = 0
        self.connections = 0


class _PictureProtocol(asyncio.Protocol):
    """Minimal HTTP/1.1 with keep-alive: a GET (or HEAD) of a path of the list answers 200
    with its picture, any other path 404, as a live photo host does."""

    def __init__(self, stats: ServerStats) -> None:
        self.stats = stats
        self.buffer = b""
        self.transport: Any = None  # uvloop's transports are no asyncio.Transport

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        self.stats.connections += 1

    def data_received(self, data: bytes) -> None:
        assert self.transport is not None
        self.buffer += data
        while (end := self.buffer.find(b"\r\n\r\n")) >= 0:
            head, self.buffer = self.buffer[:end], self.buffer[end + 4:]
            parts = head.split(b"\r\n", 1)[0].split(b" ")
            if len(parts) != 3:
                self.transport.write(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n"
                                     b"Connection: close\r\n\r\n")
                self.transport.close()
                return
            found = is_photo_path(parts[1])
            body = picture(parts[1]) if found else b"not found\n"
            close = b"connection: close" in head.lower()
            self.transport.write(
                b"HTTP/1.1 %s\r\nContent-Type: %s\r\nContent-Length: %d\r\n%s\r\n%s"
                % (b"200 OK" if found else b"404 Not Found",
                   b"image/jpeg" if found else b"text/plain", len(body),
                   b"Connection: close\r\n" if close else b"",
                   b"" if parts[0] == b"HEAD" else body))
            self.stats.requests += 1
            self.stats.not_found += not found
            self.stats.bytes += len(body)
            if close:
                self.transport.close()
                return
        if len(self.buffer) > 65536:  # no end of headers: not a client of ours
            self.transport.close()


def bind_all(addresses: list[str], tries: int = 20) -> tuple[int, list[socket.socket]]:
    """One listening socket per address, all on one port (the first address's free one)."""
    for _ in range(tries):
        sockets: list[socket.socket] = []
        port = 0
        try:
            for address in addresses:
                sock = socket.socket()
                sockets.append(sock)
                sock.bind((address, port))
                port = sock.getsockname()[1]
                sock.listen(1024)
                sock.setblocking(False)
        except OSError:
            for sock in sockets:
                sock.close()
            continue
        return port, sockets
    raise OSError(f"no port free on all of {len(addresses)} addresses")


def serve(live_hosts: int, max_seconds: float) -> None:
    """The server process: binds, says `ready PORT`, answers `stats` lines on stdin with
    `requests N not_found N bytes N connections N`, and stops at EOF on stdin (its parent
    gone or done) or after `max_seconds`, whichever comes first."""
    try:
        import uvloop
    except ImportError:
        uvloop = None
    port, sockets = bind_all(live_addresses(live_hosts))
    stats = ServerStats()

    async def main() -> None:
        loop = asyncio.get_running_loop()
        done = loop.create_future()
        for sock in sockets:
            await loop.create_server(lambda: _PictureProtocol(stats), sock=sock)

        def watch_stdin() -> None:
            for line in sys.stdin:
                if line.strip() == "stats":
                    print(f"requests {stats.requests} not_found {stats.not_found} "
                          f"bytes {stats.bytes} connections {stats.connections}", flush=True)
            loop.call_soon_threadsafe(lambda: done.done() or done.set_result(None))

        threading.Thread(target=watch_stdin, daemon=True).start()
        loop.call_later(max_seconds, lambda: done.done() or done.set_result(None))
        print(f"ready {port}", flush=True)
        await done

    if uvloop is not None:
        uvloop.run(main())
    else:
        asyncio.run(main())


class PictureServer:
    """The image server as a child process of this script (never of gather's tree)."""

    def __init__(self, live_hosts: int, max_seconds: float, log: Path) -> None:
        argv = [sys.executable, __file__, "--serve", "--live-hosts", str(live_hosts),
                "--serve-seconds", str(max_seconds)]
        self._log = open(log, "ab")  # noqa: SIM115 - closed in close()
        self.process = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                         stderr=self._log, text=True, bufsize=1)
        self.port = int(self._line(SERVER_START_SECONDS, "ready").split()[1])

    def _line(self, timeout: float, expected: str) -> str:
        assert self.process.stdout is not None
        result: list[str] = []
        reader = threading.Thread(target=lambda: result.append(self.process.stdout.readline()),
                                  daemon=True)
        reader.start()
        reader.join(timeout)
        if not result or not result[0].startswith(expected):
            self.close()
            sys.exit(f"the image server did not answer {expected!r} (see {self._log.name})")
        return result[0]

    def cpu_seconds(self) -> float:
        return cpu_seconds_of(self.process.pid)

    def stats(self) -> dict[str, int]:
        assert self.process.stdin is not None
        self.process.stdin.write("stats\n")
        self.process.stdin.flush()
        words = self._line(10.0, "requests").split()
        return {words[i]: int(words[i + 1]) for i in range(0, len(words), 2)}

    def close(self) -> None:
        with contextlib.suppress(OSError):
            if self.process.stdin is not None:
                self.process.stdin.close()  # EOF: the server stops
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self._log.close()


def server_capacity(server: PictureServer, addresses: list[str], requests: int = 20_000,
                    connections: int = 64) -> tuple[float, float]:
    """(requests/s, server CPU us a request) for `requests` GETs over `connections` keep-alive
    connections from this process, one request in flight on each: what the server can give,
    to set against what gather asks of it."""
    selector = selectors.DefaultSelector()
    sent = done = 0
    buffers: dict[socket.socket, bytes] = {}

    def send(sock: socket.socket) -> None:
        nonlocal sent
        sock.sendall(b"GET /%d/%d.jpg HTTP/1.1\r\nHost: x\r\n\r\n" % (10**9, sent))
        sent += 1

    cpu, started = server.cpu_seconds(), time.perf_counter()
    for number in range(connections):
        sock = socket.create_connection((addresses[number % len(addresses)], server.port))
        buffers[sock] = b""
        selector.register(sock, selectors.EVENT_READ)
        send(sock)
    while done < requests:
        for key, _ in selector.select(10.0):
            sock = key.fileobj
            assert isinstance(sock, socket.socket)
            data = sock.recv(65536)
            if not data:
                raise ConnectionError("the image server closed a connection")
            buffers[sock] += data
            while (end := buffers[sock].find(b"\r\n\r\n")) >= 0:
                head = buffers[sock][:end].lower()
                length = int(head.split(b"content-length: ", 1)[1].split(b"\r\n", 1)[0])
                if len(buffers[sock]) < end + 4 + length:
                    break
                buffers[sock] = buffers[sock][end + 4 + length:]
                done += 1
                if sent < requests:
                    send(sock)
    seconds = time.perf_counter() - started
    cpu = server.cpu_seconds() - cpu
    for sock in buffers:
        selector.unregister(sock)
        sock.close()
    return requests / seconds, cpu / requests * 1e6


# --------------------------------------------------------------------------- measuring gather

def rss_kb(pid: int) -> tuple[int, int]:
    """(VmRSS, VmHWM) of a process in kB; zeros once it is gone."""
    rss = hwm = 0
    try:
        with open(f"/proc/{pid}/status", "rb") as handle:
            for line in handle:
                if line.startswith(b"VmRSS:"):
                    rss = int(line.split()[1])
                elif line.startswith(b"VmHWM:"):
                    hwm = int(line.split()[1])
    except OSError:
        pass
    return rss, hwm


@dataclass
class Measured:
    seconds: float
    tree_rss_mb: float
    tree_pss_mb: float
    coordinator_hwm_mb: float
    cpu_seconds: float = 0.0  # gather's whole tree, user + system
    coordinator_cpu_seconds: float = 0.0  # the coordinating process alone
    workers_rss_mb: float = 0.0  # peak summed RSS of the tree but the coordinator


class Sampler(threading.Thread):
    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.pid = pid
        self.rss = self.pss = self.hwm = self.workers = 0
        self.cpu = 0.0  # the coordinator's own CPU seconds, as last seen
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.is_set():
            with contextlib.suppress(OSError, IndexError, ValueError):
                self.cpu = cpu_seconds_of(self.pid)
            tree = process_tree(self.pid)
            figures = [rss_kb(pid) for pid in tree]
            self.rss = max(self.rss, sum(rss for rss, _ in figures))
            self.workers = max(self.workers, sum(rss for rss, _ in figures[1:]))
            self.pss = max(self.pss, sum(pss_kb(pid) for pid in tree))
            self.hwm = max(self.hwm, rss_kb(self.pid)[1])
            self.done.wait(SAMPLE_SECONDS)


def children_cpu() -> float:
    usage = os.times()
    return usage.children_user + usage.children_system


def snapshot_code(code: Path, source: Path | None = None) -> str:
    """Copy the working tree's `pipeline` package (or the one in `source`) to `code` (both
    runs use this copy, however the tree changes meanwhile); what it was, in words."""
    shutil.copytree((source or REPO) / "pipeline", code / "pipeline",
                    ignore=shutil.ignore_patterns("__pycache__"))
    digest = hashlib.sha256()
    for path in sorted((code / "pipeline").rglob("*.py")):
        digest.update(path.relative_to(code).as_posix().encode() + b"\0" + path.read_bytes())

    def git(*args: str) -> str:
        done = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True)
        return done.stdout.strip() if done.returncode == 0 else "?"

    if source is not None:
        return f"pipeline/ from {source} (sources' sha256 {digest.hexdigest()[:12]})"
    changed = [line.strip() for line in git("status", "--short", "pipeline/").splitlines()]
    return (f"pipeline/ as in the working tree at commit {git('rev-parse', '--short', 'HEAD')}"
            + (f" with {len(changed)} changed: {', '.join(changed)}" if changed else ", clean")
            + f" (sources' sha256 {digest.hexdigest()[:12]})")


def run_gather(code: Path, urls: Path, wnids_file: Path, out: Path, log: Path,
               timeout: float) -> Measured:
    """`pipeline gather` from the snapshot in `code` (-P: not the repository's own folder)."""
    argv = [sys.executable, "-P", "-m", "pipeline", "-q", "gather", "--urls", str(urls),
            "--wnids-file", str(wnids_file), "--out", str(out), "--processes", "2"]
    env = {**os.environ, "PYTHONPATH": str(code)}
    cpu = children_cpu()  # gather's workers are reaped by gather, then counted in its own
    started = time.perf_counter()
    with open(log, "ab") as output:
        process = subprocess.Popen(argv, cwd=REPO, env=env, stdout=output,
                                   stderr=subprocess.STDOUT)
        sampler = Sampler(process.pid)
        sampler.start()
        try:
            code_ = process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            code_ = None
        finally:
            sampler.done.set()
            sampler.join()
            if process.poll() is None:
                process.terminate()  # gather journals what is left, its workers stop
                try:
                    process.wait(60)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()
    seconds = time.perf_counter() - started
    measured = Measured(seconds, sampler.rss / 1024, sampler.pss / 1024, sampler.hwm / 1024,
                        children_cpu() - cpu, sampler.cpu, sampler.workers / 1024)
    if code_ != 0:
        tail = log.read_text(errors="replace").splitlines()[-10:]
        why = f"did not finish within {timeout:.0f} s" if code_ is None else f"failed ({code_})"
        sys.exit(f"gather {why} (peaks until then: tree RSS {measured.tree_rss_mb:.0f} MB, "
                 f"coordinator HWM {measured.coordinator_hwm_mb:.0f} MB):\n" + "\n".join(tail))
    return measured


def journal_outcomes(journal: Path, start: int = 0) -> tuple[Counter[str], int]:
    """Outcomes of the journal's lines from byte `start` on (a few seconds for millions of
    lines), and where it ends."""
    counts: Counter[str] = Counter()
    with open(journal, "rb") as handle:
        handle.seek(start)
        for line in handle:
            counts[json.loads(line)["outcome"]] += 1
        return counts, handle.tell()


def count_files(out: Path) -> int:
    """Visible image files in the class folders (what training would read)."""
    return sum(1 for folder in out.iterdir() if folder.is_dir() and folder.name[0] != "."
               for name in os.listdir(folder) if name[0] != ".")


# --------------------------------------------------------------------------- main

def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--synsets", type=int, default=10_000)
    parser.add_argument("--per-synset", type=int, default=1_400)
    parser.add_argument("--every", type=int, default=10, help="select every Nth synset")
    parser.add_argument("--hosts", type=int, default=4096, help="dead hosts (closed port)")
    parser.add_argument("--kept-share", type=float, default=0.5,
                        help="share of the selected URLs that give a distinct image (0: none, "
                             "no server)")
    parser.add_argument("--live-hosts", type=int, default=256,
                        help="loopback addresses the image server listens on (60%% of the live "
                             "URLs on the first 4)")
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()))
    parser.add_argument("--target-mb", type=float, default=300.0)
    parser.add_argument("--code", type=Path,
                        help="a folder holding the `pipeline` package to measure (default: the "
                             "working tree's, copied at the start)")
    parser.add_argument("--run-timeout", type=float, default=RUN_TIMEOUT,
                        help="seconds one gather run may take")
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--serve-seconds", type=float, default=60.0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if not 0.0 <= args.kept_share <= 1.0:
        parser.error("--kept-share must be within 0..1")
    if not FARMS < args.live_hosts <= 254 * 256:
        parser.error(f"--live-hosts must be within {FARMS + 1}..{254 * 256}")
    if args.serve:
        serve(args.live_hosts, args.serve_seconds)
        return
    selected = args.synsets // args.every * args.per_synset
    need = BASE_DISK * selected / 1_400_000 + DISK_PER_KEPT * selected * args.kept_share
    free = shutil.disk_usage(args.workdir).free
    if free < need:
        sys.exit(f"{args.workdir} has {free / 2**30:.1f} GiB free, the benchmark needs "
                 f"~{need / 2**30:.1f} GiB")
    work = Path(tempfile.mkdtemp(prefix="bench-gather-memory-", dir=args.workdir))
    try:
        bench(args, work)
    finally:
        with contextlib.suppress(OSError):
            shutil.rmtree(work)


def bench(args: argparse.Namespace, work: Path) -> None:
    urls, wnids_file, out, log = (work / "urls.txt", work / "wnids.txt", work / "raw",
                                  work / "gather.log")
    print("code: " + snapshot_code(work / "code", args.code), flush=True)
    server = None
    if args.kept_share:
        server = PictureServer(args.live_hosts, 2 * args.run_timeout + 3600.0,
                               work / "server.log")
    try:
        measure(args, work / "code", urls, wnids_file, out, log, server)
    finally:
        if server is not None:
            server.close()


def measure(args: argparse.Namespace, code: Path, urls: Path, wnids_file: Path, out: Path,
            log: Path, server: PictureServer | None) -> None:
    started = time.perf_counter()
    wnids, live = write_list(urls, args.synsets, args.per_synset, args.every, args.hosts,
                             closed_port(), args.kept_share, args.live_hosts,
                             server.port if server else 0)
    wnids_file.write_text("\n".join(wnids) + "\n")
    lines = args.synsets * args.per_synset
    print(f"list: {lines:,} lines ({urls.stat().st_size / 2**20:.0f} MiB) written in "
          f"{time.perf_counter() - started:.1f} s; {len(wnids):,} synsets selected "
          f"({len(wnids) * args.per_synset:,} URLs, {live:,} of them live on "
          f"{args.live_hosts if live else 0} hosts)", flush=True)
    if server:
        rate, each = server_capacity(server, live_addresses(FARMS))
        print(f"image server alone: {rate:,.0f} requests/s over 64 keep-alive connections "
              f"from one client, {each:.0f} us of its CPU a request", flush=True)
    runs, journal_end = {}, 0
    for name in ("first run", "resume"):
        server_cpu = server.cpu_seconds() if server else 0.0
        before = server.stats() if server else {}
        runs[name] = measured = run_gather(code, urls, wnids_file, out, log, args.run_timeout)
        counts, journal_end = journal_outcomes(out / "gather.jsonl", journal_end)
        print(f"{name}: {measured.seconds:.1f} s, peak tree RSS {measured.tree_rss_mb:.0f} MB, "
              f"peak tree PSS {measured.tree_pss_mb:.0f} MB, coordinator HWM "
              f"{measured.coordinator_hwm_mb:.0f} MB, the rest of the tree (workers) "
              f"{measured.workers_rss_mb:.0f} MB; gather CPU {measured.cpu_seconds:.0f} s "
              f"({measured.cpu_seconds / measured.seconds:.2f} cores; the coordinator "
              f"{measured.coordinator_cpu_seconds / measured.seconds:.0%} of one); its journal "
              "lines: "
              f"{sum(counts.values()):,} (ok {counts['ok']:,})", flush=True)
        print("  outcomes: " + ", ".join(f"{outcome} {count:,}"
                                         for outcome, count in counts.most_common()), flush=True)
        if server:
            cpu = server.cpu_seconds() - server_cpu
            after = server.stats()
            requests = after["requests"] - before["requests"]
            connections = after["connections"] - before["connections"]
            missing = after["not_found"] - before["not_found"]
            each = (f", {cpu / requests * 1e6:.0f} us a request; gather "
                    f"{measured.cpu_seconds / requests * 1e6:.0f} us a request" if requests else "")
            print(f"  image server: {requests:,} requests ({missing:,} of other paths: 404) on "
                  f"{connections:,} connections, "
                  f"CPU {cpu:.1f} s "
                  f"({cpu / measured.seconds:.1%} of one core{each})", flush=True)
    counts, _ = journal_outcomes(out / "gather.jsonl")
    files = count_files(out)
    print(f"journal: {sum(counts.values()):,} lines, "
          + ", ".join(f"{outcome} {count:,}" for outcome, count in counts.most_common()))
    print(f"images on disk: {files:,}")
    worst = max(m.tree_rss_mb for m in runs.values())
    verdict = "met" if worst <= args.target_mb else "NOT met"
    print(f"SUMMARY gather memory: {len(wnids) * args.per_synset:,} URLs of a {lines:,}-line "
          f"list, {files:,} images kept: first run {runs['first run'].seconds:.0f} s / "
          f"{runs['first run'].tree_rss_mb:.0f} MB, resume {runs['resume'].seconds:.0f} s / "
          f"{runs['resume'].tree_rss_mb:.0f} MB peak tree RSS; target <= {args.target_mb:.0f} "
          f"MB {verdict}")


if __name__ == "__main__":
    main()
