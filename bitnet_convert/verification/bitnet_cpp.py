"""bitnet.cpp itself, as the user built it: a GGUF file's logits at every position, or its greedy continuation.

bitnet.cpp ships no Python binding. Its build (Microsoft's BitNet with its llama.cpp fork; `build.sh` of
../shared/runtimes/bitnet.cpp lays one out) holds the fork's C API: `3rdparty/llama.cpp/include/llama.h` and
`build/3rdparty/llama.cpp/src/libllama.so`. bitnet_cpp_logits.cc, our own small program, is compiled against
them on first use with the system C++ compiler (`$CXX`, default g++), run-path set to the build's library
folders, into the cache folder (bitnet_core.cache) under a name keyed by the source, the build's path and its
libllama.so, so a rebuilt bitnet.cpp gets a fresh program. The build is found from `bitnet_cpp_dir`, else
`$BITNET_CPP_DIR`. The program runs in a process of its own: a file bitnet.cpp cannot run (it aborts on an
unknown tensor, it dies on a type it has no kernel for) is one line, not a crash.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np

from bitnet_core import cache
from bitnet_core.errors import ConvertError

ENV = "BITNET_CPP_DIR"
SOURCE = Path(__file__).with_name("bitnet_cpp_logits.cc")
INCLUDE_DIRS = ("3rdparty/llama.cpp/include", "3rdparty/llama.cpp/ggml/include")
LIBRARY_DIRS = ("build/3rdparty/llama.cpp/src", "build/3rdparty/llama.cpp/ggml/src")
LIBLLAMA = "build/3rdparty/llama.cpp/src/libllama.so"
BUILD_HINT = "../shared/runtimes/bitnet.cpp/build.sh DIR builds one"
FLAGS = ["-O2", "-std=c++17"]
TIMEOUT_S = 600


def build_dir(bitnet_cpp_dir: str | os.PathLike | None = None) -> Path:
    """The bitnet.cpp build to run: `bitnet_cpp_dir`, else $BITNET_CPP_DIR; ConvertError when neither names one."""
    given = bitnet_cpp_dir if bitnet_cpp_dir is not None else os.environ.get(ENV)
    if not given:
        raise ConvertError(f"bitnet.cpp: no build given: pass --bitnet-cpp-dir DIR or set {ENV} (the folder "
                           f"holding build/ and 3rdparty/llama.cpp/include/llama.h; {BUILD_HINT})")
    root = Path(given).expanduser().resolve()
    missing = [part for part in (*INCLUDE_DIRS, f"{INCLUDE_DIRS[0]}/llama.h", LIBLLAMA)
               if not (root / part).exists()]
    if missing:
        raise ConvertError(f"{root}: not a bitnet.cpp build (no {missing[0]}; {BUILD_HINT})")
    return root


def _compiler() -> str:
    return os.environ.get("CXX", "g++")


def program(root: Path) -> Path:
    """The logits program for the build at `root`, compiled on first use."""
    library = root / LIBLLAMA
    key = hashlib.sha256(SOURCE.read_bytes())
    stat = library.stat()
    key.update(f"{root} {stat.st_size} {stat.st_mtime_ns} {_compiler()} {' '.join(FLAGS)}".encode())
    key.update((root / INCLUDE_DIRS[0] / "llama.h").read_bytes())
    path = cache.cache_dir("bitnet-cpp") / f"bitnet_cpp_logits-{key.hexdigest()[:16]}"
    if path.exists():
        return path
    compiler = shutil.which(_compiler())
    if compiler is None:
        raise ConvertError(f"no C++ compiler ({_compiler()}) on PATH: verify --runtime bitnet.cpp compiles "
                           f"{SOURCE.name} against {root}")
    libraries = [str(root / d) for d in LIBRARY_DIRS]

    def compile_to(tmp: str) -> None:
        cmd = [compiler, *FLAGS, *(f"-I{root / d}" for d in INCLUDE_DIRS), str(SOURCE), "-o", tmp,
               *(f"-L{d}" for d in libraries), "-lllama", "-lggml", *(f"-Wl,-rpath,{d}" for d in libraries)]
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, errors="replace", check=False,
                                  timeout=TIMEOUT_S)
        except subprocess.TimeoutExpired:
            raise ConvertError(f"{root}: compiling {SOURCE.name} took over {TIMEOUT_S} s") from None
        if done.returncode != 0:
            lines = [line for line in done.stderr.splitlines() if "error" in line] or done.stderr.splitlines()[-1:]
            raise ConvertError(f"{root}: compiling {SOURCE.name} against this bitnet.cpp build failed: "
                               f"{(lines or ['no message'])[0].strip()}")

    return cache.compiled(path, compile_to)


def _run(path: str, args: list[str], bitnet_cpp_dir, tmp: Path) -> bytes:
    binary = program(build_dir(bitnet_cpp_dir))
    out = tmp / "out.bin"
    try:
        done = subprocess.run([str(binary), args[0], str(path), *args[1:], str(out)], capture_output=True,
                              text=True, errors="replace", timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise ConvertError(f"{path}: bitnet.cpp did not finish within {TIMEOUT_S} s") from None
    if done.returncode != 0 or not out.is_file():
        how = f"signal {-done.returncode}" if done.returncode < 0 else f"exit {done.returncode}"
        lines = [line.strip() for line in (done.stderr or "").splitlines() if line.strip()]
        why = next((line for line in lines if "error" in line.lower()), lines[-1] if lines else "no message")
        raise ConvertError(f"{path}: bitnet.cpp could not run the file ({how}): {why}")
    return out.read_bytes()


def logits(path: str | os.PathLike, ids: list[int], *, bitnet_cpp_dir=None) -> np.ndarray:
    """float32 [len(ids), vocab]: bitnet.cpp's logits at every position of one sequence, in one batch."""
    with tempfile.TemporaryDirectory(prefix="bitnet-cpp-") as tmp:
        data = _run(os.fspath(path), ["logits", ",".join(str(int(t)) for t in ids)], bitnet_cpp_dir, Path(tmp))
    values = np.frombuffer(data, np.float32)
    return values.reshape(len(ids), values.size // len(ids)).copy()


def trace(path: str | os.PathLike, ids: list[int], vocab_size: int, *,
          bitnet_cpp_dir=None) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """As `logits` ([len(ids), vocab_size]), and the float32 input [len(ids), in] of each `blk.*` weight's product
    by the weight's GGUF name: what bitnet.cpp quantized (I2_S) or multiplied (float weights)."""
    with tempfile.TemporaryDirectory(prefix="bitnet-cpp-") as tmp:
        data = _run(os.fspath(path), ["trace", ",".join(str(int(t)) for t in ids)], bitnet_cpp_dir, Path(tmp))
    at = len(ids) * vocab_size * 4
    out = np.frombuffer(data[:at], np.float32).reshape(len(ids), vocab_size).copy()
    inputs = {}
    while at < len(data):
        (length,) = np.frombuffer(data[at : at + 4], np.uint32)
        name = data[at + 4 : at + 4 + int(length)].decode()
        at += 4 + int(length)
        ne0, ne1 = (int(v) for v in np.frombuffer(data[at : at + 8], np.uint32))
        at += 8
        inputs[name] = np.frombuffer(data[at : at + 4 * ne0 * ne1], np.float32).reshape(ne1, ne0).copy()
        at += 4 * ne0 * ne1
    return out, inputs


def greedy(path: str | os.PathLike, prompt_ids, max_new_tokens: int, *, bitnet_cpp_dir=None) -> list[int]:
    """The token ids bitnet.cpp appends to `prompt_ids` taking the largest logit each step (the first of equal
    ones), one token per decode after the prompt; stops after `max_new_tokens` or at an end-of-generation token
    (included)."""
    prompt = [int(t) for t in prompt_ids]
    if not prompt:
        raise ConvertError("greedy: an empty prompt (bitnet.cpp needs at least one token)")
    if max_new_tokens <= 0:
        return []
    with tempfile.TemporaryDirectory(prefix="bitnet-cpp-") as tmp:
        data = _run(os.fspath(path), ["greedy", ",".join(map(str, prompt)), str(int(max_new_tokens))],
                    bitnet_cpp_dir, Path(tmp))
    return [int(t) for t in np.frombuffer(data, np.int32)]
