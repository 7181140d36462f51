"""Dropping clean file pages from this process's resident set (madvise MADV_DONTNEED).

A page a process touches in a read-only file mapping stays in its resident set (and its peak RSS) until the
mapping goes. Such pages are clean, so dropping them loses nothing: a later read faults them back in from the
page cache. Linux (and other systems with madvise); where libc cannot be loaded, nothing happens.
"""

from __future__ import annotations

import ctypes
import functools
import mmap

_MADV_DONTNEED = getattr(mmap, "MADV_DONTNEED", 4)
PAGE = mmap.PAGESIZE


@functools.cache
def _madvise():
    try:
        libc = ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None
    madvise = libc.madvise
    madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    return madvise


def drop_resident(begin: int, end: int) -> None:
    """Drop the resident pages of addresses [begin, end) (page-aligned: whole pages) of a read-only file mapping."""
    madvise = _madvise()
    if madvise is not None and end > begin:
        madvise(begin, end - begin, _MADV_DONTNEED)
