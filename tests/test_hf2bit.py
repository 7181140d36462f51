"""The Hugging Face 2-bit packing against hand-worked layouts and transformers' own `pack_weights`."""

import numpy as np
import pytest
from reference_extra import transformers_pack_weights

from bitnet_core.codecs import hf2bit
from bitnet_core.errors import CorruptData


def test_block_layout_by_hand():
    # out = 8, so R = 2: value row k*2 + r sits in bits 2k..2k+1 of packed row r.
    codes = np.array([-1, 0, 1, 0, 1, 1, -1, 0], np.int8)[:, None]  # rows 0..7, one column
    biased = codes[:, 0] + 1  # 0, 1, 2, 1, 2, 2, 0, 1
    row0 = biased[0] | biased[2] << 2 | biased[4] << 4 | biased[6] << 6  # value rows 0, 2, 4, 6
    row1 = biased[1] | biased[3] << 2 | biased[5] << 4 | biased[7] << 6  # value rows 1, 3, 5, 7
    packed = hf2bit.pack(codes)
    assert packed.dtype == np.uint8 and packed.shape == (2, 1)
    assert packed[:, 0].tolist() == [row0, row1] == [0b00101000, 0b01100101]
    np.testing.assert_array_equal(hf2bit.unpack(packed, 8), codes)


def test_unpacks_the_transformers_docstring_example():
    # transformers' `unpack_weights` docstring: this packed tensor holds this [8, 2] matrix.
    packed = np.array([[0b10100001, 0b00011000], [0b10010000, 0b00001010]], np.uint8)
    expected = [[0, -1], [-1, 1], [-1, 1], [-1, 1], [1, 0], [0, -1], [1, -1], [1, -1]]
    assert hf2bit.unpack(packed, 8).tolist() == expected
    np.testing.assert_array_equal(hf2bit.pack(np.array(expected, np.int8)), packed)


@pytest.mark.parametrize("shape", [(4, 3), (8, 16), (12, 7), (5, 3), (6, 2), (9, 4), (1, 5), (7,), (2560, 64)])
def test_matches_transformers_pack_weights(shape):
    codes = np.random.default_rng(sum(shape)).integers(-1, 2, size=shape).astype(np.int8)
    theirs = transformers_pack_weights(codes)
    ours = hf2bit.pack(codes)
    assert ours.dtype == np.uint8 and ours.shape == theirs.shape == (hf2bit.packed_rows(shape[0]), *shape[1:])
    np.testing.assert_array_equal(ours, theirs)
    np.testing.assert_array_equal(hf2bit.unpack(theirs, shape[0]), codes)


def test_packed_rows():
    assert [hf2bit.packed_rows(n) for n in (1, 4, 5, 8, 6912)] == [1, 1, 2, 2, 1728]


@pytest.mark.parametrize(
    "bad",
    [
        np.array([[2]], np.int8),
        np.array([[-2]], np.int8),
        np.array([[65535]], np.int64),  # wraps to -1 through int16: must still be refused
        np.array([[256]], np.int32),  # wraps to 0 through uint8
        np.array([[0.5]], np.float32),
        np.array([[np.nan]], np.float32),
    ],
)
def test_pack_refuses_non_ternary_values(bad):
    with pytest.raises(ValueError, match=r"must be -1, 0 or \+1"):
        hf2bit.pack(bad)


def test_pack_refuses_empty():
    with pytest.raises(ValueError, match="cannot pack"):
        hf2bit.pack(np.zeros((0, 4), np.int8))


def test_unpack_refuses_code_3_and_wrong_row_count():
    packed = hf2bit.pack(np.zeros((8, 3), np.int8))
    packed[1, 2] |= 0b11 << 4
    with pytest.raises(CorruptData, match="invalid code 3"):
        hf2bit.unpack(packed, 8)
    with pytest.raises(CorruptData, match="has 2 rows, expected 3 for 9 outputs"):
        hf2bit.unpack(hf2bit.pack(np.zeros((8, 3), np.int8)), 9)
