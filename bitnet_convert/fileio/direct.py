"""An output file written to the disk straight from a few reused buffers, on a thread of its own.

A buffered write() of a fresh 1.2 GB output spends its time getting page-cache pages, not copying, and how
long that takes depends on whether the kernel has just freed pages to reuse (on a VM each new page is a fault
in the hypervisor too): the conversion's main thread sat in write() for most of a conversion. With O_DIRECT the
data goes from the buffer to the device at the same speed in every run, with little CPU and no page cache to
fill or to flush at the fsync (BENCHMARKS.md, design measurements).

`DirectFile` is a small file object (write, tell, seek, flush, close) for the writers' own loops, gguf-py's
and zipfile's: writes are copied into one of `BUFFERS` page-aligned buffers of `BUFFER_BYTES`, and a full
buffer is handed to a writer thread (pwrite releases the GIL: the copy, the hashing and the next tensor's
transcoding go on meanwhile). The last buffer is written padded to whole blocks, as O_DIRECT requires, and the
file cut back to its length. A write at a position already handed out (zipfile rewriting a member's local
header, a writer patching its header) goes into the buffer where that is still in memory, else it is kept
and written through an ordinary descriptor after the direct writes. Where O_DIRECT is refused (tmpfs,
some network filesystems, not Linux) the same loop writes through the page cache.
"""

from __future__ import annotations

import errno
import io
import mmap
import os
import queue
import threading

import numpy as np

BUFFER_BYTES = 8 << 20  # per pwrite: 2 MiB was as fast (design measurements); fewer, larger calls
BUFFERS = 3  # one being filled, up to two being written
BLOCK = 4096  # O_DIRECT alignment of offsets and lengths (the logical block size or a multiple of it)
_O_DIRECT = getattr(os, "O_DIRECT", 0)


class DirectFile(io.RawIOBase):
    """A new file at `path` (created, or truncated), written as above. Closing it waits for every write and
    raises the first error any of them met."""

    def __init__(self, path: str | os.PathLike) -> None:
        super().__init__()
        self._fd = -1  # until opened: a failed open leaves nothing for __del__ to close
        self._path = os.fspath(path)
        self._fd = _open(self._path)
        self._capacity = BUFFER_BYTES  # of each buffer, fixed for this file
        self._free: queue.Queue = queue.Queue()
        for _ in range(BUFFERS):
            self._free.put(mmap.mmap(-1, self._capacity))  # anonymous maps are page-aligned
        self._pending: queue.Queue = queue.Queue()
        self._error: BaseException | None = None
        self._raised = False
        self._buffer = self._free.get()
        self._view = np.frombuffer(self._buffer, np.uint8)
        self._start = 0  # file offset of self._buffer[0]
        self._filled = 0  # bytes of self._buffer in use
        self._pos = 0  # the file position (write, seek, tell)
        self._patches: list[tuple[int, bytes]] = []  # writes behind the buffer, applied at close
        self._writer = threading.Thread(target=self._write_out, name="bitnet-convert-direct-write", daemon=True)
        self._writer.start()

    # -------------------------------------------------------------------------------- the file interface

    def writable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        base = {os.SEEK_SET: 0, os.SEEK_CUR: self._pos, os.SEEK_END: self._end}[whence]
        if base + offset < 0:
            raise OSError(errno.EINVAL, "negative seek position")
        self._pos = base + offset
        return self._pos

    def write(self, data) -> int:
        self._raise_failed()
        view = memoryview(data).cast("B")
        n = view.nbytes
        if self._pos > self._end:  # past the end: the gap reads as zeros, as in a file
            self._append(memoryview(bytes(self._pos - self._end)))
        if self._pos < self._end:  # over bytes written before: the part that lies before the end
            inside = min(n, self._end - self._pos)
            self._overwrite(self._pos, view[:inside])
            self._pos += inside
            view = view[inside:]
        if view.nbytes:
            self._append(view)
            self._pos = self._end
        return n

    def flush(self) -> None:  # the data reaches the disk at close (atomic.py fsyncs after that)
        self._raise_failed()

    def close(self) -> None:
        if self.closed:
            return
        try:
            length = self._end
            tail = -(-self._filled // BLOCK) * BLOCK
            self._view[self._filled:tail] = 0
            self._hand_out(tail)
            self._pending.put(None)
            self._writer.join()
            self._raise_failed()
            if self._error is not None:  # raised already: the file is abandoned
                return
            os.ftruncate(self._fd, length)
            if self._patches:
                fd = os.open(self._path, os.O_WRONLY)
                try:
                    for offset, data in self._patches:
                        _pwrite_all(fd, memoryview(data), offset)
                finally:
                    os.close(fd)
        finally:
            if self._writer.is_alive():  # an exception above: let the thread end
                self._pending.put(None)
                self._writer.join()
            os.close(self._fd)
            super().close()

    def __del__(self) -> None:  # io.IOBase would call close(), which writes; an unclosed file is abandoned
        if self._fd >= 0 and not self.closed:
            if self._writer.is_alive():
                self._pending.put(None)
            os.close(self._fd)
            self._fd = -1

    # -------------------------------------------------------------------------------------------- buffers

    @property
    def _end(self) -> int:
        return self._start + self._filled

    def _append(self, view: memoryview) -> None:
        data = np.frombuffer(view, np.uint8)  # numpy copies without the GIL
        done = 0
        while done < data.size:
            take = min(data.size - done, self._capacity - self._filled)
            self._view[self._filled:self._filled + take] = data[done:done + take]
            self._filled += take
            done += take
            if self._filled == self._capacity:
                self._hand_out(self._capacity)
                self._buffer = self._free.get()
                self._view = np.frombuffer(self._buffer, np.uint8)
                self._raise_failed()

    def _overwrite(self, offset: int, view: memoryview) -> None:
        in_buffer = max(offset, self._start)
        if in_buffer > offset:  # already handed out: written after the direct writes
            self._patches.append((offset, bytes(view[:in_buffer - offset])))
        if in_buffer < offset + view.nbytes:
            data = np.frombuffer(view[in_buffer - offset:], np.uint8)
            self._view[in_buffer - self._start:in_buffer - self._start + data.size] = data

    def _hand_out(self, nbytes: int) -> None:
        self._pending.put((self._buffer, self._start, nbytes))
        self._start += self._filled
        self._filled = 0

    def _write_out(self) -> None:
        while (job := self._pending.get()) is not None:
            buffer, offset, nbytes = job
            try:
                if self._error is None and nbytes:
                    _pwrite_all(self._fd, memoryview(buffer)[:nbytes], offset)
            except BaseException as exc:  # raised in the writing thread at its next call
                self._error = exc
            finally:
                self._free.put(buffer)

    def _raise_failed(self) -> None:
        """Raise the writer thread's error, once (the caller then abandons the file; closing it only cleans up)."""
        if self._error is not None and not self._raised:
            self._raised = True
            raise self._error


def _open(path: str) -> int:
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_CLOEXEC", 0)
    if _O_DIRECT:
        try:
            return os.open(path, flags | _O_DIRECT, 0o644)
        except OSError as exc:
            if exc.errno != errno.EINVAL:  # EINVAL: this filesystem has no O_DIRECT
                raise
    return os.open(path, flags, 0o644)


def _pwrite_all(fd: int, view: memoryview, offset: int) -> None:
    done = 0
    while done < view.nbytes:
        try:
            done += os.pwrite(fd, view[done:], offset + done)
        except OSError as exc:
            # EINVAL from a direct write the filesystem cannot align: go on through the page cache
            if exc.errno != errno.EINVAL or not _drop_direct(fd):
                raise


def _drop_direct(fd: int) -> bool:
    import fcntl

    flags = fcntl.fcntl(fd, fcntl.F_GETFL)
    if not flags & _O_DIRECT:
        return False
    fcntl.fcntl(fd, fcntl.F_SETFL, flags & ~_O_DIRECT)
    return True
