"""`pipeline gather`: download the images of some synsets, keeping only real, new images.

Shaped like img2dataset's reader / downloader / writer / logger split, over these modules:
`urllist` reads the list; `schedule` decides which URL goes next (fair per class, polite per
host, exact under --limit); `worker` runs one event loop per core, each fetching with `http`
(one bounded attempt, what a failure means) and checking and staging bodies with `store`;
`hosts` resolves names and tracks host health; this module runs the coordinator loop that
ties them together, owns the journal and prints the summary.

Every URL handed to a worker ends with a journal line, even after Ctrl-C or a worker crash,
and no attempt can outlive `url_deadline`, so a run always ends.
"""

from __future__ import annotations

from typing import Any

from pipeline.stages.gather.options import GatherOptions

__all__ = ["GatherOptions", "GatherReport", "gather", "gather_synsets"]
_RUN = frozenset({"GatherReport", "gather", "gather_synsets"})


def __getattr__(name: str) -> Any:
    """The run's names load aiohttp: only on use, so every `pipeline --help` stays fast."""
    if name in _RUN:
        from pipeline.stages.gather import run
        return getattr(run, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
