"""Where the tool keeps what it compiles on first use (the native kernels, the bitnet.cpp logits program, JAX's
executables):
`$BITNET_CONVERT_CACHE`, else `$XDG_CACHE_HOME/bitnet-convert`, else `~/.cache/bitnet-convert`."""

from __future__ import annotations

import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path


def cache_root() -> Path:
    """The tool's cache folder (one folder per kind of artifact inside)."""
    if os.environ.get("BITNET_CONVERT_CACHE"):
        return Path(os.environ["BITNET_CONVERT_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "bitnet-convert"


def cache_dir(kind: str) -> Path:
    """The folder for one kind of compiled artifact (created by whoever writes there)."""
    return cache_root() / kind


def compiled(path: Path, compile_to, *, force: bool = False) -> Path:
    """`path`, compiled unless it is there already: `compile_to(tmp)` writes a temporary file in the same folder
    that is then renamed into place, so concurrent builds (test workers) never load a half-written file. What
    `compile_to` raises propagates, and the temporary file is removed. `force` compiles again."""
    if path.exists() and not force:
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=path.suffix, dir=path.parent)
    os.close(fd)
    try:
        compile_to(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def compiler() -> str:
    """The C++ compiler the tool builds with: `$CXX`, else g++."""
    return os.environ.get("CXX", "g++")


def library_path(kind: str, name: str, sources: Sequence[Path], flags: Sequence[str], key: str = "") -> Path:
    """Where the library built from `sources` (the file compiled, then what it includes) lives, built or not:
    `name-KEY.so` in the folder of `kind`, KEY covering their bytes, the compiler, `flags`, the machine and
    `key` (what else the build depends on)."""
    digest = hashlib.sha256()
    for source in sources:
        digest.update(source.read_bytes())
    digest.update(f"{key} {compiler()} {' '.join(flags)} {platform.machine()}".encode())
    return cache_dir(kind) / f"{name}-{digest.hexdigest()[:16]}.so"


def build_library(path: Path, source: Path, flags: Sequence[str], *, force: bool = False) -> Path:
    """`path` (a library_path), compiled from `source` with `flags` unless it is there (`compiled` says how);
    RuntimeError with the compiler's message when it cannot be."""
    if path.exists() and not force:
        return path
    found = shutil.which(compiler())
    if found is None:
        raise RuntimeError(f"no C++ compiler ({compiler()}) on PATH")

    def compile_to(tmp: str) -> None:
        done = subprocess.run([found, *flags, str(source), "-o", tmp], capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"compiling {source.name} failed: {done.stderr.strip()[-2000:]}")

    return compiled(path, compile_to, force=force)
