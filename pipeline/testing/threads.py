"""The one harness that runs a test server on an event loop of its own in a daemon thread."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Awaitable, Callable, Iterator
from typing import Any, TypeVar

T = TypeVar("T")
JOIN_SECONDS = 30.0


@contextlib.contextmanager
def serve_in_thread(name: str, serve: Callable[[Callable[[T], None]], Awaitable[None]],
                    stop: Callable[[], None]) -> Iterator[T]:
    """Run `serve` until the block ends, so a test never leaks a server or a thread.

    `serve(ready)` calls `ready(value)` once it listens (the block gets `value`), then serves
    until `stop()`, which is called on its own loop, or until its own deadline. A server that
    fails to start raises here with its error as the cause; one that does not stop within
    JOIN_SECONDS raises on exit.
    """
    started = threading.Event()
    state: dict[str, Any] = {}

    def ready(value: T) -> None:
        state["value"], state["loop"] = value, asyncio.get_running_loop()
        started.set()

    def run() -> None:
        try:
            asyncio.run(serve(ready))
        except Exception as exc:  # handed to the caller below
            state["error"] = exc
        finally:
            started.set()

    thread = threading.Thread(target=run, name=name, daemon=True)
    thread.start()
    started.wait()
    if "loop" not in state:
        thread.join()
        raise RuntimeError(f"{name} did not start") from state.get("error")
    try:
        yield state["value"]
    finally:
        with contextlib.suppress(RuntimeError):  # the loop already ended (its deadline)
            state["loop"].call_soon_threadsafe(stop)
        thread.join(JOIN_SECONDS)
        if thread.is_alive():
            raise RuntimeError(f"{name} did not stop within {JOIN_SECONDS:g} s")
