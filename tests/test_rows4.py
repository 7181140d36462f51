"""The model's 2-bit layout (codecs/rows4.py): packing, and the HF <-> rows4 transcoders, byte for byte."""

import numpy as np
import pytest

from bitnet_core.codecs import hf2bit, rows4
from bitnet_core.errors import CorruptData

# (out, in): R = out/4 a multiple of 4 (the field-transpose path), and not (through int8 codes)
SHAPES = [(16, 8), (64, 3), (6912 // 16, 40), (2560, 128), (4, 1), (8, 5), (12, 7), (20, 256)]


def codes_of(shape, seed=0):
    return np.random.default_rng(seed).integers(-1, 2, shape).astype(np.int8)


def test_layout_is_four_consecutive_rows_per_byte():
    codes = np.array([[-1], [0], [1], [1], [0], [0], [-1], [1]], np.int8)
    # row 4r + k at bits 2k..2k+1 of packed row r, code + 1: rows 0..3 = 0, 1, 2, 2 -> 0b10_10_01_00
    assert rows4.pack(codes).tolist() == [[0b10100100], [0b10000101]]
    np.testing.assert_array_equal(rows4.unpack(rows4.pack(codes)), codes)


@pytest.mark.parametrize("shape", SHAPES)
def test_transcoders_are_byte_identical_to_unpack_then_pack(shape):
    codes = codes_of(shape, seed=shape[0])
    hf_bytes = hf2bit.pack(codes)
    ours = rows4.from_hf2bit(hf_bytes, shape[0])
    assert ours.dtype == np.uint8 and ours.shape == (shape[0] // 4, shape[1])
    assert ours.tobytes() == rows4.pack(hf2bit.unpack(hf_bytes, shape[0])).tobytes()
    back = rows4.to_hf2bit(ours)
    assert back.tobytes() == hf2bit.pack(rows4.unpack(ours)).tobytes() == hf_bytes.tobytes()


def test_the_fast_path_makes_no_int8_codes(monkeypatch):
    codes = codes_of((64, 256), seed=4)
    hf_bytes, ours = hf2bit.pack(codes), rows4.pack(codes)
    monkeypatch.setattr(hf2bit, "unpack", lambda *a: pytest.fail("int8 codes were made"))
    monkeypatch.setattr(rows4, "unpack", lambda *a: pytest.fail("int8 codes were made"))
    assert rows4.from_hf2bit(hf_bytes, 64).tobytes() == ours.tobytes()
    assert rows4.to_hf2bit(ours).tobytes() == hf_bytes.tobytes()


@pytest.mark.parametrize("shape", [(64, 256), (12, 7)])
def test_code_3_is_corrupt_data_everywhere(shape):
    codes = codes_of(shape, seed=5)
    for bad_field in range(4):
        hf_bytes, ours = hf2bit.pack(codes), rows4.pack(codes)
        hf_bytes[1, 2] |= np.uint8(3 << 2 * bad_field)
        ours[1, 2] |= np.uint8(3 << 2 * bad_field)
        for call in (lambda: rows4.from_hf2bit(hf_bytes, shape[0]), lambda: rows4.to_hf2bit(ours),
                     lambda: rows4.unpack(ours), lambda: rows4.check(ours)):
            with pytest.raises(CorruptData, match="code 3"):
                call()


def test_refuses_shapes_it_cannot_hold():
    with pytest.raises(ValueError, match="multiple of 4"):
        rows4.pack(np.zeros((6, 4), np.int8))
    with pytest.raises(ValueError, match="-1, 0 or \\+1"):
        rows4.pack(np.full((4, 4), 2, np.int8))
    with pytest.raises(ValueError, match="multiple of 4"):
        rows4.from_hf2bit(hf2bit.pack(np.zeros((6, 4), np.int8)), 6)
    with pytest.raises(CorruptData, match="expected"):
        rows4.check(np.zeros((2, 4), np.uint8), out_features=12)
