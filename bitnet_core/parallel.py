"""Row-local array work split over the CPU's cores.

A conversion's transcoding is a few whole-array numpy operations per tensor (bit shuffles, a dtype cast), and
numpy releases the GIL inside them, so the halves of a matrix transcode at once on two threads. On one thread
the producer of a 2B4T conversion was the long pole, longer than the hashing beside it (BENCHMARKS.md, design
measurements). Work below MIN_BYTES runs on the calling thread alone: handing a part to the pool costs more
than such small work.
"""

from __future__ import annotations

import concurrent.futures
import os
import threading
from collections.abc import Callable

MIN_BYTES = 1 << 20
_WORKERS = max(1, os.cpu_count() or 1)
_pool: concurrent.futures.ThreadPoolExecutor | None = None
_lock = threading.Lock()


def _executor() -> concurrent.futures.ThreadPoolExecutor:
    global _pool
    with _lock:
        if _pool is None:
            _pool = concurrent.futures.ThreadPoolExecutor(max_workers=_WORKERS - 1, thread_name_prefix="bitnet-rows")
        return _pool


def for_row_ranges(rows: int, nbytes: int, work: Callable[[int, int], None]) -> None:
    """Call work(start, stop) over [0, rows) cut into one range per core (one range when `nbytes`, the data
    the work touches, is under MIN_BYTES); the calling thread takes the first. Ranges must not overlap in what
    they write. The first exception of any range is raised once all have ended."""
    parts = min(_WORKERS, rows) if nbytes >= MIN_BYTES else 1
    if parts <= 1:
        work(0, rows)
        return
    bounds = [rows * i // parts for i in range(parts + 1)]
    pool = _executor()
    futures = [pool.submit(work, bounds[i], bounds[i + 1]) for i in range(1, parts)]
    try:
        work(bounds[0], bounds[1])
    finally:
        for future in futures:
            future.exception()  # waits; raised below in order
    for future in futures:
        future.result()
