"""The gather journal: one JSON line per finished URL, append-only.

It is the resume record: a re-run skips every id whose last line is a final outcome and tries
the transient ones again. Lines are flushed one by one, so `kill -9` loses at most the line
being written; a torn last line is ignored on reading.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

JOURNAL_NAME = "gather.jsonl"  # in the output root of `pipeline gather`
PLACEHOLDERS_NAME = "placeholders.txt"  # digests found to be placeholders, beside the journal

# In the order the summary table shows them. Final: ok, dead, http_error (4xx), not_image,
# too_large, too_small, placeholder, duplicate, opted_out, blocked_redirect. Transient (tried
# again by the next run): timeout, unreachable (refused, DNS, TLS), http_error (5xx, 429),
# host_down (not requested: its host failed too often), interrupted (Ctrl-C).
OUTCOMES = ("ok", "dead", "http_error", "timeout", "unreachable", "host_down", "interrupted",
            "not_image", "too_large", "too_small", "placeholder", "duplicate", "opted_out",
            "blocked_redirect")
ALWAYS_TRANSIENT = frozenset({"timeout", "unreachable", "host_down", "interrupted"})
RETRYABLE_STATUSES = frozenset({408, 425, 429, 500, 502, 503, 504})


def is_final(record: dict[str, Any]) -> bool:
    """A final outcome is not tried again on resume; a transient one is.

    Every record says which (`final`); the outcome decides only for records without it.
    """
    if record.get("final") is not None:
        return bool(record["final"])
    return record["outcome"] not in ALWAYS_TRANSIENT


def read_journal(path: Path) -> dict[str, dict[str, Any]]:
    """The last record of every id; unparsable lines (a torn tail after a kill) are skipped."""
    records: dict[str, dict[str, Any]] = {}
    if not path.exists():
        return records
    skipped = 0
    with open(path, encoding="utf-8", errors="replace") as handle:
        for line in handle:
            try:
                record = json.loads(line)
                records[record["id"]] = record
            except (ValueError, KeyError, TypeError):
                skipped += 1
    if skipped:
        log.warning("journal %s: skipped %d unreadable line(s)", path, skipped)
    return records
