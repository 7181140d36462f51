"""Produce the next tensor's bytes on a second core while this one writes and hashes the current one.

A conversion is a chain of CPU-bound steps per tensor: transcode (numpy), then hash (hashlib) and write
(the kernel's page cache). numpy's large array operations, hashlib and file writes all release the GIL, so
running the producer one or two pieces ahead on a worker thread overlaps them on a 2-core machine. Producers
run in order on that one thread, so producers that hand state to the next one (a weight's multiplier to its
scale tensor) keep working; each piece must be a fresh array (none is reused after it is yielded).
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")
_DONE = object()
DEFAULT_DEPTH = 2  # pieces computed ahead: enough to keep the second core busy, few enough to stay small


def prefetch(items: Iterable[T], depth: int = DEFAULT_DEPTH, *, max_bytes: int = 0,
             weigh: Callable[[T], int] | None = None) -> Prefetch[T]:
    """Yield `items` in order, computed up to `depth` ahead on a worker thread that starts now; its exceptions
    re-raise here.

    With `max_bytes` and `weigh` (an item's size), the worker also waits while the items computed and not yet
    taken weigh more than `max_bytes` (one item always fits): a deep lookahead bounded in memory. Iterate to the
    end, or `close()` (a `with` block does): the worker then stops."""
    return Prefetch(items, depth, max_bytes, weigh)


class _Shared:
    """What the worker and the consumer share (the worker holds no reference to the Prefetch, so an abandoned
    one is collected, and its __del__ stops the worker)."""

    def __init__(self, depth: int, max_bytes: int, weigh) -> None:
        self.ready: queue.Queue = queue.Queue(maxsize=depth)
        self.stop = threading.Event()
        self.max_bytes = max_bytes if weigh is not None else 0
        self.weigh = weigh
        self.held = 0  # bytes computed and not yet taken (with max_bytes)
        self.room = threading.Condition()

    def put(self, entry) -> bool:
        while not self.stop.is_set():
            try:
                self.ready.put(entry, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False


def _work(shared: _Shared, items: Iterator) -> None:
    try:
        for item in items:
            if shared.max_bytes:
                with shared.room:
                    shared.held += shared.weigh(item)
            if not shared.put((item, None)):
                return
            if shared.max_bytes:
                with shared.room:
                    while shared.held > shared.max_bytes and not shared.stop.is_set():
                        shared.room.wait(0.1)
            if shared.stop.is_set():
                return
        shared.put((_DONE, None))
    except BaseException as exc:  # handed to the consumer, raised there with its traceback
        shared.put((_DONE, exc))


class Prefetch(Iterator[T]):
    def __init__(self, items: Iterable[T], depth: int, max_bytes: int, weigh: Callable[[T], int] | None) -> None:
        self._shared = _Shared(depth, max_bytes, weigh)
        self._done = False
        self._worker = threading.Thread(target=_work, args=(self._shared, iter(items)),
                                        name="bitnet-convert-prefetch", daemon=True)
        self._worker.start()

    def __next__(self) -> T:
        shared = self._shared
        if self._done:
            raise StopIteration
        try:
            item, error = shared.ready.get()
        except BaseException:
            self.close()
            raise
        if item is _DONE:
            self.close()
            if error is not None:
                raise error
            raise StopIteration
        if shared.max_bytes:
            with shared.room:
                shared.held -= shared.weigh(item)
                shared.room.notify()
        return item

    def close(self) -> None:
        """Stop the worker (it ends at its next item) and wait for it; idempotent."""
        self._done = True
        shared = self._shared
        shared.stop.set()
        with shared.room:
            shared.room.notify()
        while self._worker.is_alive():
            try:
                shared.ready.get(timeout=0.1)
            except queue.Empty:
                pass

    def __enter__(self) -> Prefetch[T]:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:  # abandoned: let the worker end at its next item, without waiting for it here
        self._shared.stop.set()
