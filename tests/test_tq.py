"""TQ1_0 / TQ2_0 (llama.cpp): our bytes are gguf-py's quantizer's bytes; decoding keeps codes and block d."""

import numpy as np
import pytest
from gguf import GGMLQuantizationType, quants

from bitnet_convert.formats.gguf import tq as tq
from bitnet_core.errors import CorruptData

TYPES = [GGMLQuantizationType.TQ1_0, GGMLQuantizationType.TQ2_0]


def random_codes(shape=(8, 512), seed=0) -> np.ndarray:
    codes = np.random.default_rng(seed).integers(-1, 2, size=shape).astype(np.int8)
    codes[0, :256] = 0  # an all-zero block: gguf-py writes d = 0 for it
    codes[1, 256:] = -1
    return codes


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_bytes_equal_gguf_py(qtype):
    codes = random_codes()
    expected = quants.quantize(codes.astype(np.float32), qtype)
    packed = tq.pack(codes, qtype)
    assert packed.dtype == np.uint8 and packed.shape == (8, tq.row_bytes(qtype, 512))
    assert packed.tobytes() == expected.tobytes()


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_set_d_is_gguf_py_of_codes_times_d(qtype):
    """set_d after packing = gguf-py's quantizer of codes x d (llama.cpp's converter's bytes): the blocks with a
    non-zero get d, the all-zero block keeps d = 0; where every block is zero, all get d."""
    codes, d = random_codes(), np.float16(0.3)
    expected = quants.quantize(codes.astype(np.float32) * np.float32(d), qtype)
    assert tq.set_d(tq.pack(codes, qtype), qtype, d).tobytes() == expected.tobytes()
    zeros = tq.set_d(tq.pack(np.zeros((2, 512), np.int8), qtype), qtype, d)
    stored_codes, stored_d = tq.unpack(zeros, qtype, (2, 512))
    assert not stored_codes.any() and (stored_d == np.float32(d)).all()


def test_direct_tq2_0_packer_is_byte_identical():
    codes = random_codes((33, 768), seed=3)
    assert tq.pack_tq2_0(codes).tobytes() == quants.quantize(codes.astype(np.float32), tq.TQ2_0).tobytes()


def test_direct_tq2_0_decoder_matches_gguf_py():
    codes = random_codes((5, 512), seed=4)
    raw = quants.quantize(codes.astype(np.float32) * np.float32(0.75), tq.TQ2_0)
    back, d = tq.unpack(raw, tq.TQ2_0, codes.shape)
    assert np.array_equal(back * np.repeat(d, 256, axis=1), quants.dequantize(raw, tq.TQ2_0).reshape(codes.shape))


def test_tq2_0_block_by_hand():
    # All +1: every 2-bit field holds q+1 = 2, so every byte is 0b10101010; then f16 1.0 = 0x3C00 little-endian.
    packed = tq.pack(np.ones((1, 256), np.int8), tq.TQ2_0)
    assert packed.tobytes() == bytes([0xAA] * 64) + bytes([0x00, 0x3C])


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_round_trip_codes_and_block_scales(qtype):
    codes = random_codes()
    back, d = tq.unpack(tq.pack(codes, qtype), qtype, codes.shape)
    assert np.array_equal(back, codes)
    assert d.shape == (8, 2) and d[0, 0] == 0 and (np.delete(d.ravel(), 0) == 1).all()


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_unpack_of_a_folded_multiplier(qtype):
    """llama.cpp's converter stores codes*m; the digits come back exactly and d is m in f16."""
    codes = random_codes()
    raw = quants.quantize(codes.astype(np.float32) * np.float32(1.37), qtype)
    back, d = tq.unpack(raw, qtype, codes.shape)
    assert np.array_equal(back[1:], codes[1:])
    assert set(np.unique(d)) == {0.0, np.float32(np.float16(1.37))}


def test_tq2_0_code_3_is_corrupt():
    raw = tq.pack(np.zeros((1, 256), np.int8), tq.TQ2_0)
    raw[0, 0] = 0xFF
    with pytest.raises(CorruptData, match="invalid code 3"):
        tq.unpack(raw, tq.TQ2_0, (1, 256))


def test_rows_must_be_whole_blocks():
    with pytest.raises(ValueError, match="multiple of 256"):
        tq.pack(np.zeros((2, 128), np.int8), tq.TQ2_0)
