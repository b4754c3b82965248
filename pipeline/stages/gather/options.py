"""The options of `pipeline gather`, with their defaults written once (the CLI reads them here).

Torch-free and aiohttp-free, so `pipeline gather --help` stays fast.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

from pipeline import __version__
from pipeline.core.options import option
from pipeline.core.stage_options import VALIDATE
from pipeline.formats.journal import JOURNAL_NAME, PLACEHOLDERS_NAME

PRODUCT_TOKEN = "pipeline"  # what a robots.txt group names to address us (RFC 9309 2.2.1)
DEFAULT_USER_AGENT = (f"{PRODUCT_TOKEN}/{__version__} (image dataset builder{{contact}}; "
                      "honours robots.txt, X-Robots-Tag noai and TDMRep)")
MAX_DEFAULT_PROCESSES = 8
# First contacts with hosts that have not answered yet, in flight at once, on top of
# --concurrency, as a share of it: many such attempts on a 2011 list wait for a connection
# that never comes, so they must not take the downloads' slots. More at once (1.0) finished
# the small live hosts sooner on the world benchmark but not the run: each first contact
# begins with a name lookup, and more lookups at once made the resolver drop more of them.
PROBE_SHARE = 0.5
HYPONYM_CONFLICTS = ("drop", "first")  # `--hyponym-conflicts`


def default_processes() -> int:
    """One event loop per core: one loop saturates a core long before the network."""
    return max(1, min(len(os.sched_getaffinity(0)), MAX_DEFAULT_PROCESSES))


def _resolve_pins(values: tuple[str, ...]) -> tuple[tuple[str, int | None, str], ...]:
    from pipeline.stages.gather.names import parse_resolve  # imported when used: --help is fast

    return tuple(parse_resolve(value) for value in values)


def _dns_servers(values: tuple[str, ...]) -> tuple[str, ...]:
    from pipeline.stages.gather.names import parse_dns_server

    return tuple(parse_dns_server(value) for value in values)


def _digests(paths: tuple[Path, ...]) -> frozenset[str]:
    return frozenset(hashlib.sha256(path.read_bytes()).hexdigest() for path in paths)


@dataclass(frozen=True)
class GatherOptions:
    """Defaults chosen for the real web, where 40-60% of an ImageNet list is dead."""

    out: Path = option(Path("data/raw"), path="dir", help=(
        "Output root: images go to OUT/<wnid>/, the journal to OUT/gather.jsonl."))
    hyponym_conflicts: str = option("drop", choices=HYPONYM_CONFLICTS, help=(
        "A hyponym under two unrelated requested classes (several parents): drop its URLs, or "
        "file them under the first of those classes as requested. Listed in "
        "OUT/hyponym_conflicts.txt either way."))
    limit: int | None = option(None, type=int, min=1, help=(
        "Stop at exactly this many good images per synset."))
    concurrency: int = option(512, min=1, help=(
        "Downloads in flight at once (over all processes) from hosts that have answered; "
        "half as many again may be first contacts with hosts that have not answered yet."))
    per_host: int = option(16, min=1, help="Connections to any one host at once.")
    processes: int = option(0, min=0, show_default="all cores, at most 8", help=(
        "Worker processes, each with its own event loop (0: the default)."))
    timeout: float = option(10.0, min=0.1, help="Seconds to connect, and to wait for each read.")
    url_deadline: float = option(60.0, min=0.1, help=(
        "Seconds one attempt may take in all (connect, redirects, whole body)."))
    min_rate: int = option(1024, min=0, help=(
        "Bytes/s a body must average once --timeout seconds have passed (0: off)."))
    retries: int = option(3, min=0, help=(
        "Extra attempts in this run for failures that may heal at once (5xx, 429, resets); "
        "connection failures and timeouts wait for the next run."))
    host_failures: int = option(5, min=1, help=(
        "Connection failures in a row (refused, no connection within --timeout, TLS) that "
        "pause a host; one more try after --host-down-after seconds, and if it fails too the "
        "host's other URLs are not requested in this run (journaled host_down, tried next "
        "run)."))
    host_down_after: float = option(20.0, min=0, help=(
        "Seconds a host's failures must span before it is given up for the run."))
    resolve: tuple[tuple[str, int | None, str], ...] = option(
        (), type=str, multiple=True, metavar="HOST:PORT:ADDR", parse=_resolve_pins, help=(
            "Connect to ADDR for HOST (and PORT; HOST:ADDR for any port) without DNS, as "
            "curl's --resolve (repeatable)."))
    dns_servers: tuple[str, ...] = option(
        (), flag="--dns-server", type=str, multiple=True, metavar="ADDR[:PORT]",
        parse=_dns_servers, help=(
            "Ask this DNS resolver instead of the system's (repeatable; /etc/hosts and "
            "--resolve still come first), e.g. for a node without a good local resolver."))
    dns_timeout: float = option(5.0, min=0.1, help=(
        "Seconds one name lookup may take. A name that does not exist is host_not_found for "
        "all its URLs (tried again next run); a timeout is asked again before it counts."))
    allow_private_redirects: bool = option(False, help=(
        "Follow redirects from public addresses to loopback/private/link-local ones (refused "
        "by default as blocked_redirect)."))
    max_bytes: int = option(20 * 2**20, min=1024, help="Larger bodies are dropped as too_large.")
    min_size: int = option(VALIDATE.min_size, min=0, help=(
        "Images whose shorter side is smaller are dropped as too_small."))
    honour_opt_out: bool = option(True, flag="--honour-opt-out/--ignore-opt-out", help=(
        "Drop images whose X-Robots-Tag says noai/noimageai, or for which TDMRep reserves "
        "text and data mining (the tdm-reservation: 1 header, or a rule of the host's "
        "/.well-known/tdmrep.json, asked once per host), as opted_out (--ignore-opt-out "
        "keeps them)."))
    honour_robots: bool = option(True, flag="--honour-robots/--ignore-robots", help=(
        "Ask each host's /robots.txt once, before its first image, and drop the URLs it "
        f"disallows to {PRODUCT_TOKEN!r} (or to *) as opted_out, never requested; a host whose "
        "robots.txt answers 5xx is not fetched in this run (RFC 9309). Crawl-delay is "
        "honoured. --ignore-robots skips all this: use it only for sites you may crawl."))
    contact: str = option("", metavar="URL_OR_EMAIL", help=(
        "How a site owner can reach whoever runs this gather: shown in the User-Agent."))
    placeholder_digests: frozenset[str] = option(
        frozenset(), flag="--placeholder", type=Path, path="existing-file", multiple=True,
        parse=_digests, help=(
            "An image a host serves for deleted photos; identical bytes are dropped as "
            "placeholder (repeatable)."))
    placeholder_after: int = option(3, min=0, help=(
        "The same image (same bytes, or a near-identical perceptual hash: resized or "
        "re-encoded) from this many URLs (at least two different ones) is a host's generic "
        "placeholder: every copy is dropped as placeholder and the body remembered in "
        "OUT/placeholders.txt. A host that gives an image is also asked once for a made-up "
        "path: the picture it serves there is its placeholder (0: both off)."))
    backoff: float = 0.5
    max_retry_after: float = 60.0
    grace: float = 3.0  # seconds in-flight URLs get after Ctrl-C
    user_agent: str = DEFAULT_USER_AGENT  # "{contact}" becomes "; +" and --contact, or nothing

    @property
    def journal_path(self) -> Path:
        return self.out / JOURNAL_NAME

    @property
    def placeholders_path(self) -> Path:
        return self.out / PLACEHOLDERS_NAME

    @property
    def agent(self) -> str:
        """The User-Agent sent: the product token and version, and --contact when given."""
        return self.user_agent.format(contact=f"; +{self.contact}" if self.contact else "")

    @property
    def probe_slots(self) -> int:
        """First contacts in flight at most, beside the --concurrency downloads."""
        return max(1, int(self.concurrency * PROBE_SHARE))

    @property
    def worker_processes(self) -> int:
        return self.processes or default_processes()
