"""The codecs' hot loops in C++ (native.cc), compiled on first use; the numpy versions stay, for machines
without a C++ compiler and as the reference the tests hold these to, byte for byte.

Why: a 2B4T conversion spent most of its producer's time in whole-array numpy passes (the 24 byte-wise
operations of a 2-bit field transpose, a bf16 -> f16 cast, the code-3 scan, base-3 digits spread over a buffer
four times the input): native.cc does each in one pass, 2.5-15x faster (BENCHMARKS.md, design measurements).
ctypes releases the GIL during a call, so callers split rows over the cores with bitnet_core.parallel as they
did for numpy.

The library is built like the engine's kernels (`$CXX`, default g++; bitnet_core.cache's folder, keyed by the
source and the compiler) and loaded once per process. `BITNET_NATIVE_CODECS=0` keeps the numpy versions;
`available()` is False then, as it is where the build fails (`reason()` says why).
"""

from __future__ import annotations

import ctypes
import functools
import os
from pathlib import Path

import numpy as np

from bitnet_core import cache

SOURCE = Path(__file__).with_name("native.cc")
FLAGS = ["-O2", "-std=c++17", "-shared", "-fPIC"]
LEVELS = ("scalar", "avx2", "avx512")  # `level` in native.cc: 0, 1, 2

_reason = ""


def library_path() -> Path:
    return cache.library_path("native", "bitnet_codecs", [SOURCE], FLAGS)


def build(force: bool = False) -> Path:
    """The library for this source and compiler, compiled unless it is there (RuntimeError with the compiler's
    message when it cannot be)."""
    return cache.build_library(library_path(), SOURCE, FLAGS, force=force)


@functools.cache
def _library() -> ctypes.CDLL | None:
    global _reason
    if os.environ.get("BITNET_NATIVE_CODECS", "1") == "0":
        _reason = "disabled by BITNET_NATIVE_CODECS=0"
        return None
    try:
        lib = ctypes.CDLL(str(build()))
        pointer, size = ctypes.c_void_p, ctypes.c_int64
        lib.bitnet_codecs_level.restype = ctypes.c_int
        lib.bitnet_hf2bit_to_rows.argtypes = [pointer, size, size, ctypes.c_int, pointer, size, size, ctypes.c_int]
        lib.bitnet_hf2bit_to_rows.restype = None
        lib.bitnet_hf2bit_to_rows4.argtypes = [pointer, size, size, pointer, size, size, ctypes.c_int]
        lib.bitnet_hf2bit_to_rows4.restype = None
        lib.bitnet_hf2bit_to_trits.argtypes = [pointer, size, pointer, size, size]
        lib.bitnet_hf2bit_to_trits.restype = None
        lib.bitnet_tq2_0_blocks.argtypes = [pointer, size, ctypes.c_uint16, pointer]
        lib.bitnet_tq2_0_blocks.restype = None
        lib.bitnet_has_code3.argtypes = [pointer, size, ctypes.c_int]
        lib.bitnet_has_code3.restype = ctypes.c_int
        lib.bitnet_bf16_to_f16.argtypes = [pointer, pointer, size, ctypes.c_uint16, ctypes.c_int]
        lib.bitnet_bf16_to_f16.restype = ctypes.c_int
    except (OSError, RuntimeError, AttributeError) as exc:  # AttributeError: a symbol missing from the library
        _reason = str(exc)
        return None
    return lib


def available() -> bool:
    return _library() is not None


def reason() -> str:
    """Why `available()` is false ("" when it is true)."""
    _library()
    return _reason


def cpu_level() -> int:
    """The highest level this CPU runs (LEVELS); the functions below use it unless told another."""
    return _library().bitnet_codecs_level()


def _level(level: int | None) -> int:
    best = cpu_level()
    if level is None:
        return best
    if not 0 <= level <= best:
        raise ValueError(f"level {level} is not one this CPU runs (0 to {best}: {', '.join(LEVELS[:best + 1])})")
    return level


def to_rows(packed: np.ndarray, reverse_groups: bool, planes: np.ndarray, start: int, stop: int,
            level: int | None = None) -> None:
    """hf2bit.to_rows of HF rows [start, stop) of C-contiguous uint8 `packed` [R, in] into C-contiguous
    `planes` [4, R, in/128, 32]."""
    rows, n_in = packed.shape
    _require(packed, planes)
    _library().bitnet_hf2bit_to_rows(packed.ctypes.data, rows, n_in, int(reverse_groups), planes.ctypes.data, start,
                                     stop, _level(level))


def to_rows4(packed: np.ndarray, out: np.ndarray, start: int, stop: int, level: int | None = None) -> None:
    """rows4.from_hf2bit of C-contiguous HF bytes `packed` [R, in] (R a multiple of 4) into C-contiguous `out`
    [R, in], for the groups of four HF rows [start, stop)."""
    _require(packed, out)
    rows, n_in = packed.shape
    if rows % 4 or out.shape != packed.shape or not 0 <= start <= stop <= rows // 4:
        raise ValueError(f"to_rows4: {packed.shape} into {out.shape}, groups [{start}, {stop})")
    _library().bitnet_hf2bit_to_rows4(packed.ctypes.data, rows, n_in, out.ctypes.data, start, stop, _level(level))


def to_trits(packed: np.ndarray, out: np.ndarray, start: int, stop: int) -> None:
    """trits.from_hf2bit's bytes [start, stop) of `out` (uint8 [ceil(4 n / 5)]) from the n C-contiguous HF bytes
    `packed`."""
    _require(packed, out)
    if out.size != -(-4 * packed.size // 5) or not 0 <= start <= stop <= out.size:
        raise ValueError(f"to_trits: {out.size} output bytes for {packed.size} HF bytes, range [{start}, {stop})")
    _library().bitnet_hf2bit_to_trits(packed.ctypes.data, packed.size, out.ctypes.data, start, stop)


def tq2_0_blocks(qs: np.ndarray, out: np.ndarray, one: int) -> None:
    """TQ2_0 blocks out [blocks, 66] from their code bytes qs [blocks, 64] (both C-contiguous uint8): the codes,
    then `d` = the f16 bits `one`, or +0 where a block's codes are all zero."""
    _require(qs, out)
    if qs.shape[0] != out.shape[0] or qs.shape[1:] != (64,) or out.shape[1:] != (66,):
        raise ValueError(f"tq2_0_blocks takes [blocks, 64] and [blocks, 66], got {qs.shape} and {out.shape}")
    _library().bitnet_tq2_0_blocks(qs.ctypes.data, qs.shape[0], one, out.ctypes.data)


def has_code3(flat: np.ndarray, level: int | None = None) -> bool:
    """_bits.has_code3 of C-contiguous uint8 `flat`."""
    _require(flat)
    return bool(_library().bitnet_has_code3(flat.ctypes.data, flat.size, _level(level)))


def bf16_to_f16(src: np.ndarray, dst: np.ndarray, limit: int, level: int | None = None) -> bool:
    """dst (float16 bits) = src (bf16 bits), both C-contiguous uint16 of one size, rounded to nearest even as
    ml_dtypes casts; True when every value's magnitude bits are below `limit`, False otherwise (dst then holds
    nothing the caller may use)."""
    _require(src, dst)
    if src.size != dst.size or src.itemsize != 2 or dst.itemsize != 2:
        raise ValueError("bf16_to_f16 takes two 16-bit arrays of one size")
    return not _library().bitnet_bf16_to_f16(src.ctypes.data, dst.ctypes.data, src.size, limit, _level(level))


def _require(*arrays: np.ndarray) -> None:
    for array in arrays:
        if not array.flags.c_contiguous:
            raise ValueError("the native codecs take C-contiguous arrays")
