"""The vectorized codec kernels and the direct HF -> I2_S / TQ2_0 / base-3 transcoders, byte for byte against
references that are not our code or that transcribe the layout's definition one value at a time:

- HF 2-bit: transformers' `pack_weights` (torch);
- TQ2_0: gguf-py's `quants.quantize` (float32 codes in, llama.cpp's block bytes out);
- I2_S and base-3: the formulas of docs/formats.md §7 and §5, codecs/trits.py, evaluated per value below.
"""

import struct

import numpy as np
import pytest
from reference_extra import transformers_pack_weights
from gguf import quants

from bitnet_convert.formats.gguf import tq as tq
from bitnet_core.codecs import _bits, hf2bit, i2s, trits
from bitnet_core.errors import CorruptData

SHAPES = [(4, 256), (8, 512), (12, 768), (64, 2560), (20, 6912 // 27 * 2)]  # last: in not a multiple of 128
VALID_BYTES = np.array([a | b << 2 | c << 4 | d << 6 for a in range(3) for b in range(3) for c in range(3)
                        for d in range(3)], np.uint8)


def random_codes(shape, seed, p_zero=1 / 3):
    rng = np.random.default_rng(seed)
    p = [(1 - p_zero) / 2, p_zero, (1 - p_zero) / 2]
    return rng.choice(np.array([-1, 0, 1], np.int8), size=shape, p=p)


def same(a: np.ndarray, b: np.ndarray) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


# ------------------------------------------------------------------------------------ independent references


def hf_packed(codes: np.ndarray) -> np.ndarray:
    """transformers' packing (a test using it skips without the reference extra)."""
    return transformers_pack_weights(codes)


def hf_unpacked(packed: np.ndarray, out_features: int) -> np.ndarray:
    """docs/formats.md §2: value row k*R + r is field k (bits 2k..2k+1) of packed row r, codes 0, 1, 2 = -1, 0, +1."""
    rows = packed.shape[0]
    codes = np.empty((4 * rows, *packed.shape[1:]), np.int8)
    for k in range(4):
        codes[k * rows:(k + 1) * rows] = ((packed.astype(np.int64) >> (2 * k)) & 3) - 1
    return codes[:out_features]


def i2s_reference(codes: np.ndarray, multiplier) -> np.ndarray:
    """docs/formats.md §7: value 32g + p of each 128-value block at shift 6 - 2g of the block's byte p; then the
    float32 multiplier (little endian) and 28 zero bytes."""
    flat = codes.reshape(-1).astype(np.int64) + 1
    index = np.arange(flat.size)
    block, g, p = index // 128, index % 128 // 32, index % 32
    body = np.zeros(flat.size // 4, np.int64)
    np.bitwise_or.at(body, 32 * block + p, flat << (6 - 2 * g))  # value by value
    tail = struct.pack("<f", float(np.float32(multiplier))) + bytes(28)
    return np.concatenate([body.astype(np.uint8), np.frombuffer(tail, np.uint8)])


def tq2_0_reference(codes: np.ndarray) -> np.ndarray:
    return quants.quantize(codes.astype(np.float32), tq.TQ2_0)


def trits_reference(codes: np.ndarray) -> np.ndarray:
    """codecs/trits.py: byte i = sum_j (v[5i+j] + 1) * 3**j over the row-major values, padded with value 0."""
    digits = np.ones(-(-codes.size // 5) * 5, np.int64)
    digits[: codes.size] = codes.reshape(-1) + 1
    return (digits.reshape(-1, 5) * 3 ** np.arange(5)).sum(axis=1).astype(np.uint8)


# ------------------------------------------------------------------------------------------------- tests


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("p_zero", [1 / 3, 0.9, 1.0])
def test_packers_match_the_references(shape, p_zero):
    codes = random_codes(shape, seed=hash((shape, p_zero)) % 1000, p_zero=p_zero)
    if codes.size % 128 == 0:
        assert same(i2s.pack(codes, 1.4375), i2s_reference(codes, 1.4375))
    if shape[1] % 256 == 0:
        codes[0, :256] = 0  # some all-zero blocks: their d must be 0
        assert same(tq.pack_tq2_0(codes), tq2_0_reference(codes))
        assert same(tq.pack(codes, tq.TQ2_0), tq2_0_reference(codes))
    assert same(trits.pack(codes), trits_reference(codes))
    packed = hf_packed(codes)
    assert same(hf2bit.pack(codes), packed)
    assert same(hf2bit.unpack(packed, shape[0]), codes)


@pytest.mark.parametrize("shape", [s for s in SHAPES if s[1] % 128 == 0])
@pytest.mark.parametrize("p_zero", [1 / 3, 1.0])
def test_transcoders_match_the_references(shape, p_zero):
    codes = random_codes(shape, seed=7, p_zero=p_zero)
    if shape[1] % 256 == 0:
        codes[3, 256:512] = 0  # one all-zero block in a later plane
    packed = hf_packed(codes)
    assert same(i2s.from_hf2bit(packed, shape[0], np.float32(1.53)), i2s_reference(codes, np.float32(1.53)))
    if shape[1] % 256 == 0:
        assert same(tq.tq2_0_from_hf2bit(packed, shape[0]), tq2_0_reference(codes))
    assert same(trits.from_hf2bit(packed, shape[0]), trits_reference(codes))


@pytest.mark.parametrize("shape", [(4, 1), (4, 3), (8, 7), (12, 33), (20, 6912 // 27), (5, 256), (7, 128)])
def test_transcoders_on_odd_shapes(shape):
    """Groups of five that straddle rows and planes, a partial last byte, padded HF rows (out % 4 != 0)."""
    codes = random_codes(shape, seed=shape[1])
    packed = hf_packed(codes)
    assert same(trits.from_hf2bit(packed, shape[0]), trits_reference(codes))
    if codes.size % 128 == 0:
        assert same(i2s.from_hf2bit(packed, shape[0], 2.0), i2s_reference(codes, 2.0))
    if shape[1] % 256 == 0:
        assert same(tq.tq2_0_from_hf2bit(packed, shape[0]), tq2_0_reference(codes))


def test_every_byte_value_transcodes():
    """All 81 valid bytes at every position of a block, as rows of one plane and columns of every group."""
    rng = np.random.default_rng(0)
    for _ in range(4):
        packed = VALID_BYTES[rng.integers(0, 81, (16, 1024))]
        codes = hf_unpacked(packed, 64)
        assert same(hf2bit.unpack(packed, 64), codes)
        assert same(i2s.from_hf2bit(packed[:, :256], 64, 2.0), i2s_reference(codes[:, :256], 2.0))
        assert same(tq.tq2_0_from_hf2bit(packed, 64), tq2_0_reference(codes))
        assert same(trits.from_hf2bit(packed, 64), trits_reference(codes))


@pytest.mark.parametrize("out_features", [1, 5, 6, 7, 9])
def test_unpack_of_padded_rows(out_features):
    codes = random_codes((out_features, 40), seed=out_features)
    assert same(hf2bit.unpack(hf_packed(codes), out_features), codes)


def test_unpack_of_more_dimensions():
    codes = random_codes((8, 3, 5), seed=1)
    packed = hf2bit.pack(codes)
    assert same(hf2bit.unpack(packed, 8), hf_unpacked(packed, 8))


@pytest.mark.parametrize("size", [1, 4, 5, 6, 9, 10, 11, 12, 16 * 5 + 3])
def test_trits_partial_last_byte(size):
    codes = random_codes((size,), seed=size)
    assert same(trits.pack(codes), trits_reference(codes))


@pytest.mark.parametrize("where", [0, 1, 63, 100, 255])
def test_code3_is_refused_everywhere(where):
    packed = hf2bit.pack(random_codes((16, 256), seed=3))
    flat = packed.reshape(-1)
    flat[where] |= 0b11 << (2 * (where % 4))
    for fn in (lambda: hf2bit.unpack(packed, 16), lambda: i2s.from_hf2bit(packed, 16, 1.0),
               lambda: tq.tq2_0_from_hf2bit(packed, 16), lambda: trits.from_hf2bit(packed, 16)):
        with pytest.raises(CorruptData, match="invalid code 3"):
            fn()


def test_has_code3_on_odd_lengths():
    for n in range(1, 20):
        data = np.full(n, 0x55, np.uint8)
        assert not _bits.has_code3(data)
        data[-1] = 0xC0
        assert _bits.has_code3(data)


@pytest.mark.parametrize("bad", [np.array([2, 0], np.int8), np.array([-2, 1], np.int8), np.array([0.5, 1.0]),
                                 np.array([300, 0], np.int16)])
def test_packers_refuse_non_ternary_values(bad):
    codes = np.resize(bad, 256 * 2).reshape(2, 256)
    for fn in (lambda: i2s.pack(codes, 1.0), lambda: tq.pack_tq2_0(codes), lambda: trits.pack(codes)):
        with pytest.raises(ValueError, match=r"must be (-1, 0 or \+1|integers)"):
            fn()


def test_wider_integer_codes_pack_like_int8():
    codes = random_codes((2, 256), seed=5)
    for dtype in (np.int16, np.int64):
        wide = codes.astype(dtype)
        assert same(i2s.pack(wide, 1.0), i2s.pack(codes, 1.0))
        assert same(tq.pack_tq2_0(wide), tq.pack_tq2_0(codes))
        assert same(trits.pack(wide), trits.pack(codes))


def test_shape_errors():
    packed = np.zeros((3, 256), np.uint8)
    for fn in (lambda: hf2bit.unpack(packed, 16), lambda: i2s.from_hf2bit(packed, 16, 1.0),
               lambda: tq.tq2_0_from_hf2bit(packed, 16), lambda: trits.from_hf2bit(packed, 16)):
        with pytest.raises(CorruptData, match="has 3 rows, expected 4 for 16 outputs"):
            fn()
    with pytest.raises(ValueError):
        i2s.pack(np.zeros(100, np.int8), 1.0)
