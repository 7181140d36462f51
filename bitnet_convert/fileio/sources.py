"""Reading a source without trusting it: regular files only, bounded side files, strict JSON, and one open
descriptor per source file held for the whole run, with a check that nothing changed underneath.

Why each rule:
- A FIFO or a device blocks or never ends (`open` of a FIFO waits for a writer, /dev/zero has no end), so every
  source file is opened non-blocking and refused unless it is a regular file.
- config.json, an index or a tokenizer file is read whole into memory: a stray 256 MiB file must not be, so
  each is refused beyond SIDE_FILE_LIMIT bytes.
- A file written over while it is read (another model saved onto model.safetensors) would give an output
  mixing two models. Every read goes through the descriptor opened first, so a file replaced by a rename is
  still read as it was, and `SourceWatch.check` compares the descriptor's and the path's inode, size and
  modification time with what they were at open: any difference stops the run before its output is published.
  Readers call it after each tensor load (`SourceWatch.guard`), and each load returns a private copy of its
  bytes (pread, never a view of a mapping), so a load that passed the check used only bytes of the unchanged file.
"""

from __future__ import annotations

import dataclasses
import json
import mmap
import os
import stat
import threading
from pathlib import Path

import numpy as np

from bitnet_core import validate
from bitnet_core.checkpoint import TensorEntry
from bitnet_core import gcpause
from bitnet_core.errors import ConvertError

# Bounds for what is read whole: 2B4T's largest side file (tokenizer.json) is 9 MB, the largest real ones ~35 MB.
SIDE_FILE_LIMIT = 64 << 20
SIDE_FILES_TOTAL_LIMIT = 256 << 20  # all side files of one checkpoint together
# Paths longer than this are shortened in messages, so that the error stays one readable line.
SHOWN_PATH_CHARS = 160

_KINDS = ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISCHR, "a character device"),
          (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))


def printable(text: str) -> str:
    """`text` with every character a terminal would not show as itself (a newline, an escape, a byte of a
    file name that is not UTF-8) written as its Python escape: a message stays one line, and can be printed."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def shown(path) -> str:
    """`path` for a message: as is (its unprintable characters escaped), or its two ends around '...' when it is
    too long to read."""
    text = printable(os.fsdecode(path)) or "''"  # an empty path, shown as one
    if len(text) <= SHOWN_PATH_CHARS:
        return text
    half = SHOWN_PATH_CHARS // 2
    return f"{text[:half]}...{text[-half:]} ({len(text)} characters)"


def kind_of(mode: int) -> str:
    """What a non-regular file is, in words ("a FIFO (named pipe)", "a character device" ...)."""
    return next((name for test, name in _KINDS if test(mode)), "not a regular file")


def os_problem(path, exc: OSError) -> ConvertError:
    """An OSError met while reading `path`, as one line naming it ("File name too long", "Permission denied")."""
    if isinstance(exc, FileNotFoundError):
        return ConvertError(f"{shown(path)}: no such file")
    return ConvertError(f"{shown(path)}: cannot read: {exc.strerror or exc}")


def open_regular(path) -> int:
    """A read-only descriptor of `path`, refused unless it is a regular file (checked on the descriptor itself,
    so the path cannot be swapped for a FIFO between a check and the open)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        raise os_problem(path, exc) from None
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        raise ConvertError(f"{shown(path)}: is {kind_of(mode)}, not a regular file")
    return fd


@dataclasses.dataclass(frozen=True)
class Identity:
    """What must stay the same while a file is read."""

    device: int
    inode: int
    size: int
    mtime_ns: int

    @classmethod
    def of(cls, st: os.stat_result) -> Identity:
        return cls(st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


def _change(path: Path, opened: Identity, fd: int | None) -> str | None:
    """How the file at `path` differs from the one opened (None when it does not)."""
    try:
        now = Identity.of(os.stat(path))
    except OSError:
        return "was removed"
    if (now.device, now.inode) != (opened.device, opened.inode):
        return "was replaced by another file"
    held = Identity.of(os.fstat(fd)) if fd is not None else now
    if held != opened or now != opened:
        return "was modified (size or modification time changed)"
    return None


class HeldFile:
    """One source file, opened once for the whole run: every read goes through this descriptor."""

    def __init__(self, path):
        self.path = Path(path)
        self.fd = open_regular(self.path)
        self.identity = Identity.of(os.fstat(self.fd))
        self._lock = threading.Lock()
        self._mapping = None

    @property
    def size(self) -> int:
        return self.identity.size

    def pread(self, offset: int, nbytes: int) -> bytes:
        """Up to `nbytes` bytes at `offset` (fewer only at the end of the file)."""
        buffer = bytearray(nbytes)
        got = self.readinto(offset, memoryview(buffer))
        return bytes(buffer) if got == nbytes else bytes(buffer[:got])

    def readinto(self, offset: int, view: memoryview) -> int:
        """Fill `view` from `offset`; the number of bytes read (short only at the end of the file)."""
        got = 0
        try:
            while got < view.nbytes:  # one pread returns at most ~2 GiB on Linux
                n = os.preadv(self.fd, [view[got:]], offset + got)
                if not n:
                    break
                got += n
        except OSError as exc:
            raise os_problem(self.path, exc) from None
        return got

    def mapping(self) -> np.ndarray:
        """A read-only memory map of the whole file (for inspection only: readers copy with `pread`)."""
        with self._lock:
            if self._mapping is None:
                if self.size == 0:
                    self._mapping = np.zeros(0, np.uint8)
                else:
                    try:
                        self._mapping = np.frombuffer(mmap.mmap(self.fd, 0, access=mmap.ACCESS_READ), np.uint8)
                    except (OSError, ValueError) as exc:
                        raise ConvertError(f"{shown(self.path)}: cannot map file: {exc}") from None
            return self._mapping

    def change(self) -> str | None:
        return _change(self.path, self.identity, self.fd)

    def close(self) -> None:
        fd, self.fd = self.fd, -1
        if fd >= 0:
            os.close(fd)

    def __del__(self):  # a mapping keeps its own duplicate of the descriptor
        if getattr(self, "fd", -1) >= 0:
            self.close()


class SourceWatch:
    """Every file one checkpoint is read from, with what each was when it was opened; `check` says if any changed.

    Readers `hold` their tensor files, read config and tokenizer files through `read_side_file`, and wrap
    their entries with `guard`, so each tensor load ends with a check of all of them."""

    def __init__(self) -> None:
        self._held: list[HeldFile] = []
        self._read: list[tuple[Path, Identity]] = []
        self._side_bytes = 0

    def hold(self, path) -> HeldFile:
        held = HeldFile(path)
        self._held.append(held)
        return held

    def read_side_file(self, path, what: str = "file") -> bytes:
        """The bytes of a small file (config, index, tokenizer), refused beyond SIDE_FILE_LIMIT."""
        fd = open_regular(path)
        try:
            opened = Identity.of(os.fstat(fd))
            self.charge(opened.size, path, what)
            with os.fdopen(fd, "rb", closefd=False) as fh:
                data = fh.read(opened.size + 1)
        except OSError as exc:
            raise os_problem(path, exc) from None
        finally:
            os.close(fd)
        if len(data) != opened.size:
            raise ConvertError(f"{shown(path)}: changed while it was read (size differs)")
        self._read.append((Path(path), opened))
        return data

    def charge(self, nbytes: int, path, what: str) -> None:
        """Count `nbytes` of side data read whole from `path`, refused past the per-file and total limits."""
        if nbytes > SIDE_FILE_LIMIT:
            raise ConvertError(f"{shown(path)}: {nbytes:,} bytes, more than any {what} (at most "
                               f"{SIDE_FILE_LIMIT >> 20} MiB)")
        self._side_bytes += nbytes
        if self._side_bytes > SIDE_FILES_TOTAL_LIMIT:
            raise ConvertError(f"{shown(path)}: config and tokenizer files together exceed "
                               f"{SIDE_FILES_TOTAL_LIMIT >> 20} MiB, more than any real checkpoint has")

    def check(self) -> None:
        """Raise ConvertError naming the first source file that changed since it was opened."""
        for held in self._held:
            if (change := held.change()) is not None:
                raise _changed(held.path, change)
        for path, opened in self._read:
            if (change := _change(path, opened, None)) is not None:
                raise _changed(path, change)

    def guard(self, entries: dict[str, TensorEntry]) -> dict[str, TensorEntry]:
        """The same entries, each load followed by `check` (the packed form and row ranges too)."""
        def after(value) -> None:
            self.check()

        return {name: validate.after_each_load(entry, after, after, lambda value, start, stop: self.check())
                for name, entry in entries.items()}


def _changed(path: Path, change: str) -> ConvertError:
    return ConvertError(f"{shown(path)}: {change} while it was being read; nothing was written (run again once "
                        "nothing writes to it)")


# ---------------------------------------------------------------------------------------------------- JSON


class _NotJSONNumber(ValueError):
    """A number Python's json accepts but JSON has not (NaN, Infinity, 1e999)."""


def _refuse_constant(name: str):
    raise _NotJSONNumber(f"{name}, which is not a JSON number")


def _finite_float(text: str) -> float:
    value = float(text)
    if value in (float("inf"), float("-inf")):
        raise _NotJSONNumber(f"the number {text[:40]}, beyond the float range")
    return value


def parse_json(data: bytes, where: str, subject: str = "", *, non_finite: bool = False):
    """Strict JSON from `data`: UTF-8, no NaN/Infinity, no number beyond the float range, no integer beyond
    Python's 4300 digits; anything else is one ConvertError, "<where>: [<subject> is ]not ...". (Integers are
    parsed by json's C scanner: a parse_int hook would double the time of a 9 MB tokenizer.json; each field
    that holds one checks its range where it is read.) `non_finite`: NaN, Infinity and 1e999 are read as
    Python reads them (a provenance record, only shown: `--json` prints them as null).
    """
    said = f"{where}: {subject} is" if subject else f"{where}:"
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConvertError(f"{said} not UTF-8 text (byte {exc.start})") from None
    try:
        with gcpause.paused():  # a tokenizer.json is ~1M containers
            if non_finite:
                return json.loads(text)
            return json.loads(text, parse_constant=_refuse_constant, parse_float=_finite_float)
    except json.JSONDecodeError as exc:
        raise ConvertError(f"{said} not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno})") from None
    except RecursionError:
        raise ConvertError(f"{said} JSON nested too deeply") from None
    except _NotJSONNumber as exc:
        raise ConvertError(f"{said} JSON holding {exc}") from None
    except ValueError:  # int() refuses more than 4300 digits
        raise ConvertError(f"{said} JSON holding an integer of more than 4300 digits") from None


def read_json_file(watch: SourceWatch, path, what: str = "JSON file", *, non_finite: bool = False) -> dict:
    """A small JSON file read through `watch`, refused unless it holds a JSON object."""
    value = parse_json(watch.read_side_file(path, what), shown(path), non_finite=non_finite)
    if not isinstance(value, dict):
        raise ConvertError(f"{shown(path)}: not a JSON object")
    return value


