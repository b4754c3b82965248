"""The options of `pipeline gather`, with their defaults written once (the CLI reads them here).

Torch-free and aiohttp-free, so `pipeline gather --help` stays fast.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from pipeline import __version__
from pipeline.core.stage_options import VALIDATE
from pipeline.formats.journal import JOURNAL_NAME, PLACEHOLDERS_NAME

DEFAULT_USER_AGENT = f"pipeline/{__version__} (image dataset builder; honours X-Robots-Tag noai)"
MAX_DEFAULT_PROCESSES = 8
HYPONYM_CONFLICTS = ("drop", "first")  # `--hyponym-conflicts`


def default_processes() -> int:
    """One event loop per core: one loop saturates a core long before the network."""
    return max(1, min(len(os.sched_getaffinity(0)), MAX_DEFAULT_PROCESSES))


@dataclass(frozen=True)
class GatherOptions:
    """Defaults chosen for the real web, where 40-60% of an ImageNet list is dead."""

    out: Path = Path("data/raw")
    concurrency: int = 512  # half of it at most for hosts that have not answered yet
    per_host: int = 16
    processes: int = 0  # 0: default_processes()
    timeout: float = 10.0  # connect, and each read
    url_deadline: float = 60.0  # one attempt, connect to last byte
    min_rate: int = 1024  # bytes/s a body must average once `timeout` has passed
    retries: int = 3
    host_failures: int = 5  # consecutive connection failures/timeouts before a host is down
    host_down_after: float = 20.0  # seconds those failures must span (then one more probe)
    dns_servers: tuple[str, ...] = ()  # ADDR:PORT, instead of the system's resolvers
    dns_timeout: float = 5.0  # one lookup
    max_bytes: int = 20 * 2**20
    min_size: int = VALIDATE.min_size
    limit: int | None = None
    honour_opt_out: bool = True
    placeholder_digests: frozenset[str] = frozenset()
    placeholder_after: int = 3  # URLs with the same image that make it a placeholder (0: off)
    hyponym_conflicts: str = "drop"  # a synset under two requested classes: two labels
    resolve: tuple[tuple[str, int | None, str], ...] = ()  # (host, port or None, address)
    allow_private_redirects: bool = False
    backoff: float = 0.5
    max_retry_after: float = 60.0
    grace: float = 3.0  # seconds in-flight URLs get after Ctrl-C
    user_agent: str = DEFAULT_USER_AGENT

    @property
    def journal_path(self) -> Path:
        return self.out / JOURNAL_NAME

    @property
    def placeholders_path(self) -> Path:
        return self.out / PLACEHOLDERS_NAME

    @property
    def worker_processes(self) -> int:
        return self.processes or default_processes()
