"""I2_S (bitnet.cpp) packing against bytes worked out by hand from docs/formats.md §7."""

import numpy as np
import pytest

from bitnet_core.codecs import i2s
from bitnet_core.errors import CorruptData

# 1.5 as little-endian float32 is 0x3FC00000; the rest of the 32-byte tail is zero.
TAIL_1_5 = bytes([0x00, 0x00, 0xC0, 0x3F]) + bytes(28)


def hand_row() -> np.ndarray:
    """One 128-value block: group 0 all +1, group 1 all 0, group 2 all -1, group 3 alternating +1, -1."""
    return np.array([1] * 32 + [0] * 32 + [-1] * 32 + [1, -1] * 16, np.int8)


def test_one_block_by_hand():
    # Byte p = code(g0) << 6 | code(g1) << 4 | code(g2) << 2 | code(g3), codes 0,1,2 = -1,0,+1:
    # 2<<6 | 1<<4 | 0<<2 | 2 = 0x92 for even p, ... | 0 = 0x90 for odd p.
    expected = bytes([0x92, 0x90] * 16) + TAIL_1_5
    assert i2s.pack(hand_row()[None, :], 1.5).tobytes() == expected


def test_two_rows_by_hand():
    second = np.zeros(128, np.int8)
    second[5] = 1  # group 0, byte 5: 2<<6 | 1<<4 | 1<<2 | 1 = 0x95
    second[96 + 7] = -1  # group 3, byte 7: 1<<6 | 1<<4 | 1<<2 | 0 = 0x54
    block2 = [0x55] * 32  # all zeros: 0b01010101
    block2[5], block2[7] = 0x95, 0x54
    expected = bytes([0x92, 0x90] * 16) + bytes(block2) + TAIL_1_5
    packed = i2s.pack(np.stack([hand_row(), second]), 1.5)
    assert packed.tobytes() == expected
    assert packed.size == i2s.nbytes(256) == 256 // 4 + 32


def test_round_trip_keeps_codes_and_float32_multiplier():
    rng = np.random.default_rng(1)
    codes = rng.integers(-1, 2, size=(6, 256)).astype(np.int8)
    multiplier = np.float32(1.2345678)
    back, m = i2s.unpack(i2s.pack(codes, multiplier), codes.shape)
    assert np.array_equal(back, codes) and back.dtype == np.int8
    assert m == multiplier and m.dtype == np.float32


def test_invalid_code_3_is_corrupt():
    raw = i2s.pack(hand_row()[None, :], 1.0)
    raw[0] |= 0xC0  # group 0 of byte 0 becomes code 3
    with pytest.raises(CorruptData, match="invalid code 3"):
        i2s.unpack(raw, (1, 128))


def test_wrong_sizes_refused():
    with pytest.raises(ValueError, match="multiple of 128"):
        i2s.pack(np.zeros((1, 100), np.int8), 1.0)
    with pytest.raises(CorruptData, match="needs 64 bytes"):
        i2s.unpack(np.zeros(63, np.uint8), (1, 128))
    with pytest.raises(ValueError, match="-1, 0 or \\+1"):
        i2s.pack(np.full((1, 128), 2, np.int8), 1.0)
