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
from collections.abc import Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")
_DONE = object()
DEFAULT_DEPTH = 2  # pieces computed ahead: enough to keep the second core busy, few enough to stay small


def prefetch(items: Iterable[T], depth: int = DEFAULT_DEPTH) -> Iterator[T]:
    """Yield `items` in order, computed up to `depth` ahead on a worker thread; its exceptions re-raise here."""
    ready: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def work() -> None:
        try:
            for item in items:
                while not stop.is_set():
                    try:
                        ready.put((item, None), timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            ready.put((_DONE, None))
        except BaseException as exc:  # handed to the consumer, raised there with its traceback
            ready.put((_DONE, exc))

    worker = threading.Thread(target=work, name="bitnet-convert-prefetch", daemon=True)
    worker.start()
    try:
        while True:
            item, error = ready.get()
            if item is _DONE:
                if error is not None:
                    raise error
                return
            yield item
    finally:
        stop.set()  # the consumer stopped (done, or failed): let the worker end instead of blocking on put
        while worker.is_alive():
            try:
                ready.get(timeout=0.1)
            except queue.Empty:
                pass
