"""Where the tool keeps what it compiles on first use (the native kernels, the bitnet.cpp logits program, JAX's
executables):
`$BITNET_CONVERT_CACHE`, else `$XDG_CACHE_HOME/bitnet-convert`, else `~/.cache/bitnet-convert`."""

from __future__ import annotations

import os
import tempfile
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
