"""bitnet.cpp's I2_S layout of a ternary weight (docs/formats.md §7).

The `[out, in]` matrix is flattened row-major and cut into blocks of 128 values; each block is split into four
groups of 32, and value `32*g + p` of a block sits in byte `p` of the block's 32 bytes at shift `6 - 2*g`
(the first group in the high bits). Codes 0, 1, 2 mean -1, 0, +1; code 3 is invalid. After the `n/4` packed
bytes comes a 32-byte tail whose first 4 bytes are the float32 multiplier (the rest is padding, zero here).
"""

from __future__ import annotations

import numpy as np

from bitnet_core.codecs import hf2bit
from bitnet_core.codecs._bits import pack_biased
from bitnet_core.errors import CorruptData

GGML_TYPE = 36  # GGML_TYPE_I2_S in bitnet.cpp's ggml fork; means something else in mainline ggml
FILE_TYPE = 40  # LLAMA_FTYPE_MOSTLY_I2_S in bitnet.cpp's fork
BLOCK_VALUES = 128
GROUPS = 4  # groups of 32 values per block, one 2-bit plane each
GROUP_SIZE = BLOCK_VALUES // GROUPS
BLOCK_BYTES = BLOCK_VALUES // 4
TAIL_BYTES = 32
_SHIFTS = np.array([6, 4, 2, 0], np.uint8)  # shift of group g


def nbytes(n_values: int) -> int:
    """Stored size of an I2_S tensor of `n_values` values: packed codes plus the 32-byte tail."""
    return n_values // 4 + TAIL_BYTES


def check_codes(codes: np.ndarray) -> None:
    """ValueError unless `codes` holds integers in {-1, 0, +1}; checked in the caller's dtype, before any
    narrowing cast could wrap a bad value (256 in int16 -> 0 in uint8) into range."""
    if codes.dtype.kind not in "iu":
        raise ValueError(f"ternary codes must be integers, got dtype {codes.dtype}")
    if codes.size and (codes.min() < -1 or codes.max() > 1):
        raise ValueError(f"ternary codes must be -1, 0 or +1 (found values in [{codes.min()}, {codes.max()}])")


def pack(codes: np.ndarray, multiplier) -> np.ndarray:
    """int8 codes in {-1, 0, +1} (any shape, row-major) and a multiplier -> uint8 [n/4 + 32]."""
    codes = np.asarray(codes)
    if codes.size == 0 or codes.size % BLOCK_VALUES:
        raise ValueError(f"I2_S needs a multiple of {BLOCK_VALUES} values, got {codes.size} (shape {codes.shape})")
    check_codes(codes)
    groups = np.ascontiguousarray(codes, dtype=np.int8).reshape(-1, GROUPS, GROUP_SIZE)  # [blocks, g, p]
    n_bytes = codes.size // 4
    out = np.empty(n_bytes + TAIL_BYTES, np.uint8)
    # byte p of a block holds group g at shift 6 - 2g
    body = out[:n_bytes].view(np.int8).reshape(-1, GROUP_SIZE)
    pack_biased([groups[:, g] for g in range(GROUPS)], _SHIFTS.tolist(), body)
    _write_tail(out[n_bytes:], multiplier)
    return out


def from_hf2bit(packed: np.ndarray, out_features: int, multiplier) -> np.ndarray:
    """= pack(hf2bit.unpack(packed, out_features), multiplier), without making the int8 codes."""
    packed = np.asarray(packed, dtype=np.uint8)
    if not hf2bit.transcodable(packed, out_features, BLOCK_VALUES):
        return pack(hf2bit.unpack(packed, out_features), multiplier)
    hf2bit.check(packed, out_features)
    n_bytes = packed.size  # n/4
    out = np.empty(n_bytes + TAIL_BYTES, np.uint8)
    # A row's values are whole 128-value blocks here, so the flattened matrix's blocks are rows' chunks.
    hf2bit.to_rows(packed, reverse_groups=True, out=out[:n_bytes])  # group g at shift 6 - 2g
    _write_tail(out[n_bytes:], multiplier)
    return out


def set_multiplier(raw: np.ndarray, multiplier) -> None:
    """Write `multiplier` into the tail of packed bytes uint8 [n/4 + 32], in place."""
    _write_tail(raw[raw.size - TAIL_BYTES:], multiplier)


def _write_tail(tail: np.ndarray, multiplier) -> None:
    """The 32-byte tail: the float32 multiplier, little endian, then zeros."""
    tail[:] = 0
    tail[:4] = np.frombuffer(np.float32(multiplier).astype("<f4").tobytes(), np.uint8)


def unpack(raw: np.ndarray, shape: tuple[int, ...]) -> tuple[np.ndarray, np.float32]:
    """uint8 [n/4 + 32] -> (int8 codes of `shape`, float32 multiplier); CorruptData on code 3 or a bad size."""
    raw = np.asarray(raw, np.uint8).reshape(-1)
    n = int(np.prod(shape))
    if n % BLOCK_VALUES:
        raise CorruptData(f"I2_S tensor of shape {list(shape)} is not a whole number of {BLOCK_VALUES}-value blocks")
    if raw.size != nbytes(n):
        raise CorruptData(f"I2_S tensor of shape {list(shape)} needs {nbytes(n)} bytes, found {raw.size}")
    packed = raw[: n // 4].reshape(-1, 1, BLOCK_BYTES)
    planes = (packed >> _SHIFTS[None, :, None]) & 3  # [blocks, g, p]
    if (planes == 3).any():
        raise CorruptData("I2_S weight holds the invalid code 3")
    codes = (planes.astype(np.int8) - 1).reshape(shape)
    multiplier = raw[n // 4 : n // 4 + 4].view("<f4")[0].astype(np.float32)
    return codes, np.float32(multiplier)
