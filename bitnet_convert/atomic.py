"""All-or-nothing outputs: write beside the target under a temporary name, rename at the end.

A conversion killed half-way leaves at most a hidden `.NAME.partial-*` file or folder, never a file at the
target path; an existing output is refused unless `force`, and then replaced only once the new one is whole.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from .errors import ConvertError


def check_writable(target: str | os.PathLike, force: bool) -> Path:
    target = Path(target)
    if target.exists() and not force:
        raise ConvertError(f"{target}: already exists (use --force to overwrite)")
    parent = target.parent if str(target.parent) else Path(".")
    if not parent.is_dir():
        raise ConvertError(f"{target}: parent folder {parent} does not exist")
    return target


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike, *, force: bool = False, directory: bool = False) -> Iterator[Path]:
    """Yield a temporary path (a file, or a fresh folder if `directory`) that becomes `target` on success."""
    target = check_writable(target, force)
    parent = target.parent
    prefix = f".{target.name}.partial-"
    if directory:
        tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    else:
        fd, name = tempfile.mkstemp(prefix=prefix, dir=parent)
        os.close(fd)
        tmp = Path(name)
    try:
        yield tmp
        _fsync(tmp)
        _replace(tmp, target, force)
    except BaseException as exc:
        _remove(tmp)
        if isinstance(exc, OSError) and not isinstance(exc, ConvertError):
            raise ConvertError(f"{target}: could not write: {exc.strerror or exc}") from exc
        raise


def _replace(tmp: Path, target: Path, force: bool) -> None:
    if target.exists():
        if not force:  # appeared while we were writing
            raise ConvertError(f"{target}: already exists (use --force to overwrite)")
        if target.is_dir() and not target.is_symlink():
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
            old.rmdir()
            target.rename(old)
            tmp.rename(target)
            shutil.rmtree(old, ignore_errors=True)
            return
    os.replace(tmp, target)


def _fsync(path: Path) -> None:
    paths = [p for p in path.rglob("*") if p.is_file()] if path.is_dir() else [path]
    for p in paths:
        with open(p, "rb") as fh:
            os.fsync(fh.fileno())


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
