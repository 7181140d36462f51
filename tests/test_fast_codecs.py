"""bitnet_convert.codecs.fast: the same bytes and the same errors as the reference codecs, on every input."""

import numpy as np
import pytest

from bitnet_convert.codecs import fast, hf2bit, i2s, tq, trits
from bitnet_convert.errors import CorruptData

SHAPES = [(4, 256), (8, 512), (12, 768), (64, 2560), (20, 6912 // 27 * 2)]  # last: in not a multiple of 128
VALID_BYTES = np.array([a | b << 2 | c << 4 | d << 6 for a in range(3) for b in range(3) for c in range(3)
                        for d in range(3)], np.uint8)


def random_codes(shape, seed, p_zero=1 / 3):
    rng = np.random.default_rng(seed)
    p = [(1 - p_zero) / 2, p_zero, (1 - p_zero) / 2]
    return rng.choice(np.array([-1, 0, 1], np.int8), size=shape, p=p)


def same(a: np.ndarray, b: np.ndarray) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("p_zero", [1 / 3, 0.9, 1.0])
def test_packers_match_the_references(shape, p_zero):
    codes = random_codes(shape, seed=hash((shape, p_zero)) % 1000, p_zero=p_zero)
    if codes.size % 128 == 0:
        assert same(fast.i2s_pack(codes, 1.4375), i2s.pack(codes, 1.4375))
    if shape[1] % 256 == 0:
        # some all-zero blocks: their d must be 0
        codes[0, :256] = 0
        assert same(fast.tq2_0_pack(codes), tq.pack_tq2_0(codes))
        assert same(fast.tq2_0_pack(codes), tq.pack(codes, tq.TQ2_0))
    assert same(fast.trits_pack(codes), trits.pack(codes))
    packed = hf2bit.pack(codes)
    assert same(fast.hf2bit_unpack(packed, shape[0]), hf2bit.unpack(packed, shape[0]))


@pytest.mark.parametrize("shape", [s for s in SHAPES if s[1] % 128 == 0])
@pytest.mark.parametrize("p_zero", [1 / 3, 1.0])
def test_transcoders_match_unpack_then_pack(shape, p_zero):
    codes = random_codes(shape, seed=7, p_zero=p_zero)
    packed = hf2bit.pack(codes)
    assert same(fast.hf2bit_to_i2s(packed, shape[0], np.float32(1.53)), i2s.pack(codes, np.float32(1.53)))
    if shape[1] % 256 == 0:
        codes[3, 256:512] = 0  # one all-zero block in a later plane
        packed = hf2bit.pack(codes)
        assert same(fast.hf2bit_to_tq2_0(packed, shape[0]), tq.pack_tq2_0(codes))
    assert same(fast.hf2bit_to_trits(packed, shape[0]), trits.pack(codes))


@pytest.mark.parametrize("shape", [(4, 1), (4, 3), (8, 7), (12, 33), (20, 6912 // 27)])
def test_trits_transcoder_on_odd_widths(shape):
    """Groups of five that straddle rows and planes, and a partial last byte."""
    codes = random_codes(shape, seed=shape[1])
    assert same(fast.hf2bit_to_trits(hf2bit.pack(codes), shape[0]), trits.pack(codes))


def test_every_byte_value_transcodes():
    """All 81 valid bytes at every position of a block, as rows of one plane and columns of every group."""
    rng = np.random.default_rng(0)
    for seed in range(4):
        packed = VALID_BYTES[rng.integers(0, 81, (16, 1024))]
        codes = hf2bit.unpack(packed, 64)
        assert same(fast.hf2bit_unpack(packed, 64), codes)
        assert same(fast.hf2bit_to_i2s(packed, 64, 2.0), i2s.pack(codes, 2.0))
        assert same(fast.hf2bit_to_tq2_0(packed, 64), tq.pack_tq2_0(codes))
        assert same(fast.hf2bit_to_trits(packed, 64), trits.pack(codes))


@pytest.mark.parametrize("out_features", [1, 5, 6, 7, 9])
def test_unpack_of_padded_rows(out_features):
    codes = random_codes((out_features, 40), seed=out_features)
    packed = hf2bit.pack(codes)
    assert same(fast.hf2bit_unpack(packed, out_features), hf2bit.unpack(packed, out_features))


def test_unpack_of_more_dimensions():
    codes = random_codes((8, 3, 5), seed=1)
    packed = hf2bit.pack(codes)
    assert same(fast.hf2bit_unpack(packed, 8), hf2bit.unpack(packed, 8))


@pytest.mark.parametrize("size", [1, 4, 5, 6, 9, 10, 11, 12, 16 * 5 + 3])
def test_trits_partial_last_byte(size):
    codes = random_codes((size,), seed=size)
    assert same(fast.trits_pack(codes), trits.pack(codes))


@pytest.mark.parametrize("where", [0, 1, 63, 100, 255])
def test_code3_is_refused_everywhere(where):
    codes = random_codes((16, 256), seed=3)
    packed = hf2bit.pack(codes)
    flat = packed.reshape(-1)
    flat[where] |= 0b11 << (2 * (where % 4))
    for fn in (lambda: fast.hf2bit_unpack(packed, 16), lambda: fast.hf2bit_to_i2s(packed, 16, 1.0),
               lambda: fast.hf2bit_to_tq2_0(packed, 16), lambda: fast.hf2bit_to_trits(packed, 16)):
        with pytest.raises(CorruptData, match="invalid code 3"):
            fn()
    with pytest.raises(CorruptData):
        hf2bit.unpack(packed, 16)


def test_has_code3_on_odd_lengths():
    for n in range(1, 20):
        data = np.full(n, 0x55, np.uint8)
        assert not fast.has_code3(data)
        data[-1] = 0xC0
        assert fast.has_code3(data)


@pytest.mark.parametrize("bad", [np.array([2, 0], np.int8), np.array([-2, 1], np.int8), np.array([0.5, 1.0]),
                                 np.array([300, 0], np.int16), np.array([1, 0], np.int64)])
def test_unusual_inputs_behave_as_the_references(bad):
    codes = np.resize(bad, 256 * 2).reshape(2, 256)

    def outcome(fn):
        try:
            return fn().tobytes()
        except Exception as exc:  # noqa: BLE001 - comparing the failure itself
            return (type(exc), str(exc))

    assert outcome(lambda: fast.i2s_pack(codes, 1.0)) == outcome(lambda: i2s.pack(codes, 1.0))
    assert outcome(lambda: fast.tq2_0_pack(codes)) == outcome(lambda: tq.pack_tq2_0(codes))
    assert outcome(lambda: fast.trits_pack(codes)) == outcome(lambda: trits.pack(codes))


def test_shape_errors_behave_as_the_references():
    packed = np.zeros((3, 256), np.uint8)
    with pytest.raises(CorruptData) as ref:
        hf2bit.unpack(packed, 16)
    with pytest.raises(CorruptData) as got:
        fast.hf2bit_unpack(packed, 16)
    assert str(got.value) == str(ref.value)
    with pytest.raises(ValueError):
        fast.i2s_pack(np.zeros(100, np.int8), 1.0)
