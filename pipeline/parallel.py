"""Process-parallel map shared by the CPU-bound stages (validate, mean, pack).

Decoding is CPU work that holds the GIL in parts, so stages use processes. With one worker
it runs in-process, which keeps tracebacks simple and avoids start-up cost on tiny inputs.
"""

from __future__ import annotations

import multiprocessing
import os
from collections.abc import Callable, Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")
R = TypeVar("R")


def default_workers() -> int:
    return max(1, len(os.sched_getaffinity(0)))


def imap(function: Callable[[T], R], items: Iterable[T], workers: int,
         chunksize: int = 16, ordered: bool = True) -> Iterator[R]:
    """Yield function(item) for every item; results stream back as they are produced."""
    if workers <= 1:
        yield from map(function, items)
        return
    with multiprocessing.get_context("fork").Pool(workers) as pool:
        mapper = pool.imap if ordered else pool.imap_unordered
        yield from mapper(function, items, chunksize)
