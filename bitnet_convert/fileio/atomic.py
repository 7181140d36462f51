"""All-or-nothing outputs that never clobber: write beside the target under a temporary name, publish at the end.

- A conversion that fails or is interrupted leaves at most a hidden `.NAME.partial-*` file or folder, never a
  file at the target path: Ctrl-C, SIGTERM and SIGHUP remove it on the way out (the process then still ends
  by its signal); only `kill -9` or a crash leaves one behind.
- Without `force` any directory entry at the target is refused, a dangling symlink too, and the final rename
  cannot replace one that appeared while we wrote (another run): Linux `renameat2(RENAME_NOREPLACE)`.
- With `force` only an earlier output of bitnet-convert in the same format is replaced: a folder holding our
  provenance record and nothing but files our folder writers write, or a file whose recorded provenance says
  so (how to read it is the format's business: the formats layer names it with `replacing_outputs_of`).
  `RENAME_EXCHANGE` swaps the new output in, so the target path is never empty, and what it swapped out is
  deleted only if it is still the entry that was checked.
- Where renameat2 is missing (old kernels, NFS), runs serialize publishing on a hidden lock file beside the
  target; a folder is then replaced in two renames, and the old output a crash strands between them in a
  hidden `.NAME.old-*` is put back (or reported) by the next run.
The output is fsync'ed before it is published (its disk writes started early: writeback.py), so a crash right
after cannot leave a renamed but empty file.
"""

from __future__ import annotations

import contextlib
import contextvars
import ctypes
import ctypes.util
import dataclasses
import errno
import fcntl
import json
import logging
import os
import platform
import re
import shutil
import signal
import stat
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

from bitnet_convert.fileio import sources
from bitnet_convert.fileio.integrity import PROVENANCE_FILE
from bitnet_convert.fileio.safetensors_io import INDEX_FILE, SINGLE_FILE
from bitnet_convert.fileio.writeback import early_writeback
from bitnet_core.errors import ConvertError
from bitnet_core.names import TOKENIZER_FILES

log = logging.getLogger(__name__)

PRODUCER = "bitnet-convert"  # the "producer" of every provenance record (integrity.provenance_record)

# What our folder writers (hf, flax) put into an output besides the weight files their record lists: config,
# provenance, weights of fixed name, and the tokenizer files the readers carry (names.TOKENIZER_FILES, chat
# templates). Anything else in a folder is the user's, and --force never deletes it.
FOLDER_FILES = frozenset({"config.json", PROVENANCE_FILE, SINGLE_FILE, INDEX_FILE, "params.safetensors",
                          *TOKENIZER_FILES})
_CHAT_TEMPLATE = re.compile(r"[^.].*\.jinja")
_RECORD_LIMIT = 1 << 20  # our provenance record is ~1 kB; a bigger file there is not ours (never read it whole)
_NAMES_SHOWN = 8  # unexpected entries named in a refusal

REFUSED = "refusing to replace it, even with --force"


# --------------------------------------------------------------------------- which output --force may replace


@dataclasses.dataclass(frozen=True)
class _Writing:
    """The format being written and its reader of a file's recorded provenance (None: not known here)."""

    fmt: str | None = None
    recorded_provenance: Callable[[Path], dict | None] | None = None


_WRITING: contextvars.ContextVar[_Writing | None] = contextvars.ContextVar("bitnet_convert_writing", default=None)


@contextlib.contextmanager
def replacing_outputs_of(fmt: str, recorded_provenance: Callable[[Path], dict | None]) -> Iterator[None]:
    """While the body writes a `fmt` output, --force recognizes an earlier one by `recorded_provenance(path)`.

    Only the formats layer knows where a GGUF or an .npz keeps its record, and this layer may not import it
    (tests/test_layers.py), so the registry says it around each write. Folders are recognized without it."""
    token = _WRITING.set(_Writing(fmt, recorded_provenance))
    try:
        yield
    finally:
        _WRITING.reset(token)


def _check_replaceable(target: Path, directory: bool, writing: _Writing) -> os.stat_result | None:
    """What is at `target` when --force may replace it (None: nothing is); else ConvertError saying what is in
    the way."""
    found = _lstat(target)
    if found is None:
        return None
    problem = _kind_problem(found, directory)
    if problem is None:
        problem = _folder_problem(target, writing.fmt) if directory else _file_problem(target, writing)
    if problem is not None:
        raise ConvertError(f"{target}: {problem}")
    return found


def _kind_problem(found: os.stat_result, directory: bool) -> str | None:
    if stat.S_ISLNK(found.st_mode):
        return f"is a symbolic link (bitnet-convert never writes one); {REFUSED}"
    if stat.S_ISDIR(found.st_mode):
        return None if directory else "is a folder; --force replaces a file output only by a file"
    if stat.S_ISREG(found.st_mode):
        return "is a file; --force replaces a folder output only by a folder" if directory else None
    return f"is neither a file nor a folder; {REFUSED}"


def _folder_problem(folder: Path, fmt: str | None) -> str | None:
    entries = sorted(os.scandir(folder), key=lambda entry: entry.name)
    if not entries:
        return None  # an empty folder: nothing to lose
    record = _folder_record(folder)
    strangers = [entry for entry in entries if not _written_by_us(entry, record or {})]
    if record is None:
        in_the_way = f"; in the way: {_names(strangers)}" if strangers else ""
        return f"folder holds no model written by bitnet-convert (no {PROVENANCE_FILE}){in_the_way}; {REFUSED}"
    if fmt is not None and record.get("format") != fmt:
        return f"folder {_other_format(record, fmt)}"
    if strangers:
        return f"folder holds what bitnet-convert does not write: {_names(strangers)}; {REFUSED}"
    return None


def _folder_record(folder: Path) -> dict | None:
    """The provenance record our folder writers leave, when it is one (any damage: not ours)."""
    path = folder / PROVENANCE_FILE
    found = _lstat(path)
    if found is None or not stat.S_ISREG(found.st_mode) or found.st_size > _RECORD_LIMIT:
        return None
    try:
        record = json.loads(path.read_bytes())
    except (OSError, ValueError):  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        return None
    return record if isinstance(record, dict) and record.get("producer") == PRODUCER else None


def _written_by_us(entry: os.DirEntry, record: dict) -> bool:
    """A plain file of a name our folder writers write (the weight files of a sharded output: as recorded)."""
    recorded = record.get("files")
    weights = {name for name in recorded if isinstance(name, str)} if isinstance(recorded, list) else set()
    name = entry.name
    return (entry.is_file(follow_symlinks=False) and not name.startswith(".")
            and (name in FOLDER_FILES or name in weights or bool(_CHAT_TEMPLATE.fullmatch(name))))


def _names(entries: list[os.DirEntry]) -> str:
    shown = [entry.name + ("/" if entry.is_dir(follow_symlinks=False) else "") for entry in entries[:_NAMES_SHOWN]]
    more = len(entries) - len(shown)
    return ", ".join(shown) + (f" and {more} more" if more else "")


def _file_problem(path: Path, writing: _Writing) -> str | None:
    if writing.recorded_provenance is None:
        return f"not known to be an output of bitnet-convert (no reader of its format's provenance given); {REFUSED}"
    try:
        record = writing.recorded_provenance(path)
    except Exception as exc:  # whatever a reader says about a file it cannot read: it is not ours to delete
        return f"not an output of bitnet-convert ({str(exc).removeprefix(f'{path}: ')}); {REFUSED}"
    if not isinstance(record, dict) or record.get("producer") != PRODUCER:
        return f"not an output of bitnet-convert (it records no bitnet-convert provenance); {REFUSED}"
    if record.get("format") != writing.fmt:
        return _other_format(record, writing.fmt)
    return None


def _other_format(record: dict, fmt: str) -> str:
    found = record.get("format") or "format-less"
    return (f"holds a {found} output of bitnet-convert, not {fmt}; --force replaces an output only by one of the "
            "same format")


def _with_format_of(writing: _Writing, tmp: Path, directory: bool) -> _Writing:
    """Writers called outside the registry: a finished folder output says its own format in its record."""
    if writing.fmt is not None or not directory:
        return writing
    record = _folder_record(tmp)
    return dataclasses.replace(writing, fmt=record.get("format") if record else None)


# ------------------------------------------------------------------------------------ the output is the input


def refuse_output_over_input(source: str | os.PathLike | None, out: str | os.PathLike) -> None:
    """Refuse, with or without --force, an output that is the input (same path; same file through a symlink
    or hard link), holds it (a folder above it) or lies inside it: publishing it would destroy what is read.

    `source` is a local path as given or as a reader recorded it (`Checkpoint.provenance["path"]`); a hub id or
    a checkpoint made in memory has none here."""
    if "\0" in os.fspath(out):  # no system call takes it: one line, not a ValueError from deep in a writer
        raise ConvertError(f"{sources.shown(out)}: not a valid path (it holds a NUL byte)")
    if not source or not os.path.lexists(source):
        return
    relation = _relation(Path(source), Path(out))
    if relation is not None:
        raise ConvertError(f"{out}: {relation} the input {source}; write the output somewhere else")


def _relation(source: Path, out: Path) -> str | None:
    sources, outs = _spellings(source), _spellings(out)
    if any(_same_entry(s, o) for s in sources for o in outs):
        return "is"
    if any(_same_entry(parent, o) for s in sources for parent in s.parents for o in outs):
        return "holds"
    if any(_same_entry(parent, s) for o in outs for parent in o.parents for s in sources):
        return "lies inside"
    if any(_same_entry(file, o) for file in _files_of(source) for o in outs):
        return "is a file of"  # a hard link to one of the input folder's files
    return None


def _files_of(folder: Path) -> list[Path]:
    try:
        with os.scandir(folder) as entries:
            return [Path(entry.path) for entry in entries]
    except OSError:  # not a folder, or one we may not list (then neither may we read the input in it)
        return []


def _spellings(path: Path) -> set[Path]:
    """The path as named (made absolute) and as it really is (symlinks followed)."""
    return {Path(os.path.abspath(path)), Path(os.path.realpath(path))}


def _same_entry(a: Path, b: Path) -> bool:
    if a == b:  # also for paths that do not exist yet
        return True
    try:
        return os.path.samefile(a, b)  # symlinks, hard links, bind mounts
    except OSError:
        return False


# ---------------------------------------------------------------------------------------------- atomic_path


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike, *, force: bool = False, directory: bool = False) -> Iterator[Path]:
    """Yield a temporary path (a file, or a fresh folder if `directory`) that becomes `target` on success."""
    with atomic_paths([target], force=force, directory=directory) as (tmp,):
        yield tmp


@contextlib.contextmanager
def atomic_paths(targets: list[str | os.PathLike], *, force: bool = False,
                 directory: bool = False) -> Iterator[list[Path]]:
    """`atomic_path` for a set of outputs published together (a split GGUF): one temporary path per target;
    on success each becomes its target, the first last (the file a runtime opens); a failure on the way
    removes those already published that were new, so the set appears whole or not at all."""
    targets = [Path(target) for target in targets]
    writing = _WRITING.get() or _Writing()
    for target in targets:
        _refuse_early(target, force, directory, writing)
    with _signals_unwind() as signals:
        tmps: list[Path] = []
        published: list[Path] = []
        try:
            with signals.held():
                tmps += [_new_partial(target, directory) for target in targets]
            with contextlib.ExitStack() as writeback:
                for tmp in tmps:
                    writeback.enter_context(early_writeback(tmp))
                yield tmps
            for tmp in tmps:
                _fsync(tmp)
                _publish_mode(tmp)
            with signals.held():
                for tmp, target in reversed(list(zip(tmps, targets))):
                    existed = os.path.lexists(target)
                    _publish(tmp, target, force=force, directory=directory,
                             writing=_with_format_of(writing, tmp, directory))
                    if not existed:
                        published.append(target)
        except BaseException as exc:
            with signals.held():
                for tmp in tmps:
                    _remove(tmp)
                if len(published) < len(targets):
                    for target in published:
                        _remove(target)
            if isinstance(exc, OSError):
                raise ConvertError(f"{targets[0]}: could not write: {exc.strerror or exc}") from exc
            raise


def check_target(target: str | os.PathLike, *, force: bool = False, directory: bool = False) -> None:
    """What `atomic_path` checks before any work, alone (a dry run): ConvertError where it would refuse."""
    _refuse_early(Path(target), force, directory, _WRITING.get() or _Writing(), recover=False)


def _refuse_early(target: Path, force: bool, directory: bool, writing: _Writing, recover: bool = True) -> None:
    """Before any work: a missing parent, an existing target without --force, one --force may not replace."""
    if not target.parent.is_dir():
        what = "is not a folder" if os.path.lexists(target.parent) else "does not exist"
        raise ConvertError(f"{target}: parent folder {target.parent} {what}")
    if recover:
        _recover_stranded(target)
    if not force and os.path.lexists(target):
        raise ConvertError(f"{target}: already exists (use --force to overwrite)")
    if force:
        try:
            _check_replaceable(target, directory, writing)
        except OSError as exc:  # e.g. a folder we may not list
            raise ConvertError(f"{target}: cannot tell what is there: {exc.strerror or exc}") from exc


def _new_partial(target: Path, directory: bool) -> Path:
    prefix = f".{target.name}.partial-"
    if directory:
        return Path(tempfile.mkdtemp(prefix=prefix, dir=target.parent))
    fd, name = tempfile.mkstemp(prefix=prefix, dir=target.parent)
    os.close(fd)
    return Path(name)


# -------------------------------------------------------------------------------------------------- publish


def _publish(tmp: Path, target: Path, *, force: bool, directory: bool, writing: _Writing) -> None:
    """Move the finished output to `target`, in one step that replaces nothing unless `force`, and then only
    the earlier output of ours that is there at that moment."""
    while True:
        try:
            published = _renameat2(tmp, target, RENAME_NOREPLACE)
        except FileExistsError:
            if not force:
                raise _appeared(target) from None
        else:
            if not published:
                _publish_under_lock(tmp, target, force=force, directory=directory, writing=writing)
            return
        checked = _check_replaceable(target, directory, writing)
        if checked is None:
            continue  # it went away meanwhile: take the free place
        try:
            exchanged = _renameat2(tmp, target, RENAME_EXCHANGE)
        except FileNotFoundError:
            continue
        if not exchanged:
            return _publish_under_lock(tmp, target, force=force, directory=directory, writing=writing)
        return _drop_swapped_out(tmp, target, checked)


def _drop_swapped_out(tmp: Path, target: Path, checked: os.stat_result) -> None:
    """After the exchange `tmp` holds what was at the target: delete it only if it is the entry checked."""
    if _identity(os.lstat(tmp)) != _identity(checked):
        _renameat2(tmp, target, RENAME_EXCHANGE)  # put it back; then the except in atomic_path removes ours
        raise ConvertError(f"{target}: changed while this conversion ran; left as it is")
    _remove(tmp)


def _identity(found: os.stat_result) -> tuple:
    # Not st_ctime: the exchange itself changes it. A folder's mtime changes with any entry added or removed.
    return found.st_dev, found.st_ino, found.st_mode, found.st_size, found.st_mtime_ns


def _publish_under_lock(tmp: Path, target: Path, *, force: bool, directory: bool, writing: _Writing) -> None:
    """Without renameat2: the check and the rename(s) happen under a lock that every bitnet-convert run takes."""
    with _publish_lock(target):
        there = _check_replaceable(target, directory, writing) if force else _lstat(target)
        if there is None:
            return os.rename(tmp, target)
        if not force:
            raise _appeared(target)
        if not directory:
            return os.replace(tmp, target)
        stranded = target.parent / f"{_stranded_prefix(target)}{os.urandom(4).hex()}"
        os.rename(target, stranded)  # a crash before the next rename strands it: the next run puts it back
        try:
            os.rename(tmp, target)
        except BaseException:  # an error or Ctrl-C: the old output goes back at once
            os.rename(stranded, target)
            raise
        _remove(stranded)


def _appeared(target: Path) -> ConvertError:
    return ConvertError(f"{target}: already exists: it appeared while this conversion ran (another run?); "
                        "left as it is (use --force to overwrite)")


def _recover_stranded(target: Path) -> None:
    """Put back the one old output an interrupted two-rename --force left where the target is missing (this
    version without renameat2, or an older version); report any other as a warning. Never fatal."""
    prefix = _stranded_prefix(target)
    stranded: list[Path] = []
    try:
        stranded = sorted(Path(e.path) for e in os.scandir(target.parent) if e.name.startswith(prefix))
        if len(stranded) == 1 and not os.path.lexists(target):
            _move_noreplace(stranded[0], target)
            log.warning("%s: restored the earlier output stranded in %s by an interrupted --force",
                        target, stranded[0].name)
            return
    except OSError:  # published meanwhile (FileExistsError), or a folder we may not list: report what we saw
        pass
    for path in stranded:
        log.warning("%s: an earlier output of %s, stranded by an interrupted --force; delete it when no longer "
                    "needed", path, target.name)


def _stranded_prefix(target: Path) -> str:
    return f".{target.name}.old-"


def _move_noreplace(src: Path, dst: Path) -> None:
    if _renameat2(src, dst, RENAME_NOREPLACE):
        return
    with _publish_lock(dst):
        if os.path.lexists(dst):
            raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), os.fspath(dst))
        os.rename(src, dst)


@contextlib.contextmanager
def _publish_lock(target: Path) -> Iterator[None]:
    """An exclusive flock on a hidden `.NAME.lock` beside the target, removed when released. A run that waited
    on a lock file its holder has just removed locks the new one instead."""
    path = target.parent / f".{target.name}.lock"
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        fcntl.flock(fd, fcntl.LOCK_EX)
        held, current = os.fstat(fd), _lstat(path)
        if current is not None and (held.st_dev, held.st_ino) == (current.st_dev, current.st_ino):
            break
        os.close(fd)
    try:
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        os.close(fd)


# ---------------------------------------------------------------------------------------------- renameat2

AT_FDCWD = -100
RENAME_NOREPLACE = 1  # <linux/fs.h>
RENAME_EXCHANGE = 2
_RENAMEAT2 = {"x86_64": 316, "aarch64": 276, "riscv64": 276, "ppc64le": 357, "s390x": 347}  # syscall numbers
_RENAMEAT2_NUMBER = _RENAMEAT2.get(platform.machine()) if sys.platform == "linux" else None


def _libc_syscall():
    if _RENAMEAT2_NUMBER is None:
        return None
    try:
        call = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True).syscall
    except (OSError, AttributeError):
        return None
    call.restype = ctypes.c_long
    return call


_SYSCALL = _libc_syscall()


def _renameat2(src: Path, dst: Path, flags: int) -> bool:
    """rename(2) with `flags`; False where the kernel or the file system cannot (the caller then locks). An
    OSError otherwise: FileExistsError when RENAME_NOREPLACE finds `dst`, FileNotFoundError when it is gone."""
    if _SYSCALL is None:
        return False
    as_long = ctypes.c_long  # syscall(2) reads every argument as a long
    result = _SYSCALL(as_long(_RENAMEAT2_NUMBER), as_long(AT_FDCWD), os.fsencode(src), as_long(AT_FDCWD),
                      os.fsencode(dst), as_long(flags))
    if result == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL):  # EINVAL: flags this file system does not support (NFS, FUSE...)
        return False
    raise OSError(err, os.strerror(err), os.fspath(dst))


# ---------------------------------------------------------------------------------------------------- signals

TERMINATING_SIGNALS = (signal.SIGTERM, signal.SIGHUP)  # `timeout`, `docker stop`, a closed terminal


class Terminated(BaseException):
    """SIGTERM or SIGHUP, raised where the main thread was so that `atomic_path` removes its partial output on
    the way out, as it does for Ctrl-C's KeyboardInterrupt (not an Exception: nothing may swallow it)."""

    def __init__(self, signum: int) -> None:
        super().__init__(f"terminated by {signal.Signals(signum).name}")
        self.signum = signum


class _SignalGuard:
    """Turns a terminating signal into `Terminated` while installed; `held()` postpones it over the steps that
    must not stop half-way (creating, publishing, removing the partial output)."""

    def __init__(self) -> None:
        self.received: int | None = None
        self._raised = False
        self._holds = 0
        self._previous: dict[int, object] = {}

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return  # Python runs signal handlers in the main thread only
        for signum in TERMINATING_SIGNALS:
            # An application's own handler, or SIG_IGN (nohup), stays as it is: only the default action, which
            # kills the process where it stands, is taken over.
            if signal.getsignal(signum) is signal.SIG_DFL:
                self._previous[signum] = signal.signal(signum, self._handle)

    def _handle(self, signum: int, frame) -> None:
        if self.received is None:
            self.received = signum
        if not self._holds and not self._raised:
            self._raised = True
            raise Terminated(signum)

    @contextlib.contextmanager
    def held(self) -> Iterator[None]:
        self._holds += 1
        try:
            yield
        finally:
            self._holds -= 1
        if self.received is not None and not self._holds and not self._raised:
            self._raised = True
            raise Terminated(self.received)

    def uninstall(self) -> None:
        """Put the previous handlers back; a signal received meanwhile is then delivered again, so the process
        ends by it as it would have (exit status 128 + N), only with its partial output removed first."""
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
        if self.received is not None:
            signal.raise_signal(self.received)
            raise SystemExit(128 + self.received)  # reached only where the signal is blocked


@contextlib.contextmanager
def _signals_unwind() -> Iterator[_SignalGuard]:
    guard = _SignalGuard()
    guard.install()
    try:
        yield guard
    finally:
        guard.uninstall()


# ------------------------------------------------------------------------------------------------- plumbing


def _lstat(path: Path) -> os.stat_result | None:
    try:
        return os.lstat(path)
    except FileNotFoundError:
        return None


def _publish_mode(path: Path) -> None:
    """mkstemp/mkdtemp make 0600/0700 (private while partial); give the output the mode `open` would."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~umask)


def _fsync(path: Path) -> None:
    paths = [p for p in path.rglob("*") if p.is_file()] if path.is_dir() else [path]
    for p in paths:
        with open(p, "rb") as fh:
            os.fsync(fh.fileno())


def _remove(path: Path) -> None:
    found = _lstat(path)
    if found is not None and stat.S_ISDIR(found.st_mode):
        shutil.rmtree(path, ignore_errors=True)
    elif found is not None:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
