"""llama.cpp's own converter (`convert_hf_to_gguf.py`, its `conversion/` package and `gguf-py/`), from the
llama-cpp-python sdist the `llama` extra pins (vendor/llama.cpp/ inside it).

`python tests/llama_cpp_converter.py` (run by .ci/run and `make converter`) fetches the sdist once with pip
into the cache and extracts those files beside it; the tests find them there, or in LLAMA_CPP_CONVERTER_DIR,
and skip with the command to run when neither holds them: tests never reach the network.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

VERSION = "0.3.36"  # = pyproject's `llama` extra
PACKAGE = "llama-cpp-python"
VENDORED = "vendor/llama.cpp/"
WANTED = ("convert_hf_to_gguf.py", "conversion/", "gguf-py/")
ENV = "LLAMA_CPP_CONVERTER_DIR"
SCRIPT = "convert_hf_to_gguf.py"


def cache_root() -> Path:
    if os.environ.get("BITNET_CONVERT_CACHE"):
        return Path(os.environ["BITNET_CONVERT_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "bitnet-convert"


def extracted_dir() -> Path:
    return cache_root() / f"llama.cpp-converter-{VERSION}"


def converter_dir() -> Path | None:
    """The folder holding convert_hf_to_gguf.py: LLAMA_CPP_CONVERTER_DIR, else the cache; None when absent."""
    folder = Path(os.environ[ENV]) if os.environ.get(ENV) else extracted_dir()
    return folder if (folder / SCRIPT).is_file() else None


def fetch() -> Path:
    """The sdist from the registry (once: a tarball already in the cache is used as it is), then its converter
    files extracted into extracted_dir()."""
    target = extracted_dir()
    if (target / SCRIPT).is_file():
        return target
    sdist_dir = cache_root() / "sdist"
    tarball = sdist_dir / f"{PACKAGE.replace('-', '_')}-{VERSION}.tar.gz"
    if not tarball.is_file():
        # pip download resolves against the index every time, whatever lies in -d: hence the check above
        subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:",
                        f"{PACKAGE}=={VERSION}", "-d", str(sdist_dir)], check=True)
    partial = target.with_name(target.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    with tarfile.open(tarball) as tar:
        members = []
        for member in tar.getmembers():
            inner = member.name.split("/", 1)[1] if "/" in member.name else ""
            if inner.startswith(VENDORED) and inner[len(VENDORED):].startswith(WANTED):
                member.name = inner[len(VENDORED):]
                members.append(member)
        if not any(m.name == SCRIPT for m in members):
            raise SystemExit(f"error: {tarball}: no {VENDORED}{SCRIPT} inside")
        tar.extractall(partial, members=members, filter="data")
    shutil.rmtree(target, ignore_errors=True)
    partial.rename(target)
    return target


if __name__ == "__main__":
    print(fetch())
