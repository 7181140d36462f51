"""All-or-nothing outputs: write beside the target under a temporary name, rename at the end.

A conversion killed half-way leaves at most a hidden `.NAME.partial-*` file or folder, never a file at the
target path; an existing output is refused unless `force`, and then replaced only once the new one is whole.
The output is fsync'ed before the rename (its disk writes started early: writeback.py), so a crash right
after cannot leave a renamed but empty file.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from .errors import ConvertError
from .writeback import early_writeback


# What marks a folder as a model output that --force may replace (anything else is the user's folder).
MODEL_FOLDER_MARKERS = ("config.json", "bitnet_convert.json")


def check_writable(target: str | os.PathLike, force: bool, directory: bool | None = None) -> Path:
    """Refuse an existing target unless `force`; even then, never replace a file with a folder or the other way
    round, nor a folder that holds no model (`--force` on `~/models` must not wipe it)."""
    target = Path(target)
    if target.exists() and not force:
        raise ConvertError(f"{target}: already exists (use --force to overwrite)")
    if target.exists() and directory is not None:
        if target.is_dir() and not directory:
            raise ConvertError(f"{target}: is a folder; --force replaces a file output only by a file")
        if not target.is_dir() and directory:
            raise ConvertError(f"{target}: is a file; --force replaces a folder output only by a folder")
        if target.is_dir() and any(target.iterdir()) and not any((target / m).is_file() for m in MODEL_FOLDER_MARKERS):
            raise ConvertError(f"{target}: folder holds no model ({' or '.join(MODEL_FOLDER_MARKERS)}); "
                               "refusing to replace it, even with --force")
    parent = target.parent if str(target.parent) else Path(".")
    if not parent.is_dir():
        raise ConvertError(f"{target}: parent folder {parent} does not exist")
    return target


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike, *, force: bool = False, directory: bool = False) -> Iterator[Path]:
    """Yield a temporary path (a file, or a fresh folder if `directory`) that becomes `target` on success."""
    target = check_writable(target, force, directory)
    parent = target.parent
    prefix = f".{target.name}.partial-"
    if directory:
        tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    else:
        fd, name = tempfile.mkstemp(prefix=prefix, dir=parent)
        os.close(fd)
        tmp = Path(name)
    try:
        with early_writeback(tmp):
            yield tmp
        _fsync(tmp)
        _publish_mode(tmp)
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
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
