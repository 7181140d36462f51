"""The model's 2-bit packing of ternary weights ("rows4"): what `bitnet_model` holds in memory and Flax folders store.

Codes T [out, in] in {-1, 0, +1} (out a multiple of 4) become uint8 `packed [out/4, in]`, byte (r, i) holding
`T[4r + k, i] + 1` in bits 2k..2k+1: four *consecutive* output rows per byte, so unpacking a block of packed
rows gives a contiguous block of output rows (bitnet_model/packed.py says why the model wants that). Codes
0, 1, 2 mean -1, 0, +1; code 3 is invalid. HF's layout (hf2bit.py) differs only in *which* rows share a byte:
rows k*R + r there, 4r + k here. numpy only (no JAX): the Flax reader and writer use it.

`from_hf2bit` / `to_hf2bit` move the 2-bit fields between the two layouts without making int8 codes. Four
consecutive HF packed rows 4q + j (j = 0..3) hold, in field k, value rows k*R + 4q + j; the rows4 byte of
packed row k*R/4 + q holds, in field j, the same four value rows. So each 4x4 matrix of fields (bytes j,
fields k) is transposed (`_bits.transpose_fields`), and plane k of the result is output block k: 26 byte-wise
operations per 16 values and one strided copy, when R = out/4 is a multiple of 4 (every 2B4T shape);
other shapes go through int8 codes.
"""

from __future__ import annotations

import numpy as np

from bitnet_core import parallel
from bitnet_core.codecs import hf2bit, native
from bitnet_core.codecs._bits import field, has_code3, transpose_fields
from bitnet_core.errors import CorruptData

LAYOUT = "rows4"
VALUES_PER_BYTE = 4


def packable(out_features: int) -> bool:
    return out_features > 0 and out_features % VALUES_PER_BYTE == 0


def pack(codes: np.ndarray) -> np.ndarray:
    """int8 codes [out, in] in {-1, 0, +1} (out a multiple of 4) -> uint8 [out/4, in]."""
    codes = np.asarray(codes)
    if codes.ndim != 2 or not packable(codes.shape[0]):
        raise ValueError(f"cannot pack ternary codes of shape {list(codes.shape)}: needs [out, in] with out a "
                         f"positive multiple of {VALUES_PER_BYTE}")
    if codes.size and (codes.min() < -1 or codes.max() > 1):  # before the narrowing cast, which would wrap
        raise ValueError("ternary codes must be -1, 0 or +1")
    out, n_in = codes.shape
    rows = codes.reshape(out // VALUES_PER_BYTE, VALUES_PER_BYTE, n_in)  # [R, 4, in]: row 4r + k at [r, k]
    packed = np.empty((out // VALUES_PER_BYTE, n_in), np.uint8)
    tmp = np.empty_like(packed)
    np.add(rows[:, 0], 1, out=packed, casting="unsafe")  # int8 -1, 0, 1 -> codes 0, 1, 2
    for k in range(1, VALUES_PER_BYTE):
        np.add(rows[:, k], 1, out=tmp, casting="unsafe")
        np.left_shift(tmp, 2 * k, out=tmp)
        np.bitwise_or(packed, tmp, out=packed)
    return packed


def check(packed: np.ndarray, out_features: int | None = None) -> np.ndarray:
    """`packed` as uint8 [out/4, in], checked: no code 3 (CorruptData) and, if given, rows for `out_features`."""
    packed = np.asarray(packed, dtype=np.uint8)
    if packed.ndim != 2 or (out_features is not None and packed.shape[0] * VALUES_PER_BYTE != out_features):
        raise CorruptData(f"packed weight has shape {list(packed.shape)}, expected [{out_features}/4, in]")
    if has_code3(packed):
        raise CorruptData("packed weight holds the invalid code 3")
    return packed


def unpack(packed: np.ndarray) -> np.ndarray:
    """uint8 [R, in] -> int8 codes [4R, in]; raises CorruptData on code 3."""
    packed = check(packed)
    rows, n_in = packed.shape
    codes = np.empty((rows, VALUES_PER_BYTE, n_in), np.uint8)  # [r, k] = value row 4r + k
    for k in range(VALUES_PER_BYTE):
        field(packed, k, codes[:, k])
    np.subtract(codes, 1, out=codes)  # codes 0, 1, 2 -> 255, 0, 1: int8 -1, 0, +1
    return codes.view(np.int8).reshape(rows * VALUES_PER_BYTE, n_in)


def _fast(rows: int, n_in: int) -> bool:
    return rows > 0 and rows % VALUES_PER_BYTE == 0 and n_in > 0


def from_hf2bit(packed: np.ndarray, out_features: int) -> np.ndarray:
    """= pack(hf2bit.unpack(packed, out_features)) without making int8 codes; CorruptData on code 3.

    Faster than hf2bit.unpack + pack: no int8 codes made and read back (BENCHMARKS.md, design measurements).
    """
    if not packable(out_features):
        raise ValueError(f"cannot pack {out_features} output rows: not a positive multiple of {VALUES_PER_BYTE}")
    packed = hf2bit.check(packed, out_features)  # the transpose moves fields, so a code 3 would survive it
    if packed.ndim != 2 or not _fast(*packed.shape):
        return pack(hf2bit.unpack(packed, out_features))
    rows, n_in = packed.shape
    if native.available() and packed.flags.c_contiguous:
        out = np.empty_like(packed)
        parallel.for_row_ranges(rows // VALUES_PER_BYTE, packed.nbytes,
                                lambda start, stop: native.to_rows4(packed, out, start, stop))
        return out
    planes = np.empty((VALUES_PER_BYTE, rows // VALUES_PER_BYTE, n_in), np.uint8)
    np.copyto(planes, packed.reshape(rows // VALUES_PER_BYTE, VALUES_PER_BYTE, n_in).transpose(1, 0, 2))
    transpose_fields(planes)  # plane k is now rows4 packed rows k*R/4 .. (k+1)*R/4 - 1
    return planes.reshape(rows, n_in)


def to_hf2bit(packed: np.ndarray) -> np.ndarray:
    """rows4 bytes [R, in] -> HF bytes [R, in] of the same codes (= hf2bit.pack(unpack(packed))); CorruptData on
    code 3. The inverse of `from_hf2bit`: the field transpose is its own inverse."""
    packed = check(packed)
    rows, n_in = packed.shape
    if not _fast(rows, n_in):
        return hf2bit.pack(unpack(packed))
    planes = packed.reshape(VALUES_PER_BYTE, rows // VALUES_PER_BYTE, n_in).copy()
    transpose_fields(planes)  # plane j now holds field k = value row k*R + 4q + j at [j, q]
    out = np.empty((rows // VALUES_PER_BYTE, VALUES_PER_BYTE, n_in), np.uint8)
    np.copyto(out, planes.transpose(1, 0, 2))
    return out.reshape(rows, n_in)
