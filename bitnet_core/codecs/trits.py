"""Base-3 packing of ternary weights: five trits per byte, 1.6 bits per weight (the `.npz` format's layout).

Flatten the int8 `[out, in]` codes row-major, add one (so -1, 0, +1 become digits 0, 1, 2), pad the end with
digit 1 (value 0) to a multiple of five, and store each group of five as one byte, first value in the lowest
digit:

    byte[i] = d[5i] + 3*d[5i+1] + 9*d[5i+2] + 27*d[5i+3] + 81*d[5i+4]        (0 <= byte <= 242)

Bytes 243..255 are invalid. 3^5 = 243 <= 256 is why five trits fit in a byte; log2(3) = 1.585 bits is the
floor, so this wastes under 1%. Decoding in plain numpy: ``(byte[:, None] // 3 ** np.arange(5)) % 3 - 1``.

Packing reads five digit bytes as one unaligned little-endian uint64 (a stride-5 view) and multiplies it by a
constant that sums the digits with their place values into one byte of the product: one multiply per byte
instead of Horner's rule over five stride-5 columns (BENCHMARKS.md, design measurements). `from_hf2bit` takes
the digits straight from HF packed bytes' 2-bit fields: the HF planes k = 0..3 are the row blocks of the
flattened matrix, in order (native.cc's version reads five HF bytes as one word per output byte instead).
"""

from __future__ import annotations

import numpy as np

from bitnet_core import parallel
from bitnet_core.codecs import hf2bit, native
from bitnet_core.codecs._bits import field
from bitnet_core.errors import CorruptData

TRITS_PER_BYTE = 5
MAX_BYTE = 3**TRITS_PER_BYTE - 1  # 242
_PLACE = 3 ** np.arange(TRITS_PER_BYTE, dtype=np.uint8)  # 1, 3, 9, 27, 81

# Byte -> its five values (-1/0/+1), lowest digit first. Unpacking is one table look-up per byte.
_DECODE = ((np.arange(MAX_BYTE + 1)[:, None] // _PLACE.astype(np.int64)) % 3 - 1).astype(np.int8)


def packed_size(count: int) -> int:
    """Bytes holding `count` ternary values."""
    return -(-int(count) // TRITS_PER_BYTE)


def pack(codes: np.ndarray) -> np.ndarray:
    """Ternary codes of any shape (integer dtype, values in {-1, 0, +1}) -> uint8 [ceil(size/5)]."""
    codes = np.asarray(codes)
    if codes.dtype.kind not in "iu":
        raise ValueError(f"ternary codes must be integers, got dtype {codes.dtype}")
    flat = codes.reshape(-1)
    # Range check on the caller's dtype, before any narrowing cast could wrap a bad value into range.
    if flat.size and (flat.min() < -1 or flat.max() > 1):
        raise ValueError(f"ternary codes must be -1, 0 or +1 (found values in [{flat.min()}, {flat.max()}])")
    digits = _digit_buffer(flat.size)
    np.add(flat, 1, out=digits[: flat.size], casting="unsafe")  # -1, 0, +1 -> 0, 1, 2
    return _base3_bytes(digits, flat.size)


def from_hf2bit(packed: np.ndarray, out_features: int) -> np.ndarray:
    """= pack(hf2bit.unpack(packed, out_features)), without making the int8 codes."""
    packed = np.asarray(packed, dtype=np.uint8)
    if packed.ndim != 2 or packed.size == 0 or out_features != hf2bit.VALUES_PER_BYTE * packed.shape[0]:
        return pack(hf2bit.unpack(packed, out_features))
    packed = hf2bit.check(packed, out_features)
    count = packed.size * hf2bit.VALUES_PER_BYTE
    if native.available() and packed.flags.c_contiguous:
        out = np.empty(packed_size(count), np.uint8)
        parallel.for_row_ranges(out.size, out.nbytes, lambda start, stop: native.to_trits(packed, out, start, stop))
        return out
    digits = _digit_buffer(count)
    planes = digits[:count].reshape(hf2bit.VALUES_PER_BYTE, *packed.shape)  # rows k*R + r = row r of plane k
    for k in range(hf2bit.VALUES_PER_BYTE):
        field(packed, k, planes[k])
    return _base3_bytes(digits, count)


# Five digits, one per byte at bits 8i of a little-endian word, times this constant put
# d0 + 3*d1 + 9*d2 + 27*d3 + 81*d4 in bits 32..39 of the product: every partial sum stays under 256, so no
# carry reaches byte 4, and the word's three other bytes (the next group's digits) only land above it.
_BASE3_WEIGHTS = np.uint64(81 | 27 << 8 | 9 << 16 | 3 << 24 | 1 << 32)


def _digit_buffer(count: int) -> np.ndarray:
    """Room for `count` digits, the padding to a multiple of five, and the 3 bytes the last word reads past."""
    return np.empty(packed_size(count) * TRITS_PER_BYTE + 3, np.uint8)


def _base3_bytes(digits: np.ndarray, count: int) -> np.ndarray:
    """Digits 0..2 in `digits[:count]` (a `_digit_buffer`) -> the packed bytes."""
    size = packed_size(count)
    digits[count : size * TRITS_PER_BYTE] = 1  # padding digit 1 = value 0
    words = np.ndarray((size,), np.dtype("<u8"), buffer=digits, offset=0, strides=(TRITS_PER_BYTE,))  # word i: digit 5i..
    out = np.empty(size, np.uint8)
    # In cache-sized pieces: the uint64 products of a whole matrix (8 bytes per output byte) would go through
    # memory three times (multiply, shift, narrow); 64 Ki words at a time stay in L2 (design measurements).
    product = np.empty(min(size, _CHUNK_WORDS), np.uint64)
    for start in range(0, size, _CHUNK_WORDS):
        stop = min(size, start + _CHUNK_WORDS)
        piece = product[: stop - start]
        np.multiply(words[start:stop], _BASE3_WEIGHTS, out=piece)
        np.right_shift(piece, np.uint64(32), out=piece)
        np.copyto(out[start:stop], piece, casting="unsafe")
    return out


_CHUNK_WORDS = 1 << 16


def unpack(packed: np.ndarray, shape) -> np.ndarray:
    """uint8 [ceil(prod(shape)/5)] -> int8 codes of `shape`; raises CorruptData on a byte above 242."""
    shape = tuple(int(d) for d in shape)
    count = int(np.prod(shape, dtype=np.int64)) if shape else 1
    packed = np.asarray(packed)
    if packed.dtype != np.uint8 or packed.ndim != 1:
        raise CorruptData(f"base-3 packed weight must be 1-D uint8, got {packed.dtype} {list(packed.shape)}")
    if packed.size != packed_size(count):
        raise CorruptData(
            f"base-3 packed weight has {packed.size} bytes, expected {packed_size(count)} for shape {list(shape)}"
        )
    if packed.size and packed.max() > MAX_BYTE:
        raise CorruptData(f"base-3 packed weight holds the invalid byte {int(packed.max())} (largest valid: 242)")
    # np.take on a small table, not fancy indexing `_DECODE[packed]`: the faster of the two (design measurements).
    return np.take(_DECODE, packed, axis=0).reshape(-1)[:count].reshape(shape)
