"""Base-3 packing of ternary weights: five trits per byte, 1.6 bits per weight (the `.npz` format's layout).

Flatten the int8 `[out, in]` codes row-major, add one (so -1, 0, +1 become digits 0, 1, 2), pad the end with
digit 1 (value 0) to a multiple of five, and store each group of five as one byte, first value in the lowest
digit:

    byte[i] = d[5i] + 3*d[5i+1] + 9*d[5i+2] + 27*d[5i+3] + 81*d[5i+4]        (0 <= byte <= 242)

Bytes 243..255 are invalid. 3^5 = 243 <= 256 is why five trits fit in a byte; log2(3) = 1.585 bits is the
floor, so this wastes under 1%. Decoding in plain numpy: ``(byte[:, None] // 3 ** np.arange(5)) % 3 - 1``.
"""

from __future__ import annotations

import numpy as np

from ..errors import CorruptData

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
    size = packed_size(flat.size)
    digits = np.ones(size * TRITS_PER_BYTE, np.uint8)  # padding digit 1 = value 0
    np.add(flat, 1, out=digits[: flat.size], casting="unsafe")
    groups = digits.reshape(size, TRITS_PER_BYTE)
    # Horner's rule from the highest digit keeps every intermediate <= 242, so uint8 arithmetic is exact.
    packed = groups[:, 4].copy()
    for place in (3, 2, 1, 0):
        packed *= 3
        packed += groups[:, place]
    return packed


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
    # np.take on a small table is ~3x faster than fancy indexing `_DECODE[packed]` (numpy 2.4).
    return np.take(_DECODE, packed, axis=0).reshape(-1)[:count].reshape(shape)
