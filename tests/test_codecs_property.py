"""Property tests of every ternary bit layout: any legal matrix round-trips, anything illegal is refused.

Codecs: HF 2-bit (codecs/hf2bit), base-3 five-per-byte of the .npz (codecs/trits), bitnet.cpp I2_S
(codecs/i2s), llama.cpp TQ1_0 / TQ2_0 (codecs/tq). Example counts stay small so the file runs in seconds.
"""

import numpy as np
import pytest
from gguf import quants
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from reference_extra import transformers_pack_weights

from bitnet_convert.formats.gguf import tq as tq
from bitnet_core.codecs import hf2bit, i2s, trits
from bitnet_core.errors import CorruptData

# No example database: several engineers share this tree, and a failure must reproduce from the seed it prints.
FEW = settings(max_examples=50, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])

TERNARY_VALUES = st.integers(-1, 1)
NOT_TERNARY_INT8 = st.one_of(st.integers(-128, -2), st.integers(2, 127))


def ternary(shape) -> st.SearchStrategy[np.ndarray]:
    """int8 codes of `shape`; hypothesis mixes a fill value with scattered others (so all-zero blocks occur)."""
    return hnp.arrays(np.int8, shape, elements=TERNARY_VALUES)


def hf_shapes():  # any out (not only multiples of 4), any in
    return st.tuples(st.integers(1, 37), st.integers(1, 33))


@st.composite
def i2s_shapes(draw):
    """[out, in] with out*in a multiple of 128: I2_S flattens the matrix and cuts 128-value blocks."""
    blocks = draw(st.integers(1, 6))
    total = blocks * i2s.BLOCK_VALUES
    out = draw(st.sampled_from([d for d in range(1, total + 1) if total % d == 0]))
    return out, total // out


def tq_shapes():  # rows of whole 256-value blocks
    return st.tuples(st.integers(1, 5), st.integers(1, 3).map(lambda k: k * tq.BLOCK_VALUES))


@st.composite
def with_one_bad_value(draw, shapes, values=NOT_TERNARY_INT8):
    """A legal matrix of a drawn shape with one value replaced by a non-ternary one."""
    codes = draw(shapes.flatmap(ternary)).copy()
    flat_index = draw(st.integers(0, codes.size - 1))
    codes.reshape(-1)[flat_index] = draw(values)
    return codes


# ------------------------------------------------------------------------------------------------ HF 2-bit


@FEW
@given(hf_shapes().flatmap(ternary))
def test_hf2bit_round_trips_any_shape(codes):
    packed = hf2bit.pack(codes)
    assert packed.dtype == np.uint8 and packed.shape == (hf2bit.packed_rows(codes.shape[0]), codes.shape[1])
    assert not (((packed >> np.array([0, 2, 4, 6], np.uint8)[:, None, None]) & 3) == 3).any()
    back = hf2bit.unpack(packed, codes.shape[0])
    assert back.dtype == np.int8
    np.testing.assert_array_equal(back, codes)


@FEW
@given(hf_shapes().flatmap(ternary))
def test_hf2bit_is_transformers_pack_weights(codes):
    theirs = transformers_pack_weights(codes)
    np.testing.assert_array_equal(hf2bit.pack(codes), theirs)


@FEW
@given(with_one_bad_value(hf_shapes()))
def test_hf2bit_refuses_non_ternary_codes(codes):
    with pytest.raises(ValueError, match=r"must be -1, 0 or \+1"):
        hf2bit.pack(codes)


@FEW
@given(hf_shapes().flatmap(ternary), st.data())
def test_hf2bit_refuses_code_3(codes, data):
    packed = hf2bit.pack(codes)
    row = data.draw(st.integers(0, packed.shape[0] - 1))
    col = data.draw(st.integers(0, packed.shape[1] - 1))
    plane = data.draw(st.integers(0, 3))
    packed[row, col] |= np.uint8(3 << (2 * plane))
    with pytest.raises(CorruptData, match="invalid code 3"):
        hf2bit.unpack(packed, codes.shape[0])


@FEW
@given(hf_shapes().flatmap(ternary), st.integers(1, 8))
def test_hf2bit_refuses_a_row_count_that_does_not_fit(codes, extra):
    out = codes.shape[0] + 4 * extra  # needs `extra` more packed rows than there are
    with pytest.raises(CorruptData, match="rows, expected"):
        hf2bit.unpack(hf2bit.pack(codes), out)


# ---------------------------------------------------------------------------------------- base-3 (.npz)


def shapes_any():
    return hnp.array_shapes(min_dims=1, max_dims=3, min_side=1, max_side=23)


@FEW
@given(shapes_any().flatmap(ternary))
def test_trits_round_trip_any_shape(codes):
    packed = trits.pack(codes)
    assert packed.dtype == np.uint8 and packed.shape == (-(-codes.size // 5),)
    assert packed.max() <= 242
    back = trits.unpack(packed, codes.shape)
    assert back.dtype == np.int8 and back.shape == codes.shape
    np.testing.assert_array_equal(back, codes)


@FEW
@given(shapes_any().flatmap(ternary))
def test_trits_layout_is_the_documented_one(codes):
    """byte i = sum_j (v[5i+j] + 1) * 3**j over the row-major values, padded with value 0 (digit 1)."""
    digits = np.ones(-(-codes.size // 5) * 5, np.int64)
    digits[: codes.size] = codes.reshape(-1) + 1
    expected = (digits.reshape(-1, 5) * 3 ** np.arange(5)).sum(axis=1)
    np.testing.assert_array_equal(trits.pack(codes), expected)
    # ... and the plain-numpy decoding the README gives
    b = trits.pack(codes)
    decoded = ((b[:, None] // 3 ** np.arange(5)) % 3 - 1).reshape(-1)[: codes.size].reshape(codes.shape)
    np.testing.assert_array_equal(decoded, codes)


@FEW
@given(with_one_bad_value(shapes_any()))
def test_trits_refuse_non_ternary_codes(codes):
    with pytest.raises(ValueError, match=r"must be -1, 0 or \+1"):
        trits.pack(codes)


@FEW
@given(shapes_any().flatmap(ternary), st.data())
def test_trits_refuse_bytes_above_242(codes, data):
    packed = trits.pack(codes)
    packed[data.draw(st.integers(0, packed.size - 1))] = data.draw(st.integers(243, 255))
    with pytest.raises(CorruptData, match=r"invalid byte 2(4[3-9]|5[0-5])"):
        trits.unpack(packed, codes.shape)


@FEW
@given(shapes_any().flatmap(ternary), st.integers(1, 5))
def test_trits_refuse_a_size_that_does_not_fit(codes, extra):
    wrong = (codes.size + 5 * extra,)
    with pytest.raises(CorruptData, match="bytes, expected"):
        trits.unpack(trits.pack(codes), wrong)
    with pytest.raises(CorruptData, match="1-D uint8"):
        trits.unpack(trits.pack(codes).astype(np.int16), codes.shape)


def test_trits_refuse_float_codes():
    with pytest.raises(ValueError, match="must be integers"):
        trits.pack(np.array([0.0, 1.0, 0.5]))


# ------------------------------------------------------------------------------------------------ I2_S


@FEW
@given(i2s_shapes().flatmap(ternary), st.floats(width=32, allow_nan=False, allow_infinity=False))
def test_i2s_round_trips_any_legal_shape(codes, multiplier):
    raw = i2s.pack(codes, multiplier)
    assert raw.dtype == np.uint8 and raw.shape == (codes.size // 4 + 32,) == (i2s.nbytes(codes.size),)
    back, m = i2s.unpack(raw, codes.shape)
    np.testing.assert_array_equal(back, codes)
    assert back.dtype == np.int8
    assert m.dtype == np.float32 and m.tobytes() == np.float32(multiplier).tobytes()


@FEW
@given(i2s_shapes().flatmap(ternary))
def test_i2s_layout_is_the_documented_one(codes):
    """Value 32g + p of each 128-value block sits in byte p of the block at shift 6 - 2g."""
    raw = i2s.pack(codes, 1.0)
    blocks = (codes.reshape(-1, 4, 32).astype(np.int64) + 1)  # [block, g, p]
    expected = (blocks << np.array([6, 4, 2, 0])[None, :, None]).sum(axis=1).reshape(-1)
    np.testing.assert_array_equal(raw[: codes.size // 4], expected)


@FEW
@given(with_one_bad_value(i2s_shapes()))
def test_i2s_refuses_non_ternary_codes(codes):
    with pytest.raises(ValueError, match=r"must be -1, 0 or \+1"):
        i2s.pack(codes, 1.0)


@FEW
@given(i2s_shapes().flatmap(ternary), st.data())
def test_i2s_refuses_code_3(codes, data):
    raw = i2s.pack(codes, 1.0)
    raw[data.draw(st.integers(0, codes.size // 4 - 1))] |= np.uint8(3 << (2 * data.draw(st.integers(0, 3))))
    with pytest.raises(CorruptData, match="invalid code 3"):
        i2s.unpack(raw, codes.shape)


@FEW
@given(st.tuples(st.integers(1, 20), st.integers(1, 300)).filter(lambda s: (s[0] * s[1]) % 128))
def test_i2s_refuses_shapes_that_are_not_whole_blocks(shape):
    with pytest.raises(ValueError, match="multiple of 128"):
        i2s.pack(np.zeros(shape, np.int8), 1.0)
    n = shape[0] * shape[1]
    with pytest.raises(CorruptData, match="128-value blocks"):
        i2s.unpack(np.zeros(n // 4 + 32, np.uint8), shape)


@FEW
@given(i2s_shapes().flatmap(ternary), st.sampled_from([-32, -1, 1, 4]))
def test_i2s_refuses_a_byte_count_that_does_not_fit(codes, delta):
    raw = i2s.pack(codes, 1.0)
    wrong = raw[:delta] if delta < 0 else np.concatenate([raw, np.zeros(delta, np.uint8)])
    with pytest.raises(CorruptData, match="bytes, found"):
        i2s.unpack(wrong, codes.shape)


# ---------------------------------------------------------------------------------------------- TQ1_0 / TQ2_0

TQ_TYPES = pytest.mark.parametrize("qtype", [tq.TQ1_0, tq.TQ2_0], ids=["TQ1_0", "TQ2_0"])


@TQ_TYPES
@FEW
@given(codes=tq_shapes().flatmap(ternary))
def test_tq_round_trips_any_legal_shape(qtype, codes):
    raw = tq.pack(codes, qtype)
    out, n_in = codes.shape
    assert raw.dtype == np.uint8 and raw.shape == (out, tq.row_bytes(qtype, n_in))
    back, d = tq.unpack(raw, qtype, codes.shape)
    np.testing.assert_array_equal(back, codes)
    assert back.dtype == np.int8
    # d is 1 for every block holding a non-zero, 0 for a block of zeros
    nonzero = (codes.reshape(out, -1, tq.BLOCK_VALUES) != 0).any(axis=2)
    np.testing.assert_array_equal(d, nonzero.astype(np.float32))


@FEW
@given(tq_shapes().flatmap(ternary))
def test_tq2_0_direct_packer_is_byte_identical_to_gguf_py(codes):
    np.testing.assert_array_equal(tq.pack_tq2_0(codes), quants.quantize(codes.astype(np.float32), tq.TQ2_0))


@TQ_TYPES
@FEW
@given(codes=with_one_bad_value(tq_shapes()))
def test_tq_refuses_non_ternary_codes(qtype, codes):
    with pytest.raises(ValueError, match=r"must be -1, 0 or \+1"):
        tq.pack(codes, qtype)


@FEW
@given(tq_shapes().flatmap(ternary), st.data())
def test_tq2_0_refuses_code_3(codes, data):
    raw = tq.pack(codes, tq.TQ2_0)
    blocks = raw.reshape(-1, 66)  # qs[64] then f16 d
    block = data.draw(st.integers(0, blocks.shape[0] - 1))
    blocks[block, data.draw(st.integers(0, 63))] |= np.uint8(3 << (2 * data.draw(st.integers(0, 3))))
    with pytest.raises(CorruptData, match="invalid code 3"):
        tq.unpack(raw, tq.TQ2_0, codes.shape)


@FEW
@given(tq_shapes(), st.binary(min_size=48, max_size=48))
def test_tq1_0_has_no_invalid_digits(shape, qs):
    """Every TQ1_0 byte decodes to digits 0..2, so damaged TQ1_0 data cannot be detected (unlike code 3)."""
    out, n_in = shape
    raw = np.zeros((out * n_in // tq.BLOCK_VALUES, 54), np.uint8)
    raw[:, :48] = np.frombuffer(qs, np.uint8)
    codes, _ = tq.unpack(raw.reshape(out, -1), tq.TQ1_0, shape)
    assert set(np.unique(codes)) <= {-1, 0, 1}


@TQ_TYPES
@FEW
@given(shape=st.tuples(st.integers(1, 4), st.integers(1, 700).filter(lambda n: n % 256)))
def test_tq_refuses_rows_that_are_not_whole_blocks(qtype, shape):
    with pytest.raises(ValueError, match="multiple of 256"):
        tq.pack(np.zeros(shape, np.int8), qtype)
    with pytest.raises(CorruptData, match="not whole 256-value blocks"):
        tq.unpack(np.zeros(64, np.uint8), qtype, shape)


@TQ_TYPES
def test_tq_refuses_a_one_dimensional_tensor(qtype):
    with pytest.raises(ValueError, match="multiple of 256"):
        tq.pack(np.zeros(512, np.int8), qtype)


@TQ_TYPES
@FEW
@given(codes=tq_shapes().flatmap(ternary), delta=st.sampled_from([-66, -1, 1, 54]))
def test_tq_refuses_a_byte_count_that_does_not_fit(qtype, codes, delta):
    raw = tq.pack(codes, qtype).reshape(-1)
    wrong = raw[:delta] if delta < 0 else np.concatenate([raw, np.zeros(delta, np.uint8)])
    with pytest.raises(CorruptData, match="bytes, found"):
        tq.unpack(wrong, qtype, codes.shape)


# ------------------------------------------------- values a narrowing cast would wrap into {-1, 0, +1}

# A packer that casts to int16/int8/uint8 before checking the range accepts these as legal codes.
WRAPPING = [(np.int16, 255), (np.int16, 256), (np.int32, 65535), (np.int32, 65536), (np.int64, 2**32), (np.float32, 0.5)]
PACKERS = {
    "hf2bit": hf2bit.pack,
    "trits": trits.pack,
    "i2s": lambda c: i2s.pack(c, 1.0),
    "tq1_0": lambda c: tq.pack(c, tq.TQ1_0),
    "tq2_0": lambda c: tq.pack(c, tq.TQ2_0),
}
@pytest.mark.parametrize(
    "codec, dtype, value",
    [
        pytest.param(name, t, v, id=f"{name}-{t.__name__}-{v}")
        for name in PACKERS
        for t, v in WRAPPING
    ],
)
def test_values_that_wrap_in_a_narrow_cast_are_refused(codec, dtype, value):
    codes = np.zeros((2, 256), dtype)
    codes[1, 7] = value
    with pytest.raises(ValueError, match=r"must be (-1, 0 or \+1|integers)"):
        PACKERS[codec](codes)
