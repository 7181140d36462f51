"""The Hugging Face 2-bit packing of ternary weights (transformers' `pack_weights`).

With `R = ceil(out / 4)`, value row `k*R + r` sits in bits `2k..2k+1` of packed row `r`: a block layout
along dim 0, not interleaved. Codes 0, 1, 2 mean -1, 0, +1; code 3 is invalid.
"""

from __future__ import annotations

import numpy as np

from ..errors import CorruptData

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


def unpack(packed: np.ndarray, out_features: int) -> np.ndarray:
    """uint8 [ceil(out/4), ...] -> int8 [out, ...]; raises CorruptData on code 3."""
    packed = np.asarray(packed, dtype=np.uint8)
    if packed.shape[0] != packed_rows(out_features):
        raise CorruptData(
            f"packed weight has {packed.shape[0]} rows, expected {packed_rows(out_features)} for {out_features} outputs"
        )
    planes = np.stack([(packed >> shift) & 3 for shift in (0, 2, 4, 6)])  # [4, R, ...]
    if (planes == 3).any():
        raise CorruptData("packed weight holds the invalid code 3")
    codes = planes.reshape(-1, *packed.shape[1:])[:out_features]
    return (codes.astype(np.int8) - 1).astype(np.int8)
