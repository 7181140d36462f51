"""Start writing an output's pages to disk while the conversion is still producing it.

Every output is fsync'ed before it is renamed into place (atomic.py). Left to the end, that fsync writes the
whole file at once while the CPUs sit idle, a sizeable part of a conversion (BENCHMARKS.md, design
measurements). A thread that asks the kernel every few tenths of a second to start writeback of
what is dirty so far (Linux `sync_file_range(SYNC_FILE_RANGE_WRITE)`: asynchronous, it does not wait for
the disk) overlaps that I/O with the work, and the final fsync only waits for the tail. It works from the
path alone (any descriptor of a file reaches its pages), so writers need not know about it. Where the call is
missing (not Linux) it does nothing; its errors are ignored: durability still comes from the fsync.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import threading
from collections.abc import Iterator
from pathlib import Path

SYNC_FILE_RANGE_WRITE = 2  # <linux/fs.h>
INTERVAL_S = 0.2  # a few hundred MB of output between calls at a conversion's speed


def _sync_file_range():
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
        call = libc.sync_file_range
    except (OSError, AttributeError):
        return None
    call.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    call.restype = ctypes.c_int
    return call


_CALL = _sync_file_range()


@contextlib.contextmanager
def early_writeback(path: Path, interval_s: float = INTERVAL_S) -> Iterator[None]:
    """While the body runs, keep starting writeback of the file at `path` (or of every file under it)."""
    if _CALL is None:
        yield
        return
    stop = threading.Event()
    worker = threading.Thread(target=_run, args=(Path(path), stop, interval_s), name="bitnet-convert-writeback",
                              daemon=True)
    worker.start()
    try:
        yield
    finally:
        stop.set()
        worker.join()


def _run(path: Path, stop: threading.Event, interval_s: float) -> None:
    fds: dict[Path, int] = {}
    try:
        while not stop.wait(interval_s):
            files = [p for p in path.rglob("*") if p.is_file()] if path.is_dir() else [path]
            for file in files:
                if file not in fds:
                    with contextlib.suppress(OSError):
                        fds[file] = os.open(file, os.O_RDONLY)
                if file in fds:
                    _CALL(fds[file], 0, 0, SYNC_FILE_RANGE_WRITE)  # 0, 0: from the start to the end of file
    finally:
        for fd in fds.values():
            os.close(fd)
