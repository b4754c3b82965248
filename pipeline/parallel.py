"""Process-parallel map shared by the CPU-bound stages (validate, mean, pack).

Decoding is CPU work that holds the GIL in parts, so stages use processes. With one worker
it runs in-process, which keeps tracebacks simple and avoids start-up cost on tiny inputs.
"""

from __future__ import annotations

import itertools
import multiprocessing
import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")
R = TypeVar("R")

CHUNKS_IN_FLIGHT_PER_WORKER = 2


def default_workers() -> int:
    return max(1, len(os.sched_getaffinity(0)))


def imap(function: Callable[[T], R], items: Iterable[T], workers: int,
         chunksize: int = 16) -> Iterator[R]:
    """Yield function(item) for every item, in order, as results come back.

    Unlike Pool.imap, at most a few chunks per worker are in flight, so a consumer slower
    than the workers (an HDF5 writer, say) never makes results pile up in memory.
    """
    if workers <= 1:
        yield from map(function, items)
        return
    window = workers * CHUNKS_IN_FLIGHT_PER_WORKER
    with multiprocessing.get_context("fork").Pool(workers) as pool:
        pending: deque = deque()
        iterator = iter(items)
        while chunk := list(itertools.islice(iterator, chunksize)):
            pending.append(pool.apply_async(_apply, (function, chunk)))
            if len(pending) >= window:
                yield from pending.popleft().get()
        while pending:
            yield from pending.popleft().get()


def _apply(function: Callable[[T], R], chunk: list[T]) -> list[R]:
    return [function(item) for item in chunk]
