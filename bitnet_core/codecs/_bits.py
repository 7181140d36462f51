"""Whole-array bit tricks the 2-bit codecs share (hf2bit, i2s, tq); numpy only, no per-value Python. Where the
codecs' C++ library is built (native.py), the hot ones run there in one pass instead, to the same bytes.

Why they are written this way (`benchmarks/bench_codecs.py`; BENCHMARKS.md, design measurements): byte-wise
shifts, masks and adds on uint8/int8 arrays written into preallocated outputs (`out=`) vectorize; int16
detours, `np.stack`/`np.concatenate` copies, boolean temporaries of the full size and 256-entry look-up tables
(`np.take`, far slower than a shift-and-mask here) do not.
"""

from __future__ import annotations

import numpy as np

from bitnet_core import parallel
from bitnet_core.codecs import native

_FIELD_LOW_BITS = np.uint64(0x5555555555555555)


def has_code3(packed: np.ndarray) -> bool:
    """Any 2-bit field of these bytes equal to 3 (the invalid code of the HF, I2_S and TQ2_0 layouts)."""
    flat = np.ascontiguousarray(packed).reshape(-1)
    if native.available():
        return native.has_code3(flat)
    head = flat[: flat.size - flat.size % 8].view(np.uint64)  # 8 bytes per operation where the length allows
    found = []

    def part(start: int, stop: int) -> None:
        words = head[start:stop]
        found.append(bool((words & (words >> np.uint64(1)) & _FIELD_LOW_BITS).any()))

    parallel.for_row_ranges(head.size, head.nbytes, part)
    if any(found):
        return True
    tail = flat[head.size * 8 :]
    return bool(tail.size and (tail & (tail >> 1) & 0x55).any())


def field(packed: np.ndarray, k: int, out: np.ndarray) -> np.ndarray:
    """out = 2-bit field k (bits 2k..2k+1) of every byte of `packed`: two operations at most, no temporaries."""
    if k == 0:
        return np.bitwise_and(packed, 3, out=out)
    np.right_shift(packed, 2 * k, out=out)
    return out if k == 3 else np.bitwise_and(out, 3, out=out)


def pack_biased(parts, shifts, out: np.ndarray) -> None:
    """out (int8) = the byte holding four codes c_g in {-1, 0, +1} as biased fields (c_g + 1) << shift_g.

    int8 arithmetic wraps like the hardware: sum((c_g + 1) << s_g) = sum(c_g << s_g) + sum(1 << s_g) modulo
    256, and the true byte is at most 170, so the wrapped int8 result, read as uint8, is the byte.
    """
    tmp = np.empty_like(out)
    bias = 0
    for i, (part, shift) in enumerate(zip(parts, shifts)):
        target = out if i == 0 else tmp
        if shift:
            np.left_shift(part, shift, out=target)
        else:
            np.copyto(target, part)
        if i:
            np.add(out, tmp, out=out)
        bias |= 1 << shift
    np.add(out, np.int8(bias - 256 if bias > 127 else bias), out=out)


def _delta_swap(a: np.ndarray, b: np.ndarray, shift: int, mask: int, tmp: np.ndarray) -> None:
    """Exchange the bits of `a` selected by `mask << shift` with the bits of `b` selected by `mask`, in place."""
    np.right_shift(a, shift, out=tmp)
    np.bitwise_xor(tmp, b, out=tmp)
    np.bitwise_and(tmp, mask, out=tmp)
    np.bitwise_xor(b, tmp, out=b)
    np.left_shift(tmp, shift, out=tmp)
    np.bitwise_xor(a, tmp, out=a)


def transpose_fields(planes: np.ndarray) -> None:
    """In place: field j of planes[i]'s bytes <-> field i of planes[j]'s bytes (i, j = 0..3, field j at bits 2j).

    Four bytes, one per plane, hold a 4x4 matrix of 2-bit fields; this transposes every such matrix with two
    rounds of masked delta swaps (Hacker's Delight 7-3): 24 byte-wise operations per 16 values.
    """
    p0, p1, p2, p3 = planes
    tmp = np.empty_like(p0)
    # Swap the off-diagonal 2x2 blocks, then transpose each 2x2 block (the two steps commute).
    _delta_swap(p0, p2, 4, 0x0F, tmp)  # fields 2,3 of plane 0 <-> fields 0,1 of plane 2
    _delta_swap(p1, p3, 4, 0x0F, tmp)  # fields 2,3 of plane 1 <-> fields 0,1 of plane 3
    _delta_swap(p0, p1, 2, 0x33, tmp)  # fields 1,3 of plane 0 <-> fields 0,2 of plane 1
    _delta_swap(p2, p3, 2, 0x33, tmp)  # fields 1,3 of plane 2 <-> fields 0,2 of plane 3
