"""Faster, byte-identical kernels for the codecs the 2B converters spend their time in.

Every function here returns exactly the bytes (and raises exactly the errors) of its reference in hf2bit, i2s,
tq or trits; tests/test_fast_codecs.py checks that on random and adversarial inputs. Where an input is unusual
(a dtype other than int8/uint8, values outside {-1, 0, +1}), the function hands it to the reference, so the
two can only differ in speed.

Why they are faster (numpy 2.4, one core of a Xeon with AVX-512; `benchmarks/bench_codecs.py`):
- Only SIMD-friendly whole-array bit operations on uint8/int8, written into preallocated outputs (`out=`): no
  int16 detours, no `np.stack`/`np.concatenate` copies, no boolean temporaries of the full size. numpy
  look-up tables (`np.take` on a 256-entry table) are 10x slower than a shift-and-mask here, so there are none.
- Packing from int8 codes uses int8 arithmetic that wraps like the hardware: a byte holding four biased codes
  `sum((c_g + 1) << s_g)` equals `sum(c_g << s_g) + sum(1 << s_g)` modulo 256, and its true value is at most
  170, so the wrapped int8 result is the byte.
- The direct transcoders (`hf2bit_to_i2s`, `hf2bit_to_tq2_0`) never make int8 codes at all. An HF byte holds
  field k (bits 2k..2k+1) of four output rows k*R + r; an I2_S or TQ2_0 byte holds four values 32 apart in
  one row. For one (r, 128-value chunk, p) the four HF bytes of groups g = 0..3 form a 4x4 matrix of 2-bit
  fields (rows g, columns k), and the four output bytes for planes k are its transpose: two rounds of masked
  delta swaps (Hacker's Delight 7-3) on whole planes, 24 byte-wise operations per 16 values.
"""

from __future__ import annotations

import numpy as np

from ..errors import CorruptData
from . import hf2bit, i2s, tq, trits

_F16_ONE_HIGH = np.uint8(0x3C)  # float16 1.0 = 0x3C00, little endian: low byte 0x00, high byte 0x3C
_ZERO_CODES_BYTE = 0x55  # four biased codes of 1 (value 0)


# ------------------------------------------------------------------------------------------------- helpers


def _valid_int8(codes: np.ndarray) -> bool:
    """int8 codes all in {-1, 0, +1} (two SIMD reductions)."""
    return codes.dtype == np.int8 and (codes.size == 0 or (int(codes.min()) >= -1 and int(codes.max()) <= 1))


def has_code3(packed: np.ndarray) -> bool:
    """Any 2-bit field of these bytes equal to 3 (the invalid code of the HF, I2_S and TQ2_0 layouts)."""
    flat = np.ascontiguousarray(packed).reshape(-1)
    head = flat[: flat.size - flat.size % 8].view(np.uint64)  # 8 bytes per operation where the length allows
    if head.size and (head & (head >> np.uint64(1)) & np.uint64(0x5555555555555555)).any():
        return True
    tail = flat[head.size * 8 :]
    return bool(tail.size and (tail & (tail >> 1) & 0x55).any())


def _delta_swap(a: np.ndarray, b: np.ndarray, shift: int, mask: int, tmp: np.ndarray) -> None:
    """Exchange the bits of `a` selected by `mask << shift` with the bits of `b` selected by `mask`, in place."""
    np.right_shift(a, shift, out=tmp)
    np.bitwise_xor(tmp, b, out=tmp)
    np.bitwise_and(tmp, mask, out=tmp)
    np.bitwise_xor(b, tmp, out=b)
    np.left_shift(tmp, shift, out=tmp)
    np.bitwise_xor(a, tmp, out=a)


def _transpose_fields(planes: np.ndarray) -> None:
    """In place: planes[i] byte's field j <-> planes[j] byte's field i (i, j = 0..3, field j at bits 2j)."""
    p0, p1, p2, p3 = planes
    tmp = np.empty_like(p0)
    # Swap the off-diagonal 2x2 blocks, then transpose each 2x2 block (the two steps commute).
    _delta_swap(p0, p2, 4, 0x0F, tmp)  # fields 2,3 of plane 0 <-> fields 0,1 of plane 2
    _delta_swap(p1, p3, 4, 0x0F, tmp)  # fields 2,3 of plane 1 <-> fields 0,1 of plane 3
    _delta_swap(p0, p1, 2, 0x33, tmp)  # fields 1,3 of plane 0 <-> fields 0,2 of plane 1
    _delta_swap(p2, p3, 2, 0x33, tmp)  # fields 1,3 of plane 2 <-> fields 0,2 of plane 3


def _planes_of_hf2bit(packed: np.ndarray, reverse_groups: bool, out: np.ndarray | None = None) -> np.ndarray:
    """HF bytes [R, in] -> fields transposed: out[k] is [R, in/128, 32] with plane k's values (into `out`).

    out[k][r, j, p] holds, at field g (or 3 - g with `reverse_groups`), the value of row k*R + r, column
    128*j + 32*g + p: four values of one output row, 32 apart."""
    rows, n_in = packed.shape
    groups = packed.reshape(rows, n_in // 128, 4, 32).transpose(2, 0, 1, 3)  # [g, R, J, 32], a strided view
    shape = (4, rows, n_in // 128, 32)
    planes = np.empty(shape, np.uint8) if out is None else out.reshape(shape)
    np.copyto(planes, groups[::-1] if reverse_groups else groups)
    _transpose_fields(planes)
    return planes


# ------------------------------------------------------------------------------------------ HF 2-bit layout


def hf2bit_unpack(packed: np.ndarray, out_features: int) -> np.ndarray:
    """= hf2bit.unpack: uint8 [ceil(out/4), ...] -> int8 [out, ...]; CorruptData on code 3."""
    packed = np.asarray(packed, dtype=np.uint8)
    if packed.ndim < 1 or packed.shape[0] != hf2bit.packed_rows(out_features) or out_features <= 0:
        return hf2bit.unpack(packed, out_features)  # the reference words every shape error
    if has_code3(packed):
        raise CorruptData("packed weight holds the invalid code 3")
    planes = np.empty((4, *packed.shape), np.uint8)
    for k in range(4):
        plane = planes[k]
        if k:
            np.right_shift(packed, 2 * k, out=plane)
            if k < 3:
                np.bitwise_and(plane, 3, out=plane)
        else:
            np.bitwise_and(packed, 3, out=plane)
        np.subtract(plane, 1, out=plane)  # 0, 1, 2 -> 255, 0, 1: int8 -1, 0, +1
    codes = planes.view(np.int8).reshape(-1, *packed.shape[1:])
    return codes[:out_features] if out_features < codes.shape[0] else codes


def hf2bit_to_i2s(packed: np.ndarray, out_features: int, multiplier) -> np.ndarray:
    """= i2s.pack(hf2bit.unpack(packed, out_features), multiplier), without making the codes."""
    packed = np.asarray(packed, dtype=np.uint8)
    if (packed.ndim != 2 or out_features != 4 * packed.shape[0] or packed.shape[1] % 128 or packed.size == 0):
        return i2s.pack(hf2bit.unpack(packed, out_features), multiplier)
    if has_code3(packed):
        raise CorruptData("packed weight holds the invalid code 3")
    n_bytes = packed.size  # n/4
    out = np.empty(n_bytes + i2s.TAIL_BYTES, np.uint8)
    _planes_of_hf2bit(packed, reverse_groups=True, out=out[:n_bytes])  # I2_S: group g at shift 6 - 2g
    _i2s_tail(out[n_bytes:], multiplier)
    return out


def hf2bit_to_tq2_0(packed: np.ndarray, out_features: int) -> np.ndarray:
    """= tq.pack_tq2_0(hf2bit.unpack(packed, out_features)), without making the codes."""
    packed = np.asarray(packed, dtype=np.uint8)
    if (packed.ndim != 2 or out_features != 4 * packed.shape[0] or packed.shape[1] % tq.BLOCK_VALUES
            or packed.size == 0):
        return tq.pack_tq2_0(hf2bit.unpack(packed, out_features))
    if has_code3(packed):
        raise CorruptData("packed weight holds the invalid code 3")
    rows, n_in = packed.shape
    planes = _planes_of_hf2bit(packed, reverse_groups=False)  # TQ2_0: value m + 32l at bits 2l
    qs = planes.reshape(4 * rows, n_in // tq.BLOCK_VALUES, 64)
    out = np.empty((4 * rows, n_in // tq.BLOCK_VALUES, 66), np.uint8)
    out[:, :, :64] = qs
    _tq2_0_d(out, qs)
    return out.reshape(4 * rows, tq.row_bytes(tq.TQ2_0, n_in))


# --------------------------------------------------------------------------------------- packing int8 codes


def _i2s_tail(tail: np.ndarray, multiplier) -> None:
    tail[:] = 0
    tail[:4] = np.frombuffer(np.float32(multiplier).astype("<f4").tobytes(), np.uint8)


def _tq2_0_d(out: np.ndarray, qs: np.ndarray) -> None:
    """The f16 `d` of each TQ2_0 block [.., 66]: 1.0, or +0.0 for a block whose 256 codes are all zero."""
    words = np.ascontiguousarray(qs).reshape(-1, 64).view(np.uint64)  # [block, 8]
    zero = np.bitwise_or.reduce(words ^ np.uint64(0x5555555555555555), axis=1) == 0
    d = out.reshape(-1, 66)
    d[:, 64] = 0
    d[:, 65] = np.where(zero, np.uint8(0), _F16_ONE_HIGH)


def _weighted_sum(parts, shifts, bias: int, out: np.ndarray) -> None:
    """out (int8) = sum(part << shift) + bias, wrapping: the byte of four biased 2-bit codes."""
    tmp = np.empty_like(out)
    first = True
    for part, shift in zip(parts, shifts):
        if first:
            np.left_shift(part, shift, out=out) if shift else np.copyto(out, part)
            first = False
        elif shift:
            np.left_shift(part, shift, out=tmp)
            np.add(out, tmp, out=out)
        else:
            np.add(out, part, out=out)
    np.add(out, np.int8(bias), out=out)


def i2s_pack(codes: np.ndarray, multiplier) -> np.ndarray:
    """= i2s.pack: int8 codes (any shape, row-major) and a multiplier -> uint8 [n/4 + 32]."""
    codes = np.asarray(codes)
    if codes.size == 0 or codes.size % i2s.BLOCK_VALUES or not _valid_int8(codes):
        return i2s.pack(codes, multiplier)
    groups = codes.reshape(-1, i2s.GROUPS, i2s.GROUP_SIZE)  # [blocks, g, p]
    n_bytes = codes.size // 4
    out = np.empty(n_bytes + i2s.TAIL_BYTES, np.uint8)
    body = out[:n_bytes].view(np.int8).reshape(-1, i2s.GROUP_SIZE)
    _weighted_sum([groups[:, g] for g in range(4)], (6, 4, 2, 0), 0b01010101, body)
    _i2s_tail(out[n_bytes:], multiplier)
    return out


def tq2_0_pack(codes: np.ndarray) -> np.ndarray:
    """= tq.pack_tq2_0 for int8 codes [out, in] in {-1, 0, +1} (tq.pack checks the values first)."""
    codes = np.asarray(codes)
    if codes.ndim != 2 or codes.shape[1] % tq.BLOCK_VALUES or not _valid_int8(codes) or codes.size == 0:
        return tq.pack_tq2_0(codes)
    n_out, n_in = codes.shape
    chunks = codes.reshape(-1, 2, 4, 32)  # [block, 128-value chunk, l, m]
    out = np.empty((chunks.shape[0], 66), np.uint8)
    qs = out[:, :64].view(np.int8).reshape(-1, 2, 32)
    _weighted_sum([chunks[:, :, l] for l in range(4)], (0, 2, 4, 6), 0b01010101, qs)
    words = np.ascontiguousarray(codes).reshape(-1, tq.BLOCK_VALUES).view(np.uint64)  # [block, 32]
    zero = np.bitwise_or.reduce(words, axis=1) == 0
    out[:, 64] = 0
    out[:, 65] = np.where(zero, np.uint8(0), _F16_ONE_HIGH)
    return out.reshape(n_out, tq.row_bytes(tq.TQ2_0, n_in))


# Five base-3 digits, one per byte at bits 8i of a little-endian word, times this constant put
# d0 + 3*d1 + 9*d2 + 27*d3 + 81*d4 in bits 32..39 of the product: every partial sum below stays under 256, so
# no carry reaches byte 4, and the word's three other bytes (the next group's digits) only land above it.
_BASE3_WEIGHTS = np.uint64(81 | 27 << 8 | 9 << 16 | 3 << 24 | 1 << 32)


def _base3_bytes(digits: np.ndarray, count: int) -> np.ndarray:
    """uint8 digits 0..2 in `digits[:count]` (buffer of >= 5*ceil(count/5) + 3 bytes) -> the packed bytes."""
    size = trits.packed_size(count)
    digits[count : size * trits.TRITS_PER_BYTE] = 1  # padding digit 1 = value 0
    # An unaligned uint64 view with a stride of 5 bytes: word i starts at digit 5i.
    words = np.ndarray((size,), np.dtype("<u8"), buffer=digits, offset=0, strides=(trits.TRITS_PER_BYTE,))
    product = np.multiply(words, _BASE3_WEIGHTS)
    np.right_shift(product, np.uint64(32), out=product)
    return product.astype(np.uint8)


def _digit_buffer(count: int) -> np.ndarray:
    return np.empty(trits.packed_size(count) * trits.TRITS_PER_BYTE + 3, np.uint8)


def trits_pack(codes: np.ndarray) -> np.ndarray:
    """= trits.pack: ternary codes of any shape -> uint8 [ceil(size/5)], five base-3 digits per byte."""
    codes = np.asarray(codes)
    if not _valid_int8(codes):
        return trits.pack(codes)
    flat = codes.reshape(-1)
    digits = _digit_buffer(flat.size)
    np.add(flat.view(np.uint8), 1, out=digits[: flat.size])  # -1, 0, +1 -> 0, 1, 2 (255 + 1 wraps to 0)
    return _base3_bytes(digits, flat.size)


def hf2bit_to_trits(packed: np.ndarray, out_features: int) -> np.ndarray:
    """= trits.pack(hf2bit.unpack(packed, out_features)), without making the codes."""
    packed = np.asarray(packed, dtype=np.uint8)
    if packed.ndim != 2 or out_features != 4 * packed.shape[0] or packed.size == 0:
        return trits.pack(hf2bit.unpack(packed, out_features))
    if has_code3(packed):
        raise CorruptData("packed weight holds the invalid code 3")
    count = 4 * packed.size
    digits = _digit_buffer(count)
    planes = digits[:count].reshape(4, *packed.shape)  # row k*R + r of the codes is row r of plane k
    for k in range(4):
        if k:
            np.right_shift(packed, 2 * k, out=planes[k])
            if k < 3:
                np.bitwise_and(planes[k], 3, out=planes[k])
        else:
            np.bitwise_and(packed, 3, out=planes[k])
    return _base3_bytes(digits, count)
