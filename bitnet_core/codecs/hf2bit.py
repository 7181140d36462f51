"""The Hugging Face 2-bit packing of ternary weights (transformers' `pack_weights`).

With `R = ceil(out / 4)`, value row `k*R + r` sits in bits `2k..2k+1` of packed row `r`: a block layout
along dim 0, not interleaved. Codes 0, 1, 2 mean -1, 0, +1; code 3 is invalid.

Besides pack/unpack, `to_rows` regroups the packed bytes for the writers that transcode HF bytes straight
into another 2-bit layout (i2s.from_hf2bit, tq.tq2_0_from_hf2bit) without making int8 codes.
"""

from __future__ import annotations

import numpy as np

from bitnet_core import parallel
from bitnet_core.codecs import native
from bitnet_core.codecs._bits import field, has_code3, transpose_fields
from bitnet_core.errors import CorruptData

LAYOUT = "hf2bit"  # PackedTernary.layout of these bytes
VALUES_PER_BYTE = 4


def packed_rows(out_features: int) -> int:
    return -(-out_features // VALUES_PER_BYTE)


def pack(codes: np.ndarray) -> np.ndarray:
    """int8 [out, ...] in {-1,0,1} -> uint8 [ceil(out/4), ...]."""
    codes = np.asarray(codes)
    if codes.ndim < 1 or codes.shape[0] == 0:
        raise ValueError(f"cannot pack a ternary tensor of shape {codes.shape}")
    out = codes.shape[0]
    rows = packed_rows(out)
    # Check the caller's values before any narrowing cast, which would wrap e.g. 65535 or 256 into a legal code.
    if codes.size and (codes.min() < -1 or codes.max() > 1 or (codes.dtype.kind == "f" and (codes != np.round(codes)).any())):
        raise ValueError("ternary codes must be -1, 0 or +1")
    biased = (codes.astype(np.int16) + 1).astype(np.uint8)
    if out % VALUES_PER_BYTE:  # pad with code 0 rows; unpack drops them again
        pad = np.zeros((rows * VALUES_PER_BYTE - out, *codes.shape[1:]), np.uint8)
        biased = np.concatenate([biased, pad])
    blocks = biased.reshape(VALUES_PER_BYTE, rows, *codes.shape[1:])
    packed = blocks[0] | (blocks[1] << 2) | (blocks[2] << 4) | (blocks[3] << 6)
    return np.ascontiguousarray(packed, dtype=np.uint8)


def check(packed: np.ndarray, out_features: int) -> np.ndarray:
    """`packed` as uint8, checked: rows for `out_features` outputs and no code 3 (CorruptData otherwise)."""
    packed = np.asarray(packed, dtype=np.uint8)
    if packed.ndim < 1 or packed.shape[0] != packed_rows(out_features):
        rows = packed.shape[0] if packed.ndim else "no"
        raise CorruptData(
            f"packed weight has {rows} rows, expected {packed_rows(out_features)} for {out_features} outputs"
        )
    if has_code3(packed):
        raise CorruptData("packed weight holds the invalid code 3")
    return packed


def unpack(packed: np.ndarray, out_features: int) -> np.ndarray:
    """uint8 [ceil(out/4), ...] -> int8 [out, ...]; raises CorruptData on code 3 or a wrong row count."""
    packed = check(packed, out_features)
    planes = np.empty((VALUES_PER_BYTE, *packed.shape), np.uint8)  # plane k = value rows k*R .. k*R + R - 1
    for k in range(VALUES_PER_BYTE):
        field(packed, k, planes[k])
    np.subtract(planes, 1, out=planes)  # codes 0, 1, 2 -> 255, 0, 1: int8 -1, 0, +1
    codes = planes.view(np.int8).reshape(-1, *packed.shape[1:])
    return codes[:out_features] if out_features < codes.shape[0] else codes


def transcodable(packed: np.ndarray, out_features: int, row_multiple: int) -> bool:
    """A shape `to_rows` takes: [out/4, in], out a multiple of 4 (no padding rows), in of whole 128-value
    chunks and a multiple of `row_multiple`. The transcoders hand anything else to unpack + pack."""
    return (packed.ndim == 2 and packed.size > 0 and out_features == VALUES_PER_BYTE * packed.shape[0]
            and packed.shape[1] % 128 == 0 and packed.shape[1] % row_multiple == 0)


def to_rows(packed: np.ndarray, reverse_groups: bool, out: np.ndarray | None = None) -> np.ndarray:
    """Checked HF bytes [R, in] -> uint8 [4, R, in/128, 32] (into `out` if given) where byte [k, r, j, p]
    holds the four values of output row k*R + r at columns 128j + 32g + p, g = 0..3, value g in field g
    (field 3 - g with `reverse_groups`).

    An HF byte holds field k of four output rows k*R + r; here a byte holds four values 32 apart in one row,
    as I2_S and TQ2_0 store them. For one (r, j, p) the four HF bytes of groups g form a 4x4 matrix of 2-bit
    fields (rows g, columns k), and the four bytes wanted for k = 0..3 are its transpose.
    """
    rows, n_in = packed.shape
    shape = (4, rows, n_in // 128, 32)
    planes = np.empty(shape, np.uint8) if out is None else out.reshape(shape)
    if native.available() and packed.flags.c_contiguous and planes.flags.c_contiguous:
        parallel.for_row_ranges(rows, packed.nbytes,
                                lambda start, stop: native.to_rows(packed, reverse_groups, planes, start, stop))
        return planes
    groups = packed.reshape(rows, n_in // 128, 4, 32).transpose(2, 0, 1, 3)  # [g, R, J, 32], a strided view
    if reverse_groups:
        groups = groups[::-1]

    def part(start: int, stop: int) -> None:  # HF rows [start, stop) become output rows k*R + start.. for each k
        np.copyto(planes[:, start:stop], groups[:, start:stop])
        transpose_fields(planes[:, start:stop])

    parallel.for_row_ranges(rows, packed.nbytes, part)
    return planes
