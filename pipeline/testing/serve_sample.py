"""Serve a `make_sample.py` sample over HTTP with the faults of the real image web.

`gather` must survive dead links, throttling, hung servers, HTML error pages, truncated and
huge bodies, Flickr's "photo unavailable" placeholder and opt-out headers; this mirror produces
each of them on demand. The fault is encoded in the URL path (`make_sample.build_url_list`
writes such URLs), so the server is stateless apart from per-URL request counters, which the
"fails n times, then works" routes need and which tests read back.

    python -m pipeline.testing.serve_sample --root data/sample [--host 127.0.0.1] [--port 8765]
                                   [--latency 0] [--max-seconds 600] [--max-requests N]

Prints one line, `serving http://HOST:PORT`, once listening. It stops by itself after
--max-seconds or --max-requests, so a forgotten server can never run away.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import json
import re
import signal
import socket
import struct
import subprocess
import sys
import threading
import urllib.request
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiohttp import web
from aiohttp.typedefs import Handler
from PIL import Image

from pipeline.testing import threads

CONTENT_TYPES = {".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".png": "image/png"}
CACHE_BYTES = 256 * 2**20
# How long in-flight requests (slow, stall, huge) get at shutdown before they are cancelled.
SHUTDOWN_GRACE = 0.5
CHUNK = 64 * 1024
TRUNCATE_FRACTION = 0.6
SITE_ROUTES = frozenset({"robots", "tdmrep"})  # site-wide files, counted per host name
_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


def html_page(title: str) -> str:
    """The kind of page a web server returns where an image used to be."""
    return (f"<!DOCTYPE html>\n<html><head><title>{title}</title></head>\n"
            f"<body><h1>{title}</h1><p>The requested image could not be served.</p></body>"
            "</html>\n")


def jpeg_with_comment(data: bytes, text: str) -> bytes:
    """The same picture with different bytes: a COM segment right after SOI."""
    if not data.startswith(b"\xff\xd8"):
        raise web.HTTPNotFound(text="not a JPEG")
    payload = text.encode()
    return data[:2] + b"\xff\xfe" + struct.pack(">H", len(payload) + 2) + payload + data[2:]


def thumbnail_jpeg(data: bytes, size: int = 8) -> bytes:
    """A tracking-pixel-sized JPEG of the picture (distinct per file, unlike a fixed one)."""
    with Image.open(io.BytesIO(data)) as image:
        small = image.convert("RGB").resize((size, size))
    out = io.BytesIO()
    small.save(out, "JPEG", quality=90)
    return out.getvalue()


class Counters:
    """Request counts, read from other threads by tests, hence the lock."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._total = 0
        self._by_route: Counter[str] = Counter()
        self._by_path: Counter[str] = Counter()

    def count(self, route: str, path: str) -> int:
        """Count one request; return the running total."""
        with self._lock:
            self._total += 1
            self._by_route[route] += 1
            self._by_path[path] += 1
            return self._total

    def hits(self, path: str) -> int:
        with self._lock:
            return self._by_path[path]

    def snapshot(self, *, paths: bool) -> dict[str, Any]:
        with self._lock:
            stats: dict[str, Any] = {"requests": self._total, "by_route": dict(self._by_route)}
            if paths:
                stats["by_path"] = dict(self._by_path)
            return stats


class ByteCache:
    """File bytes and derived bodies, least recently used first out past `limit` bytes:
    benchmarks fetch the same few thousand files over and over."""

    def __init__(self, limit: int = CACHE_BYTES) -> None:
        self._limit = limit
        self._size = 0
        self._items: OrderedDict[tuple[str, ...], bytes] = OrderedDict()

    def get(self, key: tuple[str, ...], make: Callable[[], bytes]) -> bytes:
        data = self._items.get(key)
        if data is not None:
            self._items.move_to_end(key)
            return data
        data = make()
        self._items[key] = data
        self._size += len(data)
        while self._size > self._limit and len(self._items) > 1:
            self._size -= len(self._items.popitem(last=False)[1])
        return data


class Mirror:
    """The web application: one handler per fault, all driven by the URL path."""

    def __init__(self, root: Path, *, latency: float = 0.0,
                 max_requests: int = 1_000_000,
                 site_files: dict[str, dict[str, tuple[int, str]]] | None = None) -> None:
        self.root = Path(root)
        # Per host name (the Host header, "*" for any other), what a site-wide file answers:
        # {"/robots.txt": (200, "User-agent: *\nDisallow: /private/")}; 404 when not listed.
        self.site_files = site_files or {}
        if not (self.root / "files").is_dir():
            raise FileNotFoundError(f"{self.root / 'files'} does not exist (run make_sample.py)")
        self.latency = latency
        self.max_requests = max_requests
        self.counters = Counters()
        self.stop = asyncio.Event()
        self._cache = ByteCache()

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self._middleware])
        tail = "{wnid}/{file}"
        app.add_routes([
            web.get(f"/img/{tail}", self._img, name="img"),
            web.get(f"/private/{tail}", self._img, name="private"),  # for robots.txt rules
            web.get(r"/status/{code:\d{3}}/" + tail, self._status, name="status"),
            web.get(r"/flaky/{code:\d{3}}/{n:\d+}/" + tail, self._flaky, name="flaky"),
            web.get(r"/throttle/{n:\d+}/" + tail, self._throttle, name="throttle"),
            web.get(r"/slow/{seconds:\d+(\.\d+)?}/" + tail, self._slow, name="slow"),
            web.get(f"/stall/{tail}", self._stall, name="stall"),
            web.get(f"/reset/{tail}", self._reset, name="reset"),
            web.get(f"/html/{tail}", self._html, name="html"),
            web.get(f"/mislabeled/{tail}", self._mislabeled, name="mislabeled"),
            web.get(f"/truncated/{tail}", self._truncated, name="truncated"),
            web.get(r"/huge/{mb:\d+}/" + tail, self._huge, name="huge"),
            web.get(f"/redirect/{tail}", self._redirect, name="redirect"),
            web.get(f"/unavailable/{tail}", self._unavailable, name="unavailable"),
            web.get("/photo_unavailable.png", self._placeholder, name="photo_unavailable"),
            web.get(f"/placeholder/{tail}", self._placeholder, name="placeholder"),
            web.get(f"/noai/{tail}", self._noai, name="noai"),
            web.get(f"/tdm/{tail}", self._tdm, name="tdm"),
            web.get(f"/tiny/{tail}", self._tiny, name="tiny"),
            web.get(r"/uniq/{k:\d+}/" + tail, self._uniq, name="uniq"),
            web.get("/robots.txt", self._site_file, name="robots"),
            web.get("/.well-known/tdmrep.json", self._site_file, name="tdmrep"),
            web.get("/stats", self._stats, name="stats"),
        ])
        return app

    @web.middleware
    async def _middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """Counting, the request limit and the latency apply to every route but /stats."""
        route = request.match_info.route.name or "unmatched"
        if route == "stats":
            return await handler(request)
        # A site-wide file is counted per host name: each name is a site of its own.
        path = request.host + request.path_qs if route in SITE_ROUTES else request.path_qs
        if self.counters.count(route, path) > self.max_requests:
            self.stop.set()
            return web.Response(status=503, text=html_page("503 Request limit reached"),
                                content_type="text/html")
        transport = request.transport  # aiohttp forgets it once it starts closing
        try:
            if self.latency > 0:
                await asyncio.sleep(self.latency)
            return await handler(request)
        except asyncio.CancelledError:
            # Cancelled at shutdown or on disconnect. A closed transport still waits to flush
            # its buffer (a huge body) to a client that may never read it: abort instead.
            if transport is not None:
                transport.abort()
            raise

    # -- bodies

    def file_bytes(self, wnid: str, name: str) -> bytes:
        """A sample file's bytes, cached; HTTPNotFound for a missing or unsafe name (other
        hosts of serve_web.py serve the sample under paths of their own)."""
        if not (_SAFE_NAME.match(wnid) and _SAFE_NAME.match(name)):
            raise web.HTTPNotFound(text=html_page("404 Not Found"), content_type="text/html")
        return self._cache.get(("file", wnid, name), lambda: self._read(wnid, name))

    def _file(self, request: web.Request) -> bytes:
        """The requested file's bytes; `?v=k` makes them unique (for reused files)."""
        data = self.file_bytes(request.match_info["wnid"], request.match_info["file"])
        variant = request.query.get("v")
        return data if variant is None else jpeg_with_comment(data, f"uniq {variant}")

    def _read(self, wnid: str, name: str) -> bytes:
        try:
            return (self.root / "files" / wnid / name).read_bytes()
        except OSError:
            raise web.HTTPNotFound(text=html_page("404 Not Found"),
                                   content_type="text/html") from None

    def _image(self, request: web.Request, data: bytes | None = None,
               headers: dict[str, str] | None = None) -> web.Response:
        return web.Response(body=self._file(request) if data is None else data,
                            content_type=_content_type(request), headers=headers)

    def placeholder_bytes(self) -> bytes:
        """Flickr's "photo unavailable" picture (the sample's placeholder.png)."""
        return self._cache.get(("placeholder",), (self.root / "placeholder.png").read_bytes)

    # -- routes

    async def _img(self, request: web.Request) -> web.Response:
        return self._image(request)

    async def _status(self, request: web.Request) -> web.Response:
        return _error(int(request.match_info["code"]))

    async def _flaky(self, request: web.Request) -> web.Response:
        if self.counters.hits(request.path_qs) <= int(request.match_info["n"]):
            return _error(int(request.match_info["code"]))
        return self._image(request)

    async def _throttle(self, request: web.Request) -> web.Response:
        if self.counters.hits(request.path_qs) <= int(request.match_info["n"]):
            return web.Response(status=429, text=html_page("429 Too Many Requests"),
                                content_type="text/html", headers={"Retry-After": "1"})
        return self._image(request)

    async def _slow(self, request: web.Request) -> web.Response:
        # Cancelled when the client disconnects (handler_cancellation) or at shutdown.
        await asyncio.sleep(float(request.match_info["seconds"]))
        return self._image(request)

    async def _stall(self, request: web.Request) -> web.StreamResponse:
        data = self._file(request)
        response = web.StreamResponse(headers={"Content-Type": _content_type(request)})
        response.content_length = len(data)
        await response.prepare(request)
        await response.write(data[: len(data) // 2])
        await self.stop.wait()  # cancelled earlier if the client disconnects
        return response

    async def _reset(self, request: web.Request) -> web.StreamResponse:
        """RST instead of a response: SO_LINGER 0, then abort the transport."""
        transport = request.transport
        if transport is not None:
            sock = transport.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            transport.abort()
        return web.Response()  # never sent: the connection is gone

    async def _html(self, request: web.Request) -> web.Response:
        return web.Response(text=html_page("Image not found"), content_type="text/html")

    async def _mislabeled(self, request: web.Request) -> web.Response:
        return web.Response(body=html_page("Image not found").encode(),
                            content_type="image/jpeg")

    async def _truncated(self, request: web.Request) -> web.Response:
        data = self._file(request)
        return self._image(request, data[: int(len(data) * TRUNCATE_FRACTION)])

    async def _huge(self, request: web.Request) -> web.StreamResponse:
        """The image, then filler up to `mb` MiB, chunked with no length: only a client that
        enforces its own limit stops early."""
        data = self._file(request)
        limit = int(request.match_info["mb"]) * 2**20
        response = web.StreamResponse(headers={"Content-Type": "image/jpeg"})
        response.enable_chunked_encoding()
        await response.prepare(request)
        filler = bytes(CHUNK)
        try:
            await response.write(data)
            for sent in range(len(data), limit, CHUNK):
                await response.write(filler[: min(CHUNK, limit - sent)])
            await response.write_eof()
        except ConnectionResetError:
            pass  # the client stopped reading, as it should
        return response

    async def _redirect(self, request: web.Request) -> web.Response:
        target = request.app.router["img"].url_for(
            wnid=request.match_info["wnid"], file=request.match_info["file"])
        raise web.HTTPFound(target.with_query(request.query))

    async def _unavailable(self, request: web.Request) -> web.Response:
        raise web.HTTPFound(request.app.router["photo_unavailable"].url_for())

    async def _placeholder(self, request: web.Request) -> web.Response:
        return web.Response(body=self.placeholder_bytes(), content_type="image/png")

    async def _noai(self, request: web.Request) -> web.Response:
        return self._image(request, headers={"X-Robots-Tag": "noai, noimageai"})

    async def _tdm(self, request: web.Request) -> web.Response:
        """W3C TDMRep: text and data mining rights reserved, with the policy's address."""
        return self._image(request, headers={"tdm-reservation": "1",
                                             "tdm-policy": "https://example.org/tdm.json"})

    async def _tiny(self, request: web.Request) -> web.Response:
        key = ("tiny", request.match_info["wnid"], request.match_info["file"],
               request.query.get("v", ""))
        data = self._cache.get(key, lambda: thumbnail_jpeg(self._file(request)))
        return web.Response(body=data, content_type="image/jpeg")

    async def _uniq(self, request: web.Request) -> web.Response:
        data = jpeg_with_comment(self._file(request), f"uniq {request.match_info['k']}")
        return web.Response(body=data, content_type="image/jpeg")

    async def _site_file(self, request: web.Request) -> web.Response:
        """robots.txt or tdmrep.json as set for the requested host name (`site_files`)."""
        name = request.host.rpartition(":")[0] or request.host
        files = self.site_files.get(name, self.site_files.get("*", {}))
        status, text = files.get(request.path, (404, html_page("404 Not Found")))
        content_type = "application/json" if request.path.endswith(".json") else "text/plain"
        return web.Response(status=status, text=text, content_type=content_type)

    async def _stats(self, request: web.Request) -> web.Response:
        """`?paths=1` adds the per-path counts (large on a big run)."""
        return web.json_response(self.counters.snapshot(paths="paths" in request.query))


def _content_type(request: web.Request) -> str:
    suffix = Path(request.match_info["file"]).suffix.lower()
    return CONTENT_TYPES.get(suffix, "application/octet-stream")


def _error(code: int) -> web.Response:
    if not 400 <= code <= 599:
        raise web.HTTPBadRequest(text="status must be 4xx or 5xx")
    return web.Response(status=code, text=html_page(f"{code} Error"), content_type="text/html")


async def serve(mirror: Mirror, host: str, port: int, max_seconds: float,
                on_ready: Callable[[str], None]) -> None:
    """Serve until `mirror.stop` is set (signal, request limit, caller) or `max_seconds`."""
    runner = web.AppRunner(mirror.app(), handler_cancellation=True,
                           shutdown_timeout=SHUTDOWN_GRACE, access_log=None)
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port)
        await site.start()
        bound_host, bound_port = runner.addresses[0][:2]
        on_ready(f"http://{bound_host}:{bound_port}")
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(mirror.stop.wait(), max_seconds)
    finally:
        await runner.cleanup()


@dataclass(frozen=True)
class MirrorHandle:
    """What a test gets from `serve_in_thread`."""

    base_url: str
    mirror: Mirror

    def stats(self) -> dict[str, Any]:
        """`requests` (total), `by_route` and `by_path` (path with query) request counts."""
        return self.mirror.counters.snapshot(paths=True)


@dataclass(frozen=True)
class ProcessMirrorHandle:
    """What a test gets from `serve_in_process`: the same stats, read over HTTP."""

    base_url: str
    pid: int

    def stats(self) -> dict[str, Any]:
        """`requests` (total), `by_route` and `by_path` (path with query) request counts."""
        with urllib.request.urlopen(f"{self.base_url}/stats?paths=1", timeout=30) as answer:
            return json.load(answer)


@contextlib.contextmanager
def serve_in_process(root: Path, *, latency: float = 0.0, max_seconds: float = 300,
                     port: int = 0, log_path: Path | None = None
                     ) -> Iterator[ProcessMirrorHandle]:
    """The mirror in a process of its own, stopped on exit: whatever the caller's own process
    did before (training threads, a loaded interpreter), the mirror answers at its own pace.
    Its stderr (the access log) goes to `log_path` when given."""
    log = open(log_path, "w", encoding="utf-8") if log_path else None  # noqa: SIM115
    server = subprocess.Popen(
        [sys.executable, "-m", "pipeline.testing.serve_sample", "--root", str(root),
         "--port", str(port),
         "--latency", str(latency), "--max-seconds", str(max_seconds)],
        stdout=subprocess.PIPE, stderr=log, text=True)
    try:
        line = server.stdout.readline().strip() if server.stdout else ""
        if not line.startswith("serving "):
            where = f" (see {log_path})" if log_path else ""
            raise RuntimeError(f"the mirror did not start: {line!r}{where}")
        yield ProcessMirrorHandle(line.split()[1], server.pid)
    finally:
        server.terminate()
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        if server.stdout:
            server.stdout.close()
        if log:
            log.close()


@contextlib.contextmanager
def serve_in_thread(root: Path, *, latency: float = 0.0, max_seconds: float = 120,
                    max_requests: int = 100_000,
                    site_files: dict[str, dict[str, tuple[int, str]]] | None = None
                    ) -> Iterator[MirrorHandle]:
    """Run a mirror on a free port in a daemon thread with its own event loop, for tests.

    The server is stopped and the thread joined on exit, exceptions included.
    """
    mirror = Mirror(root, latency=latency, max_requests=max_requests, site_files=site_files)

    async def run(ready: Callable[[str], None]) -> None:
        await serve(mirror, "127.0.0.1", 0, max_seconds, ready)

    with threads.serve_in_thread("serve_sample", run, mirror.stop.set) as url:
        yield MirrorHandle(url, mirror)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", type=Path, required=True, help="a make_sample.py directory")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8765, help="0 picks a free port")
    parser.add_argument("--latency", type=float, default=0.0, help="seconds added per request")
    parser.add_argument("--max-seconds", type=float, default=600.0)
    parser.add_argument("--max-requests", type=int, default=1_000_000)
    args = parser.parse_args(argv)
    try:
        mirror = Mirror(args.root, latency=args.latency, max_requests=args.max_requests)
    except FileNotFoundError as exc:
        print(f"serve_sample: {exc}", file=sys.stderr)
        return 2
    asyncio.run(_serve_until_signalled(mirror, args.host, args.port, args.max_seconds))
    return 0


async def _serve_until_signalled(mirror: Mirror, host: str, port: int,
                                 max_seconds: float) -> None:
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, mirror.stop.set)
    await serve(mirror, host, port, max_seconds, lambda url: print(f"serving {url}", flush=True))


if __name__ == "__main__":
    sys.exit(main())
