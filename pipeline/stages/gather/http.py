"""One attempt at one URL, and what its failure means.

Every attempt is bounded as a whole (`url_deadline`: connect, redirects, headers and body), not
only per read: a server that trickles one byte every few seconds keeps each read short forever.
A body that averages less than `min_rate` bytes/s once `timeout` seconds have passed is given
up early. Redirects are followed by hand so that each hop is checked (scheme, Flickr's
"photo unavailable" target, a public URL sent to a private address).
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import errno
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import aiohttp
from yarl import URL

from pipeline.core.images import sniff_extension
from pipeline.formats.journal import RETRYABLE_STATUSES
from pipeline.stages.gather.hosts import is_public
from pipeline.stages.gather.names import Resolver
from pipeline.stages.gather.options import GatherOptions

# Where Flickr (and Yahoo's image hosts) send a deleted photo: a 200 "photo unavailable" PNG.
PLACEHOLDER_URL_MARKERS = ("photo_unavailable", "photo-unavailable")
OPT_OUT_DIRECTIVES = frozenset({"noai", "noimageai"})
REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
MAX_REDIRECTS = 5
SNIFF_BYTES = 16  # enough for every magic number sniff_extension knows
POLICY_MAX_BYTES = 500 * 1024  # of a robots.txt, what RFC 9309 2.5 asks a crawler to parse
# Connect errors of our own making: out of descriptors, ports or buffers, no route or network.
LOCAL_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.EADDRNOTAVAIL, errno.ENOBUFS,
                          errno.ENOMEM, errno.ENETUNREACH, errno.ENETDOWN})


@dataclass
class Attempt:
    """What one attempt gave. `body` is set only when there is an image left to check.

    `connection_failed` feeds host health (refused, TLS, connect timeouts), `timed_out` when
    it was a connect timeout; `ours` says why a failure was our own making (never the host's);
    `retry` says whether another attempt in this run can help; `final` whether a later run
    should try again; `cut_short`: silent for longer than the host's own read timeout, but not
    the full --timeout.
    """

    outcome: str
    final: bool
    http_status: int | None = None
    error: str = ""
    body: bytes | None = None
    connection_failed: bool = False
    retry: bool = False
    retry_after: float | None = None
    cut_short: bool = False
    timed_out: bool = False
    ours: str = ""


_Reader = Callable[[aiohttp.ClientResponse, GatherOptions], Awaitable[Attempt]]


def _failed(outcome: str, error: str, *, retry: bool = False,
            connection: bool = True) -> Attempt:
    return Attempt(outcome, final=False, error=error, connection_failed=connection, retry=retry)


def _cut_short(read_timeout: float) -> Attempt:
    """Our impatience, not the host's failure: retried once in this run, with the host's timer
    doubled (the next run, with the full --timeout)."""
    attempt = _failed("timeout", f"no data for {read_timeout:.1f} s, far longer than this host "
                                 "usually takes", retry=True, connection=False)
    attempt.cut_short = True
    return attempt


async def fetch_once(session: aiohttp.ClientSession, url: str, options: GatherOptions,
                     resolver: Resolver, read_timeout: float | None = None) -> Attempt:
    """Never raises for anything the web does; never takes longer than `url_deadline`.

    `read_timeout`: the host's own limit for silence (see hosts.HostBook.read_timeout), when
    shorter than --timeout.
    """
    timeout = None if read_timeout is None else aiohttp.ClientTimeout(
        total=None, sock_connect=options.timeout, sock_read=read_timeout)
    hops = [URL(url, encoded=True)]
    attempt = await _attempt(session, hops, options, resolver, timeout, read_timeout)
    if attempt.connection_failed and hops[-1].host != hops[0].host:
        attempt.connection_failed = False  # another host's failure: the host itself answered
    return attempt


async def fetch_policy_file(session: aiohttp.ClientSession, url: str, options: GatherOptions,
                            resolver: Resolver) -> Attempt:
    """A site's policy file (robots.txt, tdmrep.json), bounded and redirected like an image:
    "ok" with its first POLICY_MAX_BYTES on a 2xx, else the status or the failure."""
    return await _attempt(session, [URL(url, encoded=True)], options, resolver, None, None,
                          read=_read_policy_file)


async def _attempt(session: aiohttp.ClientSession, hops: list[URL], options: GatherOptions,
                   resolver: Resolver, timeout: aiohttp.ClientTimeout | None,
                   read_timeout: float | None, read: _Reader | None = None) -> Attempt:
    try:
        async with asyncio.timeout(options.url_deadline):
            return await _follow(session, hops, options, resolver, timeout,
                                 read or _read_response)
    except _TooSlow as slow:
        return _failed("timeout", str(slow))
    except aiohttp.ConnectionTimeoutError:
        attempt = _failed("unreachable", f"no connection within {options.timeout:g} s "
                                         "(--timeout)")
        attempt.timed_out = True
        return attempt
    except aiohttp.SocketTimeoutError:
        if read_timeout is not None:
            return _cut_short(read_timeout)
        return _failed("timeout", f"no data for {options.timeout:g} s (--timeout)")
    except TimeoutError:
        return _failed("timeout", f"not finished within {options.url_deadline:g} s "
                                  "(--url-deadline)")
    except aiohttp.ClientConnectorDNSError as exc:  # a redirect's host: URLs' hosts are resolved
        return Attempt("host_not_found", final=False, error=str(exc.os_error))
    except (aiohttp.ClientConnectorCertificateError, aiohttp.ClientSSLError) as exc:
        return _failed("unreachable", f"TLS failure: {exc}")
    except aiohttp.ClientConnectorError as exc:
        return _connect_failed(exc.os_error)
    except (aiohttp.InvalidURL, ValueError) as exc:
        return Attempt("dead", final=True, error=f"invalid URL: {exc}")
    except (aiohttp.ClientError, OSError) as exc:
        # Resets, disconnects mid-body, broken chunked encoding: the next try may work, and
        # the host did answer the connection, so its health is not in question.
        return _failed("dead", f"{type(exc).__name__}: {exc}", retry=True, connection=False)


def _connect_failed(error: OSError) -> Attempt:
    """Refused is the host's answer; running out of descriptors or ports, or having no
    route, is ours: retried, never held against the host."""
    attempt = _failed("unreachable", f"cannot connect: {error}")
    if error.errno in LOCAL_ERRNOS:
        attempt.ours = f"local error: {error.strerror or error}"
        attempt.retry = True
    return attempt


class _TooSlow(Exception):
    pass


async def _follow(session: aiohttp.ClientSession, hops: list[URL], options: GatherOptions,
                  resolver: Resolver, timeout: aiohttp.ClientTimeout | None,
                  read: _Reader) -> Attempt:
    """Each hop is appended to `hops` before it is requested; `read` makes the final answer
    an Attempt."""
    url = hops[-1]
    for _ in range(MAX_REDIRECTS + 1):
        async with session.get(url, allow_redirects=False,
                               **({"timeout": timeout} if timeout else {})) as response:
            location = response.headers.get("Location")
            if response.status not in REDIRECT_STATUSES or not location:
                return await read(response, options)
        target = url.join(URL(location))
        refused = await _refused_redirect(url, target, options, resolver)
        if refused is not None:
            return refused
        url = target
        hops.append(url)
    return Attempt("dead", final=True, error=f"more than {MAX_REDIRECTS} redirects")


async def _refused_redirect(source: URL, target: URL, options: GatherOptions,
                            resolver: Resolver) -> Attempt | None:
    if target.scheme not in ("http", "https"):
        return Attempt("blocked_redirect", final=True,
                       error=f"redirect to a non-HTTP URL: {target}")
    if is_placeholder_url(str(target)):
        return Attempt("placeholder", final=True, error=f"redirected to {target}")
    if options.allow_private_redirects or source.host == target.host:
        return None
    with contextlib.suppress(OSError):  # an unresolvable target fails when requested
        if (all(map(is_public, await resolver.addresses(source.host or "", source.port or 80)))
                and not all(map(is_public,
                                await resolver.addresses(target.host or "", target.port or 80)))):
            return Attempt("blocked_redirect", final=True,
                           error=f"a public URL redirected to a private address: {target} "
                                 "(--allow-private-redirects allows it)")
    return None


async def _read_response(response: aiohttp.ClientResponse, options: GatherOptions) -> Attempt:
    status = response.status
    if status in (404, 410):
        return Attempt("dead", final=True, http_status=status, error=f"HTTP {status}")
    if status in RETRYABLE_STATUSES:
        attempt = Attempt("http_error", final=False, http_status=status, error=f"HTTP {status}",
                          retry=True)
        attempt.retry_after = parse_retry_after(response.headers.get("Retry-After"))
        return attempt
    if status >= 400:
        return Attempt("http_error", final=True, http_status=status, error=f"HTTP {status}")
    if status >= 300:
        return Attempt("dead", final=True, http_status=status,
                       error=f"HTTP {status} without a Location")
    if options.honour_opt_out and opted_out(response.headers.getall("X-Robots-Tag", [])):
        return Attempt("opted_out", final=True, http_status=status,
                       error="X-Robots-Tag: " + ", ".join(response.headers.getall("X-Robots-Tag")))
    if options.honour_opt_out and tdm_reserved(response.headers.get("tdm-reservation")):
        policy = response.headers.get("tdm-policy")
        return Attempt("opted_out", final=True, http_status=status,
                       error="tdm-reservation: 1 (W3C TDMRep: text and data mining rights "
                             "reserved" + (f"; policy {policy}" if policy else "") + ")")
    declared = response.content_length
    if declared is not None and declared > options.max_bytes:
        return Attempt("too_large", final=True, http_status=status,
                       error=f"Content-Length {declared} > {options.max_bytes}")
    return await _read_body(response, options)


async def _read_policy_file(response: aiohttp.ClientResponse,
                            options: GatherOptions) -> Attempt:
    status = response.status
    if not 200 <= status < 300:
        return Attempt("http_error", final=status not in RETRYABLE_STATUSES, http_status=status,
                       error=f"HTTP {status}")
    chunks: list[bytes] = []
    size = 0
    started = time.monotonic()
    while size < POLICY_MAX_BYTES and (chunk := await _next_chunk(response, size, started,
                                                                   options)):
        chunks.append(chunk)
        size += len(chunk)
    return Attempt("ok", final=True, http_status=status,
                   body=b"".join(chunks)[:POLICY_MAX_BYTES])


async def _read_body(response: aiohttp.ClientResponse, options: GatherOptions) -> Attempt:
    """Stream the body, giving up as soon as it is clearly not an image, too large or too slow."""
    chunks: list[bytes] = []
    size = 0
    started = time.monotonic()
    sniffed = False
    while chunk := await _next_chunk(response, size, started, options):
        chunks.append(chunk)
        size += len(chunk)
        if size > options.max_bytes:
            return Attempt("too_large", final=True, http_status=response.status,
                           error=f"body exceeds {options.max_bytes} bytes")
        if not sniffed and size >= SNIFF_BYTES:
            sniffed = True
            if sniff_extension(b"".join(chunks)[:SNIFF_BYTES]) is None:
                return _not_image(response)
    body = b"".join(chunks)
    if not sniffed and sniff_extension(body) is None:
        return _not_image(response)
    return Attempt("ok", final=True, http_status=response.status, body=body)


async def _next_chunk(response: aiohttp.ClientResponse, size: int, started: float,
                      options: GatherOptions) -> bytes:
    """The next piece of the body (b"" at its end), waiting no longer than the moment the body
    would fall below --min-rate (once --timeout seconds have passed)."""
    if not options.min_rate:
        return await response.content.readany()
    give_up = started + max(options.timeout, size / options.min_rate)
    limit = asyncio.timeout_at(asyncio.get_running_loop().time()
                               + max(0.0, give_up - time.monotonic()))
    try:
        async with limit:
            return await response.content.readany()
    except TimeoutError:
        if not limit.expired():
            raise
        seconds = time.monotonic() - started
        raise _TooSlow(f"body arrived at {size / seconds:.0f} B/s, below --min-rate "
                       f"{options.min_rate} B/s ({size} bytes in {seconds:.0f} s)") from None


def _not_image(response: aiohttp.ClientResponse) -> Attempt:
    return Attempt("not_image", final=True, http_status=response.status,
                   error=f"body is not an image ({response.content_type})")


def made_up_url(url: str) -> str:
    """A URL beside `url` that cannot name a real file (same scheme, host, folder and
    extension; a random name): what a host answers for it is its answer for a missing photo.
    A host that answers it with a picture serves that picture for every photo it lost."""
    parsed = URL(url, encoded=True)
    folder, _, name = parsed.raw_path.rpartition("/")
    extension = name.rpartition(".")[2] if "." in name else "jpg"
    token = secrets.token_hex(8)
    return str(parsed.with_path(f"{folder}/pipeline-absent-{token}.{extension}", encoded=True)
               .with_query(None))


def parse_retry_after(value: str | None) -> float | None:
    """Retry-After is either delta-seconds or an HTTP date."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    with contextlib.suppress(TypeError, ValueError):
        when = email.utils.parsedate_to_datetime(value)
        return max(0.0, when.timestamp() - time.time())
    return None


def is_placeholder_url(url: str) -> bool:
    lowered = url.lower()
    return any(marker in lowered for marker in PLACEHOLDER_URL_MARKERS)


def tdm_reserved(value: str | None) -> bool:
    """The W3C TDMRep header: `tdm-reservation: 1` reserves text and data mining rights (the
    EU DSM Directive's Art. 4 opt-out); 0 or no header does not."""
    return value is not None and value.strip() == "1"


def opted_out(values: list[str]) -> bool:
    """X-Robots-Tag directives, either bare or addressed to us (`pipeline: noai`)."""
    for value in values:
        for part in value.split(","):
            agent, colon, directive = part.strip().lower().rpartition(":")
            if colon and agent.strip() not in ("pipeline", "*"):
                continue
            if directive.strip() in OPT_OUT_DIRECTIVES:
                return True
    return False
