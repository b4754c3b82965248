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
from typing import Any, TypeVar

T = TypeVar("T")
R = TypeVar("R")

CHUNKS_IN_FLIGHT_PER_WORKER = 2


def default_workers() -> int:
    return max(1, len(os.sched_getaffinity(0)))


def chunks_in_flight(workers: int) -> int:
    """How many chunks `imap` may have submitted but not yet handed to its consumer.

    A consumer that lends each chunk a buffer can reuse the buffer of chunk k for chunk
    k + chunks_in_flight(workers): by the time that one is submitted, chunk k was consumed.
    """
    return max(1, workers) * CHUNKS_IN_FLIGHT_PER_WORKER


def imap(function: Callable[[T], R], items: Iterable[T], workers: int, chunksize: int = 16,
         initializer: Callable[..., None] | None = None,
         initargs: tuple[Any, ...] = ()) -> Iterator[R]:
    """Yield function(item) for every item, in order, as results come back.

    Unlike Pool.imap, at most `chunks_in_flight(workers)` chunks are submitted and not yet
    consumed, so a consumer slower than the workers (an HDF5 writer, say) never makes results
    pile up in memory. `initializer(*initargs)` runs once in every worker (in this process
    when workers <= 1); workers are forked, so initargs may hold unpicklable shared memory.
    """
    if workers <= 1:
        if initializer is not None:
            initializer(*initargs)
        yield from map(function, items)
        return
    window = chunks_in_flight(workers)
    context = multiprocessing.get_context("fork")
    with context.Pool(workers, initializer=initializer, initargs=initargs) as pool:
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
